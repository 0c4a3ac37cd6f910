// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title Reputation: slow to earn, lost at once, regained only slowly.
/// @notice Seed: a caught node "will lose all its reputation for a very long time". A settled, paid task
/// adds `gain` to its executor (capped at `maxScore`); a settled, slashed task wipes the executor's earned
/// score and adds `failPenalty` to a penalty that decays linearly by `decayPerDay`. The visible score is
/// earned minus the penalty still outstanding, floored at zero: with failPenalty 1000 and decay 1/day a
/// caught node needs ~3 years of clean rounds before its history counts again.
/// Only the recorder (TaskEscrow, set once) records, and only from a settlement whose every verdict it
/// checked on chain (signature, committee membership, one per verifier, quorum): a batch of verdicts in
/// AttestationLog is not enough, because the batch quorum does not vouch for each verdict's signer.
/// Each attestation counts once.
contract Reputation is Ownable {
    struct Score {
        uint64 earned;
        uint64 penalty; // outstanding at penaltyAt
        uint64 penaltyAt;
        uint64 passed;
        uint64 failed;
    }

    uint64 public immutable gain;
    uint64 public immutable maxScore;
    uint64 public immutable failPenalty;
    uint64 public immutable decayPerDay;
    /// The only account allowed to record (TaskEscrow); set once by the owner.
    address public recorder;

    mapping(address => Score) private _scores;
    mapping(bytes32 => bool) public counted;

    event ReputationChanged(address indexed node, bytes32 indexed attestationId, bool passed, uint256 score);
    event RecorderSet(address indexed recorder);

    error AttestationAlreadyCounted(bytes32 attestationId);
    error NotRecorder(address caller);
    error RecorderAlreadySet(address recorder);
    error ZeroAddress();

    constructor(address owner_, uint64 gain_, uint64 maxScore_, uint64 failPenalty_, uint64 decayPerDay_)
        Ownable(owner_)
    {
        gain = gain_;
        maxScore = maxScore_;
        failPenalty = failPenalty_;
        decayPerDay = decayPerDay_;
    }

    function setRecorder(address recorder_) external onlyOwner {
        if (recorder_ == address(0)) revert ZeroAddress();
        if (recorder != address(0)) revert RecorderAlreadySet(recorder);
        recorder = recorder_;
        emit RecorderSet(recorder_);
    }

    /// A settled outcome of `node`'s attestation `attestationId` (TaskEscrow.settle only).
    function record(address node, bytes32 attestationId, bool passed) external {
        if (msg.sender != recorder) revert NotRecorder(msg.sender);
        if (counted[attestationId]) revert AttestationAlreadyCounted(attestationId);
        counted[attestationId] = true;
        Score storage s = _scores[node];
        if (passed) {
            uint64 next = s.earned + gain;
            s.earned = next > maxScore ? maxScore : next;
            s.passed += 1;
        } else {
            s.penalty = _outstanding(s) + failPenalty;
            s.penaltyAt = uint64(block.timestamp);
            s.earned = 0;
            s.failed += 1;
        }
        emit ReputationChanged(node, attestationId, passed, scoreOf(node));
    }

    function _outstanding(Score storage s) private view returns (uint64) {
        uint256 decayed = (block.timestamp - s.penaltyAt) * decayPerDay / 1 days;
        return decayed >= s.penalty ? 0 : s.penalty - uint64(decayed);
    }

    function scoreOf(address node) public view returns (uint256) {
        Score storage s = _scores[node];
        uint64 pen = _outstanding(s);
        return s.earned > pen ? s.earned - pen : 0;
    }

    function recordOf(address node) external view returns (Score memory) {
        return _scores[node];
    }
}
