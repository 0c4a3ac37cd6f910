"""The broker's check: release an input's content key only to the executor a quorum attested, now.

The broker trusts nothing in the request; every claim is recomputed from the chain or verified by
signature (docs/lifecycle-interfaces.md section 6, docs/decisions/0092-key-release-broker.md, and what binds
the evidence to this one release, docs/decisions/0095-release-and-cosign-freshness.md):

    request field      checked against
    capsule            capsule id and task id recomputed from {namespace, name, uid}; the escrow task exists, Funded
    manifest           parsed strictly; its binding digest recomputed; `input` is one of its inputs, owned by us
    header             unwraps with our key; binds our capsule id, binding digest and our key as owner
    reveals            sortition.select_from_chain: k, seed, committers, stakes, keys all from the chain
    round              pre round of this task and capsule; executor and committee == the recomputed ones;
                       epoch == the task's seed block on chain (funding block + 1); a policyDigest and a node
    verdicts[i]        EIP-712 signature under the chain's domain by its named verifier, a committee member,
                       counted once; passed, PRE, about the executor, attestationId == round.nonce, the
                       round's epoch and policy, issued within the evidence window and not after now + skew;
                       its quote hashes to quoteDigest and passes appraise_quote: signed by its agent key,
                       countersigned by the executor's gateway, about the round's node, answering exactly
                       binding.challenge_nonce(task, round, "pre", that verifier), issued within the window,
                       not after the verdict; its capsule_state binds this task, the binding digest, the
                       image, this round, phase pre and one executor key for all
    -> >= ceil(2k/3) such verdicts: the content key wrapped to that executor key, for this input only
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eth_utils.address import to_checksum_address

from trustcap.capsule.envelope import unwrap_cek
from trustcap.capsule.errors import CapsuleError, EnvelopeError, NotARecipient
from trustcap.capsule.ids import capsule_id, task_id
from trustcap.capsule.keys import KeyPair
from trustcap.capsule.manifest import parse_manifest
from trustcap.chain.escrow import quorum_of  # the one definition, as TaskEscrow counts it
from trustcap.errors import TrustcapError
from trustcap.evidence import failure as fid
from trustcap.evidence import quote as quotes
from trustcap.evidence.freshness import NonceRegistry
from trustcap.evidence.verdict import Phase, SignedVerdict, verify_verdict
from trustcap.release.binding import MAX_EVIDENCE_AGE_S, MAX_SKEW_S, challenge_nonce
from trustcap.release.errors import ReleaseDenied
from trustcap.release.keywrap import wrap_key
from trustcap.sortition import Reveal, Selection, SortitionError, select_from_chain

if TYPE_CHECKING:
    from trustcap.chain.escrow import ChainView

__all__ = ["MAX_VERDICTS", "Release", "check_release", "quorum_of"]

MAX_VERDICTS = 31
_FIELDS = ("capsule", "manifest", "input", "header", "round", "verdicts", "reveals")


@dataclass(frozen=True)
class Release:
    """What the broker answers, and what it logs: whom it released which input to, on whose word."""

    wrapped_key: bytes
    executor_key: bytes
    executor: str
    task_id: bytes
    input_name: str
    counted: tuple[str, ...]  # the committee members whose verdicts made the quorum

    def answer(self) -> dict[str, str]:
        return {"wrappedKey": base64.b64encode(self.wrapped_key).decode(),
                "executorKey": "0x" + self.executor_key.hex()}


def _str(doc: Mapping[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise ReleaseDenied(f"{where}{key}", "must be a non-empty string", status=400)
    return value


def _hex(value: Any, field: str, n: int) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x") or len(value) != 2 + 2 * n:
        raise ReleaseDenied(field, f"must be 0x-hex of {n} bytes", status=400)
    try:
        return bytes.fromhex(value[2:])
    except ValueError:
        raise ReleaseDenied(field, f"must be 0x-hex of {n} bytes", status=400) from None


def _b64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise ReleaseDenied(field, "must be a base64 string", status=400)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ReleaseDenied(field, "is not valid base64", status=400) from None


def _0x(b: bytes) -> str:
    return "0x" + b.hex()


@dataclass(frozen=True)
class _Bound:
    """What every counted verdict and quote must agree with: this release's task, round and time."""

    tid: bytes
    nonce: str  # the round's id (spec.nonce), lowercase 0x-hex
    epoch: int
    policy: str
    node: str  # the round's HPCNode: the quote's node_id
    binding: bytes
    image: str
    now: float
    max_age_s: float
    max_skew_s: float


