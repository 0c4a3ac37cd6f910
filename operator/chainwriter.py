"""Chain-writer controller: decided Attestation rounds -> the chain-writer -> tx hash and block in status.

Thin kopf glue; the logic (journal, batching, nonces, confirmations, reorgs, outages) is
trustcap.chain.writer and is tested against anvil without Kubernetes.

    Attestation (status.result Passed/Failed)        controller                 Writer / chain
        | on.create / on.update / on.resume            |                          |
        |--------------------------------------------->| verdicts_of(spec, status, domain): each signed
        |                                              |   verdict verifies, signer in spec.committee, once,
        |                                              |   this round; together they support status.result
        |   PermanentError naming every bad entry       |   (else nothing is journaled; kopf posts it as a
        |<---------------------------------------------|    Warning event on the Attestation)
        |                                              | add all (one lock: one batch per round)
        |                                              |------------------------->| journal
        |                                              |        background loop: seal(); run()  -> chain
        |   TemporaryError(delay) until confirmed      |<-------------------------| record(verdict)
        |<---------------------------------------------|                          |
        | patch status.chain {epoch, merkleRoot, txHash, block, batchId}; Recorded=True

Configuration (environment): TRUSTCAP_CHAIN_RPC, TRUSTCAP_CHAIN_DEPLOYMENT (the Deployment JSON),
TRUSTCAP_CHAIN_JOURNAL (SQLite path on a persistent volume), TRUSTCAP_CHAIN_KEYS (JSON: {"sender": hex key,
"batchSigners": [hex keys]}; development only: in production the batch signatures come from the verifier
gateways' trust roots), TRUSTCAP_CHAIN_CONFIRMATIONS (default 2), TRUSTCAP_CHAIN_BATCH_SECONDS (default 10).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import kopf
from pydantic import ValidationError

from trustcap.chain.client import ChainClient, Deployment
from trustcap.chain.errors import ChainError
from trustcap.chain.journal import Journal
from trustcap.chain.keys import KeySigner
from trustcap.chain.writer import Writer
from trustcap.evidence.errors import EvidenceError
from trustcap.evidence.verdict import Domain, Phase, SignedVerdict, Verdict, verdict_id, verify_verdict

__all__ = ["ChainWriterController", "verdicts_of"]

log = logging.getLogger("trustcap.operator.chainwriter")

GROUP: Final = "trustcap.io"
VERSION: Final = "v1alpha1"
DECIDED: Final = ("Passed", "Failed")
HANDLER_TIMEOUT_S: Final = 3600
CONFIRM_POLL_S: Final = 5


def verdicts_of(spec: Mapping[str, Any], status: Mapping[str, Any], domain: Domain) -> list[Verdict]:
    """The verdicts of a decided round that the chain-writer may record, after checking them itself: it
    does not take the operator's `status.result` on trust, because a batch it records is the quorum's
    word that these verdicts are the round's. Each `status.verdicts[]` entry's signed verdict must verify
    under the deployment's domain and be signed by the verifier it names (`verify_verdict`); that verifier
    must be the entry's `verifier`, a member of `spec.committee`, and appear once; the verdict must be
    about this round (attestationId = spec.nonce), this executor and this phase, and hash to the entry's
    `verdictId`. Then the counted verdicts must support `status.result`: Passed needs `quorum` passed,
    Failed needs so many failed that a pass can no longer be reached (the operator's rule). Anything else
    is a PermanentError naming every entry that failed and why: nothing of the round is journaled."""
    members = {str(m.get("address", "")).lower() for m in (spec.get("committee") or {}).get("members") or []}
    try:
        quorum = int((spec.get("committee") or {})["quorum"])
        nonce = str(spec["nonce"]).lower()
        executor = str(spec["executor"]).lower()
        phase = int(Phase[str(spec["phase"]).upper()])
    except KeyError as exc:
        raise kopf.PermanentError(f"spec field {exc.args[0]} is missing; cannot check the round's verdicts") from None
    if not members or quorum < 1:
        raise kopf.PermanentError("spec.committee has no members or no quorum: the round's verdicts cannot be checked")
    out: list[Verdict] = []
    problems: list[str] = []
    seen: set[str] = set()
    passed = failed = 0
    for i, item in enumerate(status.get("verdicts") or []):
        why = _refusal(item, domain, members, seen, nonce, executor, phase)
        if why:
            problems.append(f"status.verdicts[{i}] ({item.get('verifier', '?')}): {why}")
            continue
        v = SignedVerdict.model_validate(item["verdict"]).verdict
        seen.add(v.verifier.lower())
        out.append(v)
        passed, failed = passed + v.passed, failed + (not v.passed)
    if problems:
        raise kopf.PermanentError("chain-writer refuses this round: " + "; ".join(problems))
    if not out:
        raise kopf.PermanentError("chain-writer refuses this round: status.verdicts is empty; a decided round "
                                  "must carry its verdicts")
    result = status.get("result")
    if result == "Passed" and passed < quorum:
        raise kopf.PermanentError(f"chain-writer refuses this round: status.result is Passed but only {passed} of "
                                  f"the committee's verdicts passed (quorum {quorum})")
    if result == "Failed" and len(members) - failed >= quorum:
        raise kopf.PermanentError(f"chain-writer refuses this round: status.result is Failed but only {failed} of "
                                  f"the committee's verdicts failed; a pass (quorum {quorum} of {len(members)}) "
                                  "could still be reached")
    return out


def _refusal(item: Mapping[str, Any], domain: Domain, members: set[str], seen: set[str], nonce: str, executor: str,
             phase: int) -> str:
    """Why one status.verdicts entry cannot be recorded, or "" when it can."""
    if "verdict" not in item:
        return "field verdict (the signed verdict) is missing"
    try:
        signed = SignedVerdict.model_validate(item["verdict"])
        signer = verify_verdict(signed, domain=domain).lower()
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "(document)"
        return f"verdict.{where} is not valid: {err.get('msg', 'invalid')}"
    except EvidenceError as exc:
        return str(exc)
    v = signed.verdict
    vid = "0x" + verdict_id(v, domain).hex()
    checks = (
        (signer == str(item.get("verifier", "")).lower(), f"signed by {signer}, not by the entry's verifier"),
        (signer in members, f"verifier {signer} is not a member of spec.committee"),
        (signer not in seen, f"a second verdict of verifier {signer}"),
        (v.attestation_id.lower() == nonce, "about another round (attestationId is not spec.nonce)"),
        (v.node.lower() == executor, "about another node (not spec.executor)"),
        (v.phase == phase, "about another phase (not spec.phase)"),
        ("verdictId" not in item or str(item["verdictId"]).lower() == vid,
         f"verdictId {item.get('verdictId')} is not the signed verdict's id {vid}"),
        ("passed" not in item or bool(item["passed"]) == v.passed, "passed disagrees with the signed verdict"),
    )
    return next((why for ok, why in checks if not ok), "")


class ChainWriterController:
    """Owns the Writer and its background loop; handlers only call `submit` and `record`."""

    def __init__(self, writer: Writer, *, batch_seconds: float = 10.0) -> None:
        self.writer = writer
        self.batch_seconds = batch_seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def domain(self) -> Domain:
        return Domain(chain_id=self.writer.d.chain_id, verifying_contract=self.writer.d.log)

    def submit(self, verdicts: list[Verdict], source: str) -> list[str]:
        """Journal a round's verdicts together (no seal can split them); returns their ids."""
        with self._lock:
            for v in verdicts:
                self.writer.add(v, source)
        return ["0x" + verdict_id(v, self.domain).hex() for v in verdicts]

    def tick(self, timeout: float = 60) -> None:
        with self._lock:
            self.writer.seal()
        self.writer.run(timeout=timeout)

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.batch_seconds):
                try:
                    self.tick()
                except ChainError as exc:
                    log.warning("chain-writer tick failed, will retry: %s", exc)

        self._thread = threading.Thread(target=loop, name="trustcap-chainwriter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def reconcile(self, spec: Mapping[str, Any], status: Mapping[str, Any], source: str) -> dict[str, Any]:
        """The status.chain patch for a decided round, or TemporaryError until its batch is confirmed."""
        ids = self.submit(verdicts_of(spec, status, self.domain), source)
        records = [self.writer.record(i) for i in ids]
        if any(r is None for r in records):
            raise kopf.TemporaryError("verdicts journaled; waiting for their batch to be confirmed on chain",
                                      delay=CONFIRM_POLL_S)
        r = records[0]
        assert r is not None
        return {"epoch": r.epoch, "merkleRoot": r.root, "txHash": r.tx_hash, "block": r.block, "batchId": r.batch_id}


_controller: ChainWriterController | None = None


def _from_env() -> ChainWriterController:
    try:
        keys = json.loads(Path(os.environ["TRUSTCAP_CHAIN_KEYS"]).read_text())
        client = ChainClient(os.environ["TRUSTCAP_CHAIN_RPC"], KeySigner(keys["sender"]))
        dep = Deployment.load(Path(os.environ["TRUSTCAP_CHAIN_DEPLOYMENT"]))
        journal = Journal(Path(os.environ["TRUSTCAP_CHAIN_JOURNAL"]))
    except KeyError as exc:
        raise kopf.PermanentError(f"chain-writer: setting {exc.args[0]} is missing") from None
    except (OSError, ValueError) as exc:
        raise kopf.PermanentError(f"chain-writer: cannot read its configuration: {exc}") from None
    writer = Writer(client, dep, journal, [KeySigner(k) for k in keys["batchSigners"]],
                    confirmations=int(os.environ.get("TRUSTCAP_CHAIN_CONFIRMATIONS", "2")))
    return ChainWriterController(writer, batch_seconds=float(os.environ.get("TRUSTCAP_CHAIN_BATCH_SECONDS", "10")))


@kopf.on.startup()
def start_chainwriter(logger: kopf.Logger, **_: Any) -> None:
    """Start only where configured: an operator (or a test's in-process kopf) without chain settings runs
    every other handler unchanged and leaves Attestations for the replica that has them."""
    global _controller
    if "TRUSTCAP_CHAIN_DEPLOYMENT" not in os.environ:
        logger.warning("chain-writer disabled: TRUSTCAP_CHAIN_DEPLOYMENT is not set")
        return
    if _controller is None:
        _controller = _from_env()
        _controller.start()


@kopf.on.cleanup()
def stop_chainwriter(**_: Any) -> None:
    if _controller is not None:
        _controller.stop()


def _decided(status: Mapping[str, Any], **_: Any) -> bool:
    if _controller is None:
        return False
    return status.get("result") in DECIDED and not (status.get("chain") or {}).get("txHash")


@kopf.on.resume(GROUP, VERSION, "attestations", when=_decided, timeout=HANDLER_TIMEOUT_S)
@kopf.on.create(GROUP, VERSION, "attestations", when=_decided, timeout=HANDLER_TIMEOUT_S)
@kopf.on.update(GROUP, VERSION, "attestations", when=_decided, timeout=HANDLER_TIMEOUT_S)
def record_attestation(spec: kopf.Spec, status: kopf.Status, namespace: str | None, name: str, patch: kopf.Patch,
                       logger: kopf.Logger, **_: Any) -> None:
    if _controller is None:  # filtered out by _decided; kept for a clear message if that ever changes
        raise kopf.TemporaryError("chain-writer not started", delay=CONFIRM_POLL_S)
    chain = _controller.reconcile(spec, status, f"{namespace}/{name}")
    patch.status["chain"] = chain
    logger.info("attestation recorded on chain: tx %s, block %s", chain["txHash"], chain["block"])
