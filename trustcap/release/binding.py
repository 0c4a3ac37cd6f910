"""What ties a committee member's challenge, quote and verdict to one round of one task, so that an owner's
broker (and anyone) can recompute it.

A member challenges the executor with a nonce and appraises the quote that answers it (gateway/committee.py).
When that nonce is a fresh random value, only the member knows it was its own: a broker shown a verdict and a
quote can check the quote is whole, not that it answered *this* member's challenge of *this* round. So the
nonce of a capsule round's challenge is derived from the round and the member (decision 0095):

    challenge_nonce = sha256(canonical{"domain": "trustcap/round-challenge/v1", "taskId": 0x.., "round": 0x..,
                                       "phase": "pre"|"during"|"post", "verifier": 0x<lowercase address>})

`round` is the Attestation's `spec.nonce` (the verdicts' attestationId), random per round and unknown before
the round opens, so the nonce is still unpredictable before then; one nonce per member and round, so the
member's own NonceRegistry still accepts its answer once. A broker recomputes it for each verdict's verifier
and passes it to `appraise_quote` as the expected nonce: a quote answering another member's challenge, another
round's, another task's or an idle challenge does not count toward the quorum.
"""

from __future__ import annotations

import re
from typing import Final

from trustcap import canonical

__all__ = ["CHALLENGE_NONCE_DOMAIN", "MAX_EVIDENCE_AGE_S", "MAX_SKEW_S", "challenge_nonce"]

CHALLENGE_NONCE_DOMAIN: Final = "trustcap/round-challenge/v1"
#: How old a pre round's quote and verdicts may be when a key is released on them: the round (60 s by
#: default, TRUSTCAP_ROUND_TIMEOUT_SECONDS), the operator's run order and the executor's fetch of the inputs
#: fit well inside; an attestation older than this no longer says what the executor runs now.
MAX_EVIDENCE_AGE_S: Final = 300.0
#: How far a quote or verdict may be dated ahead of the broker's clock (the agent's and the members' clocks).
MAX_SKEW_S: Final = 5.0
_HEX32 = re.compile(r"^0x[0-9a-f]{64}$")
_ADDRESS = re.compile(r"^0x[0-9a-f]{40}$")
_PHASES: Final = ("pre", "during", "post")


def challenge_nonce(*, task_id: str, round_id: str, phase: str, verifier: str) -> bytes:
    """The 32-byte nonce `verifier` sends to challenge the executor in round `round_id` (the round's
    spec.nonce) of task `task_id` (both 0x-hex, any case), phase pre, during or post. ValueError names a
    malformed argument (a caller's bug, never a peer's input: callers check the fields first)."""
    tid, rnd, who = task_id.lower(), round_id.lower(), verifier.lower()
    if not _HEX32.match(tid):
        raise ValueError(f"task id {task_id!r} is not 32 bytes of 0x-hex")
    if not _HEX32.match(rnd):
        raise ValueError(f"round id {round_id!r} is not 32 bytes of 0x-hex")
    if phase not in _PHASES:
        raise ValueError(f"phase {phase!r} is not one of {', '.join(_PHASES)}")
    if not _ADDRESS.match(who):
        raise ValueError(f"verifier {verifier!r} is not a 0x address")
    return canonical.digest({"domain": CHALLENGE_NONCE_DOMAIN, "taskId": tid, "round": rnd, "phase": phase,
                             "verifier": who})