def check_release(body: Any, *, key: KeyPair, view: ChainView, now: float | None = None,
                  max_age_s: float = MAX_EVIDENCE_AGE_S, max_skew_s: float = MAX_SKEW_S) -> Release:
    """Run every check of the module docstring on a request body; ReleaseDenied names the first field
    at fault (a malformed field is status 400, a refused claim 403). Nothing is released on any error.

    `now` is the broker's clock (unix seconds; time.time() when None): quotes and verdicts older than
    `max_age_s`, or dated more than `max_skew_s` ahead of it, do not count."""
    now = time.time() if now is None else float(now)
    if not isinstance(body, Mapping):
        raise ReleaseDenied("body", "must be a JSON object", status=400)
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise ReleaseDenied(unknown[0], "is not a field of a release request", status=400)
    for f in _FIELDS:
        if f not in body:
            raise ReleaseDenied(f, "is required", status=400)
    me = key.public_key()

    # capsule -> ids; the escrow task
    cap = body["capsule"]
    if not isinstance(cap, Mapping):
        raise ReleaseDenied("capsule", "must be an object {namespace, name, uid}", status=400)
    ns, name, uid = _str(cap, "namespace", "capsule."), _str(cap, "name", "capsule."), _str(cap, "uid", "capsule.")
    try:
        cid = capsule_id(ns, name)
        tid = task_id(cid, uid)
    except CapsuleError as exc:
        raise ReleaseDenied("capsule", str(exc), status=400) from None
    task = view.task(tid)
    if task is None:
        raise ReleaseDenied("capsule", f"task {_0x(tid)} is not funded on chain")
    if task.state != "Funded":
        raise ReleaseDenied("capsule", f"task {_0x(tid)} is {task.state} on chain, not Funded")

    # manifest, input
    try:
        manifest = parse_manifest(body["manifest"])
    except CapsuleError as exc:
        raise ReleaseDenied("manifest", str(exc), status=400) from None
    binding = manifest.binding_digest()
    input_name = body["input"]
    if not isinstance(input_name, str):
        raise ReleaseDenied("input", "must be an input name", status=400)
    inp = next((i for i in manifest.inputs if i.name == input_name), None)
    if inp is None:
        raise ReleaseDenied("input", f"{input_name!r} is not an input of the manifest")
    if inp.owner != _0x(me):
        raise ReleaseDenied("input", f"{input_name!r} is owned by {inp.owner}, not by this broker's key {_0x(me)}")

    # header: ours, for this capsule and binding
    head = _b64(body["header"], "header")
    try:
        header, cek = unwrap_cek(head, key)
    except NotARecipient:
        raise ReleaseDenied("header", "this broker's key is not a recipient of the envelope") from None
    except EnvelopeError as exc:
        raise ReleaseDenied("header", str(exc), status=400) from None
    if header.owner != me:
        raise ReleaseDenied("header", f"the envelope is signed by {_0x(header.owner)}, not by this broker's key")
    if header.capsule_id != cid:
        raise ReleaseDenied("header", f"the envelope is bound to capsule {_0x(header.capsule_id)}, not {_0x(cid)}")
    if header.manifest_digest != binding:
        raise ReleaseDenied("header", f"the envelope is bound to manifest {_0x(header.manifest_digest)}, not this "
                                      f"manifest's binding digest {_0x(binding)}")

    # selection from the chain; the round must name it
    sel = _selection(body["reveals"], view, tid)
    rnd = body["round"]
    if not isinstance(rnd, Mapping):
        raise ReleaseDenied("round", "must be the pre round's Attestation spec", status=400)
    nonce, policy, node = _round(rnd, sel, cap=(ns, name, uid), tid=tid, epoch=task.funded_block + 1)
    bound = _Bound(tid=tid, nonce=nonce, epoch=task.funded_block + 1, policy=policy, node=node, binding=binding,
                   image=manifest.function.digest, now=now, max_age_s=max_age_s, max_skew_s=max_skew_s)

    # verdicts
    raw = body["verdicts"]
    if not isinstance(raw, list) or len(raw) > MAX_VERDICTS:
        raise ReleaseDenied("verdicts", f"must be a list of at most {MAX_VERDICTS} verdicts", status=400)
    domain = view.domain()
    committee = set(sel.committee)
    counted: dict[str, bytes] = {}
    problems: list[str] = []
    for i, item in enumerate(raw):
        where = f"verdicts[{i}]"
        try:
            member, executor_key = _one_verdict(item, where, domain=domain, committee=committee, sel=sel,
                                                bound=bound)
        except ReleaseDenied as exc:
            problems.append(str(exc))
            continue
        if member in counted:
            problems.append(f"{where}: verifier {member} is counted already")
            continue
        counted[member] = executor_key
    keys = set(counted.values())
    if len(keys) > 1:
        raise ReleaseDenied("verdicts", f"the quotes bind {len(keys)} different executor keys, not one")
    need = quorum_of(len(sel.committee))
    if len(counted) < need:
        why = "; ".join(problems) if problems else "no verdicts"
        raise ReleaseDenied("verdicts", f"{len(counted)} valid passed pre verdicts of the committee, the quorum is "
                                        f"{need} of {len(sel.committee)} ({why})")
    executor_key = keys.pop()
    wrapped = wrap_key(cek, executor_key, capsule_id=cid, task_id=tid, input_name=input_name)
    return Release(wrapped, executor_key, sel.executor, tid, input_name, tuple(sorted(counted)))


