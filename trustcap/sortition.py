"""Sortition: which gateway executes a capsule and which verify it, drawn by VRF, weighted, checkable.

The seed asks that the executor "cannot be predicted" and is not announced before completion. Three
things make that hold (docs/decisions/0010-vrf-sortition.md):

1. No grinding. The VRF input is alpha = canonical{domain, role, round, capsule id, epoch seed}. The
   scheduler must take the seed of an epoch that starts AFTER the capsule was accepted, so neither the
   submitter (who chooses the capsule id) nor any node (who could evaluate its own VRF) can try inputs.
2. Weighted exponential race. Each node's VRF output beta gives u = (int(beta) + 1) / 2^256 in (0, 1]
   and a draw -ln(u) / weight; the lowest draw wins. For independent uniform u this picks node i with
   probability weight_i / sum(weights), so stake and reputation hold exactly, and nobody can predict
   another node's u without its secret key. The committee of a round is the k lowest draws of a
   separate alpha (role "committee", round r), excluding the executor, so the committee's draws say
   nothing about the executor's.
3. Commit, then reveal. At scheduling time each node commits sha256(domain, alpha, node, pi, salt) publicly
   and hands (pi, salt) only to the scheduler; the executor learns that it won, the world sees only
   commitments. After completion the scheduler publishes every reveal and anyone runs
   `verify_selection` to check that each reveal matches its commitment, each proof verifies under the
   node's registered VRF key, and the executor had the lowest draw.

Weight (integers, so every verifier computes the same thing): weight = stake * (10000 + 9 * reputation_bp)
with reputation in basis points 0..10000, i.e. 100000 x stake x (0.1 + 0.9 x reputation): full reputation
weighs exactly 10 times zero reputation at equal stake (decision 0010). A node of zero
reputation keeps a tenth of its stake's weight (a newcomer can still be picked, and earn reputation); a
quarantined node is not a candidate at all (the operator filters before calling).

Draws are compared as `Decimal` values at 80 digits: `Decimal.ln` is correctly rounded, so a draw is the
same number on every machine and a verifier can never disagree with the scheduler about a ranking.

    node i (each candidate)         scheduler (operator)                 anyone, after completion
      | pi_i = VRF.prove(sk_i, alpha)     |                                     |
      |--- commitment_i (public) -------->| records commitments in Capsule      |
      |--- (pi_i, salt_i) (private) ----->| verifies pi_i; lowest draw wins     |
      |<-- "you execute" (winner only) ---|                                     |
      |          ... run, attest, seal, wipe ...                                |
      |                                   |--- all reveals published ---------->| verify_selection()
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import TYPE_CHECKING, Protocol

from trustcap import canonical, vrf
from trustcap.errors import InvalidProof, TrustcapError

if TYPE_CHECKING:
    from trustcap.chain.escrow import NodeInfo, TaskInfo

__all__ = [
    "Candidate",
    "ChainView",
    "Reveal",
    "Selection",
    "SortitionError",
    "check_selection",
    "commitment",
    "draw",
    "participate",
    "participate_with",
    "rank",
    "select_committee",
    "select_executor",
    "select_from_chain",
    "selection_alpha",
    "verify_committee",
    "verify_selection",
    "weight",
]

DOMAIN = "trustcap/sortition/v1"
ROLES = ("executor", "committee")
REPUTATION_SCALE = 10_000  # basis points
SALT_LEN = 32
_PRECISION = 80
_TWO_256 = 2**256


class SortitionError(TrustcapError):
    """A selection cannot be made or does not verify; the message names the node and the cause."""


@dataclass(frozen=True)
class Candidate:
    """An eligible gateway as the chain and the Gateway resource describe it."""

    node_id: str
    vrf_public_key: bytes
    stake: int
    reputation_bp: int


@dataclass(frozen=True)
class Reveal:
    """What a node hands the scheduler privately and the scheduler publishes after completion."""

    node_id: str
    pi: bytes
    salt: bytes


def selection_alpha(capsule_id: str, epoch_seed: bytes, role: str = "executor", round_no: int = 0) -> bytes:
    """The VRF input of one draw. The caller must pass the seed of an epoch that began after the
    capsule was accepted (see the module docstring), or the draw can be ground."""
    if role not in ROLES:
        raise SortitionError(f"role must be one of {ROLES}, got {role!r}")
    if not isinstance(capsule_id, str) or not capsule_id:
        raise SortitionError("capsule id must be a non-empty string")
    if not isinstance(epoch_seed, bytes) or len(epoch_seed) != 32:
        raise SortitionError("epoch seed must be 32 bytes")
    if isinstance(round_no, bool) or not isinstance(round_no, int) or round_no < 0:
        raise SortitionError("round must be a non-negative integer")
    return canonical.encode(
        {"domain": DOMAIN, "role": role, "round": round_no, "capsule": capsule_id, "seed": epoch_seed}
    )


def weight(stake: int, reputation_bp: int) -> int:
    """stake x (10000 + 9 x reputation_bp): proportional to stake x (0.1 + 0.9 x reputation), 10:1 between
    full and zero reputation."""
    if isinstance(stake, bool) or not isinstance(stake, int) or stake <= 0:
        raise SortitionError(f"stake must be a positive integer, got {stake!r}")
    if isinstance(reputation_bp, bool) or not isinstance(reputation_bp, int) or not (
        0 <= reputation_bp <= REPUTATION_SCALE
    ):
        raise SortitionError(f"reputation must be an integer in 0..{REPUTATION_SCALE} basis points")
    return stake * (REPUTATION_SCALE + 9 * reputation_bp)


def draw(beta: bytes, node_weight: int) -> Decimal:
    """-ln(u) / weight with u = (int(beta) + 1) / 2^256: exponential with rate `weight`; lowest wins."""
    if len(beta) != vrf.BETA_LEN:
        raise SortitionError(f"beta must be {vrf.BETA_LEN} bytes")
    if node_weight <= 0:
        raise SortitionError("weight must be positive")
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        u = Decimal(int.from_bytes(beta, "big") + 1) / Decimal(_TWO_256)
        return -u.ln() / Decimal(node_weight)


def commitment(alpha: bytes, node_id: str, pi: bytes, salt: bytes) -> bytes:
    """The public commitment to a reveal: binds the node, the draw's input and its proof."""
    return hashlib.sha256(
        canonical.encode({"domain": DOMAIN + "/commit", "alpha": alpha, "node": node_id, "pi": pi, "salt": salt})
    ).digest()


