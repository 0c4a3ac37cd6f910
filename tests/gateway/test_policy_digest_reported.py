"""The policy digest a gateway reports is the one its committee members appraise under (issue 12 item 13).

An HPCNode declares `spec.policy.digest`; the operator compares it with the digest the gateway publishes
in `status.enrolment.policyDigest`, and each committee member refuses a round whose node declares a
policy other than the attestation policy it appraises under (decision 0116). So the gateway must report
the attestation policy's digest, not the digest of its whole GatewayPolicy: with the whole one, a node
that declares what its members apply would be PolicyMismatch forever.
"""

from __future__ import annotations

from typing import Any

from trustcap.evidence import parse_policy, policy_digest
from trustcap.gateway.policy import parse_gateway_policy


def test_the_reported_digest_is_the_attestation_policys(policy_yaml: Any) -> None:
    import yaml

    policy = parse_gateway_policy(policy_yaml())
    attestation = yaml.safe_load(policy_yaml())["attestation"]
    assert policy.attestation_digest == "0x" + policy_digest(parse_policy(yaml.safe_dump(attestation))).hex()
    assert policy.attestation_digest != policy.digest  # control: the whole policy has another digest


def test_monitoring_settings_do_not_move_it_but_an_attestation_rule_does(policy_yaml: Any) -> None:
    base = parse_gateway_policy(policy_yaml())
    slower = parse_gateway_policy(policy_yaml(monitor={"meanIntervalSeconds": 60, "maxQuoteAgeSeconds": 30}))
    assert slower.attestation_digest == base.attestation_digest and slower.digest != base.digest
    other = parse_gateway_policy(policy_yaml(attestation={"bootImages": ["0x" + "11" * 32]}))
    assert other.attestation_digest != base.attestation_digest
