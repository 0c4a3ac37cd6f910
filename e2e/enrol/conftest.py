"""Fixtures for the enrolment e2e: our CRDs on the stack's real API server, the operator as a real
process (one per module), and a tracker that deletes the cluster-scoped objects a test made."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from enrolkit import OPERATOR_NS, Cluster, Proc, start_operator

CRD_DIR = Path(__file__).resolve().parents[2] / "crds"


@pytest.fixture(scope="session")
def enrol_crds(kubectl: Any) -> None:
    files = [str(CRD_DIR / f) for f in ("hpcnode.yaml", "gateway.yaml", "bootimage.yaml")]
    kubectl("apply", *(a for f in files for a in ("-f", f)))
    kubectl("wait", "--for=condition=Established", "crd/hpcnodes.trustcap.io", "crd/gateways.trustcap.io",
            "crd/bootimages.trustcap.io", "--timeout=60s", timeout=90)
    # kopf watches nothing while its namespace filter matches no namespace; kept, never deleted (decision 0002)
    kubectl("apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NS}}))


@pytest.fixture
def cluster(k8s_api: Any, enrol_crds: None) -> Iterator[Cluster]:
    from kubernetes import client

    tracker = Cluster(client.CustomObjectsApi(k8s_api), client.CoreV1Api(k8s_api))
    try:
        yield tracker
    finally:
        tracker.cleanup()


@pytest.fixture(scope="module")
def child_env(kube_env: dict[str, str]) -> dict[str, str]:
    env = dict(kube_env)
    env.pop("PYTHONPATH", None)  # never let the repo root shadow the stdlib `operator` module
    env.pop("TRUSTCAP_CHAIN_DEPLOYMENT", None)  # the chain-writer stays off: not under test here
    return env


@pytest.fixture(scope="module")
def operator_proc(child_env: dict[str, str], enrol_crds: None,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    op = start_operator(child_env, tmp_path_factory.mktemp("operator") / "operator.log")
    try:
        yield op
    finally:
        op.stop()
        if os.environ.get("TRUSTCAP_E2E_SHOW_LOGS"):
            print(op.text())
