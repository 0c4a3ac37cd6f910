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


def _warnings(kubectl: Any, name: str) -> list[str]:
    out = kubectl("get", "events", "-n", NAMESPACE, "--field-selector",
                  f"involvedObject.name={name},type=Warning", "-o",
                  "jsonpath={range .items[*]}{.reason}{'\\n'}{end}").stdout
    return [line for line in out.splitlines() if line]


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
    wait_for("the Warning event", lambda: "AwaitingScheduling" in _warnings(kubectl, name), timeout=30)

    table = kubectl("get", "capsules", "-n", NAMESPACE).stdout.splitlines()
    header = table[0].split()
    assert header[:4] == ["NAME", "READY", "PHASE", "COMMITTEE"] and header[-1] == "AGE"
    row = next(line.split() for line in table[1:] if line.split()[0] == name)
    assert row[1:4] == ["False", "Pending", "3"]
    wide = kubectl("get", "capsule", name, "-n", NAMESPACE, "-o", "wide").stdout
    assert "AwaitingScheduling" in wide and "VRF sortition" in wide  # long message only with -o wide


def test_restart_resumes_without_rewriting(operator: OperatorProcess, capsules: Tracker, kubectl: Any) -> None:
    name = unique("resume")
    capsules.create(psi_capsule(name))
    admitted = _pending(capsules, name)
    wait_for("the Warning event", lambda: _warnings(kubectl, name), timeout=30)
    # Age the condition, as if it had waited since long ago: a resume that re-stamped it would show.
    aged = dict(_ready(admitted) or {}, lastTransitionTime="2025-01-01T00:00:00Z")
    before = capsules.patch_status(name, {"conditions": [aged]})

    operator.stop()
    mark = len(operator.log())
    operator.start()
    wait_for("the operator to resume the capsule",
             lambda: f"[{NAMESPACE}/{name}] Resuming is processed" in operator.log()[mark:], timeout=60)

    after = capsules.get(name)
    assert _ready(after) == aged  # same lastTransitionTime: nothing flipped, nothing re-stamped
    assert after["status"] == before["status"]
    assert _warnings(kubectl, name) == ["AwaitingScheduling"]  # no second Warning for the same state


def test_deletion_waits_while_an_executor_may_hold_data(
        running_operator: OperatorProcess, capsules: Tracker) -> None:
    """A capsule deleted mid-run stays (finalizer) until its executor is wiped, then goes."""
    name = unique("hold")
    capsules.create(psi_capsule(name))
    _pending(capsules, name)
    capsules.patch_status(name, {"phase": "Running"})  # the later stages' job; played here
    mark = len(running_operator.log())
    capsules.custom.delete_namespaced_custom_object("trustcap.io", "v1alpha1", NAMESPACE, "capsules", name)

    wait_for("the operator to refuse the release",
             lambda: "deletion waits until the executor is wiped" in running_operator.log()[mark:], timeout=60)
    held = capsules.get(name)
    assert held["metadata"].get("deletionTimestamp") and FINALIZER in held["metadata"]["finalizers"]

    capsules.patch_status(name, {"phase": "Wiping"})
    capsules.patch_status(name, {"phase": "Completed"})

    def gone() -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            capsules.get(name)
        except ApiException as exc:
            return bool(exc.status == 404)
        return False

    wait_for("the capsule to be released after its wipe", gone, timeout=60)
