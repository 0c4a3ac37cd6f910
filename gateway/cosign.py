"""A verifier gateway's co-signature on a chain-writer batch, given only after it checked every leaf itself.

Decision 0094. `AttestationLog.recordBatch` takes a batch (epoch, Merkle root, count) on the word of
`quorum` registered, active nodes. If the operator held those keys it alone could record any root; so
the signatures come from the verifier gateways' trust roots, and each gateway signs only a batch whose
every leaf it found, itself, in a decided round of the cluster: a verdict entry whose signed verdict
verifies under the chain's domain, by a member of that round's committee, where the committee is not the
operator's word (`spec.committee`) but the task's selection recomputed from the chain and the reveals
(`select_from_chain`, as the owners' brokers do; decision 0095). The chain-writer collects
`quorum` of these; a batch one gateway would refuse is not refused by the others on its say-so, and one
they all refuse is never sent.

    chain-writer (operator)                    CosignService (this gateway, trust root R)        API server
      | POST /v1/cosign {epoch, root, count,     |                                                  |
      |   chainId, contract, leaves: [Verdict]}  |                                                  |
      |----------------------------------------->| 1 body well-formed, bounded                  400/413
      |                                          | 2 chainId, contract == this gateway's chain      403
      |                                          | 3 count == len(leaves); root == tree(leaves)      403
      |                                          | 4 each leaf: epoch == batch epoch, once           403
      |                                          |-- list Attestations (system namespace) ------->| 503
      |                                          | 5 each leaf: the round whose spec.nonce == leaf.attestationId,
      |                                          |   decided (status.result Passed/Failed), node and phase the
      |                                          |   round's, and equal to a status.verdicts[] entry's signed
      |                                          |   verdict that verifies (verify_verdict, chain domain), by
      |                                          |   that entry's verifier                                  403
      |                                          |-- reveal Secrets of the round's task ------------>| 503
      |                                          |-- getTask, block hash, commitments, nodes -> chain  503
      |                                          | 6 each leaf's round: select_from_chain(task, reveals);
      |                                          |   spec.executor == its executor, the set of spec.committee
      |                                          |   == its committee; the leaf's verifier is in it          403
      |<-- 200 {signature, address} -------------| sig = R.sign(batch_digest(epoch, root, count, chainId, contract))
      |<-- 4xx {error, field, failures} ---------| every failed leaf named (leaves[i]: why); nothing signed

The writer recomputes nothing on the gateway's behalf: the gateway rebuilds the tree from the leaves
exactly as the writer does (`verdict_leaf(verdict_id(leaf, domain))`, OZ layout, leaves sorted), so the
root it signs is the root of the leaves it checked. A gateway signs one batch at a time (a second gets 503
and is asked again later); the body is at most `MAX_BODY` bytes and `MAX_LEAVES` leaves.

Why recompute: an operator that writes its own registered nodes into `spec.committee` would otherwise have
their verdicts co-signed by every honest gateway (a sybil committee). A task's selection is remembered once
it matched a round (`SELECTIONS` tasks): registry reputation and stake move with later settlements, and a
round's committee is the one drawn when the task was scheduled, not one drawn again today.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, Final, Protocol

from pydantic import ValidationError

from trustcap import merkle
from trustcap.chain.typed import batch_digest
from trustcap.errors import TrustcapError
from trustcap.evidence.errors import EvidenceError
from trustcap.evidence.signing import Signer
from trustcap.evidence.verdict import Domain, Phase, SignedVerdict, Verdict, verdict_id, verify_verdict
from trustcap.forms import field_error
from trustcap.gateway.participant import REVEAL_LABEL
from trustcap.sortition import ChainView, Reveal, Selection, SortitionError, select_from_chain

__all__ = ["MAX_BODY", "MAX_LEAVES", "SELECTIONS", "CosignKube", "CosignService", "RevealSecrets"]

log = logging.getLogger("trustcap.gateway")

MAX_BODY: Final = 1 << 20  # 1000 verdicts of ~450 bytes each fit
MAX_LEAVES: Final = 1000  # the writer's default max_batch
DECIDED: Final = ("Passed", "Failed")
_FIELDS: Final = frozenset({"epoch", "root", "count", "chainId", "contract", "leaves"})
_U64: Final = (1 << 64) - 1
SELECTIONS: Final = 1024  # tasks whose confirmed selection is remembered


class CosignKube(Protocol):
    """What the co-signer reads in the cluster (gateway/committee.py `KubeRounds` in production)."""

    def attestations(self, namespace: str) -> list[dict[str, Any]]: ...


class RevealSecrets(Protocol):
    """Where the tasks' selection reveals are (gateway/participant.py `KubeCapsules` in production): each
    Secret labelled `trustcap.io/reveal=<task id hex[:16]>`, decoded, as {node, pi, salt}."""

    def secrets(self, namespace: str, label_selector: str) -> list[dict[str, str]]: ...


class _Refused(Exception):
    def __init__(self, status: HTTPStatus, field: str, cause: str, failures: Sequence[str] = ()) -> None:
        super().__init__(cause)
        self.status, self.field, self.cause, self.failures = status, field, cause, list(failures)


class _Unavailable(Exception):
    """The rounds cannot be read now (API server); the writer asks again later."""


class CosignService:
    """`handle(body)` for `POST /v1/cosign` on the relay: (HTTP status, JSON body); never raises for a
    client's fault or an API-server outage (503: the writer asks again later)."""

    def __init__(self, root: Signer, kube: CosignKube, *, namespace: str, domain: Domain, view: ChainView,
                 reveals: RevealSecrets) -> None:
        self.root = root
        self.kube = kube
        self.namespace = namespace
        self.domain = domain
        self.view = view
        self.reveals = reveals
        self._selections: OrderedDict[bytes, Selection] = OrderedDict()
        self._one = threading.Lock()
        self.stats = {"signed": 0, "refused": 0, "busy": 0, "unavailable": 0}

    def handle(self, body: bytes) -> tuple[int, bytes]:
        if not self._one.acquire(blocking=False):
            self.stats["busy"] += 1
            return _answer(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "busy: co-signing another batch, retry"})
        try:
            return self._handle(body)
        finally:
            self._one.release()

    def _handle(self, body: bytes) -> tuple[int, bytes]:
        try:
            epoch, root, count, leaves = self._parse(body)
            self._check_leaves(epoch, leaves)
        except _Refused as exc:
            self.stats["refused"] += 1
            log.info("cosign: batch refused: %s: %s", exc.field, exc.cause)
            doc: dict[str, Any] = {"error": f"field {exc.field!r}: {exc.cause}", "field": exc.field}
            if exc.failures:
                doc["failures"] = exc.failures
            return _answer(exc.status, doc)
        except _Unavailable as exc:  # the API server's outage: no evidence either way
            self.stats["unavailable"] += 1
            log.warning("cosign: cannot read the rounds: %s", exc)
            return _answer(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"rounds unavailable: {str(exc)[:200]}"})
        digest = batch_digest(epoch, root, count, self.domain.chain_id, self.domain.verifying_contract)
        sig = self.root.sign_digest(digest)
        self.stats["signed"] += 1
        log.info("cosign: signed batch epoch %s root 0x%s (%s verdicts, each checked)", epoch, root.hex(), count)
        return _answer(HTTPStatus.OK, {"signature": "0x" + sig.hex(), "address": self.root.address.lower()})

    # -- the batch as a whole ------------------------------------------------------------------------
    def _parse(self, body: bytes) -> tuple[int, bytes, int, list[Verdict]]:
        bad = HTTPStatus.BAD_REQUEST
        if len(body) > MAX_BODY:
            raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body", f"over {MAX_BODY} bytes")
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _Refused(bad, "body", "request body is not JSON") from None
        if not isinstance(doc, dict):
            raise _Refused(bad, "body", "request body is not a JSON object")
        missing, unknown = sorted(_FIELDS - set(doc)), sorted(set(doc) - _FIELDS)
        if missing or unknown:
            raise _Refused(bad, (missing or unknown)[0], "missing" if missing else "unknown field")
        epoch, count, chain_id, contract = doc["epoch"], doc["count"], doc["chainId"], doc["contract"]
        for name, value, top in (("epoch", epoch, _U64), ("count", count, MAX_LEAVES), ("chainId", chain_id, _U64)):
            if type(value) is not int or not 0 <= value <= top:
                raise _Refused(bad, name, f"must be an integer from 0 to {top}")
        root = _hex32(doc["root"])
        if root is None:
            raise _Refused(bad, "root", "must be 0x and 64 lowercase hex digits")
        if not isinstance(contract, str):
            raise _Refused(bad, "contract", "must be an address")
        if chain_id != self.domain.chain_id or contract.lower() != self.domain.verifying_contract.lower():
            raise _Refused(HTTPStatus.FORBIDDEN, "contract", f"this gateway signs for chain {self.domain.chain_id} "
                           f"AttestationLog {self.domain.verifying_contract} only, not chain {chain_id} {contract}")
        raw = doc["leaves"]
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_LEAVES:
            raise _Refused(bad, "leaves", f"must be a list of 1 to {MAX_LEAVES} verdicts")
        leaves: list[Verdict] = []
        for i, item in enumerate(raw):
            try:
                leaves.append(Verdict.model_validate(item))
            except ValidationError as exc:
                where, what = field_error(exc, "(leaf)")
                raise _Refused(bad, f"leaves[{i}]", f"{where} is not valid: {what}") from None
        if count != len(leaves):
            raise _Refused(HTTPStatus.FORBIDDEN, "count", f"count {count} but {len(leaves)} leaves")
        mine = merkle.MerkleTree([merkle.verdict_leaf(verdict_id(v, self.domain)) for v in leaves]).root
        if mine != root:
            raise _Refused(HTTPStatus.FORBIDDEN, "root", f"the leaves' Merkle root is 0x{mine.hex()}, not "
                           f"0x{root.hex()}")
        return epoch, root, count, leaves

    # -- each leaf, against the cluster's rounds -----------------------------------------------------
    def _check_leaves(self, epoch: int, leaves: Sequence[Verdict]) -> None:
        rounds: dict[str, Mapping[str, Any]] = {}
        try:
            listed = self.kube.attestations(self.namespace)
        except (TrustcapError, OSError) as exc:
            raise _Unavailable(str(exc)) from exc
        for att in listed:
            nonce = str(((att or {}).get("spec") or {}).get("nonce", "")).lower()
            if nonce:
                rounds[nonce] = att
        failures: list[str] = []
        seen: set[bytes] = set()
        committees: dict[str, tuple[frozenset[str], str]] = {}  # per round: (chain's committee, why not)
        for i, leaf in enumerate(leaves):
            vid = verdict_id(leaf, self.domain)
            why = ("the same verdict twice in one batch" if vid in seen
                   else f"epoch {leaf.epoch} is not the batch's epoch {epoch}" if leaf.epoch != epoch
                   else self._refusal(leaf, rounds.get(leaf.attestation_id.lower()), committees))
            seen.add(vid)
            if why:
                failures.append(f"leaves[{i}] (round {leaf.attestation_id[:18]}.., verifier {leaf.verifier}): {why}")
        if failures:
            first = failures[0].split(" ", 1)[0]
            raise _Refused(HTTPStatus.FORBIDDEN, first, "; ".join(failures), failures)

    def _refusal(self, leaf: Verdict, att: Mapping[str, Any] | None,
                 committees: dict[str, tuple[frozenset[str], str]]) -> str:
        """Why this leaf is not a counted verdict of a decided round, or "" when it is. _Unavailable when
        the reveals or the chain cannot be read (no evidence either way)."""
        if att is None:
            return f"no Attestation in {self.namespace} has spec.nonce {leaf.attestation_id}"
        spec, status = att.get("spec") or {}, att.get("status") or {}
        name = (att.get("metadata") or {}).get("name", "?")
        if status.get("result") not in DECIDED:
            return f"round {name} is not decided (status.result {status.get('result')!r})"
        members = {str(m.get("address", "")).lower() for m in (spec.get("committee") or {}).get("members") or []
                   if isinstance(m, Mapping)}
        if str(spec.get("executor", "")).lower() != leaf.node.lower():
            return f"about node {leaf.node}, not round {name}'s executor"
        try:
            phase = int(Phase[str(spec.get("phase", "")).upper()])
        except KeyError:
            return f"round {name} has no valid spec.phase"
        if leaf.phase != phase:
            return f"phase {leaf.phase}, not round {name}'s phase {spec.get('phase')}"
        key = leaf.attestation_id.lower()
        if key not in committees:
            committees[key] = self._chain_committee(name, spec)
        chosen, why = committees[key]
        if why:
            return why
        if leaf.verifier.lower() not in chosen:
            return f"verifier {leaf.verifier.lower()} is not in the committee the chain selected for round {name}"
        reasons: list[str] = []
        for entry in status.get("verdicts") or []:
            why = _entry_refusal(entry, leaf, members, self.domain)
            if not why:
                return ""
            if why != "another verdict":
                reasons.append(why)
        if reasons:
            return f"round {name}'s entry for this verdict is not counted: {'; '.join(reasons)}"
        return f"not among round {name}'s status.verdicts"


    # -- the committee, from the chain -------------------------------------------------------------------
    def _chain_committee(self, name: str, spec: Mapping[str, Any]) -> tuple[frozenset[str], str]:
        """(the committee the chain selected for the round's task, "") when spec.executor and spec.committee
        are that selection; else (empty, why). A round of no task has no committee anyone can recompute."""
        tid = _hex32(str(spec.get("taskId", "")).lower())
        if tid is None:
            return frozenset(), (f"round {name} names no task (spec.taskId), so its committee cannot be "
                                 "recomputed from the chain")
        members = [str(m.get("address", "")).lower() for m in (spec.get("committee") or {}).get("members") or []
                   if isinstance(m, Mapping)]
        executor = str(spec.get("executor", "")).lower()
        sel = self._selections.get(tid)
        if sel is None or not _names(sel, executor, members):
            try:
                sel = select_from_chain(self.view, tid, self._reveals(tid))
            except SortitionError as exc:
                return frozenset(), f"the chain gives no selection for round {name}'s task 0x{tid.hex()}: {exc}"
            except (TrustcapError, OSError) as exc:
                raise _Unavailable(f"cannot recompute the selection of task 0x{tid.hex()}: {exc}") from exc
        if executor != sel.executor:
            return frozenset(), (f"round {name}'s spec.executor {executor} is not the chain's selection "
                                 f"{sel.executor}")
        if not _names(sel, executor, members):
            return frozenset(), (f"round {name}'s spec.committee {sorted(members)} is not the committee the chain "
                                 f"selected {sorted(sel.committee)}")
        self._selections[tid] = sel
        self._selections.move_to_end(tid)
        while len(self._selections) > SELECTIONS:
            self._selections.popitem(last=False)
        return frozenset(sel.committee), ""

    def _reveals(self, tid: bytes) -> list[Reveal]:
        out = []
        for data in self.reveals.secrets(self.namespace, f"{REVEAL_LABEL}={tid.hex()[:16]}"):
            try:
                out.append(Reveal(node_id=data["node"].lower(), pi=bytes.fromhex(data["pi"].removeprefix("0x")),
                                  salt=bytes.fromhex(data["salt"].removeprefix("0x"))))
            except (KeyError, ValueError, AttributeError):
                continue  # a malformed reveal is that node's fault: select_from_chain skips it like a missing one
        return out


