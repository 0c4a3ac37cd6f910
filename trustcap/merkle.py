"""Merkle trees whose inclusion proofs OpenZeppelin's `MerkleProof.verify` accepts on chain.

Two uses: an epoch's verdicts are batched into one root that the AttestationLog contract stores (one
transaction per epoch instead of one per verdict, and any verdict provable later), and a node's hardware
fingerprint is a root over its named readings (one value to enrol and compare, any single reading
disclosable with a proof, without revealing the others).

Why OpenZeppelin's layout, exactly: the chain engineer's contract verifies with OZ `MerkleProof`, and
off-chain tools (`@openzeppelin/merkle-tree`) build the same trees, so a root computed here, there or in
Solidity must be the same bytes. The rules (docs/decisions/0011-merkle-trees.md):

- inner node = keccak256 of its two children in ascending byte order (commutative: proofs carry no
  left/right flags, which is what `MerkleProof.processProof` expects);
- leaves are double-hashed, `keccak256(bytes.concat(keccak256(abi.encode(values...))))` (OZ
  StandardMerkleTree), so that no leaf can ever equal an inner node (second-preimage guard);
- the tree is OZ's array layout: n leaves at the end of a 2n-1 array, in reverse order, each inner node i
  hashes its children 2i+1 and 2i+2; leaves are sorted ascending first (OZ's default `sortLeaves`), so a
  batch's root does not depend on the order verdicts happened to arrive in;
- a single leaf is its own root (empty proof); an empty tree is an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak

from trustcap.errors import InvalidProof, TrustcapError

__all__ = [
    "MerkleError",
    "MerkleTree",
    "decode_proof",
    "encode_proof",
    "fingerprint",
    "fingerprint_leaf",
    "fingerprint_proof",
    "hash_pair",
    "leaf_hash",
    "process_proof",
    "verdict_leaf",
    "verify_proof",
]

NODE_LEN = 32


class MerkleError(TrustcapError):
    """A tree cannot be built as asked: no leaves, a leaf that is not 32 bytes, an index out of range."""


def hash_pair(a: bytes, b: bytes) -> bytes:
    """OZ `Hashes.commutativeKeccak256`: keccak256 of the two nodes, smaller first."""
    return keccak(a + b if a <= b else b + a)


def leaf_hash(types: Sequence[str], values: Sequence[object]) -> bytes:
    """OZ StandardMerkleTree leaf: keccak256(bytes.concat(keccak256(abi.encode(values...))))."""
    try:
        encoded = abi_encode(list(types), list(values))
    except Exception as exc:  # eth_abi raises several unrelated types for bad values
        raise MerkleError(f"cannot ABI-encode leaf values as {list(types)}: {exc}") from exc
    return keccak(keccak(encoded))


def verdict_leaf(struct_hash: bytes) -> bytes:
    """A verdict's leaf in its epoch batch: the double hash of abi.encode(bytes32 verdictStructHash)."""
    if not isinstance(struct_hash, (bytes, bytearray)) or len(struct_hash) != NODE_LEN:
        raise MerkleError("a verdict struct hash must be 32 bytes")
    return leaf_hash(["bytes32"], [bytes(struct_hash)])


class MerkleTree:
    """A tree over already-hashed 32-byte leaves, laid out as OZ `makeMerkleTree` lays it out.

    `proof(i)` takes the index of a leaf in the sequence given to the constructor, whatever sorting did.
    """

    def __init__(self, leaves: Sequence[bytes], *, sort_leaves: bool = True) -> None:
        if len(leaves) == 0:
            raise MerkleError("a Merkle tree needs at least one leaf")
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, (bytes, bytearray)) or len(leaf) != NODE_LEN:
                raise MerkleError(f"leaf {i} must be 32 bytes (an already-hashed leaf)")
        self._leaves = [bytes(x) for x in leaves]
        order = sorted(range(len(leaves)), key=lambda i: self._leaves[i]) if sort_leaves else list(
            range(len(leaves))
        )
        size = 2 * len(leaves) - 1
        tree: list[bytes] = [b""] * size
        # position in the array of each original leaf index
        self._position: dict[int, int] = {}
        for rank, original in enumerate(order):
            pos = size - 1 - rank
            tree[pos] = self._leaves[original]
            self._position[original] = pos
        for i in range(size - 1 - len(leaves), -1, -1):
            tree[i] = hash_pair(tree[2 * i + 1], tree[2 * i + 2])
        self._tree = tree

    @property
    def root(self) -> bytes:
        return self._tree[0]

    @property
    def leaves(self) -> list[bytes]:
        return list(self._leaves)

    def __len__(self) -> int:
        return len(self._leaves)

    def proof(self, index: int) -> list[bytes]:
        """Sibling hashes from the leaf up to (not including) the root: OZ `getProof`."""
        if not 0 <= index < len(self._leaves):
            raise MerkleError(f"leaf index {index} is out of range for {len(self._leaves)} leaves")
        i = self._position[index]
        path: list[bytes] = []
        while i > 0:
            sibling = i + 1 if i % 2 == 1 else i - 1
            path.append(self._tree[sibling])
            i = (i - 1) // 2
        return path


