"""Merkle trees: OpenZeppelin-identical roots and proofs, tamper rejection, odd sizes, fingerprints.

The OZ_* constants were produced by the reference implementation itself, `@openzeppelin/merkle-tree`
1.0.8 (npm), run once outside the repository:
    StandardMerkleTree.of([[0], [1], ... [n-1]], ["uint256"]).root / .getProof(n-1)
    StandardMerkleTree.of([["0x11..11"]], ["bytes32"]).root
    StandardMerkleTree.of([["cpu", ...], ["disk", "none"], ["mac", ...]], ["string", "string"])
so these tests compare against OZ, not against our own output. The chain engineer checks the same roots
with `MerkleProof.verify` on chain.
"""

from __future__ import annotations

from typing import Any

import pytest
from eth_utils import keccak

from trustcap.errors import InvalidProof
from trustcap.merkle import (
    MerkleError,
    MerkleTree,
    decode_proof,
    encode_proof,
    fingerprint,
    fingerprint_leaf,
    fingerprint_proof,
    hash_pair,
    leaf_hash,
    process_proof,
    verdict_leaf,
    verify_proof,
)

OZ_ROOTS = {
    1: "510e4e770828ddbf7f7b00ab00a9f6adaf81c0dc9cc85f1f8249c256942d61d9",
    2: "a3c45fa76377c0a96e373793e9023fb2a2d6970e0989ca39ce9f50d9acf834c9",
    3: "4dce7cb982edc0947d8dd7e45c6f988490b3adc2198e2098cd18046a1cd6f058",
    4: "e97e7870ffec941070df3ac0255521c04008ba2c5a2b9ebb33e0d4adee758162",
    5: "2130c065ea4cfb360bd5dc1308d491cd5c2923b6f986fc47c1c20acc24ec6b31",
    6: "3b2b98a9c530c49983f713e25a4ad82e3c54f42e7b6de68eeed151f29c0be469",
    7: "e843d4dd7c8dd05fd35381e6deace6102b549e82eddb7092906a1ade1c69deab",
}
OZ_PROOF_OF_LAST = {
    1: [],
    2: ["510e4e770828ddbf7f7b00ab00a9f6adaf81c0dc9cc85f1f8249c256942d61d9"],
    3: [
        "510e4e770828ddbf7f7b00ab00a9f6adaf81c0dc9cc85f1f8249c256942d61d9",
        "b5d9d894133a730aa651ef62d26b0ffa846233c74177a591a4a896adfda97d22",
    ],
    6: [
        "1ab0c6948a275349ae45a06aad66a8bd65ac18074615d53676c09b67809099e0",
        "5edeb365ae08d00cd0a6c5f99d5715350068f9b0f2fc1f7b7f724fdf5ddf69ee",
        "136294f805d88ac24e4b5175215b07d8c996803df31b99052af7cbd4f0925760",
    ],
    7: [
        "b5d9d894133a730aa651ef62d26b0ffa846233c74177a591a4a896adfda97d22",
        "5edeb365ae08d00cd0a6c5f99d5715350068f9b0f2fc1f7b7f724fdf5ddf69ee",
        "c949c2dc5da2bd9a4f5ae27532dfbb3551487bed50825cd099ff5d0a8d613ab5",
    ],
}
OZ_VERDICT_ROOT = "ddf01ddd376b0754614e249410f966d61b6560ef80e7495eaa08341d4e534a2e"
READINGS = {"cpu": "Intel(R) Core(TM) i5-8500T", "disk": "none", "mac": "52:54:00:12:34:56"}
OZ_FINGERPRINT = "6a125be2c1991d037bd2f8a22c95cf0b9d8c4e8ec1f01e01636c1e4118e54744"
OZ_FINGERPRINT_MAC_PROOF = ["2dd82dff9741c87ee5f4e7f20ed3e589c6ab4ba37942191a811f11545f0193c7"]


def _uint_leaves(n: int) -> list[bytes]:
    return [leaf_hash(["uint256"], [i]) for i in range(n)]


