"""Conditions with a frozen clock: lastTransitionTime moves only when the status flips (cert-manager)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from trustcap.operator import conditions as c
from trustcap.operator.errors import InvalidCondition

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = T0 + timedelta(minutes=7)


def _set(conds: list[c.Condition] | None, status: c.ConditionStatus = "False", reason: str = "AwaitingScheduling",
         message: str = "waiting", gen: int = 1, now: datetime = T0) -> c.ConditionUpdate:
    return c.set_condition(conds, type_=c.READY, status=status, reason=reason, message=message,
                           observed_generation=gen, now=now)


def test_new_condition_is_stamped_and_flipped() -> None:
    up = _set(None)
    assert up.flipped and up.changed
    assert up.conditions == [{
        "type": "Ready", "status": "False", "reason": "AwaitingScheduling", "message": "waiting",
        "lastTransitionTime": "2026-01-02T03:04:05Z", "observedGeneration": 1,
    }]


@pytest.mark.parametrize(
    ("status", "reason", "message", "gen", "flipped", "changed", "stamp"),
    [
        pytest.param("False", "AwaitingScheduling", "waiting", 1, False, False, "2026-01-02T03:04:05Z",
                     id="identical-no-change"),
        pytest.param("False", "Scheduled", "waiting", 1, False, True, "2026-01-02T03:04:05Z",
                     id="reason-only-keeps-time"),
        pytest.param("False", "AwaitingScheduling", "still waiting", 1, False, True, "2026-01-02T03:04:05Z",
                     id="message-only-keeps-time"),
        pytest.param("False", "AwaitingScheduling", "waiting", 2, False, True, "2026-01-02T03:04:05Z",
                     id="generation-only-keeps-time"),
        pytest.param("True", "Completed", "done", 1, True, True, "2026-01-02T03:11:05Z", id="flip-moves-time"),
        pytest.param("Unknown", "AwaitingScheduling", "waiting", 1, True, True, "2026-01-02T03:11:05Z",
                     id="flip-to-unknown-moves-time"),
    ],
)
def test_second_set_at_a_later_time(status: c.ConditionStatus, reason: str, message: str, gen: int,
                                    flipped: bool, changed: bool, stamp: str) -> None:
    first = _set(None).conditions
    up = _set(first, status=status, reason=reason, message=message, gen=gen, now=T1)
    assert (up.flipped, up.changed) == (flipped, changed)
    assert up.condition["lastTransitionTime"] == stamp
    assert (up.condition["reason"], up.condition["message"], up.condition["observedGeneration"]) == \
        (reason, message, gen)


def test_other_conditions_are_kept_in_order_and_untouched() -> None:
    other = {"type": "Scheduled", "status": "True", "reason": "X", "message": "m",
             "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 1}
    first = _set([other], now=T0).conditions
    assert [x["type"] for x in first] == ["Scheduled", "Ready"]
    up = _set(first, status="True", reason="Completed", now=T1)
    assert [x["type"] for x in up.conditions] == ["Scheduled", "Ready"]
    assert up.conditions[0] == other
    assert up.conditions[0] is not other  # a copy: the caller's status object is never mutated


def test_input_list_is_not_mutated() -> None:
    first = _set(None).conditions
    snapshot = [dict(x) for x in first]
    _set(first, status="True", reason="Completed", now=T1)
    assert first == snapshot


def test_missing_transition_time_is_repaired() -> None:
    broken = [{"type": "Ready", "status": "False", "reason": "AwaitingScheduling", "message": "waiting",
               "observedGeneration": 1}]
    up = _set(broken, now=T1)
    assert up.condition["lastTransitionTime"] == "2026-01-02T03:11:05Z" and up.changed


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        pytest.param({"status": "Maybe"}, "status", id="bad-status"),
        pytest.param({"reason": "awaiting scheduling"}, "reason", id="reason-with-space"),
        pytest.param({"reason": ""}, "reason", id="empty-reason"),
        pytest.param({"reason": "9Lives"}, "reason", id="reason-starts-with-digit"),
        pytest.param({"gen": -1}, "observedGeneration", id="negative-generation"),
    ],
)
def test_invalid_conditions_are_refused(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidCondition, match=needle):
        _set(None, **kwargs)  # type: ignore[arg-type]


def test_long_message_is_truncated_to_the_crd_bound() -> None:
    up = _set(None, message="x" * (c.MAX_MESSAGE + 10))
    assert len(up.condition["message"]) == c.MAX_MESSAGE


def test_time_format_is_utc_z() -> None:
    plus2 = timezone(timedelta(hours=2))
    assert c.format_time(datetime(2026, 1, 2, 5, 4, 5, 999, tzinfo=plus2)) == "2026-01-02T03:04:05Z"
    with pytest.raises(ValueError, match="naive"):
        c.format_time(datetime(2026, 1, 2))


def test_lookup_helpers() -> None:
    conds = _set(None, status="True", reason="Completed").conditions
    assert c.get_condition(conds, "Ready") is not None
    assert c.get_condition(conds, "Wiped") is None
    assert c.is_true(conds, "Ready") and not c.is_true(conds, "Wiped") and not c.is_true(None, "Ready")
