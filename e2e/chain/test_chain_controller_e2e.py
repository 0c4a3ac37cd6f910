"""The chain-writer controller's glue on a real anvil (no Kubernetes): a decided Attestation's signed
verdicts are checked by the writer itself (signature under the deployment's domain, signer = the entry's
verifier, a member of spec.committee, once, about this round, supporting status.result), written once,
and the status patch carries the real transaction and block; a forged, tampered or unsupported round is
refused naming the entry and the cause, and nothing of it is journaled. Each refusal's positive control
is the same honest round, which verifies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kopf
import pytest
from chainkit import OUTSIDER, VERIFIERS, WRITER, Chain, decided_round, verdict_entry

from trustcap.chain.journal import Journal
from trustcap.chain.writer import Writer
from trustcap.evidence.verdict import Domain, SignedVerdict, Verdict, sign_verdict
from trustcap.operator.chainwriter import ChainWriterController, verdicts_of


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


def _flip_signed(chain: Chain, s: dict[str, Any], st: dict[str, Any]) -> None:
    """Entry 1's signed verdict flipped to failed after signing (signature kept)."""
    item = st["verdicts"][1]
    item["verdict"]["verdict"]["passed"] = False
    item["passed"] = False


def _other_domain(chain: Chain, s: dict[str, Any], st: dict[str, Any]) -> None:
    """Entry 0 signed, validly, for another chain's AttestationLog."""
    item = st["verdicts"][0]
    v = Verdict.model_validate(item["verdict"]["verdict"])
    other = Domain(chain_id=chain.d.chain_id + 1, verifying_contract=chain.domain.verifying_contract)
    item["verdict"] = sign_verdict(v, other, VERIFIERS[1]).model_dump()


def _outsider(chain: Chain, s: dict[str, Any], st: dict[str, Any]) -> None:
    """An outsider's own valid verdict replaces entry 2 (it names and is signed by the outsider)."""
    st["verdicts"][2] = verdict_entry(chain, s, OUTSIDER, passed=True)


def _outsider_for_member(chain: Chain, s: dict[str, Any], st: dict[str, Any]) -> None:
    """The outsider signs a verdict that names member VERIFIERS[3] as its verifier."""
    item = st["verdicts"][2]
    v = Verdict.model_validate(item["verdict"]["verdict"])
    item["verdict"] = sign_verdict(v, chain.domain, OUTSIDER).model_dump()


def _twice(chain: Chain, s: dict[str, Any], st: dict[str, Any]) -> None:
    """VERIFIERS[1] signs a second verdict (other issuedAt) in place of VERIFIERS[2]'s."""
    st["verdicts"][1] = verdict_entry(chain, s, VERIFIERS[1], passed=True, issued_at=1_700_000_999)


def _minority_passed(chain: Chain, s: dict[str, Any], st: dict[str, Any]) -> None:
    """Two members honestly signed failed; status.result still says Passed."""
    st["verdicts"][1:] = [verdict_entry(chain, s, v, passed=False) for v in VERIFIERS[2:4]]


def _minority_failed(chain: Chain, s: dict[str, Any], st: dict[str, Any]) -> None:
    """One member signed failed, two passed; status.result says Failed."""
    st["verdicts"][0] = verdict_entry(chain, s, VERIFIERS[1], passed=False)
    st["result"] = "Failed"


def _zero_signature(chain: Chain, s: dict[str, Any], st: dict[str, Any]) -> None:
    st["verdicts"][0]["verdict"]["signature"] = "0x" + "00" * 65


@pytest.mark.parametrize(("mutate", "message"), [
    pytest.param(_zero_signature, r"verdicts\[0\].*signature is not valid", id="zero-filled-signature"),
    pytest.param(_flip_signed, r"verdicts\[1\].*names verifier .* but was signed by", id="flipped-after-signing"),
    pytest.param(_other_domain, r"verdicts\[0\].*not for the expected chain", id="signed-for-another-chain"),
    pytest.param(_outsider, r"verdicts\[2\].*not a member of spec.committee", id="non-committee-signer"),
    pytest.param(_outsider_for_member, r"verdicts\[2\].*but was signed by", id="outsider-signs-for-member"),
    pytest.param(_twice, r"verdicts\[1\].*a second verdict of verifier", id="one-verifier-twice"),
    pytest.param(_minority_passed, r"status.result is Passed but only 1", id="passed-without-quorum"),
    pytest.param(_minority_failed, r"status.result is Failed but only 1", id="failed-while-pass-reachable"),
    pytest.param(lambda c, s, st: s.update(nonce="0x" + "ab" * 32), r"verdicts\[0\].*about another round",
                 id="verdicts-of-another-round"),
    pytest.param(lambda c, s, st: st["verdicts"][2].pop("verdict"), r"verdicts\[2\].*field verdict",
                 id="missing-signed-verdict"),
    pytest.param(lambda c, s, st: st.update(verdicts=[]), "status.verdicts is empty", id="no-verdicts"),
])
def test_forged_tampered_or_unsupported_round_is_refused(chain: Chain, tmp_path: Path, mutate: Any,
                                                         message: str) -> None:
    writer = Writer(chain.client(WRITER), chain.d, Journal(tmp_path / "j.sqlite"), VERIFIERS[:3])
    spec, status = _resource(chain)
    assert len(verdicts_of(spec, status, chain.domain)) == 3  # control: the honest round verifies
    mutate(chain, spec, status)
    with pytest.raises(kopf.PermanentError, match=message):
        ChainWriterController(writer).reconcile(spec, status, "default/bad")
    assert writer.journal.counts()["verdicts"] == 0, "nothing of a refused round is journaled"


def test_a_failed_round_with_a_failed_quorum_is_recorded(chain: Chain) -> None:
    spec, status = decided_round(chain, epoch=4243, passed=False)
    got = verdicts_of(spec, status, chain.domain)
    assert [v.passed for v in got] == [False, False, False]
    assert {v.verifier for v in got} == {v.address for v in VERIFIERS[1:4]}
    assert all(isinstance(SignedVerdict.model_validate(i["verdict"]), SignedVerdict) for i in status["verdicts"])
