"""The broker's check: release an input's content key only to the executor a quorum attested.

The broker trusts nothing in the request; every claim is recomputed from the chain or verified by
signature (docs/lifecycle-interfaces.md section 6, docs/decisions/0092-key-release-broker.md):

    request field      checked against
    capsule            capsule id and task id recomputed from {namespace, name, uid}; the escrow task exists, Funded
    manifest           parsed strictly; its binding digest recomputed; `input` is one of its inputs, owned by us
    header             unwraps with our key; binds our capsule id, binding digest and our key as owner
    reveals            sortition.select_from_chain: k, seed, committers, stakes, keys all from the chain
    round              pre round of this task and capsule; executor and committee == the recomputed ones
    verdicts[i]        EIP-712 signature under the chain's domain by its named verifier, a committee member,
                       counted once; passed, PRE, about the executor, attestationId == round.nonce, the
                       round's policy; its quote hashes to quoteDigest, is signed by its agent key and
                       countersigned by the executor's gateway, and its capsule_state binds this task, the
                       binding digest, the image, this round, phase pre and one executor key for all
    -> >= ceil(2k/3) such verdicts: the content key wrapped to that executor key, for this input only
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trustcap.capsule.envelope import unwrap_cek
from trustcap.capsule.errors import CapsuleError, EnvelopeError, NotARecipient
from trustcap.capsule.ids import capsule_id, task_id
from trustcap.capsule.keys import KeyPair
from trustcap.capsule.manifest import parse_manifest
from trustcap.errors import TrustcapError
from trustcap.evidence import quote as quotes
from trustcap.evidence.signing import address_of, recover_address
from trustcap.evidence.verdict import Phase, SignedVerdict, verify_verdict
from trustcap.release.errors import ReleaseDenied
from trustcap.release.keywrap import wrap_key
from trustcap.sortition import Reveal, Selection, SortitionError, select_from_chain

if TYPE_CHECKING:
    from trustcap.chain.escrow import ChainView

__all__ = ["MAX_VERDICTS", "Release", "check_release", "quorum_of"]

MAX_VERDICTS = 31
_FIELDS = ("capsule", "manifest", "input", "header", "round", "verdicts", "reveals")


def quorum_of(k: int) -> int:
    """ceil(2k/3), as TaskEscrow counts it."""
    return (2 * k + 2) // 3


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


def check_release(body: Any, *, key: KeyPair, view: ChainView) -> Release:
    """Run every check of the module docstring on a request body; ReleaseDenied names the first field
    at fault (a malformed field is status 400, a refused claim 403). Nothing is released on any error."""
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
    nonce = _round(rnd, sel, cap=(ns, name, uid), tid=tid)
    policy = rnd.get("policyDigest")

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
                                                nonce=nonce, policy=policy, tid=tid, binding=binding,
                                                image=manifest.function.digest)
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


def _round(rnd: Mapping[str, Any], sel: Selection, *, cap: tuple[str, str, str], tid: bytes) -> str:
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
    return str(nonce).lower()


def _one_verdict(item: Any, where: str, *, domain: Any, committee: set[str], sel: Selection, nonce: str,
                 policy: Any, tid: bytes, binding: bytes, image: str) -> tuple[str, bytes]:
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
    if v.attestation_id.lower() != nonce:
        raise ReleaseDenied(f"{where}.verdict", "is about another round (attestationId != round.nonce)")
    if isinstance(policy, str) and v.policy_digest.lower() != policy.lower():
        raise ReleaseDenied(f"{where}.verdict", "was appraised under another policy than the round's")
    try:
        sq = quotes.decode_signed_quote(_b64(item.get("quote"), f"{where}.quote"))
    except TrustcapError as exc:
        raise ReleaseDenied(f"{where}.quote", str(exc)) from None
    q = sq.quote
    if _0x(quotes.quote_digest(q)) != v.quote_digest.lower():
        raise ReleaseDenied(f"{where}.quote", "does not hash to the verdict's quoteDigest")
    _quote_signatures(sq, f"{where}.quote", sel.executor)
    state = q.capsule_state
    key_hex = state.get("executorKey")
    if not isinstance(key_hex, str):
        raise ReleaseDenied(f"{where}.quote", "capsule_state names no executorKey")
    executor_key = _hex(key_hex, f"{where}.quote.capsule_state.executorKey", 33)
    expected = {"taskId": _0x(tid), "manifestDigest": _0x(binding), "imageDigest": image, "round": nonce,
                "phase": "pre", "executorKey": key_hex}
    got = {k: (s.lower() if isinstance(s := state.get(k), str) else s) for k in expected}
    wrong = sorted(k for k in expected if got[k] != expected[k].lower())
    if wrong:
        raise ReleaseDenied(f"{where}.quote.capsule_state.{wrong[0]}",
                            f"is {got[wrong[0]]!r}, not {expected[wrong[0]]!r}")
    return signer, executor_key


def _quote_signatures(sq: quotes.SignedQuote, field: str, executor: str) -> None:
    """Both signatures of a quote: the agent key it names, countersigned by the executor's gateway. (The
    agent key was appraised against enrolment by each verifier; the broker checks the quote is whole.)"""
    qd = quotes.quote_digest(sq.quote)
    agent_sig = bytes.fromhex(sq.agent_signature[2:])
    try:
        agent_ok = recover_address(quotes._agent_digest(qd), agent_sig) == address_of(
            bytes.fromhex(sq.quote.agent_key[2:]))
        gateway = recover_address(quotes._gateway_digest(qd, agent_sig), bytes.fromhex(sq.gateway_signature[2:]))
    except TrustcapError as exc:
        raise ReleaseDenied(field, f"signature is not valid: {exc}") from None
    if not agent_ok:
        raise ReleaseDenied(field, "is not signed by the agent key it names")
    if gateway.lower() != executor or sq.quote.gateway.lower() != executor:
        raise ReleaseDenied(field, f"is not countersigned by the executor's gateway {executor}")
