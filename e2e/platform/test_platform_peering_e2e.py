"""Leader election between two real operator processes through kopf peering on the real API server.

Two replicas share one KopfPeering object: the higher priority one acts, the other pauses; when the
leader stops, the follower takes over. Without this, two replicas would both admit (and later both
schedule) every capsule.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from platformkit import NAMESPACE, ROOT, OperatorProcess, Tracker, psi_capsule, unique, wait_for

PEERING_CRDS = ROOT / "crds" / "kopf-peering"


@pytest.fixture
def peering(kubectl: Any, platform_ns: str) -> Iterator[str]:
    kubectl("apply", "-f", str(PEERING_CRDS))
    kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev", "crd/clusterkopfpeerings.kopf.dev",
            "--timeout=60s", timeout=90)
    name = unique("peering")
    kubectl("apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": name, "namespace": NAMESPACE}}))
    try:
        yield name
    finally:
        kubectl("delete", "kopfpeering", name, "-n", NAMESPACE, "--ignore-not-found")


def _replica(kube_env: dict[str, str], log_dir: Path, peering: str, priority: int) -> OperatorProcess:
    env = dict(kube_env)
    env.pop("PYTHONPATH", None)
    return OperatorProcess(env=env, log_path=log_dir / f"operator-{priority}.log",
                           args=("--peering", peering, "--priority", str(priority)))


def _admitted_by(op: OperatorProcess, name: str) -> bool:
    return f"[{NAMESPACE}/{name}] Creation is processed" in op.log()


def test_one_leader_acts_and_a_follower_takes_over(
        kube_env: dict[str, str], peering: str, capsules: Tracker, tmp_path: Path) -> None:
    leader = _replica(kube_env, tmp_path, peering, 200)
    follower = _replica(kube_env, tmp_path, peering, 100)
    try:
        leader.start()
        wait_for("the leader to take the lead", lambda: "Resuming operations after the pause" in leader.log(),
                 timeout=60)
        follower.start()
        # With mandatory peering a replica starts paused; it joins (keep-alive) and stays paused silently.
        wait_for("the follower to join", lambda: f"Keep-alive in '{peering}'" in follower.log(), timeout=60)
        assert "Resuming operations" not in follower.log()

        first = unique("led")
        capsules.create(psi_capsule(first))
        wait_for("the leader to admit the capsule", lambda: _admitted_by(leader, first), timeout=60)
        assert capsules.get(first)["status"]["phase"] == "Pending"
        assert not _admitted_by(follower, first), "a paused replica acted"

        leader.stop()  # a clean exit removes the leader's entry from the peering object
        wait_for("the follower to resume", lambda: "Resuming operations after the pause" in follower.log(),
                 timeout=90)
        second = unique("taken")
        capsules.create(psi_capsule(second))
        wait_for("the follower to admit the next capsule", lambda: _admitted_by(follower, second), timeout=60)
        assert capsules.get(second)["status"]["phase"] == "Pending"
    finally:
        leader.stop()
        follower.stop()