def process_proof(leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """OZ `MerkleProof.processProof`: the root that `leaf` and `proof` lead to."""
    computed = bytes(leaf)
    for node in proof:
        computed = hash_pair(computed, bytes(node))
    return computed


def verify_proof(root: bytes, leaf: bytes, proof: Sequence[bytes]) -> bool:
    """OZ `MerkleProof.verify`. False for a wrong proof and for anything that is not 32-byte nodes,
    exactly as a bytes32-typed contract could never accept it."""
    items = [root, leaf, *proof] if isinstance(proof, (list, tuple)) else None
    if items is None or any(not isinstance(x, (bytes, bytearray)) or len(x) != NODE_LEN for x in items):
        return False
    return process_proof(leaf, proof) == bytes(root)


def encode_proof(proof: Sequence[bytes]) -> bytes:
    """Wire form of a proof: the nodes concatenated (what a contract's `bytes32[]` calldata carries)."""
    return b"".join(proof)


def decode_proof(data: bytes) -> list[bytes]:
    """Parse the wire form; InvalidProof unless it is a whole number of 32-byte nodes (at most 256)."""
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidProof("a Merkle proof must be bytes")
    if len(data) % NODE_LEN:
        raise InvalidProof(f"a Merkle proof must be a multiple of {NODE_LEN} bytes, got {len(data)}")
    if len(data) > 256 * NODE_LEN:
        raise InvalidProof("a Merkle proof deeper than 256 levels cannot belong to any tree we build")
    return [bytes(data[i:i + NODE_LEN]) for i in range(0, len(data), NODE_LEN)]


# Hardware fingerprints ---------------------------------------------------------------------------------
# A reading is (name, value), both strings; its leaf is leaf_hash(["string", "string"], [name, value]).
# Names are unique within a fingerprint; the root does not depend on reading order (sorted leaves).


def fingerprint_leaf(name: str, value: str) -> bytes:
    """The leaf of one hardware reading: double keccak of abi.encode(string name, string value)."""
    if not isinstance(name, str) or not name:
        raise MerkleError("a fingerprint reading needs a non-empty string name")
    if not isinstance(value, str):
        raise MerkleError(f"fingerprint reading {name!r} must have a string value")
    return leaf_hash(["string", "string"], [name, value])


def _fingerprint_tree(readings: Mapping[str, str]) -> tuple[list[str], MerkleTree]:
    if not readings:
        raise MerkleError("a fingerprint needs at least one reading")
    names = sorted(readings)
    return names, MerkleTree([fingerprint_leaf(n, readings[n]) for n in names])


def fingerprint(readings: Mapping[str, str]) -> bytes:
    """The fingerprint of a machine: the Merkle root over its named readings."""
    return _fingerprint_tree(readings)[1].root


def fingerprint_proof(readings: Mapping[str, str], name: str) -> tuple[bytes, list[bytes]]:
    """(leaf, proof) disclosing one reading against the fingerprint, without revealing the others."""
    names, tree = _fingerprint_tree(readings)
    if name not in readings:
        raise MerkleError(f"no reading named {name!r} in this fingerprint")
    index = names.index(name)
    return tree.leaves[index], tree.proof(index)
