"""Fixtures for the platform e2e tests: our CRDs installed on the stack's real API server, a namespace of
our own, a tracker that deletes what a test created, and the operator as a real process.

The stack runs no controller-manager, so a deleted namespace would stay Terminating forever
(docs/decisions/0002): the namespace is kept and reused, and each test deletes its own objects.
CRDs are applied (idempotent) and never deleted: other suites use them too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from platformkit import CRD_DIR, NAMESPACE, OperatorProcess, Tracker, crd_names


@pytest.fixture(scope="session")
def trustcap_crds(kubectl: Any) -> list[str]:
    names = crd_names()
    kubectl("apply", "-f", str(CRD_DIR))
    kubectl("wait", "--for=condition=Established", *(f"crd/{n}" for n in names), "--timeout=60s", timeout=90)
    return names


@pytest.fixture(scope="session")
def platform_ns(kubectl: Any, trustcap_crds: list[str]) -> str:
    kubectl("apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}))
    return NAMESPACE


@pytest.fixture(scope="session")
def custom(k8s_api: Any) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(k8s_api)


@pytest.fixture
def capsules(custom: Any, platform_ns: str) -> Iterator[Tracker]:
    tracker = Tracker(custom)
    try:
        yield tracker
    finally:
        tracker.cleanup()


@pytest.fixture(scope="module")
def operator(kube_env: dict[str, str], platform_ns: str, tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[OperatorProcess]:
    env = dict(kube_env)
    env.pop("PYTHONPATH", None)  # never let the repo root shadow the stdlib `operator` module
    op = OperatorProcess(env=env, log_path=tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    try:
        yield op
    finally:
        op.stop()
        if os.environ.get("TRUSTCAP_E2E_SHOW_LOGS"):
            print(op.log())