def _selection(raw: Any, view: ChainView, tid: bytes) -> Selection:
    if not isinstance(raw, list) or len(raw) > 1024:
        raise ReleaseDenied("reveals", "must be a list of {node, pi, salt}", status=400)
    reveals = []
    for i, r in enumerate(raw):
        if not isinstance(r, Mapping):
            raise ReleaseDenied(f"reveals[{i}]", "must be an object {node, pi, salt}", status=400)
        node = _str(r, "node", f"reveals[{i}].")
        try:
            pi = bytes.fromhex(_str(r, "pi", f"reveals[{i}].").removeprefix("0x"))
            salt = bytes.fromhex(_str(r, "salt", f"reveals[{i}].").removeprefix("0x"))
        except ValueError:
            raise ReleaseDenied(f"reveals[{i}]", "pi and salt must be hex", status=400) from None
        reveals.append(Reveal(node.lower(), pi, salt))
    try:
        return select_from_chain(view, tid, reveals)
    except SortitionError as exc:
        raise ReleaseDenied("reveals", str(exc)) from None


def _round(rnd: Mapping[str, Any], sel: Selection, *, cap: tuple[str, str, str], tid: bytes,
           epoch: int) -> tuple[str, str, str]:
    """(round id, policy digest, node) of a round that names this task, its chain selection and epoch."""
    if rnd.get("phase") != "pre":
        raise ReleaseDenied("round.phase", f"is {rnd.get('phase')!r}: keys are released on the pre round only")
    if _hex(rnd.get("taskId"), "round.taskId", 32) != tid:
        raise ReleaseDenied("round.taskId", f"is not this capsule's task {_0x(tid)}")
    ref = rnd.get("capsuleRef")
    if not isinstance(ref, Mapping) or (ref.get("namespace"), ref.get("name"), ref.get("uid")) != cap:
        raise ReleaseDenied("round.capsuleRef", "does not name this capsule {namespace, name, uid}")
    executor = rnd.get("executor")
    if not isinstance(executor, str) or executor.lower() != sel.executor:
        raise ReleaseDenied("round.executor", f"is {executor!r}; the chain's selection is {sel.executor}")
    members = (rnd.get("committee") or {}).get("members") if isinstance(rnd.get("committee"), Mapping) else None
    if not isinstance(members, list) or not all(isinstance(m, Mapping) and isinstance(m.get("address"), str)
                                                for m in members):
        raise ReleaseDenied("round.committee.members", "must list {address, vrfProof}", status=400)
    addresses = [str(m["address"]).lower() for m in members]
    if len(addresses) != len(set(addresses)) or set(addresses) != set(sel.committee):
        raise ReleaseDenied("round.committee.members", f"{sorted(addresses)} is not the chain's selection "
                                                      f"{sorted(sel.committee)}")
    nonce = rnd.get("nonce")
    _hex(nonce, "round.nonce", 32)
    # The epoch is the task's seed block (operator/capsule.py opens every round of a task with it), so the
    # broker reads it from the chain rather than from the round, and a round of another task cannot carry it.
    got = rnd.get("epoch")
    if isinstance(got, bool) or not isinstance(got, int):
        raise ReleaseDenied("round.epoch", "must be an integer", status=400)
    if got != epoch:
        raise ReleaseDenied("round.epoch", f"is {got}; this task's epoch on chain is its seed block {epoch} "
                                           "(funding block + 1)")
    policy = rnd.get("policyDigest")
    _hex(policy, "round.policyDigest", 32)
    node = rnd.get("node")
    if not isinstance(node, str) or not node:
        raise ReleaseDenied("round.node", "must name the executor's HPCNode", status=400)
    return str(nonce).lower(), str(policy).lower(), node


