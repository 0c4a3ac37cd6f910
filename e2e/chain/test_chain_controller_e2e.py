"""The chain-writer controller's glue on a real anvil (no Kubernetes): a decided Attestation's verdicts
are rebuilt from the resource, checked against the ids the verifiers signed, written once, and the status
patch carries the real transaction and block; a tampered or incomplete resource is refused by field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kopf
import pytest
from chainkit import VERIFIERS, WRITER, Chain, decided_round
from trustcap.operator.chainwriter import ChainWriterController

from trustcap.chain.journal import Journal
from trustcap.chain.writer import Writer


def _resource(chain: Chain, *, passed: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    return decided_round(chain, epoch=4242, passed=passed)


def test_decided_round_is_recorded_once_and_status_gets_tx_and_block(chain: Chain, tmp_path: Path) -> None:
    writer = Writer(chain.client(WRITER), chain.d, Journal(tmp_path / "j.sqlite"), VERIFIERS[:3])
    ctl = ChainWriterController(writer)
    spec, status = _resource(chain)
    with pytest.raises(kopf.TemporaryError):
        ctl.reconcile(spec, status, "default/att-1")
    ctl.tick()
    patch = ctl.reconcile(spec, status, "default/att-1")
    receipt = chain.owner.receipt(bytes.fromhex(patch["txHash"][2:]))
    assert receipt is not None and receipt["blockNumber"] == patch["block"] and patch["epoch"] == 4242
    ev = chain.owner.find_batch(chain.d, bytes.fromhex(patch["batchId"][2:]), bytes.fromhex(patch["merkleRoot"][2:]))
    assert ev is not None and int(ev["args"]["count"]) == 3  # the whole round in one batch
    assert ctl.reconcile(spec, status, "default/att-1") == patch  # a re-run (operator restart) changes nothing
    ctl.tick()
    assert writer.journal.counts() == {"verdicts": 3, "pending": 0, "batches": 1, "unconfirmed": 0}


@pytest.mark.parametrize(("mutate", "message"), [
    pytest.param(lambda s, st: st["verdicts"][1].update(passed=False), r"verdicts\[1\]\.verdictId",
                 id="verdict-flipped-after-signing"),
    pytest.param(lambda s, st: s.update(epoch=1), r"verdicts\[0\]\.verdictId", id="epoch-changed"),
    pytest.param(lambda s, st: st["verdicts"][2].pop("quoteDigest"), r"verdicts\[2\]: field quoteDigest",
                 id="missing-quote-digest"),
    pytest.param(lambda s, st: s.update(executor="nobody"), r"verdicts\[0\]: not a valid verdict",
                 id="bad-executor-address"),
    pytest.param(lambda s, st: st.update(verdicts=[]), "status.verdicts is empty", id="no-verdicts"),
])
def test_tampered_or_incomplete_round_is_refused_by_field(chain: Chain, tmp_path: Path, mutate: Any,
                                                          message: str) -> None:
    writer = Writer(chain.client(WRITER), chain.d, Journal(tmp_path / "j.sqlite"), VERIFIERS[:3])
    spec, status = _resource(chain)
    mutate(spec, status)
    with pytest.raises(kopf.PermanentError, match=message):
        ChainWriterController(writer).reconcile(spec, status, "default/bad")
    assert writer.journal.counts()["verdicts"] == 0, "nothing of a refused round is journaled"
