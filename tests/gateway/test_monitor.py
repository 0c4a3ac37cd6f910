"""Monitoring at random times with a stated mean, policy with the failed claim named, actions, and
refusal of replayed and forged quotes: the real server, channel, agent and appraisal."""

from __future__ import annotations

import random
import statistics
from typing import Any

import pytest

from trustcap.agent.identity import BootKey
from trustcap.evidence import appraise_quote
from trustcap.gateway.errors import PolicyError
from trustcap.gateway.monitor import Monitor
from trustcap.gateway.policy import parse_gateway_policy


def test_a_healthy_node_passes(pair: Any, policy_yaml: Any) -> None:
    mon = Monitor(pair.server, parse_gateway_policy(policy_yaml()))
    rec = mon.check_once()
    assert rec.ok and rec.action == "none" and rec.failed == [], rec
    assert rec.quote_digest.startswith("0x") and rec.policy_digest.startswith("0x")


def test_a_changed_measurement_is_named_and_stops_the_run(pair: Any, policy_yaml: Any) -> None:
    hooks: list[str] = []
    mon = Monitor(pair.server, parse_gateway_policy(policy_yaml()),
                  on_action={"stop": lambda r: hooks.append(r.action)})
    pair.measurements["kernel"] = "0x" + "99" * 32  # e.g. a kernel swapped under us
    rec = mon.check_once()
    assert not rec.ok
    assert [f["id"] for f in rec.failed] == ["policy.measurements.kernel.mismatch"]
    assert rec.action == "stop" and hooks == ["stop"]
    assert pair.stopped and "policy.measurements.kernel.mismatch" in pair.stopped[0]


def test_every_failed_claim_is_named(pair: Any, policy_yaml: Any) -> None:
    mon = Monitor(pair.server, parse_gateway_policy(policy_yaml()))
    pair.measurements["kernel"] = "0x" + "99" * 32
    pair.measurements["usb"] = "0x" + "77" * 32
    del pair.measurements["modules"]
    ids = {f["id"] for f in mon.check_once().failed}
    assert ids == {"policy.measurements.kernel.mismatch", "policy.measurements.modules.missing",
                   "policy.measurements.usb.unexpected"}


def test_a_replayed_quote_is_refused(pair: Any, policy_yaml: Any) -> None:
    mon = Monitor(pair.server, parse_gateway_policy(policy_yaml()))
    nonce = mon.nonces.issue()
    signed = pair.server.challenge(nonce)
    kw = {"nonces": mon.nonces, "expected_nonce": nonce, "node_id": "hpc-1",
          "agent_key": pair.agent.key.public_key(), "gateway_address": pair.server.root.address,
          "now": signed.quote.issued_at, "max_age_seconds": 30}
    assert appraise_quote(signed, **kw).ok
    again = appraise_quote(signed, **kw)
    assert "nonce.replayed" in again.event_ids


def test_a_forged_quote_is_refused(pair: Any, policy_yaml: Any) -> None:
    mon = Monitor(pair.server, parse_gateway_policy(policy_yaml()), on_action={})
    pair.agent.key = BootKey()  # the agent's answers are now signed by a key the gateway never enrolled
    rec = mon.check_once()
    assert not rec.ok and rec.action == "quarantine"
    assert rec.failed[0]["id"] == "quote.rejected_by_gateway", rec.failed


def test_a_dead_agent_is_not_still_trusted(pair: Any, policy_yaml: Any) -> None:
    stops: list[Any] = []
    mon = Monitor(pair.server, parse_gateway_policy(policy_yaml()), on_action={"stop": stops.append})
    assert mon.check_once().ok
    pair.agent.channel.chan.close()  # the agent dies mid-run
    rec = mon.check_once()
    assert not rec.ok and rec.failed[0]["id"] == "agent.unreachable" and rec.action == "stop"
    assert stops and stops[0] is rec and mon.records[-1] is rec  # recorded, not lost


def test_intervals_are_exponential_with_the_stated_mean(pair: Any, policy_yaml: Any) -> None:
    pol = parse_gateway_policy(policy_yaml(monitor={"meanIntervalSeconds": 4, "minIntervalSeconds": 0.1}))
    mon = Monitor(pair.server, pol, rng=random.Random(7))  # noqa: S311 - seeded for a reproducible sample
    xs = [mon.next_interval() for _ in range(5000)]
    assert abs(statistics.fmean(xs) - 4) < 0.25
    assert min(xs) >= 0.1
    assert statistics.pstdev(xs) > 3  # exponential: stdev ~ mean; a fixed period would be ~0


@pytest.mark.parametrize(("change", "names"), [
    pytest.param({"actions": {"high": "explode"}}, "actions.high", id="bad-action"),
    pytest.param({"actions": {"severe": "stop"}}, "actions.severe", id="bad-severity"),
    pytest.param({"actions": {"low": "report"}}, "actions.low: unknown severity", id="severity-no-failure-has"),
    pytest.param({"monitor": {"meanIntervalSeconds": -1}}, "monitor.meanIntervalSeconds", id="negative-mean"),
    pytest.param({"monitor": {"period": 3}}, "period", id="unknown-monitor-field"),
    pytest.param({"attestation": {"bootImages": []}}, "bootImages", id="empty-boot-images"),
    pytest.param({"extra": 1}, "extra", id="unknown-top-field"),
])
def test_policy_errors_name_the_field(policy_yaml: Any, change: dict[str, Any], names: str) -> None:
    with pytest.raises(PolicyError, match=names):
        parse_gateway_policy(policy_yaml(**change))


def test_policy_digest_changes_with_the_policy(policy_yaml: Any) -> None:
    a = parse_gateway_policy(policy_yaml())
    b = parse_gateway_policy(policy_yaml(actions={"high": "report"}))
    assert a.digest != b.digest and a.digest == parse_gateway_policy(policy_yaml()).digest


def test_the_policy_severities_are_the_evidence_layers_and_the_monitors_own() -> None:
    """A policy key for every Severity a failure can carry, and only those (plus unreachable): a severity
    added to the enum needs an action, and a policy key no failure can have is refused (issue 10 item 6)."""
    from trustcap.evidence import Severity
    from trustcap.gateway.policy import _DEFAULT_ACTIONS, _SEVERITIES

    assert set(_SEVERITIES) == {s.name.lower() for s in Severity} | {"unreachable"}
    assert set(_DEFAULT_ACTIONS) == set(_SEVERITIES)
