// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {NodeRegistry} from "./NodeRegistry.sol";

/// @title AttestationLog: epoch batches of verdicts, one Merkle root each, authorised by a verifier quorum.
/// @notice Only hashes reach the chain: a batch is (epoch, root, count); a verdict is its EIP-712 struct
/// hash. A batch is accepted when at least `quorum()` distinct active registered verifiers signed the
/// EIP-712 `Batch(uint64 epoch,bytes32 root,uint32 count)` under this contract's domain (chain id and
/// address), with low-s signatures only (OZ ECDSA). Signatures must come in strictly ascending signer
/// order, so one signer cannot count twice. A batch id is recorded once, and a root once per epoch: a
/// root recorded under another epoch (a quorum front-running the real batch with a forged epoch) does not
/// block the real batch, whose verdicts stay provable (decision 0096).
/// Anyone can prove a verdict's inclusion with an OZ Merkle proof (double-hashed leaf, sorted pairs).
/// `quorum()` is the larger of `minQuorum`, fixed at deployment (at least 2, and nobody can change it), and a
/// third of the registry's active nodes, rounded up: as nodes join, forging a batch takes more of them
/// (decision 0115). A batch is a record, not an outcome: the log has no outcome view. What settled a task,
/// and how, is TaskEscrow's state, decided from the committee's own signatures (decision 0091).
contract AttestationLog is EIP712 {
    struct Verdict {
        bytes32 attestationId;
        address node;
        address verifier;
        uint8 phase;
        bool passed;
        bytes32 quoteDigest;
        bytes32 policyDigest;
        uint64 epoch;
        uint64 issuedAt;
    }

    struct BatchRecord {
        uint64 epoch;
        uint32 count;
        uint64 blockNumber;
        bytes32 batchId;
    }

    bytes32 public constant VERDICT_TYPEHASH = keccak256(
        "Verdict(bytes32 attestationId,address node,address verifier,uint8 phase,bool passed,bytes32 quoteDigest,bytes32 policyDigest,uint64 epoch,uint64 issuedAt)"
    );
    bytes32 public constant BATCH_TYPEHASH = keccak256("Batch(uint64 epoch,bytes32 root,uint32 count)");

    /// The floor of `quorum()` as a share of the active nodes: one in this many, rounded up.
    uint256 public constant ACTIVE_SHARE = 3;

    NodeRegistry public immutable registry;
    /// The fewest signatures any batch needs, whatever the registry holds; fixed at deployment.
    uint256 public immutable minQuorum;

    /// keyed by keccak256(abi.encode(root, epoch)): a verdict's inclusion needs its own epoch's batch.
    mapping(bytes32 => BatchRecord) private _byRoot;
    mapping(bytes32 => bytes32) public rootOfBatch;
    mapping(bytes32 => uint64) private _epochOfBatch;

    event BatchRecorded(bytes32 indexed batchId, uint64 indexed epoch, bytes32 root, uint32 count, uint256 signers);

    error BatchAlreadyRecorded(bytes32 batchId);
    error RootAlreadyRecorded(bytes32 root);
    error EmptyBatch();
    error InsufficientSignatures(uint256 got, uint256 required);
    error UnknownVerifier(address signer);
    error DuplicateSigner(address signer);
    error SignersNotAscending(address signer, address previous);
    error InvalidQuorum(uint256 quorum);

    /// @param minQuorum_ at least 2: one key alone (an operator's, a single gateway's) never records a batch.
    constructor(NodeRegistry registry_, uint256 minQuorum_) EIP712("trustcap", "1") {
        if (minQuorum_ < 2) revert InvalidQuorum(minQuorum_);
        registry = registry_;
        minQuorum = minQuorum_;
    }

    /// The signatures a batch needs now: `minQuorum`, or a third of the active nodes (rounded up) if more.
    /// There is no setter: an owner who could lower it (to 1, as before decision 0115) could record any
    /// root with one key of its own.
    function quorum() public view returns (uint256) {
        uint256 share = (registry.activeCount() + ACTIVE_SHARE - 1) / ACTIVE_SHARE;
        return share > minQuorum ? share : minQuorum;
    }

    /// hashStruct(Batch): the batch's id, deterministic, so a resend after a crash is recognised.
    function batchId(uint64 epoch, bytes32 root, uint32 count) public pure returns (bytes32) {
        return keccak256(abi.encode(BATCH_TYPEHASH, epoch, root, count));
    }

    /// The digest verifiers sign for a batch (EIP-712, this chain, this contract).
    function batchDigest(uint64 epoch, bytes32 root, uint32 count) public view returns (bytes32) {
        return _hashTypedDataV4(batchId(epoch, root, count));
    }

    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    function recordBatch(uint64 epoch, bytes32 root, uint32 count, bytes[] calldata signatures)
        external
        returns (bytes32 id)
    {
        if (count == 0) revert EmptyBatch();
        id = batchId(epoch, root, count);
        if (rootOfBatch[id] != bytes32(0)) revert BatchAlreadyRecorded(id);
        bytes32 key = _rootKey(root, epoch);
        if (_byRoot[key].blockNumber != 0) revert RootAlreadyRecorded(root);
        uint256 need = quorum();
        if (signatures.length < need) revert InsufficientSignatures(signatures.length, need);
        bytes32 digest = _hashTypedDataV4(id);
        address previous = address(0);
        for (uint256 i = 0; i < signatures.length; ++i) {
            address signer = ECDSA.recover(digest, signatures[i]);
            if (signer == previous) revert DuplicateSigner(signer);
            if (signer < previous) revert SignersNotAscending(signer, previous);
            if (!registry.isActive(signer)) revert UnknownVerifier(signer);
            previous = signer;
        }
        _byRoot[key] = BatchRecord({epoch: epoch, count: count, blockNumber: uint64(block.number), batchId: id});
        rootOfBatch[id] = root;
        _epochOfBatch[id] = epoch;
        emit BatchRecorded(id, epoch, root, count, signatures.length);
    }

    function isRecorded(bytes32 id) external view returns (bool) {
        return rootOfBatch[id] != bytes32(0);
    }

    function _rootKey(bytes32 root, uint64 epoch) private pure returns (bytes32) {
        return keccak256(abi.encode(root, epoch));
    }

    /// The batch that recorded `root` for `epoch` (blockNumber 0: none).
    function batchOfRoot(bytes32 root, uint64 epoch) external view returns (BatchRecord memory) {
        return _byRoot[_rootKey(root, epoch)];
    }

    /// The record of batch `id` (blockNumber 0: not recorded); its root is `rootOfBatch(id)`.
    function batchOf(bytes32 id) external view returns (BatchRecord memory rec) {
        bytes32 root = rootOfBatch[id];
        if (root != bytes32(0)) rec = _byRoot[_rootKey(root, _epochOfBatch[id])];
    }

    /// hashStruct(Verdict): the verdict's id.
    function verdictId(Verdict calldata v) public pure returns (bytes32) {
        return keccak256(
            abi.encode(
                VERDICT_TYPEHASH,
                v.attestationId,
                v.node,
                v.verifier,
                v.phase,
                v.passed,
                v.quoteDigest,
                v.policyDigest,
                v.epoch,
                v.issuedAt
            )
        );
    }

    /// The digest `v.verifier` signs: EIP-712 under this contract's domain (what TaskEscrow recovers).
    function verdictDigest(Verdict calldata v) public view returns (bytes32) {
        return _hashTypedDataV4(verdictId(v));
    }

    /// OZ StandardMerkleTree leaf of a verdict: keccak256(bytes.concat(keccak256(abi.encode(id)))).
    function verdictLeaf(bytes32 id) public pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(id))));
    }

    /// True when `v` is in a recorded batch with root `root` and the batch's epoch matches the verdict's.
    function isIncluded(Verdict calldata v, bytes32 root, bytes32[] calldata proof) public view returns (bool) {
        if (_byRoot[_rootKey(root, v.epoch)].blockNumber == 0) return false;
        return MerkleProof.verifyCalldata(proof, root, verdictLeaf(verdictId(v)));
    }
}