@pytest.mark.parametrize("n", [pytest.param(n, id=f"{n}-leaves") for n in OZ_ROOTS])
def test_root_equals_openzeppelin(n: int) -> None:
    assert MerkleTree(_uint_leaves(n)).root.hex() == OZ_ROOTS[n]


@pytest.mark.parametrize("n", [pytest.param(n, id=f"{n}-leaves") for n in OZ_PROOF_OF_LAST])
def test_proof_equals_openzeppelin(n: int) -> None:
    assert [p.hex() for p in MerkleTree(_uint_leaves(n)).proof(n - 1)] == OZ_PROOF_OF_LAST[n]


def test_layout_by_hand_for_five_leaves() -> None:
    """OZ array layout, written out: sorted s0..s4 at positions 8..4, then nodes 3..0 from children."""
    s = sorted(_uint_leaves(5))
    n3, n2 = hash_pair(s[1], s[0]), hash_pair(s[3], s[2])
    n1 = hash_pair(n3, s[4])
    assert MerkleTree(_uint_leaves(5)).root == hash_pair(n1, n2)


def test_hash_pair_is_commutative_keccak_of_sorted_pair() -> None:
    a, b = b"\x01" * 32, b"\x02" * 32
    assert hash_pair(a, b) == hash_pair(b, a) == keccak(a + b)


def test_verdict_leaf_and_single_leaf_root_equal_openzeppelin() -> None:
    leaf = verdict_leaf(b"\x11" * 32)
    tree = MerkleTree([leaf])
    assert tree.root == leaf
    assert leaf.hex() == OZ_VERDICT_ROOT
    assert tree.proof(0) == []
    assert verify_proof(tree.root, leaf, [])


@pytest.mark.parametrize("n", [pytest.param(n, id=f"{n}-leaves") for n in (1, 2, 3, 5, 8, 13, 33)])
def test_every_leaf_proves_inclusion(n: int) -> None:
    leaves = _uint_leaves(n)
    tree = MerkleTree(leaves)
    for i, leaf in enumerate(leaves):
        assert verify_proof(tree.root, leaf, tree.proof(i))
        assert decode_proof(encode_proof(tree.proof(i))) == tree.proof(i)


def test_root_does_not_depend_on_leaf_order_but_unsorted_tree_does() -> None:
    leaves = _uint_leaves(6)
    assert MerkleTree(leaves).root == MerkleTree(list(reversed(leaves))).root
    assert MerkleTree(leaves, sort_leaves=False).root != MerkleTree(list(reversed(leaves)), sort_leaves=False).root
    unsorted = MerkleTree(leaves, sort_leaves=False)
    assert all(verify_proof(unsorted.root, leaf, unsorted.proof(i)) for i, leaf in enumerate(leaves))


TREE7 = MerkleTree(_uint_leaves(7))
LEAF3 = _uint_leaves(7)[3]
PROOF3 = TREE7.proof(3)


def _flip(b: bytes) -> bytes:
    return bytes([b[0] ^ 1]) + b[1:]


@pytest.mark.parametrize(
    ("root", "leaf", "proof"),
    [
        pytest.param(TREE7.root, LEAF3, [_flip(PROOF3[0]), *PROOF3[1:]], id="sibling-flipped"),
        pytest.param(TREE7.root, LEAF3, PROOF3[:-1], id="proof-truncated"),
        pytest.param(TREE7.root, LEAF3, [*PROOF3, PROOF3[-1]], id="proof-extended"),
        pytest.param(TREE7.root, LEAF3, list(reversed(PROOF3)), id="proof-reordered"),
        pytest.param(TREE7.root, _flip(LEAF3), PROOF3, id="leaf-flipped"),
        pytest.param(_flip(TREE7.root), LEAF3, PROOF3, id="root-flipped"),
        pytest.param(TREE7.root, _uint_leaves(8)[7], PROOF3, id="leaf-not-in-tree"),
        pytest.param(TREE7.root, LEAF3[:31], PROOF3, id="short-leaf"),
        pytest.param(TREE7.root, LEAF3, [PROOF3[0][:16], *PROOF3[1:]], id="short-node"),
        pytest.param(TREE7.root, LEAF3, "not a list", id="proof-not-a-list"),
    ],
)
def test_tampered_proofs_are_rejected(root: bytes, leaf: bytes, proof: Any) -> None:
    assert verify_proof(root, leaf, proof) is False