def _one_verdict(item: Any, where: str, *, domain: Any, committee: set[str], sel: Selection,
                 bound: _Bound) -> tuple[str, bytes]:
    """One verdict and its quote; returns (committee member, executor key) or raises naming the field."""
    if not isinstance(item, Mapping):
        raise ReleaseDenied(where, "must be an object {verdict, quote}", status=400)
    try:
        signed = SignedVerdict.model_validate(item.get("verdict"))
        signer = verify_verdict(signed, domain=domain).lower()
    except (TrustcapError, ValueError, TypeError) as exc:
        raise ReleaseDenied(f"{where}.verdict", f"does not verify: {exc}") from None
    v = signed.verdict
    if signer not in committee:
        raise ReleaseDenied(f"{where}.verdict", f"verifier {signer} is not in the committee")
    if not v.passed:
        raise ReleaseDenied(f"{where}.verdict", f"verifier {signer} did not pass the executor")
    if v.phase != int(Phase.PRE):
        raise ReleaseDenied(f"{where}.verdict", f"phase {v.phase} is not PRE")
    if v.node.lower() != sel.executor:
        raise ReleaseDenied(f"{where}.verdict", f"is about node {v.node.lower()}, not the executor {sel.executor}")
    if v.attestation_id.lower() != bound.nonce:
        raise ReleaseDenied(f"{where}.verdict", "is about another round (attestationId != round.nonce)")
    if v.epoch != bound.epoch:
        raise ReleaseDenied(f"{where}.verdict", f"is of epoch {v.epoch}, not this task's epoch {bound.epoch}")
    if v.policy_digest.lower() != bound.policy:
        raise ReleaseDenied(f"{where}.verdict", "was appraised under another policy than the round's")
    _fresh(f"{where}.verdict", "verdict", v.issued_at, bound)
    try:
        sq = quotes.decode_signed_quote(_b64(item.get("quote"), f"{where}.quote"))
    except TrustcapError as exc:
        raise ReleaseDenied(f"{where}.quote", str(exc)) from None
    q = sq.quote
    if _0x(quotes.quote_digest(q)) != v.quote_digest.lower():
        raise ReleaseDenied(f"{where}.quote", "does not hash to the verdict's quoteDigest")
    _appraise(sq, f"{where}.quote", verifier=signer, executor=sel.executor, bound=bound)
    if q.issued_at > v.issued_at + bound.max_skew_s:
        raise ReleaseDenied(f"{where}.quote", f"is dated {q.issued_at}, after the verdict that appraised it "
                                              f"({v.issued_at})")
    state = q.capsule_state
    key_hex = state.get("executorKey")
    if not isinstance(key_hex, str):
        raise ReleaseDenied(f"{where}.quote", "capsule_state names no executorKey")
    executor_key = _hex(key_hex, f"{where}.quote.capsule_state.executorKey", 33)
    expected = {"taskId": _0x(bound.tid), "manifestDigest": _0x(bound.binding), "imageDigest": bound.image,
                "round": bound.nonce, "phase": "pre", "executorKey": key_hex}
    got = {k: (s.lower() if isinstance(s := state.get(k), str) else s) for k in expected}
    wrong = sorted(k for k in expected if got[k] != expected[k].lower())
    if wrong:
        raise ReleaseDenied(f"{where}.quote.capsule_state.{wrong[0]}",
                            f"is {got[wrong[0]]!r}, not {expected[wrong[0]]!r}")
    return signer, executor_key


