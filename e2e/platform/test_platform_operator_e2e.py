"""The operator as a real process (`python -m trustcap.operator`) against the real API server.

It admits a new Capsule (phase Pending, Ready=False/AwaitingScheduling, observedGeneration, finalizer,
one Warning event), resumes after a restart without touching what it already wrote, and holds a Capsule
whose executor may still hold data until the wipe is done.
"""

from __future__ import annotations

from typing import Any

import pytest
from platformkit import NAMESPACE, OperatorProcess, Tracker, psi_capsule, unique, wait_for

FINALIZER = "trustcap.io/cleanup"


SYSTEM_NS = "trustcap-system"  # the operator's default system namespace (decision 0090)


def _ready(obj: dict[str, Any]) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == "Ready":
            return dict(cond)
    return None


def _pending(capsules: Tracker, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = wait_for(
        f"capsule {name} to be Pending",
        lambda: (o := capsules.get(name)) and (o.get("status") or {}).get("phase") == "Pending" and o,
    )
    return obj


def _events(kubectl: Any, name: str, kind: str) -> list[str]:
    out = kubectl("get", "events", "-n", NAMESPACE, "--field-selector",
                  f"involvedObject.name={name},type={kind}", "-o",
                  "jsonpath={range .items[*]}{.reason}{'\\n'}{end}").stdout
    return [line for line in out.splitlines() if line]


def _warnings(kubectl: Any, name: str) -> list[str]:
    return _events(kubectl, name, "Warning")


def _normal(kubectl: Any, name: str) -> list[str]:
    return _events(kubectl, name, "Normal")


def _awaiting_funding(capsules: Tracker, name: str) -> dict[str, Any]:
    """Admitted and given its task id: the controller's last write while no chain funds it."""
    obj: dict[str, Any] = wait_for(
        f"capsule {name} to await funding",
        lambda: (o := capsules.get(name)) and any(c["type"] == "Funded" for c in (o.get("status") or {}).get(
            "conditions") or []) and o)
    return obj


@pytest.fixture
def running_operator(operator: OperatorProcess) -> OperatorProcess:
    if not operator.alive():
        pytest.fail(f"the operator process died:\n{operator.log()[-4000:]}")
    return operator


def test_new_capsule_becomes_pending_with_a_ready_condition(
        running_operator: OperatorProcess, capsules: Tracker, kubectl: Any) -> None:
    name = unique("admit")
    capsules.create(psi_capsule(name))
    obj = _pending(capsules, name)
    ready = _ready(obj)
    assert ready is not None, obj.get("status")
    assert (ready["status"], ready["reason"]) == ("False", "AwaitingScheduling")
    assert ready["observedGeneration"] == obj["metadata"]["generation"]
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert FINALIZER in obj["metadata"]["finalizers"]
    # Progress is a Normal event; a healthy capsule leaves no Warning (Kubernetes users read Warnings as faults).
    wait_for("the Normal event", lambda: "AwaitingScheduling" in _normal(kubectl, name), timeout=30)
    funded = _awaiting_funding(capsules, name)
    assert funded["status"]["taskId"].startswith("0x") and "trustcap escrow fund --task-id" in str(funded["status"])
    assert _warnings(kubectl, name) == []

    table = kubectl("get", "capsules", "-n", NAMESPACE).stdout.splitlines()
    header = table[0].split()
    assert header[:4] == ["NAME", "READY", "PHASE", "OUTCOME"] and header[-1] == "AGE"
    row = next(line.split() for line in table[1:] if line.split()[0] == name)
    assert row[1:3] == ["False", "Pending"]
    wide = kubectl("get", "capsule", name, "-n", NAMESPACE, "-o", "wide").stdout
    assert "AwaitingScheduling" in wide and "VRF sortition" in wide  # long message only with -o wide


def test_restart_resumes_without_rewriting(operator: OperatorProcess, capsules: Tracker, kubectl: Any) -> None:
    name = unique("resume")
    capsules.create(psi_capsule(name))
    _pending(capsules, name)
    admitted = _awaiting_funding(capsules, name)
    wait_for("the Normal event", lambda: _normal(kubectl, name), timeout=30)
    # Age the condition, as if it had waited since long ago: a resume that re-stamped it would show.
    aged = dict(_ready(admitted) or {}, lastTransitionTime="2025-01-01T00:00:00Z")
    others = [c for c in admitted["status"]["conditions"] if c["type"] != "Ready"]
    before = capsules.patch_status(name, {"conditions": [aged, *others]})

    operator.stop()
    mark = len(operator.log())
    operator.start()
    wait_for("the operator to resume the capsule",
             lambda: f"[{NAMESPACE}/{name}] Resuming is processed" in operator.log()[mark:], timeout=60)

    after = capsules.get(name)
    assert _ready(after) == aged  # same lastTransitionTime: nothing flipped, nothing re-stamped
    assert after["status"] == before["status"]
    assert _normal(kubectl, name).count("AwaitingScheduling") == 1  # no second event for the same state
    assert _warnings(kubectl, name) == []


def test_deletion_waits_while_an_executor_may_hold_data(
        running_operator: OperatorProcess, capsules: Tracker) -> None:
    """A capsule deleted mid-run stays (finalizer): the operator tells its run to stop, and lets the object
    go only when the executor's gateway reports the run ended with its wipe."""
    name = unique("hold")
    capsules.create(psi_capsule(name))
    task = _awaiting_funding(capsules, name)["status"]["taskId"]
    run_name = f"run-{task[2:18]}"
    runs = capsules.custom
    runs.create_namespaced_custom_object("trustcap.io", "v1alpha1", SYSTEM_NS, "capsuleruns", {
        "apiVersion": "trustcap.io/v1alpha1", "kind": "CapsuleRun", "metadata": {"name": run_name},
        "spec": {"capsuleRef": {"namespace": NAMESPACE, "name": name, "uid": task[2:10]}, "taskId": task,
                 "executor": "0x" + "ab" * 20, "preRound": "played-here", "stop": ""}})
    try:
        runs.patch_namespaced_custom_object_status("trustcap.io", "v1alpha1", SYSTEM_NS, "capsuleruns", run_name,
                                                   {"status": {"phase": "Running"}})
        capsules.patch_status(name, {"phase": "Running"})  # the later stages' job, played here
        mark = len(running_operator.log())
        capsules.custom.delete_namespaced_custom_object("trustcap.io", "v1alpha1", NAMESPACE, "capsules", name)

        wait_for("the operator to refuse the release",
                 lambda: "deletion waits until the executor is wiped" in running_operator.log()[mark:], timeout=60)
        held = capsules.get(name)
        assert held["metadata"].get("deletionTimestamp") and FINALIZER in held["metadata"]["finalizers"]
        run = runs.get_namespaced_custom_object("trustcap.io", "v1alpha1", SYSTEM_NS, "capsuleruns", run_name)
        assert run["spec"]["stop"] == "Deleted"  # the executor's gateway is told to stop and wipe

        runs.patch_namespaced_custom_object_status("trustcap.io", "v1alpha1", SYSTEM_NS, "capsuleruns", run_name, {
            "status": {"phase": "Failed", "reason": "Stopped", "wipe": {"verified": True}}})

        def gone() -> bool:
            from kubernetes.client.exceptions import ApiException

            try:
                capsules.get(name)
            except ApiException as exc:
                return bool(exc.status == 404)
            return False

        wait_for("the capsule to be released after its wipe", gone, timeout=60)
    finally:
        runs.delete_namespaced_custom_object("trustcap.io", "v1alpha1", SYSTEM_NS, "capsuleruns", run_name)