def participate_with(
    node_id: str, prove: Callable[[bytes], bytes], alpha: bytes, *, token: Callable[[int], bytes] = secrets.token_bytes
) -> tuple[bytes, Reveal]:
    """What a node does at scheduling time: prove, salt, commit. Returns (commitment, private reveal).

    `prove` is the trust root's `vrf_prove`, so the VRF secret stays sealed (docs/decisions/0010-*)."""
    pi = prove(alpha)
    salt = token(SALT_LEN)
    return commitment(alpha, node_id, pi, salt), Reveal(node_id, pi, salt)


def participate(
    node_id: str, vrf_secret_key: bytes, alpha: bytes, *, token: Callable[[int], bytes] = secrets.token_bytes
) -> tuple[bytes, Reveal]:
    """`participate_with` for a bare secret key (tests, tools)."""
    return participate_with(node_id, lambda a: vrf.prove(vrf_secret_key, a), alpha, token=token)


def _index(candidates: Iterable[Candidate]) -> dict[str, Candidate]:
    by_id: dict[str, Candidate] = {}
    for c in candidates:
        if c.node_id in by_id:
            raise SortitionError(f"candidate {c.node_id!r} appears twice")
        weight(c.stake, c.reputation_bp)  # validates both
        by_id[c.node_id] = c
    if not by_id:
        raise SortitionError("there are no candidates")
    return by_id


def _verified_betas(by_id: Mapping[str, Candidate], alpha: bytes, reveals: Iterable[Reveal]) -> dict[str, bytes]:
    betas: dict[str, bytes] = {}
    for r in reveals:
        cand = by_id.get(r.node_id)
        if cand is None:
            raise SortitionError(f"reveal from {r.node_id!r}, which is not a candidate")
        if r.node_id in betas:
            raise SortitionError(f"node {r.node_id!r} revealed twice")
        try:
            betas[r.node_id] = vrf.verify(cand.vrf_public_key, r.pi, alpha)
        except InvalidProof as exc:
            raise SortitionError(f"node {r.node_id!r}: VRF proof does not verify for this draw: {exc}") from exc
    return betas


def rank(candidates: Sequence[Candidate], betas: Mapping[str, bytes]) -> list[str]:
    """Node ids ordered by draw, lowest (winner) first; ties (probability ~2^-256) broken by node id."""
    by_id = _index(candidates)
    missing = sorted(set(by_id) - set(betas))
    if missing:
        raise SortitionError(f"no VRF output for candidates {missing}")
    keyed = [(draw(betas[n], weight(c.stake, c.reputation_bp)), n) for n, c in by_id.items()]
    return [n for _, n in sorted(keyed)]


