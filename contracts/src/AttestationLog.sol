// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {NodeRegistry} from "./NodeRegistry.sol";

/// @title AttestationLog: epoch batches of verdicts, one Merkle root each, authorised by a verifier quorum.
/// @notice Only hashes reach the chain: a batch is (epoch, root, count); a verdict is its EIP-712 struct
/// hash. A batch is accepted when at least `quorum` distinct active registered verifiers signed the
/// EIP-712 `Batch(uint64 epoch,bytes32 root,uint32 count)` under this contract's domain (chain id and
/// address), with low-s signatures only (OZ ECDSA). Signatures must come in strictly ascending signer
/// order, so one signer cannot count twice. A batch id is recorded once, and a root once per epoch: a
/// root recorded under another epoch (a quorum front-running the real batch with a forged epoch) does not
/// block the real batch, whose verdicts stay provable (decision 0096).
/// Anyone can prove a verdict's inclusion with an OZ Merkle proof (double-hashed leaf, sorted pairs).
contract AttestationLog is EIP712, Ownable {
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

    NodeRegistry public immutable registry;
    uint256 public quorum;

    /// keyed by keccak256(abi.encode(root, epoch)): a verdict's inclusion needs its own epoch's batch.
    mapping(bytes32 => BatchRecord) private _byRoot;
    mapping(bytes32 => bytes32) public rootOfBatch;
    mapping(bytes32 => uint64) private _epochOfBatch;

    event BatchRecorded(bytes32 indexed batchId, uint64 indexed epoch, bytes32 root, uint32 count, uint256 signers);
    event QuorumSet(uint256 quorum);

    error BatchAlreadyRecorded(bytes32 batchId);
    error RootAlreadyRecorded(bytes32 root);
    error EmptyBatch();
    error InsufficientSignatures(uint256 got, uint256 required);
    error UnknownVerifier(address signer);
    error DuplicateSigner(address signer);
    error SignersNotAscending(address signer, address previous);
    error InvalidQuorum(uint256 quorum);
    error InsufficientVerdicts(uint256 got, uint256 required);
    error LengthMismatch();
    error VerdictNotIncluded(uint256 index);
    error InconsistentVerdicts(uint256 index);
    error VerifiersNotAscending(uint256 index);

    constructor(address owner_, NodeRegistry registry_, uint256 quorum_)
        EIP712("trustcap", "1")
        Ownable(owner_)
    {
        registry = registry_;
        _setQuorum(quorum_);
    }

    function setQuorum(uint256 quorum_) external onlyOwner {
        _setQuorum(quorum_);
    }

    function _setQuorum(uint256 quorum_) private {
        if (quorum_ == 0) revert InvalidQuorum(quorum_);
        quorum = quorum_;
        emit QuorumSet(quorum_);
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
        uint256 need = quorum;
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

    /// The outcome of one attestation round, proven from at least `minVerdicts` included verdicts of distinct
    /// verifiers that agree on (attestationId, node, phase, passed). Verifier addresses must be strictly
    /// ascending, so one verifier's verdicts (however many it signed, e.g. with other issuedAt) count once.
    /// Inclusion is the batch quorum's word, not each verifier's signature: nothing pays or slashes on this
    /// view (TaskEscrow.settle checks every verdict's own signature). Reverts naming the first that fails.
    function proveOutcome(
        Verdict[] calldata vs,
        bytes32[] calldata roots,
        bytes32[][] calldata proofs,
        uint256 minVerdicts
    ) external view returns (Verdict memory outcome) {
        if (vs.length != roots.length || vs.length != proofs.length) revert LengthMismatch();
        if (vs.length < minVerdicts || vs.length == 0) revert InsufficientVerdicts(vs.length, minVerdicts);
        address previous = address(0);
        for (uint256 i = 0; i < vs.length; ++i) {
            Verdict calldata v = vs[i];
            if (v.verifier <= previous) revert VerifiersNotAscending(i);
            previous = v.verifier;
            if (!isIncluded(v, roots[i], proofs[i])) revert VerdictNotIncluded(i);
            if (
                i > 0
                    && (
                        v.attestationId != vs[0].attestationId || v.node != vs[0].node || v.phase != vs[0].phase
                            || v.passed != vs[0].passed
                    )
            ) revert InconsistentVerdicts(i);
        }
        outcome = vs[0];
    }
}
