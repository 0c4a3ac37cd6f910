"""The errors of the operator.

    TrustcapError                     (trustcap.errors)
    └── OperatorError                 the operator met a state it must not act on
        ├── InvalidTransition         a phase change the Capsule lifecycle does not allow
        └── InvalidCondition          a condition that the CRD schema would reject (bad reason or status)

Handlers turn these into `kopf.PermanentError` (retrying cannot help): a bug or a tampered status must
stop the capsule, not loop.
"""

from __future__ import annotations

from trustcap.errors import TrustcapError


class OperatorError(TrustcapError):
    """The operator refused to act on an object's state."""


class InvalidTransition(OperatorError):
    """A Capsule phase change outside the lifecycle (e.g. Completed back to Running)."""


class InvalidCondition(OperatorError):
    """A condition with a status or reason the CRD schema does not allow."""
