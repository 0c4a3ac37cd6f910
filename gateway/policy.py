"""The gateway's monitoring policy (YAML): how often to look, what to check, what to do on a failure.

    apiVersion: trustcap.io/v1alpha1
    kind: GatewayPolicy
    monitor:
      meanIntervalSeconds: 10    # checks are a Poisson process: unpredictable times, this mean
      minIntervalSeconds: 0.5    # floor, so a burst cannot starve the HPC
      maxQuoteAgeSeconds: 30
    actions:                     # by the gravest failure's severity; one of report|stop|reboot|quarantine
      critical: quarantine
      high: stop
      medium: report             # the severities are trustcap.evidence.Severity's, lower-cased
      unreachable: stop          # the agent did not answer (a silent agent is never "still trusted")
    attestation: { ... }         # a trustcap.evidence AttestationPolicy (bootImages, measurements, ...)

Every field is checked, and an error names the field (`PolicyError`). The policy is measured
(`digest`), so every report says which rules it was reached under.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trustcap import canonical
from trustcap.evidence import Policy, Severity, parse_policy, policy_digest
from trustcap.evidence.errors import EvidenceFormatError
from trustcap.gateway.errors import PolicyError

__all__ = ["ACTIONS", "GatewayPolicy", "load_gateway_policy", "parse_gateway_policy"]

ACTIONS = ("report", "stop", "reboot", "quarantine")
# The evidence layer's severities, gravest first, and the monitor's own "the agent did not answer": a key
# that names no failure a report can carry (the old "low") is refused, not silently never used.
_SEVERITIES = (*(s.name.lower() for s in sorted(Severity, reverse=True)), "unreachable")
_DEFAULT_ACTIONS = {"critical": "quarantine", "high": "stop", "medium": "report", "unreachable": "stop"}


@dataclass(frozen=True)
class GatewayPolicy:
    attestation: Policy
    mean_interval_s: float = 10.0
    min_interval_s: float = 0.5
    max_quote_age_s: float = 30.0
    actions: dict[str, str] = field(default_factory=lambda: dict(_DEFAULT_ACTIONS))
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """The whole GatewayPolicy (monitoring, actions and attestation), named in the monitor's records."""
        return "0x" + canonical.digest(self.source).hex()

    @property
    def attestation_digest(self) -> str:
        """The attestation policy alone: what an HPCNode declares (`spec.policy.digest`), what committee
        members appraise under and name in their verdicts, and so what the gateway reports it applies.
        The monitoring part is the gateway's own business and does not change what a quote must show."""
        return "0x" + policy_digest(self.attestation).hex()


def _num(doc: dict[str, Any], key: str, default: float, where: str, lo: float, hi: float) -> float:
    v = doc.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= float(v) <= hi:
        raise PolicyError(f"{where}.{key}={v!r}: must be a number in [{lo:g}, {hi:g}]")
    return float(v)


def parse_gateway_policy(text: str) -> GatewayPolicy:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"gateway policy is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise PolicyError("gateway policy must be a YAML mapping")
    unknown = sorted(set(doc) - {"apiVersion", "kind", "monitor", "actions", "attestation"})
    if unknown:
        raise PolicyError(f"gateway policy: unknown field(s) {unknown}")
    if doc.get("kind", "GatewayPolicy") != "GatewayPolicy":
        raise PolicyError(f"gateway policy: kind={doc.get('kind')!r}, expected GatewayPolicy")
    mon = doc.get("monitor", {}) or {}
    if not isinstance(mon, dict):
        raise PolicyError("gateway policy: monitor must be a mapping")
    bad = sorted(set(mon) - {"meanIntervalSeconds", "minIntervalSeconds", "maxQuoteAgeSeconds"})
    if bad:
        raise PolicyError(f"gateway policy: monitor has unknown field(s) {bad}")
    actions = dict(_DEFAULT_ACTIONS)
    raw_actions = doc.get("actions", {}) or {}
    if not isinstance(raw_actions, dict):
        raise PolicyError("gateway policy: actions must be a mapping")
    for sev, act in raw_actions.items():
        if sev not in _SEVERITIES:
            raise PolicyError(f"gateway policy: actions.{sev}: unknown severity (one of {list(_SEVERITIES)}: a "
                              "failure is critical, high or medium, and unreachable is the agent not answering)")
        if act not in ACTIONS:
            raise PolicyError(f"gateway policy: actions.{sev}={act!r}: must be one of {list(ACTIONS)}")
        actions[sev] = act
    if "attestation" not in doc:
        raise PolicyError("gateway policy: attestation (an AttestationPolicy) is required")
    try:
        attestation = parse_policy(yaml.safe_dump(doc["attestation"]))
    except EvidenceFormatError as exc:
        raise PolicyError(f"gateway policy: attestation: {exc}") from None
    mean = _num(mon, "meanIntervalSeconds", 10.0, "monitor", 0.01, 86400)
    return GatewayPolicy(attestation=attestation, mean_interval_s=mean,
                         min_interval_s=_num(mon, "minIntervalSeconds", min(0.5, mean), "monitor", 0.0, mean),
                         max_quote_age_s=_num(mon, "maxQuoteAgeSeconds", 30.0, "monitor", 1, 86400),
                         actions=actions, source=doc)


def load_gateway_policy(path: str | Path) -> GatewayPolicy:
    try:
        return parse_gateway_policy(Path(path).read_text())
    except OSError as exc:
        raise PolicyError(f"cannot read gateway policy {path}: {exc.strerror}") from None
