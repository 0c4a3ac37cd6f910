"""Key release: an input owner's broker gives the content key only to the executor a quorum attested.

    executor gateway                                owner's broker (trustcap broker serve)       chain
      | POST /v1/release {capsule, manifest, input,       |                                        |
      |   header, round, verdicts+quotes, reveals} ------>| ids, header binding, our key            |
      |                                                   | select_from_chain ------------------->| getTask, block,
      |                                                   |                                        | commitments, nodes
      |                                                   | round == selection; quorum of verdicts |
      |                                                   | (domain from the chain) and quotes     |
      |<-- {wrappedKey, executorKey} ---------------------| wrap_key(cek, executorKey, ids, input) |
      | agent: unwrap_key (executor key), open_with_key (owner, capsule id, binding digest)        |

Committee members challenge with `challenge_nonce(task, round, phase, verifier)`, so the broker can tell a
quote answered that member's challenge of this round; the evidence must also be recent (decision 0095).

Why (docs/decisions/0092-key-release-broker.md): the owner keeps its own trust boundary, as a Trustee
KBS does; the gateway relays an opaque wrapped key; the operator never sees one.
"""

from __future__ import annotations

from trustcap.capsule.envelope import open_with_key
from trustcap.release.binding import challenge_nonce
from trustcap.release.check import Release, check_release, quorum_of
from trustcap.release.client import request_release
from trustcap.release.errors import ReleaseDenied, ReleaseError, ReleaseRefused, WrappedKeyError
from trustcap.release.keywrap import unwrap_key, wrap_key

__all__ = [
    "Release",
    "ReleaseDenied",
    "ReleaseError",
    "ReleaseRefused",
    "WrappedKeyError",
    "challenge_nonce",
    "check_release",
    "open_with_key",
    "quorum_of",
    "request_release",
    "unwrap_key",
    "wrap_key",
]
