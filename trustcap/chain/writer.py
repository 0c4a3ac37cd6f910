"""The chain-writer: records attestation verdicts on chain in epoch batches, never losing or doubling one.

    controller           Writer                     Journal (SQLite)            chain (AttestationLog)
        |  add(verdict)    |                              |                              |
        |----------------->| INSERT OR IGNORE by id ----->|  (a verdict is journaled once)
        |  seal()          |                              |                              |
        |----------------->| tree(leaves) -> root, id = hashStruct(Batch(epoch, root, count))
        |                  | quorum signs Batch (EIP-712): cosigners (the verifier gateways, each after
        |                  |   checking every leaf; decision 0094) until the contract's quorum, else the
        |                  |   batch is not sealed and the next seal asks again; dev keys only in development
        |                  | batch + verdict->batch ----->|  one atomic step             |
        |  run()           |                              |                              |
        |----------------->| recorded(id)? ---------------------------------------------->|  yes: go to confirm
        |                  | nonce = pending count, fees, sign raw tx                     |
        |                  | journal raw tx (nonce, hash)>|                              |
        |                  |      ~ kill point "after_sign"                               |
        |                  | send raw ---------------------------------------------------->|
        |                  |      ~ kill point "after_send"                               |
        |                  | receipt? no: resend same raw (same nonce, same hash); stuck or underpriced:
        |                  |   re-sign SAME nonce with +25% fees, journal first, send      |
        |                  | BatchRecorded(id) at block b, head - b + 1 >= N, hash(b) canonical
        |                  | confirm(id, tx, b) --------->|                              |
        |<-----------------| record(verdict) = (epoch, root, proof, tx, block)            |

Why it cannot lose or double a record, whatever line it is killed at:
- every step's facts hit the journal (fsync'd) before the action that depends on them, so a restart
  knows every verdict, every sealed batch and every transaction it may have sent;
- a verdict is batched once (its row gets a batch id in the same SQLite transaction that creates the batch);
- the batch id is deterministic and the contract records an id once, so a resend is harmless, and the
  writer asks the chain first (`isRecorded` through the BatchRecorded event) before signing anything;
- one batch is in flight at a time and all its attempts share one nonce, so at most one can be mined and
  nonces come from the node's pending count with nothing of ours outstanding: they never skip;
- a batch is confirmed only after N confirmations with its block still canonical; if a reorg drops it,
  the journaled raw transaction is sent again;
- RPC errors (refused, timed out) back off exponentially and retry until the caller's deadline;
- signatures are gathered before the batch is journaled: a batch too few cosigners signed is not sealed
  (its verdicts stay pending), so nothing is ever sent that the contract's quorum did not sign.

Who signs (decision 0094): `cosigners(leaves)` names the parties to ask for a batch, each a `Cosigner`
(an address and a call that returns its signature over the batch digest); the writer keeps a signature
only if it recovers to that cosigner's address, one per address, until `quorum()` (read from
AttestationLog), and sorts them by signer as the contract requires. `batch_signers` (keys in this
process) is the development path: whoever holds them can record any batch.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from trustcap import merkle
from trustcap.chain import metrics
from trustcap.chain.client import ChainClient, Deployment, Fees
from trustcap.chain.errors import ChainError, ContractReverted, NonceConflict, RpcUnavailable, TransactionFailed
from trustcap.chain.journal import BatchRow, Journal, TxRow
from trustcap.chain.typed import batch_digest, batch_id, sign_batch
from trustcap.evidence.errors import SignatureError
from trustcap.evidence.signing import Signer, recover_address
from trustcap.evidence.verdict import Verdict, verdict_id

__all__ = ["KILLPOINT_ENV", "Cosigner", "Cosigners", "Record", "Writer"]

log = logging.getLogger("trustcap.chain")

#: Test hook for the reliability tests: when set to a kill point's name, the process SIGKILLs itself there.
KILLPOINT_ENV = "TRUSTCAP_CHAIN_KILLPOINT"
_KNOWN = ("already known", "known transaction", "already imported", "nonce too low")
_UNDERPRICED = ("underpriced", "fee cap", "feecap", "less than block base fee", "max fee per gas", "too low")


def _killpoint(name: str) -> None:
    if os.environ.get(KILLPOINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class Cosigner(Protocol):
    """One party whose signature counts toward a batch's quorum (a verifier gateway's trust root)."""

    @property
    def address(self) -> str: ...

    def __call__(self, epoch: int, root: bytes, count: int, leaves: Sequence[Verdict]) -> bytes:
        """Its 65-byte signature over batch_digest(epoch, root, count, chain, contract); raises when it
        refuses or cannot be reached."""
        ...


#: who to ask for a batch, given its leaves (e.g. the gateways of the verifiers the leaves name)
Cosigners = Callable[[Sequence[Verdict]], Iterable[Cosigner]]


@dataclass(frozen=True)
class Record:
    """Where a verdict is on chain, once its batch is confirmed."""

    verdict_id: str
    batch_id: str
    epoch: int
    root: str
    proof: list[str]
    tx_hash: str
    block: int


class Writer:
    def __init__(
        self,
        client: ChainClient,
        deployment: Deployment,
        journal: Journal,
        batch_signers: Sequence[Signer] = (),
        *,
        cosigners: Cosigners | None = None,
        confirmations: int = 1,
        max_batch: int = 1000,
        stuck_after: float = 20.0,
        resend_every: float = 1.0,
        fees: Callable[[], Fees] | None = None,
        poll: float = 0.05,
        backoff: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        if confirmations < 1:
            raise ChainError("confirmations must be at least 1")
        if (cosigners is None) == (not batch_signers):
            raise ChainError("give the writer cosigners (the verifier gateways) or, in development only, "
                             "batch_signers (keys it holds), not both and not neither")
        self.client = client
        self.d = deployment
        self.journal = journal
        self.batch_signers = list(batch_signers)
        self.cosigners = cosigners
        self.confirmations = confirmations
        self.max_batch = max_batch
        self.stuck_after = stuck_after
        self.resend_every = resend_every
        self.fees = fees or client.suggest_fees
        self.poll = poll
        self.backoff = backoff
        self._last_send: dict[str, float] = {}
        #: what happened, for tests and metrics: sent, resent, replaced, underpriced, rpc_unavailable, confirmed
        self.stats: Counter[str] = Counter()
        self._log_contract = client.contract("AttestationLog", deployment.log)

    def _event(self, name: str) -> None:
        self.stats[name] += 1
        metrics.EVENTS.labels(event=name).inc()

    # -- intake -------------------------------------------------------------------------------------------
    def add(self, verdict: Verdict, source: str = "") -> bool:
        """Journal a verdict; False if it was already journaled (whatever its state): idempotent by id."""
        vid = verdict_id(verdict, _domain(self.d))
        return self.journal.add_verdict("0x" + vid.hex(), verdict.epoch, merkle.verdict_leaf(vid),
                                        verdict.model_dump_json(), source)

    def seal(self, before_epoch: int | None = None) -> list[str]:
        """Close pending verdicts into batches (per epoch, at most max_batch each); returns their ids."""
        sealed: list[str] = []
        for epoch in self.journal.pending_epochs():
            if before_epoch is not None and epoch >= before_epoch:
                continue
            while rows := self.journal.pending(epoch, self.max_batch):
                tree = merkle.MerkleTree([r.leaf for r in rows])
                bid = batch_id(epoch, tree.root, len(rows))
                sigs = self._signatures(epoch, tree.root, rows)
                if sigs is None:
                    break  # too few co-signed: these verdicts stay pending, the next seal asks again
                self.journal.seal("0x" + bid.hex(), epoch, tree.root, len(rows), sigs, [r.verdict_id for r in rows])
                log.info("sealed batch %s: epoch %s, %s verdicts", "0x" + bid.hex(), epoch, len(rows))
                sealed.append("0x" + bid.hex())
                metrics.BATCH_VERDICTS.set(len(rows))
        return sealed

    def quorum(self) -> int:
        """How many signatures AttestationLog wants for a batch (its `quorum`, read now)."""
        return int(self.client.call_fn(self._log_contract.functions.quorum()))

    def _signatures(self, epoch: int, root: bytes, rows: Sequence[Any]) -> list[bytes] | None:
        """The batch's signatures in ascending signer order, or None when fewer than quorum co-signed."""
        if self.cosigners is None:
            return sign_batch(self.batch_signers, epoch, root, len(rows), self.d.chain_id, self.d.log)
        need = self.quorum()
        leaves = [Verdict.model_validate_json(r.body) for r in rows]
        digest = batch_digest(epoch, root, len(rows), self.d.chain_id, self.d.log)
        got: dict[str, bytes] = {}
        refusals: list[str] = []
        for c in self.cosigners(leaves):
            if len(got) >= need:
                break
            if c.address.lower() in got:
                continue
            try:
                sig = c(epoch, root, len(rows), leaves)
                signer = recover_address(digest, sig).lower()
            except SignatureError as exc:
                refusals.append(f"{c.address}: not a signature ({exc})")
                continue
            except Exception as exc:  # a cosigner is another party's service: its failure is its "no"
                refusals.append(f"{c.address}: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            if signer != c.address.lower():
                refusals.append(f"{c.address}: signed as {signer}")
                continue
            got[signer] = sig
        if len(got) < need:
            self._event("cosign_short")
            log.warning("batch of epoch %s (root 0x%s, %s verdicts): %s of quorum %s co-signed, not sent; asking "
                        "again at the next seal. Refusals: %s", epoch, root.hex(), len(rows), len(got), need,
                        "; ".join(refusals) or "no cosigner to ask")
            return None
        self._event("cosigned")
        return [got[a] for a in sorted(got, key=lambda a: int(a, 16))]

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self, timeout: float = 120.0) -> None:
        """Seal what is pending and drive every batch to confirmed; RPC outages are waited out."""
        deadline = time.monotonic() + timeout
        delay = self.backoff[0]
        while True:
            try:
                self.seal()
                if not self.step():
                    return
                delay = self.backoff[0]
                time.sleep(self.poll)
            except RpcUnavailable as exc:
                self._event("rpc_unavailable")
                log.warning("chain RPC unavailable, retrying in %.1fs: %s", delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, self.backoff[1])
            if time.monotonic() > deadline:
                left = self.journal.counts()["unconfirmed"]
                raise TransactionFailed(f"chain-writer: {left} batch(es) still unconfirmed after {timeout}s")

    def step(self) -> bool:
        """One step on the oldest unconfirmed batch; False when there is nothing left to do."""
        batches = self.journal.unconfirmed()
        metrics.UNCONFIRMED.set(len(batches))
        if not batches:
            return False
        self._advance(batches[0])
        return True

    def _advance(self, b: BatchRow) -> None:
        bid = bytes.fromhex(b.batch_id[2:])
        ev = self.client.find_batch(self.d, bid, b.root)
        if ev is not None:
            self._confirm(b, ev)
            return
        attempts = self.journal.txs(b.batch_id)
        if not attempts:
            if self._taken(b):
                return
            self._sign_and_send(b, self.client.nonce("pending"), self.fees(), gas=None)
            return
        for a in attempts:
            r = self.client.receipt(bytes.fromhex(a.tx_hash[2:]))
            if r is not None:
                if r["status"] != 1:
                    if self._taken(b):
                        return
                    raise TransactionFailed(f"batch {b.batch_id}: transaction {a.tx_hash} reverted in block "
                                            f"{r['blockNumber']}; the contract refuses this batch")
                return  # mined: the event query will see it on the next step
        last = attempts[-1]
        if self.client.nonce("latest") > last.nonce:
            # Our nonce is used. Re-check receipts (one may have been mined since we looked) before blaming
            # an outsider; an attempt of ours being mined is the usual reason.
            if any(self.client.receipt(bytes.fromhex(a.tx_hash[2:])) for a in attempts):
                return
            raise NonceConflict(f"batch {b.batch_id}: nonce {last.nonce} was used by a transaction the writer "
                                "did not sign; is another process sending from this account?")
        if time.time() - last.created_at > self.stuck_after:
            log.warning("batch %s: transaction %s not mined after %.0fs, replacing it with higher fees",
                        b.batch_id, last.tx_hash, self.stuck_after)
            self._replace(b, last)
            return
        if time.monotonic() - self._last_send.get(last.tx_hash, 0.0) >= self.resend_every:
            self._send(b, last)

    def _taken(self, b: BatchRow) -> bool:
        """Whether another batch id already recorded this batch's root for its epoch (a quorum that signed
        a forged count and sent it first). The contract then refuses ours (RootAlreadyRecorded) for good,
        but every verdict of ours is provable under that record, so it confirms ours instead of failing
        forever (decision 0096)."""
        ev = self.client.find_root(self.d, b.root, b.epoch)
        if ev is None:
            return False
        other = "0x" + bytes(ev["args"]["batchId"]).hex()
        log.warning("batch %s: its root %s for epoch %s was recorded by batch %s (transaction 0x%s); its "
                    "verdicts are provable under that record, confirming from it", b.batch_id, b.root.hex(),
                    b.epoch, other, bytes(ev["transactionHash"]).hex())
        self._event("taken")
        self._confirm(b, ev)
        return True

    def _replace(self, b: BatchRow, last: TxRow) -> None:
        self._event("replaced")
        fees = Fees(last.max_fee, last.tip).bumped()
        gas = _gas_of(last.raw)
        self._sign_and_send(b, last.nonce, fees, gas=gas)

    def _sign_and_send(self, b: BatchRow, nonce: int, fees: Fees, gas: int | None) -> None:
        fn = self._log_contract.functions.recordBatch(b.epoch, b.root, b.count, b.signatures)
        for _ in range(20):
            tx = self.client.build(fn, nonce=nonce, fees=fees, gas=gas)
            raw, h = self.client.sign(tx)
            self.journal.add_tx("0x" + h.hex(), b.batch_id, nonce, raw, fees.max_fee, fees.tip)
            log.info("batch %s: signed transaction 0x%s (nonce %s, max fee %s)", b.batch_id, h.hex(), nonce,
                     fees.max_fee)
            _killpoint("after_sign")
            row = self.journal.txs(b.batch_id)[-1]
            if self._send(b, row):
                return
            fees = fees.bumped()  # underpriced: same nonce, more fees, journaled before it is sent
            gas = tx["gas"]
        raise TransactionFailed(f"batch {b.batch_id}: the node refused every fee up to {fees.max_fee}")

    def _send(self, b: BatchRow, row: TxRow) -> bool:
        """Send (or re-send) a journaled raw transaction; False if the node calls it underpriced."""
        self._event("resent" if row.tx_hash in self._last_send or row.state == "sent" else "sent")
        self._last_send[row.tx_hash] = time.monotonic()
        try:
            self.client.send_raw(row.raw)
        except RpcUnavailable:
            raise
        except ContractReverted:
            raise
        except ChainError as exc:
            msg = str(exc).lower()
            if any(k in msg for k in _KNOWN):
                return True  # in the pool already, or mined: the receipt check decides
            if any(k in msg for k in _UNDERPRICED):
                self._event("underpriced")
                log.warning("batch %s: transaction %s underpriced (%s); raising fees", b.batch_id, row.tx_hash, exc)
                return False
            raise
        if row.state != "sent":
            self.journal.mark_sent(row.tx_hash)
        _killpoint("after_send")
        return True

    def _confirm(self, b: BatchRow, ev: dict[str, Any]) -> None:
        block = int(ev["blockNumber"])
        head = self.client.block_number()
        if head - block + 1 < self.confirmations:
            return
        canonical = self.client.block_hash(block)
        ev_hash = "0x" + bytes(ev["blockHash"]).hex()
        if canonical != ev_hash:
            return  # reorganised under us: the next step looks again (and resends if it is gone)
        tx_hash = "0x" + bytes(ev["transactionHash"]).hex()
        self.journal.confirm(b.batch_id, tx_hash, block, ev_hash)
        self._event("confirmed")
        log.info("batch %s confirmed: transaction %s, block %s (%s confirmations)", b.batch_id, tx_hash, block,
                 head - block + 1)

    # -- results ------------------------------------------------------------------------------------------
    def record(self, verdict_id_hex: str) -> Record | None:
        """Where the verdict is on chain, with its Merkle proof; None until its batch is confirmed."""
        v = self.journal.verdict(verdict_id_hex)
        if v is None or v.batch_id is None:
            return None
        b = self.journal.batch(v.batch_id)
        if b is None or b.state != "confirmed" or b.tx_hash is None or b.block_number is None:
            return None
        members = self.journal.batch_leaves(b.batch_id)
        tree = merkle.MerkleTree([leaf for _, leaf in members])
        idx = tree.leaves.index(v.leaf)
        return Record(verdict_id_hex, b.batch_id, b.epoch, "0x" + b.root.hex(),
                      ["0x" + p.hex() for p in tree.proof(idx)], b.tx_hash, b.block_number)


def _domain(d: Deployment) -> Any:
    from trustcap.evidence.verdict import Domain

    return Domain(chain_id=d.chain_id, verifying_contract=d.log)


def _gas_of(raw: bytes) -> int:
    from eth_account.typed_transactions import TypedTransaction  # type: ignore[attr-defined]
    from hexbytes import HexBytes

    return int(TypedTransaction.from_bytes(HexBytes(raw)).as_dict()["gas"])
