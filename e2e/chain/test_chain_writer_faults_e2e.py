"""The chain-writer against the faults a real chain throws at it, each on a real anvil: the RPC endpoint
gone for seconds (anvil stopped and restarted with its state), a reorganisation that drops the batch's
block before it has its confirmations, an underpriced transaction, and a transaction stuck in the pool that
must be replaced with the same nonce. Each ends with the same audit: zero lost, zero doubled, no nonce
skipped."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from chainkit import VERIFIERS, WRITER, Chain, audit, deploy, make_verdict

from trustcap.chain.anvil import Anvil
from trustcap.chain.client import Fees
from trustcap.chain.journal import Journal
from trustcap.chain.writer import Writer
from trustcap.evidence.verdict import Verdict, verdict_id


class _Run(threading.Thread):
    """writer.run() in a thread; the failure, if any, is re-raised by join_ok()."""

    def __init__(self, writer: Writer, timeout: float = 90) -> None:
        super().__init__(daemon=True)
        self.writer, self.timeout, self.error = writer, timeout, None  # type: ignore[var-annotated]

    def run(self) -> None:
        try:
            self.writer.run(timeout=self.timeout)
        except BaseException as exc:
            self.error = exc  # type: ignore[assignment]

    def join_ok(self) -> None:
        self.join(self.timeout + 10)
        assert not self.is_alive(), "the writer did not finish"
        if self.error is not None:
            raise self.error


def _writer(chain: Chain, tmp: Path, **kw: object) -> Writer:
    return Writer(chain.client(WRITER), chain.d, Journal(tmp / "journal.sqlite"), VERIFIERS[:3],
                  resend_every=0.2, **kw)  # type: ignore[arg-type]


def _add(writer: Writer, epochs: range, per: int = 4) -> list[Verdict]:
    added = [make_verdict(epoch=e) for e in epochs for _ in range(per)]
    for v in added:
        assert writer.add(v)
    assert not writer.add(added[0]), "adding a verdict twice must be a no-op"
    return added


@pytest.mark.slow
def test_rpc_outage_is_waited_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="trustcap.chain")
    anvil = Anvil(state=tmp_path / "anvil-state.json", log_file=tmp_path / "anvil.log").start()
    try:
        chain = deploy(anvil)
        writer = _writer(chain, tmp_path, backoff=(0.1, 1.0))
        added = _add(writer, range(1, 4))
        writer.seal()
        anvil.stop()  # the endpoint is gone: connection refused
        run = _Run(writer)
        run.start()
        time.sleep(3)
        assert run.is_alive() and writer.stats["confirmed"] == 0, repr(run.error)
        anvil.start()  # same port, same state
        run.join_ok()
        assert writer.stats["rpc_unavailable"] >= 3, writer.stats
        assert any("chain RPC unavailable" in r.getMessage() for r in caplog.records)
        result = audit(chain, tmp_path / "journal.sqlite", added)
        assert result["batches"] == 3
    finally:
        anvil.stop()


@pytest.mark.slow
def test_reorg_before_confirmations_resubmits(tmp_path: Path) -> None:
    with Anvil(log_file=tmp_path / "anvil.log") as anvil:
        chain = deploy(anvil)
        writer = _writer(chain, tmp_path, confirmations=3)
        added = _add(writer, range(7, 8))
        (bid,) = writer.seal()
        root = writer.journal.batch(bid).root  # type: ignore[union-attr]
        snapshot = anvil.rpc("evm_snapshot")
        run = _Run(writer)
        run.start()
        deadline = time.monotonic() + 30
        while chain.owner.find_batch(chain.d, bytes.fromhex(bid[2:]), root) is None:
            assert time.monotonic() < deadline, "the batch was never mined"
            time.sleep(0.02)
        sent_before = writer.stats["sent"] + writer.stats["resent"]
        assert anvil.rpc("evm_revert", [snapshot]) is True  # the block with our batch is gone, tx and all
        assert chain.owner.find_batch(chain.d, bytes.fromhex(bid[2:]), root) is None
        while run.is_alive():  # blocks keep coming, so confirmations can accrue
            anvil.rpc("evm_mine")
            time.sleep(0.1)
        run.join_ok()
        assert writer.stats["sent"] + writer.stats["resent"] > sent_before, "the dropped tx was not resubmitted"
        rec = writer.record("0x" + verdict_id(added[0], chain.domain).hex())
        assert rec is not None and chain.owner.block_number() - rec.block + 1 >= 3
        audit(chain, tmp_path / "journal.sqlite", added)


@pytest.mark.slow
def test_underpriced_transaction_is_repriced_with_the_same_nonce(tmp_path: Path) -> None:
    with Anvil(log_file=tmp_path / "anvil.log") as anvil:
        chain = deploy(anvil)
        base = chain.owner.suggest_fees()
        writer = _writer(chain, tmp_path, fees=lambda: Fees(max_fee=base.max_fee // 10, tip=1))
        added = _add(writer, range(3, 5))
        writer.run(timeout=60)
        assert writer.stats["underpriced"] >= 2, writer.stats
        txs = writer.journal.txs()
        by_batch: dict[str, set[int]] = {}
        for t in txs:
            by_batch.setdefault(t.batch_id, set()).add(t.nonce)
        assert all(len(n) == 1 for n in by_batch.values()), f"a batch changed nonce: {by_batch}"
        assert len(txs) > len(by_batch), "no repriced attempt was journaled"
        audit(chain, tmp_path / "journal.sqlite", added)


@pytest.mark.slow
def test_stuck_transaction_is_replaced_and_only_one_is_mined(tmp_path: Path) -> None:
    with Anvil(log_file=tmp_path / "anvil.log") as anvil:
        chain = deploy(anvil)
        anvil.rpc("evm_setAutomine", [False])  # transactions wait in the pool: "stuck"
        writer = _writer(chain, tmp_path, stuck_after=1.0)
        added = _add(writer, range(5, 6))
        run = _Run(writer)
        run.start()
        deadline = time.monotonic() + 30
        while writer.stats["replaced"] < 2:
            assert time.monotonic() < deadline, f"the stuck tx was not replaced: {writer.stats}"
            time.sleep(0.1)
        anvil.rpc("evm_setAutomine", [True])
        while run.is_alive():
            anvil.rpc("evm_mine")
            time.sleep(0.2)
        run.join_ok()
        assert len({t.nonce for t in writer.journal.txs()}) == 1 and len(writer.journal.txs()) >= 3
        audit(chain, tmp_path / "journal.sqlite", added)


def test_nonce_used_by_an_outsider_stops_the_writer(tmp_path: Path) -> None:
    """A transaction the writer did not sign takes its journaled nonce: it must stop, not re-sign at a new
    nonce (which could record the batch twice if its own transaction still surfaced)."""
    from trustcap.chain.errors import NonceConflict, RpcUnavailable

    with Anvil(log_file=tmp_path / "anvil.log") as anvil:
        chain = deploy(anvil)
        writer = _writer(chain, tmp_path)
        _add(writer, range(11, 12))
        writer.seal()

        def lost(raw: bytes) -> bytes:
            raise RpcUnavailable("injected: the send never reached the node")

        real_send = writer.client.send_raw
        writer.client.send_raw = lost  # type: ignore[method-assign]
        with pytest.raises(RpcUnavailable):
            writer.step()
        (signed,) = writer.journal.txs()
        outsider = chain.client(WRITER)  # same key, another process: anvil signs for its dev account
        outsider.wait(bytes(outsider.w3.eth.send_transaction(  # type: ignore[arg-type]
            {"from": WRITER.address, "to": VERIFIERS[1].address, "value": 1})))
        assert outsider.nonce("latest") == signed.nonce + 1
        writer.client.send_raw = real_send  # type: ignore[method-assign]
        with pytest.raises(NonceConflict):
            writer.step()
        log = chain.owner.contract("AttestationLog", chain.d.log)
        assert log.events.BatchRecorded.get_logs(from_block=0) == []
