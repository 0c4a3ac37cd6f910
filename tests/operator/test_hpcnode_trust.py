"""An enrolled HPCNode's Ready and trust level come from what the operator itself judged: its Gateway's
chain state and the committee rounds about the node. Each refusal has its passing control beside it."""

from __future__ import annotations

from typing import Any

import pytest

from trustcap.operator.hpcnode import (
    REASON_ATTESTATION_FAILED,
    REASON_GATEWAY_NOT_ACTIVE,
    REASON_TRUSTED,
    TRUST_NETBOOT_NO_TPM,
    judge_trust,
)

ENROLLED = {"phase": "Enrolled"}
ACTIVE = {"spec": {"trustRoot": "software"}, "status": {"phase": "Active", "reputation": 1200}}


def _round(result: str, name: str = "r-1-pre") -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"result": result, "decidedAt": "2026-12-03T10:00:00Z"}}


def test_enrolled_behind_an_active_gateway_is_ready_and_names_its_root_kind() -> None:
    ready, reason, message, level = judge_trust(status=ENROLLED, gateway=ACTIVE, last_round=_round("Passed"))
    assert (ready, reason, level) == ("True", REASON_TRUSTED, TRUST_NETBOOT_NO_TPM)
    assert "software root" in message and "r-1-pre passed" in message


@pytest.mark.parametrize("phase", ["Registered", "Booting", "Quarantined"])
def test_a_node_the_operator_has_not_enrolled_is_left_to_the_enrolment_judge(phase: str) -> None:
    assert judge_trust(status={"phase": phase}, gateway=ACTIVE, last_round=None) == ("False", "", "", 0)


def test_without_a_chain_judging_the_gateway_the_enrolment_condition_stands() -> None:
    gateway = {"spec": {"trustRoot": "software"}, "status": {}}
    assert judge_trust(status=ENROLLED, gateway=gateway, last_round=None) == ("False", "", "", 0)
    assert judge_trust(status=ENROLLED, gateway=None, last_round=None) == ("False", "", "", 0)


@pytest.mark.parametrize("gw_phase", ["Pending", "Registered", "Offline", "Slashed"])
def test_a_gateway_not_active_on_chain_keeps_the_node_not_ready(gw_phase: str) -> None:
    gateway = {"spec": {"trustRoot": "zymkey"}, "status": {"phase": gw_phase}}
    ready, reason, _, _ = judge_trust(status=ENROLLED, gateway=gateway, last_round=None)
    assert (ready, reason) == ("False", REASON_GATEWAY_NOT_ACTIVE)
    assert judge_trust(status=ENROLLED, gateway=ACTIVE, last_round=None)[0] == "True"  # control


@pytest.mark.parametrize("result", ["Failed", "Expired"])
def test_a_failed_committee_round_makes_the_node_not_ready(result: str) -> None:
    ready, reason, message, _ = judge_trust(status=ENROLLED, gateway=ACTIVE, last_round=_round(result, "r-9-post"))
    assert (ready, reason) == ("False", REASON_ATTESTATION_FAILED) and "r-9-post" in message