def _names(sel: Selection, executor: str, members: Sequence[str]) -> bool:
    """Does a round (its executor, its committee members) name exactly this selection?"""
    return executor == sel.executor and len(members) == len(set(members)) and set(members) == set(sel.committee)


def _entry_refusal(entry: Any, leaf: Verdict, members: set[str], domain: Domain) -> str:
    """"" when this status.verdicts entry is the leaf, signed by a member; "another verdict" when it is not
    the leaf at all; else why the entry that is the leaf does not count."""
    if not isinstance(entry, Mapping) or not isinstance(entry.get("verdict"), Mapping):
        return "another verdict"
    try:
        signed = SignedVerdict.model_validate(entry["verdict"])
    except ValidationError:
        return "another verdict"
    if signed.verdict != leaf:
        return "another verdict"
    try:
        signer = verify_verdict(signed, domain=domain).lower()
    except EvidenceError as exc:
        return str(exc)
    if signer != str(entry.get("verifier", "")).lower():
        return f"signed by {signer}, not by the entry's verifier {entry.get('verifier')}"
    if signer not in members:
        return f"verifier {signer} is not a member of spec.committee"
    return ""


def _hex32(value: Any) -> bytes | None:
    if not isinstance(value, str) or len(value) != 66 or not value.startswith("0x"):
        return None
    try:
        return bytes.fromhex(value[2:]) if value[2:] == value[2:].lower() else None
    except ValueError:
        return None


def _answer(status: HTTPStatus, doc: Mapping[str, Any]) -> tuple[int, bytes]:
    return int(status), json.dumps(doc).encode()
