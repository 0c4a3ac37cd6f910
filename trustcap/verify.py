"""Check a finished capsule's record offline, trusting neither the operator nor any single gateway.

What a Completed Capsule publishes (operator/capsule.py, decision 0090) is enough for anyone with the
chain to re-derive every claim:

1. identity: the task id is sha256 of the capsule id and the object's uid;
2. the selection: `select_from_chain` recomputes the executor and the committee from the chain's
   commitments, VRF keys, stake and reputation and the published reveals; it must name the executor the
   status names and the committee every round used;
3. each round: each verdict's EIP-712 signature under the chain's domain is by the verifier it names, a
   member of that committee (counted once), about this round, executor and phase; a passed round has
   at least ceil(2k/3) passed verdicts, k from the escrow (not from the record);
4. chain inclusion: each round's verdicts are leaves of a batch root that the AttestationLog holds;
5. the escrow: the task was assigned to this executor and committee for the post round and settled;
6. the results: the key that signed each result is the executor key every quorum quote of the pre
   round bound (so a recipient accepts a result only from the attested executor).

Each check is reported, passed or failed, with what it compared; nothing stops at the first failure.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trustcap.errors import TrustcapError


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _quorum(k: int) -> int:
    return -(-2 * k // 3)


def verify_capsule(capsule: Mapping[str, Any], view: Any, *, batch_recorded: Any = None) -> list[Check]:
    """Every check of the module docstring. `view` is a ChainView; `batch_root(batch_id) -> bytes | None`
    reads a recorded batch's root from the AttestationLog (None: skip inclusion, reported as failed)."""
    from trustcap.capsule.ids import capsule_id, task_id
    from trustcap.evidence.quote import decode_signed_quote
    from trustcap.evidence.verdict import Phase, SignedVerdict, verdict_id, verify_verdict
    from trustcap.merkle import MerkleTree, verdict_leaf, verify_proof
    from trustcap.sortition import Reveal, select_from_chain

    out: list[Check] = []
    meta, st = capsule["metadata"], capsule.get("status") or {}
    out.append(Check("completed", st.get("phase") == "Completed", f"phase {st.get('phase')}"))
    tid = task_id(capsule_id(meta["namespace"], meta["name"]), str(meta["uid"]))
    out.append(Check("task id", st.get("taskId") == "0x" + tid.hex(),
                     f"sha256(capsule id, uid) = 0x{tid.hex()[:16]}…"))
    info = view.task(tid)
    if info is None:
        out.append(Check("escrow", False, "no escrow task on chain for this task id"))
        return out
    k = int(info.k)
    vrf = st.get("vrf") or {}
    executor = str(vrf.get("executor", "")).lower()
    reveals = [Reveal(node_id=r["gateway"].lower(), pi=bytes.fromhex(r["proof"][2:]),
                      salt=bytes.fromhex(r["salt"][2:])) for r in vrf.get("reveals") or []]
    try:
        sel = select_from_chain(view, tid, reveals)
        committee = {c.lower() for c in sel.committee}
        out.append(Check("selection", sel.executor.lower() == executor,
                         f"recomputed from the chain: executor {sel.executor}, committee of {len(committee)}"
                         f" (the record names {executor or 'nobody'})"))
    except TrustcapError as exc:
        out.append(Check("selection", False, f"cannot recompute the selection: {exc}"))
        committee = set()
    domain = view.domain()
    record = list(st.get("record") or [])
    executor_keys: set[str] = set()
    by_batch: dict[str, list[bytes]] = {}
    inclusions: list[tuple[str, Mapping[str, Any], bytes]] = []
    roots: dict[str, str] = {}
    post_nonce = ""
    for rnd in record:
        phase = str(rnd.get("phase"))
        counted: dict[str, bool] = {}
        problems: list[str] = []
        same = {c.lower() for c in rnd.get("committee") or []} == committee
        for item in rnd.get("verdicts") or []:
            try:
                signed = SignedVerdict.model_validate(item.get("verdict"))
                signer = verify_verdict(signed, domain=domain).lower()
            except (TrustcapError, ValueError, TypeError) as exc:
                problems.append(f"{item.get('verifier')}: {exc}")
                continue
            v = signed.verdict
            if signer not in committee or signer in counted:
                problems.append(f"{signer}: not a committee member, or counted twice")
                continue
            if (v.attestation_id.lower() != str(rnd.get("nonce")).lower() or v.node.lower() != executor
                    or v.phase != int(Phase[phase.upper()])):
                problems.append(f"{signer}: about another round, node or phase")
                continue
            counted[signer] = v.passed
            chain = rnd.get("chain") or {}
            vid = "0x" + verdict_id(v, domain).hex()
            where = {str(i.get("verdictId", "")).lower(): i for i in chain.get("inclusions") or []}.get(vid)
            batch = str(chain.get("batchId") or "")
            if where is not None:  # this verdict's own batch and Merkle proof
                inclusions.append((vid, where, verdict_leaf(verdict_id(v, domain))))
            elif batch:
                by_batch.setdefault(batch, []).append(verdict_leaf(verdict_id(v, domain)))
                roots[batch] = str(chain.get("merkleRoot") or "")
            if phase == "pre" and v.passed and item.get("quote"):
                quote = decode_signed_quote(base64.b64decode(item["quote"])).quote
                executor_keys.add(str(quote.capsule_state.get("executorKey", "")).lower())
        passed = sum(1 for p in counted.values() if p)
        want_pass = rnd.get("result") == "Passed"
        ok = same and (passed >= _quorum(k) if want_pass else True) and not problems
        out.append(Check(f"round {rnd.get('name')}", ok,
                         f"{phase}: {passed} of {k} passed (quorum {_quorum(k)}), result {rnd.get('result')}"
                         + ("" if same else "; committee differs from the recomputed one")
                         + (f"; refused: {'; '.join(problems)}" if problems else "")))
        if phase == "post":
            post_nonce = str(rnd.get("nonce", "")).lower()
    for vid, where, leaf in inclusions:
        root_hex = str(where.get("merkleRoot", "")).lower()
        try:
            root = bytes.fromhex(root_hex.removeprefix("0x"))
            proof = [bytes.fromhex(str(p).removeprefix("0x")) for p in where.get("proof") or []]
        except ValueError:
            root, proof = b"", []
        included = verify_proof(root, leaf, proof)
        recorded = included and bool(batch_recorded(str(where.get("batchId", "")), root_hex)) if batch_recorded \
            else False
        out.append(Check(f"verdict {vid[:10]}… on chain", included and recorded,
                         f"Merkle proof {'leads' if included else 'does NOT lead'} to root {root_hex[:18]}…, "
                         + ("recorded in the AttestationLog" if recorded else "NOT found on chain")))
    for batch, leaves in by_batch.items():
        local = "0x" + MerkleTree(leaves).root.hex()
        recorded = bool(batch_recorded(batch, local)) if batch_recorded else False
        out.append(Check(f"chain batch {batch[:10]}…", recorded and local == roots[batch].lower(),
                         f"{len(leaves)} verdict leaves; root {local[:18]}… "
                         + ("recorded in the AttestationLog" if recorded else "NOT found on chain")))
    out.append(Check("escrow", info.state in ("Paid",) and str(info.executor).lower() == executor
                     and {v.lower() for v in info.verifiers} == committee
                     and ("0x" + bytes(info.attestation_id).hex()) == post_nonce,
                     f"state {info.state}, assigned to the revealed executor and committee for the post round"))
    signer = str(st.get("resultSigner", "")).lower()
    out.append(Check("result signer", bool(signer) and executor_keys == {signer},
                     f"results signed by {signer[:18]}…; the pre round's quorum quotes bound "
                     f"{', '.join(sorted(x[:18] + '…' for x in executor_keys)) or 'no key'}"))
    return out


def all_ok(checks: Sequence[Check]) -> bool:
    return all(c.ok for c in checks)
