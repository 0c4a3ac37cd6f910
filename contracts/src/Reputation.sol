// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {AttestationLog} from "./AttestationLog.sol";

/// @title Reputation: slow to earn, lost at once, regained only slowly.
/// @notice Seed: a caught node "will lose all its reputation for a very long time". A proven passed round
/// adds `gain` (capped at `maxScore`); a proven failed round wipes the earned score and adds `failPenalty`
/// to a penalty that decays linearly by `decayPerDay`. The visible score is earned minus the penalty still
/// outstanding, floored at zero: with failPenalty 1000 and decay 1/day a caught node needs ~3 years of
/// clean rounds before its history counts again. Each attestation counts once; anyone may submit it.
contract Reputation {
    struct Score {
        uint64 earned;
        uint64 penalty; // outstanding at penaltyAt
        uint64 penaltyAt;
        uint64 passed;
        uint64 failed;
    }

    AttestationLog public immutable log;
    uint64 public immutable gain;
    uint64 public immutable maxScore;
    uint64 public immutable failPenalty;
    uint64 public immutable decayPerDay;
    uint256 public immutable minVerdicts;

    mapping(address => Score) private _scores;
    mapping(bytes32 => bool) public counted;

    event ReputationChanged(address indexed node, bytes32 indexed attestationId, bool passed, uint256 score);

    error AttestationAlreadyCounted(bytes32 attestationId);

    constructor(
        AttestationLog log_,
        uint64 gain_,
        uint64 maxScore_,
        uint64 failPenalty_,
        uint64 decayPerDay_,
        uint256 minVerdicts_
    ) {
        log = log_;
        gain = gain_;
        maxScore = maxScore_;
        failPenalty = failPenalty_;
        decayPerDay = decayPerDay_;
        minVerdicts = minVerdicts_;
    }

    function record(
        AttestationLog.Verdict[] calldata vs,
        bytes32[] calldata roots,
        bytes32[][] calldata proofs
    ) external {
        AttestationLog.Verdict memory o = log.proveOutcome(vs, roots, proofs, minVerdicts);
        if (counted[o.attestationId]) revert AttestationAlreadyCounted(o.attestationId);
        counted[o.attestationId] = true;
        Score storage s = _scores[o.node];
        if (o.passed) {
            uint64 next = s.earned + gain;
            s.earned = next > maxScore ? maxScore : next;
            s.passed += 1;
        } else {
            s.penalty = _outstanding(s) + failPenalty;
            s.penaltyAt = uint64(block.timestamp);
            s.earned = 0;
            s.failed += 1;
        }
        emit ReputationChanged(o.node, o.attestationId, o.passed, scoreOf(o.node));
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
