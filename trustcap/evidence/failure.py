"""Failures collected during an appraisal, after Keylime's `failure.py`.

An appraisal never stops at the first failed claim: an operator who quarantines a node must see every
reason (a wrong kernel AND a replayed nonce are two different incidents). Each failure has the component
that found it, a dotted id that names the claim (`policy.measurements.kernel.mismatch`), a severity, a
one-line message and a small context (never secrets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final


class Severity(IntEnum):
    """How bad a failed claim is. CRITICAL: the evidence cannot be trusted at all (forged, replayed);
    HIGH: the evidence is genuine but says the node is not in a trusted state; MEDIUM: stale or unclear."""

    MEDIUM = 1
    HIGH = 2
    CRITICAL = 3


# The failure ids callers act on, exported so that they compare against a name, not a spelled string
# (issue 10 item 6): an id renamed here fails at import where it is used, not silently at run time.
QUOTE_IDENTITY_AGENT_KEY: Final = "quote.identity.agent_key"
QUOTE_IDENTITY_NODE: Final = "quote.identity.node"
QUOTE_IDENTITY_GATEWAY: Final = "quote.identity.gateway"
QUOTE_SIGNATURE_AGENT: Final = "quote.signature.agent"
QUOTE_SIGNATURE_GATEWAY: Final = "quote.signature.gateway"
QUOTE_EXPIRED: Final = "quote.expired"
QUOTE_PREDATES_CHALLENGE: Final = "quote.predates_challenge"
QUOTE_FUTURE: Final = "quote.future"
NONCE_MISMATCH: Final = "nonce.mismatch"
NONCE_UNKNOWN: Final = "nonce.unknown"
NONCE_REPLAYED: Final = "nonce.replayed"
NONCE_EXPIRED: Final = "nonce.expired"


@dataclass(frozen=True)
class Failure:
    component: str
    event_id: str
    severity: Severity
    message: str
    context: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.event_id}: {self.message}"


@dataclass
class Report:
    """Every failure of one appraisal; `ok` only if there is none."""

    failures: list[Failure] = field(default_factory=list)

    def add(
        self, component: str, event_id: str, severity: Severity, message: str, **context: Any
    ) -> None:
        self.failures.append(Failure(component, event_id, severity, message, dict(context)))

    def merge(self, other: Report) -> Report:
        self.failures.extend(other.failures)
        return self

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def max_severity(self) -> Severity | None:
        return max((f.severity for f in self.failures), default=None)

    @property
    def event_ids(self) -> list[str]:
        return [f.event_id for f in self.failures]

    def summary(self) -> str:
        return "; ".join(str(f) for f in self.failures) if self.failures else "all claims hold"