def select_executor(candidates: Sequence[Candidate], alpha: bytes, reveals: Iterable[Reveal]) -> str:
    """The scheduler's choice: verify every reveal, the lowest draw executes."""
    by_id = _index(candidates)
    return rank(list(by_id.values()), _verified_betas(by_id, alpha, reveals))[0]


def select_committee(
    candidates: Sequence[Candidate], alpha: bytes, reveals: Iterable[Reveal], k: int, executor: str
) -> list[str]:
    """The k lowest draws for a committee alpha, the executor excluded (it cannot verify itself)."""
    by_id = _index(candidates)
    if executor not in by_id:
        raise SortitionError(f"executor {executor!r} is not a candidate")
    others = [c for n, c in by_id.items() if n != executor]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(others):
        raise SortitionError(f"committee size must be between 1 and {len(others)}, got {k!r}")
    betas = _verified_betas(by_id, alpha, reveals)
    betas.pop(executor, None)
    return rank(others, betas)[:k]


def _check_commitments(alpha: bytes, commitments: Mapping[str, bytes], reveals: Sequence[Reveal]) -> None:
    revealed = {r.node_id for r in reveals}
    missing = sorted(set(commitments) - revealed)
    if missing:
        raise SortitionError(f"committed nodes {missing} have no published reveal")
    for r in reveals:
        expected = commitments.get(r.node_id)
        if expected is None:
            raise SortitionError(f"node {r.node_id!r} revealed without having committed")
        if not hmac.compare_digest(expected, commitment(alpha, r.node_id, r.pi, r.salt)):
            raise SortitionError(f"node {r.node_id!r}: reveal does not match its commitment")


def verify_selection(
    candidates: Sequence[Candidate],
    alpha: bytes,
    commitments: Mapping[str, bytes],
    reveals: Sequence[Reveal],
    claimed_executor: str,
) -> None:
    """Anyone's check, after completion, that `claimed_executor` was the rightful winner.

    The candidates are those that committed at scheduling time; every one of them must have a
    published reveal matching its commitment and a proof that verifies. Raises SortitionError naming
    the first node or claim that fails.
    """
    by_id = _index(candidates)
    strangers = sorted(set(commitments) - set(by_id))
    if strangers:
        raise SortitionError(f"commitments from non-candidates {strangers}")
    uncommitted = sorted(set(by_id) - set(commitments))
    if uncommitted:
        raise SortitionError(f"candidates {uncommitted} have no commitment")
    _check_commitments(alpha, commitments, reveals)
    rightful = rank(list(by_id.values()), _verified_betas(by_id, alpha, reveals))[0]
    if claimed_executor != rightful:
        raise SortitionError(f"executor {claimed_executor!r} was not the rightful winner: {rightful!r} was")


def verify_committee(
    candidates: Sequence[Candidate],
    alpha: bytes,
    commitments: Mapping[str, bytes],
    reveals: Sequence[Reveal],
    executor: str,
    claimed_committee: Sequence[str],
) -> None:
    """Anyone's check that a round's committee was the k lowest draws of that round's alpha."""
    by_id = _index(candidates)
    others = {n for n in by_id if n != executor}
    relevant = {n: c for n, c in commitments.items() if n in others}
    _check_commitments(alpha, relevant, [r for r in reveals if r.node_id in others])
    rightful = select_committee(
        list(by_id.values()), alpha, [r for r in reveals if r.node_id in others], len(claimed_committee), executor
    )
    if list(claimed_committee) != rightful:
        raise SortitionError(f"committee {list(claimed_committee)} is not the rightful one: {rightful}")


# --- selection from the chain alone (docs/lifecycle-interfaces.md section 4; issue 12 items 8, 9) ----------


class ChainView(Protocol):
    """The reads `select_from_chain` needs (`trustcap.chain.escrow.ChainView` adds the verdicts' domain;
    Escrow implements both). Declared here so sortition does not import the chain layer at run time."""

    def task(self, task_id: bytes) -> TaskInfo | None: ...
    def block_hash(self, number: int) -> bytes | None: ...
    def commitment(self, task_id: bytes, node: str) -> bytes | None: ...
    def committers(self, task_id: bytes) -> list[str]: ...
    def committed_weight(self, task_id: bytes, node: str) -> tuple[int, int] | None: ...
    def node(self, address: str) -> NodeInfo | None: ...


@dataclass(frozen=True)
class Selection:
    """Who executes a task and who verifies it, as anyone recomputes it from the chain and the reveals."""

    executor: str
    committee: tuple[str, ...]
    alpha: bytes
    seed: bytes
    skipped: tuple[str, ...]  # committed but did not reveal, or revealed badly, or is no longer registered


