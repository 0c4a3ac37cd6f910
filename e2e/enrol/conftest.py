"""Fixtures for the enrolment e2e: our CRDs on the stack's real API server, the operator as a real
process (one per module), and a tracker that deletes the cluster-scoped objects a test made. Thin
wrappers over e2e/clusterkit.py, which the netboot join uses too."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from clusterkit import Cluster, Proc, apply_node_crds, operator_env, running_operator, tracked_cluster


@pytest.fixture(scope="session")
def enrol_crds(kubectl: Any) -> None:
    apply_node_crds(kubectl)


@pytest.fixture
def cluster(k8s_api: Any, enrol_crds: None) -> Iterator[Cluster]:
    with tracked_cluster(k8s_api) as tracker:
        yield tracker


@pytest.fixture(scope="module")
def child_env(kube_env: dict[str, str]) -> dict[str, str]:
    return operator_env(kube_env)


@pytest.fixture(scope="module")
def operator_proc(child_env: dict[str, str], enrol_crds: None,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    with running_operator(child_env, tmp_path_factory.mktemp("operator") / "operator.log") as op:
        yield op
