"""Attestation policy: what a node's quote must say, declared in YAML, checked claim by claim.

A policy belongs to one node (HPCNode.spec.policy): netbooted machines measure per-machine values
(Keylime #491), so a quote is compared with its own node's enrolment, never one golden value for all.
Everything that decides trust is in the policy and the policy is measured: its digest goes into every
Verdict (policyDigest), so a verdict says against which rules it was reached (dstack gateway #119).

    apiVersion: trustcap.io/v1alpha1
    kind: AttestationPolicy
    node: hpc-1                          # optional: the quote's node_id must equal it
    bootImages: ["0x<sha256>", ...]      # allow list of boot-image digests (required, non-empty)
    agentKeys: ["0x02<x>", ...]          # enrolled agent keys (empty: any key the appraisal accepted)
    measurements:                        # name -> rule; every listed name is required
      kernel: {equals: "0x<sha256>"}
      modules: {oneOf: ["0x..", "0x.."]}
    allowUnlistedMeasurements: false     # a measurement the policy does not name fails the check
    capsuleState:                        # field -> rule, same rules; JSON scalars
      phase: {oneOf: [idle, wiped]}
      containers: {equals: 0}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from trustcap import canonical
from trustcap.evidence.errors import EvidenceFormatError
from trustcap.evidence.failure import Report, Severity
from trustcap.evidence.quote import Hex32, Hex33, Name, Quote, Scalar
from trustcap.forms import field_error

__all__ = ["Policy", "Rule", "check_policy", "load_policy", "parse_policy", "policy_digest"]

MAX_POLICY_BYTES = 256 * 1024
# libyaml's safe loader: fast, and it refuses deep nesting itself (the pure-Python one recurses until
# RecursionError, which takes seconds on a few kilobytes of '['). Same safe subset either way.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)


class Rule(_Model):
    """Exactly one of `equals` or `oneOf`."""

    equals: Scalar = None
    one_of: list[Scalar] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Rule:
        if (self.equals is None) == (self.one_of is None):
            raise ValueError("a rule needs exactly one of 'equals' or 'oneOf'")
        return self

    def allows(self, value: Any) -> bool:
        allowed = [self.equals] if self.one_of is None else self.one_of
        # bool is an int in Python: compare type too, so `true` never matches `1`
        return any(type(value) is type(a) and value == a for a in allowed)

    def expected(self) -> Any:
        return self.equals if self.one_of is None else self.one_of


class Policy(_Model):
    api_version: Literal["trustcap.io/v1alpha1"] = "trustcap.io/v1alpha1"
    kind: Literal["AttestationPolicy"] = "AttestationPolicy"
    node: Annotated[str, StringConstraints(min_length=1, max_length=253)] | None = None
    boot_images: Annotated[list[Hex32], Field(min_length=1)]
    agent_keys: list[Hex33] = Field(default_factory=list)
    measurements: dict[Name, Rule] = Field(default_factory=dict)
    allow_unlisted_measurements: bool = False
    capsule_state: dict[Name, Rule] = Field(default_factory=dict)


def parse_policy(text: str | bytes) -> Policy:
    """A policy from YAML text; EvidenceFormatError names the field that is wrong."""
    if len(text) > MAX_POLICY_BYTES:
        raise EvidenceFormatError(f"a policy must be at most {MAX_POLICY_BYTES} bytes")
    try:
        doc = yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader, C or Python
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise EvidenceFormatError(f"policy is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise EvidenceFormatError("policy must be a YAML mapping")
    try:
        return Policy.model_validate(doc)
    except ValidationError as exc:
        raise EvidenceFormatError("invalid policy: {}: {}".format(*field_error(exc))) from None


def load_policy(path: str | Path) -> Policy:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise EvidenceFormatError(f"cannot read policy {path}: {exc.strerror}") from None
    return parse_policy(text)


def policy_digest(policy: Policy) -> bytes:
    """sha256 of the canonical policy (camelCase keys as written, defaults filled): Verdict.policyDigest."""
    return canonical.digest(policy.model_dump(by_alias=True, mode="json"))


def _check_rules(report: Report, section: str, rules: dict[str, Rule], values: dict[str, Any]) -> None:
    for name, rule in rules.items():
        if name not in values:
            report.add("policy", f"policy.{section}.{name}.missing", Severity.HIGH, f"{section} {name!r} is missing")
        elif not rule.allows(values[name]):
            report.add(
                "policy", f"policy.{section}.{name}.mismatch", Severity.HIGH,
                f"{section} {name!r} is not an allowed value", expected=rule.expected(), got=values[name],
            )


def check_policy(quote: Quote, policy: Policy) -> Report:
    """Every claim of `quote` against `policy`; the report names each that fails."""
    report = Report()
    if policy.node is not None and quote.node_id != policy.node:
        report.add("policy", "policy.node.mismatch", Severity.HIGH, f"policy is for node {policy.node!r}",
                   got=quote.node_id)
    if quote.boot_image_digest not in policy.boot_images:
        report.add("policy", "policy.boot_image.not_allowed", Severity.HIGH, "boot image digest is not allowed",
                   got=quote.boot_image_digest)
    if policy.agent_keys and quote.agent_key not in policy.agent_keys:
        report.add("policy", "policy.agent_key.not_enrolled", Severity.HIGH, "agent key is not enrolled for this node")
    _check_rules(report, "measurements", dict(policy.measurements), dict(quote.measurements))
    if not policy.allow_unlisted_measurements:
        for name in sorted(set(quote.measurements) - set(policy.measurements)):
            report.add("policy", f"policy.measurements.{name}.unexpected", Severity.HIGH,
                       f"measurement {name!r} is not named by the policy")
    _check_rules(report, "capsule_state", dict(policy.capsule_state), dict(quote.capsule_state))
    return report