def test_inner_node_cannot_pose_as_leaf_because_leaves_are_double_hashed() -> None:
    """With a single-hashed leaf an inner node plus the rest of the proof would verify (second preimage);
    our API only ever makes leaves through leaf_hash, whose output is a keccak of a keccak."""
    inner = hash_pair(LEAF3, PROOF3[0])
    assert process_proof(inner, PROOF3[1:]) == TREE7.root  # the raw algorithm would accept it ...
    assert inner not in TREE7.leaves  # ... but it is no leaf that leaf_hash produced


@pytest.mark.parametrize(
    ("leaves", "match"),
    [
        pytest.param([], "at least one leaf", id="empty"),
        pytest.param([b"\x00" * 31], "32 bytes", id="short-leaf"),
        pytest.param(["00" * 32], "32 bytes", id="hex-string-leaf"),
    ],
)
def test_bad_trees_are_refused(leaves: list[Any], match: str) -> None:
    with pytest.raises(MerkleError, match=match):
        MerkleTree(leaves)


@pytest.mark.parametrize("index", [pytest.param(-1, id="negative"), pytest.param(7, id="past-end")])
def test_proof_index_out_of_range(index: int) -> None:
    with pytest.raises(MerkleError, match="out of range"):
        TREE7.proof(index)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param(b"\x00" * 33, "multiple of 32", id="ragged"),
        pytest.param(b"\x00" * 32 * 257, "deeper than 256", id="too-deep"),
        pytest.param("00" * 32, "must be bytes", id="not-bytes"),
    ],
)
def test_decode_proof_refuses_malformed(data: Any, match: str) -> None:
    with pytest.raises(InvalidProof, match=match):
        decode_proof(data)


def test_fingerprint_equals_openzeppelin_and_discloses_one_reading() -> None:
    root = fingerprint(READINGS)
    assert root.hex() == OZ_FINGERPRINT
    leaf, proof = fingerprint_proof(READINGS, "mac")
    assert leaf == fingerprint_leaf("mac", READINGS["mac"])
    assert [p.hex() for p in proof] == OZ_FINGERPRINT_MAC_PROOF
    assert verify_proof(root, leaf, proof)
    assert not verify_proof(root, fingerprint_leaf("mac", "52:54:00:12:34:57"), proof)


def test_fingerprint_changes_with_any_reading_and_not_with_order() -> None:
    root = fingerprint(READINGS)
    assert fingerprint(dict(reversed(list(READINGS.items())))) == root
    for name in READINGS:
        assert fingerprint({**READINGS, name: READINGS[name] + "x"}) != root
    assert fingerprint({**READINGS, "tpm": "absent"}) != root


@pytest.mark.parametrize(
    ("readings", "match"),
    [
        pytest.param({}, "at least one reading", id="empty"),
        pytest.param({"": "x"}, "non-empty string name", id="empty-name"),
        pytest.param({"cpu": 4}, "string value", id="non-string-value"),
    ],
)
def test_bad_fingerprints_are_refused(readings: dict[str, Any], match: str) -> None:
    with pytest.raises(MerkleError, match=match):
        fingerprint(readings)


def test_fingerprint_proof_for_missing_reading() -> None:
    with pytest.raises(MerkleError, match="no reading named"):
        fingerprint_proof(READINGS, "gpu")


def test_leaf_hash_refuses_values_abi_cannot_encode() -> None:
    with pytest.raises(MerkleError, match="ABI-encode"):
        leaf_hash(["uint8"], [300])
    with pytest.raises(MerkleError, match="32 bytes"):
        verdict_leaf(b"\x00")
