"""The Capsule lifecycle: allowed steps, the wipe that no path may skip, and idempotent admission."""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime, timedelta

import kopf
import pytest

from trustcap.operator import capsule
from trustcap.operator import lifecycle as lc
from trustcap.operator.errors import InvalidTransition

P = lc.Phase
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_table_covers_every_phase() -> None:
    assert set(lc.TRANSITIONS) == set(P)
    assert set(lc.READY_BY_PHASE) == set(P)
    assert {p for p, nxt in lc.TRANSITIONS.items() if not nxt} == lc.TERMINAL


def _paths_to_terminal(start: lc.Phase) -> list[list[lc.Phase]]:
    out: list[list[lc.Phase]] = []
    todo: deque[list[lc.Phase]] = deque([[start]])
    while todo:
        path = todo.popleft()
        nxt = lc.TRANSITIONS[path[-1]]
        if not nxt:
            out.append(path)
        todo.extend([*path, n] for n in nxt if n not in path)
    return out


@pytest.mark.parametrize("start", sorted(lc.HOLDS_DATA))
def test_no_path_from_an_executor_holding_data_skips_the_wipe(start: lc.Phase) -> None:
    paths = _paths_to_terminal(start)
    assert paths
    for path in paths:
        assert P.WIPING in path, path


def test_every_phase_reaches_an_end() -> None:
    for phase in P:
        assert _paths_to_terminal(phase)


@pytest.mark.parametrize(
    ("old", "new", "ok"),
    [
        pytest.param(None, P.PENDING, True, id="start-pending"),
        pytest.param(None, P.RUNNING, False, id="start-running"),
        pytest.param(P.PENDING, P.PENDING, True, id="stay"),
        pytest.param(P.PENDING, P.SCHEDULED, True, id="schedule"),
        pytest.param(P.PENDING, P.RUNNING, False, id="skip-attestation"),
        pytest.param(P.SCHEDULED, P.FAILED, True, id="fail-before-data"),
        pytest.param(P.RUNNING, P.FAILED, False, id="fail-without-wipe"),
        pytest.param(P.RUNNING, P.COMPLETED, False, id="complete-without-wipe"),
        pytest.param(P.RUNNING, P.WIPING, True, id="abort-through-wipe"),
        pytest.param(P.WIPING, P.COMPLETED, True, id="complete"),
        pytest.param(P.COMPLETED, P.RUNNING, False, id="completed-is-final"),
        pytest.param(P.FAILED, P.PENDING, False, id="failed-is-final"),
    ],
)
def test_check_transition(old: lc.Phase | None, new: lc.Phase, ok: bool) -> None:
    if ok:
        lc.check_transition(old, new)
    else:
        with pytest.raises(InvalidTransition):
            lc.check_transition(old, new)


def test_unknown_phase_in_status_is_refused() -> None:
    with pytest.raises(InvalidTransition, match=r"status\.phase"):
        lc.admit({"phase": "Exploding"}, generation=1, now=T0)


def test_admit_new_capsule() -> None:
    change = lc.admit({}, generation=1, now=T0)
    assert change is not None
    assert change.phase is P.PENDING and change.observed_generation == 1 and change.warn
    assert change.ready["reason"] == "AwaitingScheduling" and change.ready["status"] == "False"


def _as_status(change: lc.StatusChange) -> dict[str, object]:
    return {"phase": str(change.phase), "observedGeneration": change.observed_generation,
            "conditions": change.conditions}


def test_admit_is_idempotent() -> None:
    first = lc.admit(None, generation=1, now=T0)
    assert first is not None
    assert lc.admit(_as_status(first), generation=1, now=T0 + timedelta(hours=1)) is None


def test_admit_refreshes_generation_without_moving_the_transition_time() -> None:
    first = lc.admit(None, generation=1, now=T0)
    assert first is not None
    again = lc.admit(_as_status(first), generation=2, now=T0 + timedelta(hours=1))
    assert again is not None and again.observed_generation == 2 and not again.warn
    assert again.ready["lastTransitionTime"] == first.ready["lastTransitionTime"]


@pytest.mark.parametrize("phase", [p for p in P if p is not P.PENDING])
def test_admit_never_moves_a_later_phase_back(phase: lc.Phase) -> None:
    assert lc.admit({"phase": str(phase)}, generation=1, now=T0) is None


def test_move_to_completed_is_ready_and_quiet() -> None:
    status = {"phase": "Wiping"}
    change = lc.move_to(status, P.COMPLETED, generation=1, now=T0)
    assert change is not None and change.ready["status"] == "True" and not change.warn


def test_move_to_failed_warns_with_the_given_message() -> None:
    change = lc.move_to({"phase": "Wiping"}, P.FAILED, generation=1, now=T0, message="wipe proof mismatch")
    assert change is not None and change.warn and change.ready["message"] == "wipe proof mismatch"


class _Kube:
    """The one read release_capsule makes: the run order, here still running."""

    def __init__(self, run: dict | None) -> None:
        self.run, self.stopped = run, ""

    def get(self, plural: str, namespace: str, name: str) -> dict | None:
        return self.run

    def patch_spec(self, plural: str, namespace: str, name: str, spec: dict) -> None:
        self.stopped = spec["stop"]


class _Memo:
    def __init__(self, kube: _Kube) -> None:
        self.capsules = capsule.Settings(kube=kube)  # type: ignore[arg-type]


def _release(status: dict, kube: _Kube) -> None:
    capsule.release_capsule(status=status, meta={"uid": "u-1"}, name="c", namespace="ns", memo=_Memo(kube),
                            logger=_NoLog())


@pytest.mark.parametrize("phase", sorted(lc.HOLDS_DATA - {P.ATTESTING}))
def test_release_stops_the_run_and_waits_for_its_wipe(phase: lc.Phase) -> None:
    kube = _Kube({"metadata": {"name": "run-x"}, "spec": {"stop": ""}, "status": {"phase": "Running"}})
    with pytest.raises(kopf.TemporaryError, match="wiped"):
        _release({"phase": str(phase)}, kube)
    assert kube.stopped == "Deleted"


def test_release_lets_go_once_the_run_reports_its_wipe() -> None:
    kube = _Kube({"metadata": {"name": "run-x"}, "spec": {"stop": "Deleted"},
                  "status": {"phase": "Failed", "reason": "Stopped", "wipe": {"verified": True}}})
    _release({"phase": "Running"}, kube)


def test_release_lets_an_attesting_capsule_go_before_any_run_order() -> None:
    _release({"phase": "Attesting"}, _Kube(None))  # no run order: no input was released to anyone


@pytest.mark.parametrize("phase", ["Running", "Sealing", "Wiping"])
def test_release_holds_a_running_capsule_whose_run_order_is_missing(phase: str) -> None:
    with pytest.raises(kopf.TemporaryError, match="wiped"):
        _release({"phase": phase}, _Kube(None))


@pytest.mark.parametrize("phase", [None, "Pending", "Scheduled", "Completed", "Failed", "Bogus"])
def test_release_lets_go_otherwise(phase: str | None) -> None:
    _release({"phase": phase} if phase else {}, _Kube(None))


class _NoLog:
    def info(self, *args: object) -> None:
        pass
