"""The writer sends a batch only with a quorum of its cosigners' signatures, sorted as the contract wants.

The chain is a fake ChainClient (our wrapper) that reads AttestationLog's quorum and captures the
recordBatch a writer would send; the journal is the real SQLite one; the cosigners really sign the batch
digest (EIP-712), and one signs with the wrong key, one refuses. Against the real contract these same
signatures are what e2e/lifecycle records.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from trustcap import merkle
from trustcap.chain.client import Deployment, Fees
from trustcap.chain.errors import ChainError
from trustcap.chain.journal import Journal
from trustcap.chain.keys import KeySigner
from trustcap.chain.typed import batch_digest
from trustcap.chain.writer import Writer
from trustcap.evidence.signing import recover_address
from trustcap.evidence.verdict import Domain, Verdict, verdict_id

DEP = Deployment(chain_id=31337, registry="0x" + "11" * 20, log="0x" + "22" * 20, reputation="0x" + "33" * 20,
                 escrow="0x" + "44" * 20)
DOMAIN = Domain(chain_id=DEP.chain_id, verifying_contract=DEP.log)
GATEWAYS = [KeySigner("0x" + f"{50 + i:02x}" * 32) for i in range(4)]
SENDER = KeySigner("0x" + "5f" * 32)


class _Fn:
    def __init__(self, name: str, args: tuple[Any, ...]) -> None:
        self.fn_name, self.args = name, args


class _Functions:
    def __getattr__(self, name: str) -> Any:
        return lambda *args: _Fn(name, args)


class _Contract:
    functions = _Functions()


class FakeChain:
    """What the writer calls on a ChainClient; recordBatch calls are captured, never mined."""

    def __init__(self, quorum: int) -> None:
        self.quorum = quorum
        self.sent: list[tuple[Any, ...]] = []
        self._built: dict[bytes, tuple[Any, ...]] = {}

    def contract(self, name: str, address: str) -> _Contract:
        assert (name, address) == ("AttestationLog", DEP.log)
        return _Contract()

    def call_fn(self, fn: _Fn, value: int = 0) -> Any:
        assert fn.fn_name == "quorum"
        return self.quorum

    def suggest_fees(self) -> Fees:
        return Fees(10**9, 10**8)

    def find_batch(self, d: Deployment, bid: bytes, root: bytes) -> None:
        return None

    def find_root(self, d: Deployment, root: bytes, epoch: int) -> None:
        return None

    def nonce(self, block: str = "pending") -> int:
        return 0

    def build(self, fn: _Fn, *, nonce: int, fees: Fees, gas: int | None = None) -> dict[str, Any]:
        assert fn.fn_name == "recordBatch"
        return {"args": fn.args, "nonce": nonce, "gas": gas or 200_000}

    def sign(self, tx: dict[str, Any]) -> tuple[bytes, bytes]:
        raw = os.urandom(64)
        self._built[raw] = tx["args"]
        return raw, os.urandom(32)

    def send_raw(self, raw: bytes) -> bytes:
        self.sent.append(self._built[raw])
        return b""


class Gateway:
    """A cosigner that signs the batch digest with `key` (its trust root), claiming to be `address`."""

    def __init__(self, key: KeySigner, *, address: str | None = None, refuse: bool = False) -> None:
        self.key, self._address, self.refuse = key, (address or key.address).lower(), refuse
        self.asked: list[list[Verdict]] = []

    @property
    def address(self) -> str:
        return self._address

    def __call__(self, epoch: int, root: bytes, count: int, leaves: Sequence[Verdict]) -> bytes:
        self.asked.append(list(leaves))
        if self.refuse:
            raise ChainError("HTTP 403 field 'leaves[0]': not among round r's status.verdicts")
        return self.key.sign_digest(batch_digest(epoch, root, count, DEP.chain_id, DEP.log))


def _verdicts(n: int = 3, epoch: int = 4) -> list[Verdict]:
    nonce = "0x" + os.urandom(32).hex()
    return [Verdict(attestation_id=nonce, node=GATEWAYS[3].address, verifier=g.address, phase=1, passed=True,
                    quote_digest="0x" + os.urandom(32).hex(), policy_digest="0x" + "00" * 32, epoch=epoch,
                    issued_at=1_700_000_000) for g in GATEWAYS[:n]]


def _writer(tmp_path: Path, chain: FakeChain, cosigners: list[Gateway]) -> Writer:
    return Writer(chain, DEP, Journal(tmp_path / "j.sqlite"), cosigners=lambda leaves: cosigners)  # type: ignore[arg-type]


def _signers(epoch: int, verdicts: list[Verdict], sigs: Sequence[bytes]) -> list[str]:
    root = merkle.MerkleTree([merkle.verdict_leaf(verdict_id(v, DOMAIN)) for v in verdicts]).root
    digest = batch_digest(epoch, root, len(verdicts), DEP.chain_id, DEP.log)
    return [recover_address(digest, s) for s in sigs]


def test_a_batch_is_sent_with_a_quorum_of_cosignatures_in_signer_order(tmp_path: Path) -> None:
    chain = FakeChain(quorum=2)
    gws = [Gateway(g) for g in reversed(GATEWAYS[:3])]
    w = _writer(tmp_path, chain, gws)
    vs = _verdicts()
    for v in vs:
        w.add(v)
    assert len(w.seal()) == 1
    assert gws[0].asked == gws[1].asked and sorted(gws[0].asked[0], key=str) == sorted(vs, key=str)
    assert gws[2].asked == []  # the quorum was reached: nobody else is asked
    assert w.step()
    (epoch, _root, count, sigs), = chain.sent
    assert (epoch, count) == (4, 3)
    signers = _signers(4, vs, sigs)
    assert signers == sorted(signers, key=lambda a: int(a, 16))
    assert {s.lower() for s in signers} == {gws[0].address, gws[1].address}
    assert w.stats["cosigned"] == 1


def test_fewer_than_quorum_cosigners_means_nothing_is_sealed_or_sent_until_enough_sign(tmp_path: Path) -> None:
    chain = FakeChain(quorum=2)
    honest = Gateway(GATEWAYS[0])
    liar = Gateway(GATEWAYS[3], address=GATEWAYS[1].address)  # signs with another key than it claims
    refuser = Gateway(GATEWAYS[2], refuse=True)
    again = Gateway(GATEWAYS[0])  # the same gateway twice counts once
    cosigners = [honest, liar, refuser, again]
    w = _writer(tmp_path, chain, cosigners)
    vs = _verdicts()
    for v in vs:
        w.add(v)
    assert w.seal() == []
    assert not w.step() and chain.sent == []
    assert w.journal.counts()["unconfirmed"] == 0
    assert w.stats["cosign_short"] == 1
    assert again.asked == []
    cosigners.append(Gateway(GATEWAYS[2]))  # positive control: a second honest gateway answers later
    assert len(w.seal()) == 1
    assert w.step()
    (_, _, _, sigs), = chain.sent
    assert {s.lower() for s in _signers(4, vs, sigs)} == {GATEWAYS[0].address.lower(), GATEWAYS[2].address.lower()}


def test_the_quorum_is_the_contracts(tmp_path: Path) -> None:
    chain = FakeChain(quorum=3)
    w = _writer(tmp_path, chain, [Gateway(g) for g in GATEWAYS[:2]])
    for v in _verdicts():
        w.add(v)
    assert w.seal() == []
    chain.quorum = 2
    assert len(w.seal()) == 1


def test_a_writer_takes_cosigners_or_dev_keys_not_both_nor_neither(tmp_path: Path) -> None:
    chain = FakeChain(quorum=2)
    j = Journal(tmp_path / "j.sqlite")
    with pytest.raises(ChainError, match="cosigners"):
        Writer(chain, DEP, j)  # type: ignore[arg-type]
    with pytest.raises(ChainError, match="not both"):
        Writer(chain, DEP, j, GATEWAYS[:2], cosigners=lambda leaves: [])  # type: ignore[arg-type]
    dev = Writer(chain, DEP, j, GATEWAYS[:2])  # type: ignore[arg-type]
    vs = _verdicts()
    for v in vs:
        dev.add(v)
    assert len(dev.seal()) == 1
