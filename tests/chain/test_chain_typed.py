"""Our Batch hashing agrees with eth_account's independent EIP-712 encoder, is bound to the chain id and
contract, and the software signer makes low-s, recoverable signatures sorted the way the contract wants."""

from __future__ import annotations

import os

import pytest
from eth_account.messages import encode_typed_data
from eth_utils.crypto import keccak

from trustcap.chain.keys import ANVIL_KEYS, KeySigner
from trustcap.chain.typed import batch_digest, batch_id, sign_batch
from trustcap.evidence.signing import recover_address

CONTRACT = "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512"
_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _reference(epoch: int, root: bytes, count: int, chain_id: int, contract: str) -> tuple[bytes, bytes]:
    msg = encode_typed_data(full_message={
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                             {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"}],
            "Batch": [{"name": "epoch", "type": "uint64"}, {"name": "root", "type": "bytes32"},
                      {"name": "count", "type": "uint32"}],
        },
        "primaryType": "Batch",
        "domain": {"name": "trustcap", "version": "1", "chainId": chain_id, "verifyingContract": contract},
        "message": {"epoch": epoch, "root": root, "count": count},
    })
    return bytes(msg.body), keccak(b"\x19" + bytes(msg.version) + bytes(msg.header) + bytes(msg.body))


@pytest.mark.parametrize("epoch,count", [pytest.param(0, 1, id="zero-epoch"), pytest.param(2**64 - 1, 2**32 - 1,
                                                                                         id="max-values")])
def test_batch_hashes_match_an_independent_eip712_encoder(epoch: int, count: int) -> None:
    root = os.urandom(32)
    body, digest = _reference(epoch, root, count, 31337, CONTRACT)
    assert batch_id(epoch, root, count) == body
    assert batch_digest(epoch, root, count, 31337, CONTRACT) == digest


def test_digest_is_bound_to_chain_and_contract() -> None:
    root = os.urandom(32)
    d = batch_digest(1, root, 3, 31337, CONTRACT)
    assert d != batch_digest(1, root, 3, 1, CONTRACT)
    assert d != batch_digest(1, root, 3, 31337, "0x5FbDB2315678afecb367f032d93F642f64180aa3")
    assert batch_id(1, root, 3) != batch_id(1, root, 4)


def test_signatures_are_low_s_recoverable_and_sorted_by_signer() -> None:
    signers = [KeySigner(k) for k in ANVIL_KEYS[:6]]
    root = os.urandom(32)
    sigs = sign_batch(reversed(signers), 5, root, 9, 31337, CONTRACT)
    digest = batch_digest(5, root, 9, 31337, CONTRACT)
    addrs = [recover_address(digest, s) for s in sigs]
    assert sorted(addrs, key=lambda a: int(a, 16)) == addrs
    assert set(addrs) == {s.address for s in signers}
    assert all(int.from_bytes(s[32:64], "big") <= _N // 2 and s[64] in (27, 28) for s in sigs)
    assert "ac0974" not in repr(signers[0])  # never a key in a repr
