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

Who signs a batch (decision 0094): with TRUSTCAP_CHAIN_COSIGN=gateways, the verifier gateways. For each
batch the writer asks the gateways of the verifiers its leaves name first, then the other gateways (their
Gateway objects' spec.endpoint, `POST http://<endpoint>/v1/cosign`), each of which checks every leaf
against the decided rounds itself and signs with its trust root; the batch is sent once AttestationLog's
`quorum` of them signed, and asked again at the next tick when fewer did. The operator holds no key that
counts toward the quorum.

    writer.seal()  -> cosigners(leaves): Gateway objects, leaves' verifiers first -> GatewayCosigner each
                   -> POST /v1/cosign {epoch, root, count, chainId, contract, leaves} -> {signature, address}
                   -> quorum signatures recovering to those addresses, sorted by signer -> journal -> chain

TRUSTCAP_CHAIN_COSIGN=dev-keys signs with the keys in TRUSTCAP_CHAIN_KEYS "batchSigners" instead: a
development option only (whoever holds those keys can record any batch), said so at startup. When
TRUSTCAP_CHAIN_COSIGN is not set, a keys file with "batchSigners" is taken as that development choice
(with the same warning), and one without as `gateways`.

Configuration (environment): TRUSTCAP_CHAIN_RPC, TRUSTCAP_CHAIN_DEPLOYMENT (the Deployment JSON),
TRUSTCAP_CHAIN_JOURNAL (SQLite path on a persistent volume), TRUSTCAP_CHAIN_KEYS (JSON: {"sender": hex key,
and for dev-keys "batchSigners": [hex keys]}), TRUSTCAP_CHAIN_COSIGN (gateways | dev-keys),
TRUSTCAP_CHAIN_COSIGN_TIMEOUT_SECONDS (default 15), TRUSTCAP_CHAIN_CONFIRMATIONS (default 2),
TRUSTCAP_CHAIN_BATCH_SECONDS (default 10).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, cast

import kopf
from pydantic import ValidationError

from trustcap.api import ATTESTATIONS, GATEWAYS, GROUP, VERSION
from trustcap.chain.client import ChainClient, Deployment
from trustcap.chain.errors import ChainError
from trustcap.chain.journal import Journal
from trustcap.chain.keys import KeySigner
from trustcap.chain.writer import Cosigner, Cosigners, Writer
from trustcap.evidence.errors import EvidenceError
from trustcap.evidence.verdict import Domain, Phase, SignedVerdict, Verdict, verdict_id, verify_verdict
from trustcap.forms import field_error

__all__ = ["ChainWriterController", "CosignRefused", "GatewayCosigner", "gateway_cosigners", "verdicts_of"]

log = logging.getLogger("trustcap.operator.chainwriter")

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
        where, what = field_error(exc)
        return f"verdict.{where} is not valid: {what}"
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
        # A late verdict of a round already decided lands in a later batch: each verdict says where it is.
        inclusions = [{"verdictId": x.verdict_id, "batchId": x.batch_id, "merkleRoot": x.root, "proof": list(x.proof)}
                      for x in records if x is not None]
        return {"epoch": r.epoch, "merkleRoot": r.root, "txHash": r.tx_hash, "block": r.block, "batchId": r.batch_id,
                "inclusions": inclusions}


# -- who co-signs a batch: the verifier gateways ----------------------------------------------------------
class CosignRefused(ChainError):
    """A gateway did not co-sign a batch: it refused (naming the leaf and why) or could not be reached."""


MAX_COSIGN_ANSWER: Final = 4096


class GatewayCosigner:
    """A verifier gateway's `POST /v1/cosign` as the writer's Cosigner: it sends the batch and its leaves and
    returns the signature the gateway answered (the writer checks it recovers to `address`)."""

    def __init__(self, address: str, url: str, domain: Domain, *, timeout: float = 15.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise CosignRefused(f"gateway {address}: endpoint {url!r} is not an http(s) URL")
        self._address = address.lower()
        self.url = url.rstrip("/") + "/v1/cosign"
        self.domain = domain
        self.timeout = timeout

    @property
    def address(self) -> str:
        return self._address

    def __call__(self, epoch: int, root: bytes, count: int, leaves: Sequence[Verdict]) -> bytes:
        body = json.dumps({"epoch": epoch, "root": "0x" + root.hex(), "count": count,
                           "chainId": self.domain.chain_id, "contract": self.domain.verifying_contract,
                           "leaves": [v.model_dump(mode="json") for v in leaves]}).encode()
        req = urllib.request.Request(self.url, data=body, method="POST",  # noqa: S310 - http(s) checked
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                data: bytes = resp.read(MAX_COSIGN_ANSWER + 1)
        except urllib.error.HTTPError as exc:
            try:
                reason = str(json.loads(exc.read(64 * 1024)).get("error", ""))
            except (ValueError, AttributeError):
                reason = ""
            finally:
                exc.close()
            raise CosignRefused(f"gateway {self.address} at {self.url} refused: HTTP {exc.code} "
                                f"{reason[:500]}".rstrip()) from None
        except (urllib.error.URLError, OSError) as exc:
            raise CosignRefused(f"gateway {self.address} at {self.url} unreachable: "
                                f"{getattr(exc, 'reason', exc)}") from None
        try:
            doc = json.loads(data[:MAX_COSIGN_ANSWER])
            sig = str(doc["signature"])
            return bytes.fromhex(sig.removeprefix("0x"))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CosignRefused(f"gateway {self.address} at {self.url} answered no signature") from None


def gateway_cosigners(gateways: Callable[[], Iterable[Mapping[str, Any]]], domain: Domain, *,
                      timeout: float = 15.0) -> Cosigners:
    """`cosigners(leaves)`: a GatewayCosigner for each Gateway object with spec.endpoint (read when the
    batch is sealed): first the verifiers the leaves name, in the leaves' order, then the other gateways
    by address. The others are asked too because a batch may name fewer verifiers than the quorum (a
    verdict written after its round was decided is batched alone), and every gateway checks every leaf
    against the same rounds."""

    def cosigners(leaves: Sequence[Verdict]) -> list[Cosigner]:
        wanted = list(dict.fromkeys(v.verifier.lower() for v in leaves))
        endpoints: dict[str, str] = {}
        for gw in gateways():
            spec = (gw or {}).get("spec") or {}
            addr = str(spec.get("address", "")).lower()
            if addr and spec.get("endpoint"):
                endpoints.setdefault(addr, f"http://{spec['endpoint']}")
        missing = [a for a in wanted if a not in endpoints]
        if missing:
            log.info("chain-writer: no Gateway endpoint for verifier(s) %s; they cannot co-sign", ", ".join(missing))
        order = [a for a in wanted if a in endpoints] + sorted(a for a in endpoints if a not in wanted)
        return [GatewayCosigner(a, endpoints[a], domain, timeout=timeout) for a in order]

    return cosigners


def _kube_gateways() -> Callable[[], list[dict[str, Any]]]:
    from trustcap.api import GROUP as KGROUP
    from trustcap.operator.kube import TIMEOUT_S, Kube

    kube = Kube()

    def gateways() -> list[dict[str, Any]]:
        try:
            doc = kube.custom.list_cluster_custom_object(KGROUP, VERSION, GATEWAYS, _request_timeout=TIMEOUT_S)
        except Exception as exc:  # an API outage: no cosigner this tick, the writer asks again
            raise CosignRefused(f"cannot list Gateway objects: {getattr(exc, 'reason', exc)}") from exc
        return list(cast(dict[str, Any], doc).get("items") or [])

    return gateways


MEMO_KEY: Final = "chainwriter"  # kopf's memo holds the running controller (operator-wide, not a global)
COSIGN_MODES: Final = ("gateways", "dev-keys")


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
    mode = os.environ.get("TRUSTCAP_CHAIN_COSIGN") or ("dev-keys" if keys.get("batchSigners") else "gateways")
    if mode not in COSIGN_MODES:
        raise kopf.PermanentError(f"chain-writer: TRUSTCAP_CHAIN_COSIGN={mode!r} is not one of {COSIGN_MODES}")
    confirmations = int(os.environ.get("TRUSTCAP_CHAIN_CONFIRMATIONS", "2"))
    if mode == "dev-keys":
        if not keys.get("batchSigners"):
            raise kopf.PermanentError("chain-writer: TRUSTCAP_CHAIN_COSIGN=dev-keys needs \"batchSigners\" in "
                                      "TRUSTCAP_CHAIN_KEYS")
        log.warning("chain-writer: batches signed with %s development key(s) from TRUSTCAP_CHAIN_KEYS: DEVELOPMENT "
                    "ONLY, whoever holds them can record any batch; set TRUSTCAP_CHAIN_COSIGN=gateways to have the "
                    "verifier gateways co-sign", len(keys["batchSigners"]))
        writer = Writer(client, dep, journal, [KeySigner(k) for k in keys["batchSigners"]],
                        confirmations=confirmations)
    else:
        domain = Domain(chain_id=dep.chain_id, verifying_contract=dep.log)
        timeout = float(os.environ.get("TRUSTCAP_CHAIN_COSIGN_TIMEOUT_SECONDS", "15"))
        writer = Writer(client, dep, journal, cosigners=gateway_cosigners(_kube_gateways(), domain, timeout=timeout),
                        confirmations=confirmations)
        log.info("chain-writer: batches co-signed by the verifier gateways (POST /v1/cosign), AttestationLog "
                 "quorum; the operator holds no batch key")
    return ChainWriterController(writer, batch_seconds=float(os.environ.get("TRUSTCAP_CHAIN_BATCH_SECONDS", "10")))


def controller(memo: Mapping[str, Any]) -> ChainWriterController | None:
    """The chain-writer this operator runs, or None where it is not configured."""
    return cast("ChainWriterController | None", memo.get(MEMO_KEY))


@kopf.on.startup()
def start_chainwriter(logger: kopf.Logger, memo: kopf.Memo, **_: Any) -> None:
    """Start only where configured: an operator (or a test's in-process kopf) without chain settings runs
    every other handler unchanged and leaves Attestations for the replica that has them."""
    if "TRUSTCAP_CHAIN_DEPLOYMENT" not in os.environ:
        logger.warning("chain-writer disabled: TRUSTCAP_CHAIN_DEPLOYMENT is not set")
        return
    if controller(memo) is None:
        running = _from_env()
        running.start()
        memo[MEMO_KEY] = running


@kopf.on.cleanup()
def stop_chainwriter(memo: kopf.Memo, **_: Any) -> None:
    running = controller(memo)
    if running is not None:
        running.stop()


def _decided(status: Mapping[str, Any], memo: Mapping[str, Any], **_: Any) -> bool:
    if controller(memo) is None:
        return False
    return status.get("result") in DECIDED and not (status.get("chain") or {}).get("txHash")


@kopf.on.resume(GROUP, VERSION, ATTESTATIONS, when=_decided, timeout=HANDLER_TIMEOUT_S)
@kopf.on.create(GROUP, VERSION, ATTESTATIONS, when=_decided, timeout=HANDLER_TIMEOUT_S)
@kopf.on.update(GROUP, VERSION, ATTESTATIONS, when=_decided, timeout=HANDLER_TIMEOUT_S)
def record_attestation(spec: kopf.Spec, status: kopf.Status, namespace: str | None, name: str, patch: kopf.Patch,
                       logger: kopf.Logger, memo: kopf.Memo, **_: Any) -> None:
    running = controller(memo)
    if running is None:  # filtered out by _decided; kept for a clear message if that ever changes
        raise kopf.TemporaryError("chain-writer not started", delay=CONFIRM_POLL_S)
    chain = running.reconcile(spec, status, f"{namespace}/{name}")
    patch.status["chain"] = chain
    logger.info("attestation recorded on chain: tx %s, block %s", chain["txHash"], chain["block"])