def _fresh(field: str, what: str, issued_at: int, bound: _Bound) -> None:
    age = bound.now - issued_at
    if age > bound.max_age_s:
        raise ReleaseDenied(field, f"the {what} is {age:.0f} s old; keys are released on evidence of the last "
                                   f"{bound.max_age_s:g} s only (a new pre round is needed)")
    if -age > bound.max_skew_s:
        raise ReleaseDenied(field, f"the {what} is dated {-age:.0f} s ahead of the broker's clock (at most "
                                   f"{bound.max_skew_s:g} s of skew)")


def _appraise(sq: quotes.SignedQuote, field: str, *, verifier: str, executor: str, bound: _Bound) -> None:
    """appraise_quote with this verdict's expectations: the agent's signature, the executor's gateway's
    countersignature, the round's node, the verifier's challenge nonce of this round (binding.py), and an
    issue time inside the window. The agent key is the quote's own: each verifier appraised it against the
    HPC's enrolment, and their verdicts are what the quorum counts; the broker checks the quote is whole."""
    expected = challenge_nonce(task_id=_0x(bound.tid), round_id=bound.nonce, phase="pre", verifier=verifier)
    # The broker keeps no nonce memory of its own: a second request on the same evidence only wraps the key
    # again to the same attested executor key (decision 0092). A one-nonce registry, issued now, lets
    # appraise_quote check that the quote answers exactly `expected` and is inside the window.
    nonces = NonceRegistry(bound.max_age_s, capacity=1, clock=lambda: bound.now, token=lambda _n: expected)
    nonces.issue()
    report = quotes.appraise_quote(sq, nonces=nonces, expected_nonce=expected, node_id=bound.node,
                                   agent_key=bytes.fromhex(sq.quote.agent_key[2:]),
                                   gateway_address=to_checksum_address(executor), now=bound.now,
                                   max_age_seconds=bound.max_age_s, max_skew_seconds=bound.max_skew_s)
    if report.ok:
        return
    why = []
    for f in report.failures:
        if f.event_id == fid.NONCE_MISMATCH:
            why.append(f"{f.event_id}: its nonce is not verifier {verifier}'s challenge of this round "
                       "(trustcap.release.binding.challenge_nonce)")
        elif f.event_id in (fid.QUOTE_IDENTITY_GATEWAY, fid.QUOTE_SIGNATURE_GATEWAY):
            why.append(f"{f.event_id}: is not countersigned by the executor's gateway {executor}")
        else:
            why.append(str(f))
    raise ReleaseDenied(field, "; ".join(why))
