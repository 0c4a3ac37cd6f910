"""The monitor's `stop` is checked, not assumed (issue 12 item 20): the real server, channel and agent.

An agent whose stop leaves the run going (it answers `running: true`), or that answers without saying,
has not stopped anything: the record says so and the stop escalates to quarantine. Control: an agent
that confirms (`running: false`) gets the plain stop and no quarantine.
"""

from __future__ import annotations

from typing import Any

import pytest

from trustcap.gateway.monitor import STOP_FAILURES, Monitor
from trustcap.gateway.policy import parse_gateway_policy


def _monitor(pair: Any, policy_yaml: Any, acted: list[str]) -> Monitor:
    hooks = {"stop": lambda r: acted.append("stop"), "quarantine": lambda r: acted.append("quarantine")}
    return Monitor(pair.server, parse_gateway_policy(policy_yaml()), on_action=hooks)


@pytest.mark.parametrize("answer", [
    pytest.param({"stopped": False, "running": True}, id="run-still-going"),
    pytest.param({"stopped": True}, id="answer-without-running"),
])
def test_a_stop_the_agent_does_not_confirm_escalates_to_quarantine(pair: Any, policy_yaml: Any,
                                                                    answer: dict[str, Any]) -> None:
    acted: list[str] = []
    mon = _monitor(pair, policy_yaml, acted)
    pair.agent.runner.stop = lambda reason: answer  # the agent's stop fails to end its run
    before = STOP_FAILURES._value.get()
    pair.measurements["kernel"] = "0x" + "99" * 32  # a high-severity failure: the policy says stop
    rec = mon.check_once()
    assert rec.action == "stop"
    assert acted == ["stop", "quarantine"], acted
    assert rec.extra["escalated_to"] == "quarantine" and "did not stop" in rec.extra["stop_error"]
    assert STOP_FAILURES._value.get() == before + 1


def test_control_a_confirmed_stop_is_not_escalated(pair: Any, policy_yaml: Any) -> None:
    acted: list[str] = []
    mon = _monitor(pair, policy_yaml, acted)
    pair.agent.runner.stop = lambda reason: {"stopped": True, "running": False}
    pair.measurements["kernel"] = "0x" + "99" * 32
    rec = mon.check_once()
    assert rec.action == "stop" and acted == ["stop"]
    assert "stop_error" not in rec.extra and "escalated_to" not in rec.extra