def _norm(address: str) -> str:
    return address.lower() if isinstance(address, str) else ""


def select_from_chain(view: ChainView, task_id: bytes, reveals: Iterable[Reveal]) -> Selection:
    """The selection of a task, from the chain alone; the caller's word counts for nothing.

    k and the funding block come from the escrow (getTask), the seed is the hash of the block after the
    funding block, the candidates are the task's on-chain committers: each registered before the seed
    block (the contract refuses any other commit, decision 0115), with the VRF key the registry holds and
    the stake and reputation the contract kept at its commit (`committed_weight`). Those weights do not
    move afterwards, so a check run after a settlement or a slash weighs the draw as the scheduler did.
    Each reveal counts only if it opens its node's on-chain commitment and its proof verifies under that
    node's registered VRF key; a committer without such a reveal is skipped (named in `skipped`), so
    withholding a reveal cannot stall selection. Executor = lowest draw, committee = the next k.
    SortitionError names the cause when fewer than k + 1 valid reveals exist."""
    if not isinstance(task_id, bytes) or len(task_id) != 32:
        raise SortitionError("task id must be 32 bytes")
    task = view.task(task_id)
    if task is None:
        raise SortitionError(f"task 0x{task_id.hex()} is not on chain")
    k = task.k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SortitionError(f"task 0x{task_id.hex()} has committee size {k!r} on chain")
    seed = view.block_hash(task.funded_block + 1)
    if seed is None:
        raise SortitionError(f"the seed block {task.funded_block + 1} (funding block + 1) is not mined yet")
    alpha = selection_alpha(task_id.hex(), seed)
    by_node: dict[str, list[Reveal]] = {}
    for r in reveals:
        by_node.setdefault(_norm(r.node_id), []).append(r)
    betas: dict[str, bytes] = {}
    weights: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for node_id in dict.fromkeys(_norm(c) for c in view.committers(task_id)):
        why = _check_committer(view, task_id, alpha, node_id, by_node.get(node_id, []), betas, weights)
        if why:
            skipped[node_id] = why
    if len(betas) < k + 1:
        causes = "; ".join(f"{n}: {w}" for n, w in sorted(skipped.items())) or "no other committers"
        raise SortitionError(f"task 0x{task_id.hex()} needs k + 1 = {k + 1} valid reveals of committed, active "
                             f"nodes, has {len(betas)} ({causes})")
    ranked = [n for _, n in sorted((draw(betas[n], weights[n]), n) for n in betas)]
    return Selection(executor=ranked[0], committee=tuple(ranked[1:k + 1]), alpha=alpha, seed=seed,
                     skipped=tuple(sorted(skipped)))


def _check_committer(view: ChainView, task_id: bytes, alpha: bytes, node_id: str, mine: list[Reveal],
                     betas: dict[str, bytes], weights: dict[str, int]) -> str:
    """Record a committer's beta and weight, or return why it does not count.

    Active is not asked here: the contract checked it at the commit, and asking again would let a slash
    landing after the selection (by this task or another) change who had been selected."""
    info = view.node(node_id)
    if info is None:
        return "not a registered node (its VRF key is unknown)"
    expected = view.commitment(task_id, node_id)
    kept = view.committed_weight(task_id, node_id)
    if expected is None or kept is None:
        return "no commitment on chain"
    try:
        weights[node_id] = weight(*kept)
    except SortitionError as exc:
        return f"its weight at the commit: {exc}"
    if not mine:
        del weights[node_id]
        return "committed but did not reveal"
    for r in mine:
        if not hmac.compare_digest(expected, commitment(alpha, node_id, r.pi, r.salt)):
            continue
        try:
            betas[node_id] = vrf.verify(info.vrf_public_key, r.pi, alpha)
            return ""
        except InvalidProof:
            continue
    del weights[node_id]
    return "reveal does not open its commitment or its proof does not verify under its VRF key"


def check_selection(view: ChainView, task_id: bytes, reveals: Iterable[Reveal], *, executor: str,
                    committee: Iterable[str]) -> Selection:
    """A claimed executor and committee (a scheduler's, an Attestation's) against the selection
    recomputed from the chain; SortitionError names what differs."""
    sel = select_from_chain(view, task_id, reveals)
    if _norm(executor) != sel.executor:
        raise SortitionError(f"executor {executor!r} is not the rightful one: {sel.executor} is")
    claimed = [_norm(c) for c in committee]
    if len(claimed) != len(set(claimed)) or set(claimed) != set(sel.committee):
        raise SortitionError(f"committee {sorted(claimed)} is not the rightful one: {sorted(sel.committee)} "
                             f"(k = {len(sel.committee)} on chain)")
    return sel
