// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

/// @title NaiveLog: the baseline the gas bench compares against (bench/bench_chain_gas.py).
/// @notice Each verdict in its own storage slot, one transaction each, one signature check each: what a
/// log without batching would cost. Not deployed outside the bench.
contract NaiveLog {
    mapping(bytes32 => uint256) public recordedAt;

    event VerdictRecorded(bytes32 indexed verdictId);

    error AlreadyRecorded(bytes32 verdictId);
    error BadSignature();

    function record(bytes32 verdictId, uint8 v, bytes32 r, bytes32 s) external {
        if (recordedAt[verdictId] != 0) revert AlreadyRecorded(verdictId);
        if (ecrecover(verdictId, v, r, s) == address(0)) revert BadSignature();
        recordedAt[verdictId] = block.number;
        emit VerdictRecorded(verdictId);
    }
}
