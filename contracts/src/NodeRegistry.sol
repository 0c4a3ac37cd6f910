// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

/// @title NodeRegistry: who may verify and execute, with what stake, on which approved boot images.
/// @notice A gateway registers from its own trust-root address (its signing address IS its chain
/// address), with a deposit, its VRF public key and the Merkle root of its HPC's hardware fingerprint.
/// It can leave only after a delay, so a node caught misbehaving cannot pull its deposit out before the
/// slash lands, and not at all while its deposit is locked: TaskEscrow locks a node's deposit when it
/// commits to a task's draw (so an executor, who learns its role at selection, cannot leave during the run),
/// releases the committers `assign` does not name, and unlocks the participants when the task settles or is
/// refunded, so the stake a settlement may slash is still there when the verdicts arrive. Boot-image digests are approved by the owner (governance); a gateway serves only those.
contract NodeRegistry is Ownable, ReentrancyGuard {
    struct Node {
        uint256 deposit;
        bytes32 fingerprintRoot;
        uint64 registeredAt;
        uint64 leaveRequestedAt; // 0 while active
        uint64 registeredBlock; // TaskEscrow admits a node to a task's draw only if this is before the seed block
        bool registered;
        bytes vrfPublicKey;
    }

    uint256 public immutable minDeposit;
    uint64 public immutable leaveDelay;
    /// The only contract allowed to slash (TaskEscrow); set once by the owner.
    address public slasher;

    mapping(address => Node) private _nodes;
    mapping(bytes32 => bool) public approvedBootImage;
    /// How many open tasks hold this node's deposit (committed, or executor or verifier); withdraw and leave
    /// wait for 0.
    mapping(address => uint256) public locks;
    uint256 public activeCount;

    event NodeRegistered(address indexed node, uint256 deposit, bytes32 fingerprintRoot);
    event LeaveRequested(address indexed node, uint64 at);
    event NodeLeft(address indexed node, uint256 refunded);
    event NodeSlashed(address indexed node, uint256 amount, address indexed to);
    event BootImageApproved(bytes32 indexed digest);
    event BootImageRevoked(bytes32 indexed digest);
    event SlasherSet(address indexed slasher);
    event DepositLocked(address indexed node, uint256 locks);
    event DepositUnlocked(address indexed node, uint256 locks);

    error AlreadyRegistered(address node);
    error NotRegistered(address node);
    error DepositTooLow(uint256 sent, uint256 required);
    error InvalidVrfKey(uint256 length);
    error LeaveNotRequested(address node);
    error LeaveDelayNotOver(uint64 availableAt);
    error NotSlasher(address caller);
    error SlasherAlreadySet(address slasher);
    error ZeroAddress();
    error TransferFailed(address to, uint256 amount);
    error DepositIsLocked(address node, uint256 locks);
    error NotLocked(address node);

    constructor(address owner_, uint256 minDeposit_, uint64 leaveDelay_) Ownable(owner_) {
        minDeposit = minDeposit_;
        leaveDelay = leaveDelay_;
    }

    /// @param vrfPublicKey SEC1-compressed P-256 key of the gateway's ECVRF (33 bytes).
    /// @param fingerprintRoot Merkle root (trustcap.merkle) of the HPC's hardware fingerprint readings.
    function register(bytes calldata vrfPublicKey, bytes32 fingerprintRoot) external payable {
        Node storage n = _nodes[msg.sender];
        if (n.registered) revert AlreadyRegistered(msg.sender);
        if (msg.value < minDeposit) revert DepositTooLow(msg.value, minDeposit);
        if (vrfPublicKey.length != 33) revert InvalidVrfKey(vrfPublicKey.length);
        n.deposit = msg.value;
        n.fingerprintRoot = fingerprintRoot;
        n.registeredAt = uint64(block.timestamp);
        n.registeredBlock = uint64(block.number);
        n.leaveRequestedAt = 0;
        n.registered = true;
        n.vrfPublicKey = vrfPublicKey;
        activeCount += 1;
        emit NodeRegistered(msg.sender, msg.value, fingerprintRoot);
    }

    /// A leaving node stops counting as a verifier at once; its deposit stays slashable for `leaveDelay`.
    function requestLeave() external {
        Node storage n = _nodes[msg.sender];
        if (!n.registered) revert NotRegistered(msg.sender);
        if (locks[msg.sender] != 0) revert DepositIsLocked(msg.sender, locks[msg.sender]);
        if (n.leaveRequestedAt == 0) {
            n.leaveRequestedAt = uint64(block.timestamp);
            activeCount -= 1;
            emit LeaveRequested(msg.sender, n.leaveRequestedAt);
        }
    }

    function withdraw() external nonReentrant {
        Node storage n = _nodes[msg.sender];
        if (!n.registered) revert NotRegistered(msg.sender);
        if (n.leaveRequestedAt == 0) revert LeaveNotRequested(msg.sender);
        if (locks[msg.sender] != 0) revert DepositIsLocked(msg.sender, locks[msg.sender]);
        uint64 availableAt = n.leaveRequestedAt + leaveDelay;
        if (block.timestamp < availableAt) revert LeaveDelayNotOver(availableAt);
        uint256 amount = n.deposit;
        delete _nodes[msg.sender];
        emit NodeLeft(msg.sender, amount);
        (bool ok,) = msg.sender.call{value: amount}("");
        if (!ok) revert TransferFailed(msg.sender, amount);
    }

    function setSlasher(address slasher_) external onlyOwner {
        if (slasher_ == address(0)) revert ZeroAddress();
        if (slasher != address(0)) revert SlasherAlreadySet(slasher);
        slasher = slasher_;
        emit SlasherSet(slasher_);
    }

    /// Takes up to `amount` of `node`'s deposit to `to`. Only the slasher (TaskEscrow), which slashes only
    /// on a proven failed attestation. Returns what was actually taken.
    function slash(address node, uint256 amount, address to) external nonReentrant returns (uint256 taken) {
        if (msg.sender != slasher) revert NotSlasher(msg.sender);
        Node storage n = _nodes[node];
        if (!n.registered) revert NotRegistered(node);
        taken = amount < n.deposit ? amount : n.deposit;
        n.deposit -= taken;
        emit NodeSlashed(node, taken, to);
        (bool ok,) = to.call{value: taken}("");
        if (!ok) revert TransferFailed(to, taken);
    }

    /// The slasher (TaskEscrow) holds `node`'s deposit for one more task (committed to, or assigned).
    function lock(address node) external {
        if (msg.sender != slasher) revert NotSlasher(msg.sender);
        if (!_nodes[node].registered) revert NotRegistered(node);
        uint256 n = locks[node] + 1;
        locks[node] = n;
        emit DepositLocked(node, n);
    }

    /// The slasher releases one hold (not selected, or the task settled, was cancelled or refunded).
    function unlock(address node) external {
        if (msg.sender != slasher) revert NotSlasher(msg.sender);
        uint256 n = locks[node];
        if (n == 0) revert NotLocked(node);
        locks[node] = n - 1;
        emit DepositUnlocked(node, n - 1);
    }

    function approveBootImage(bytes32 digest) external onlyOwner {
        approvedBootImage[digest] = true;
        emit BootImageApproved(digest);
    }

    function revokeBootImage(bytes32 digest) external onlyOwner {
        approvedBootImage[digest] = false;
        emit BootImageRevoked(digest);
    }

    /// Registered, not leaving, and still holding at least the minimum deposit.
    function isActive(address node) public view returns (bool) {
        Node storage n = _nodes[node];
        return n.registered && n.leaveRequestedAt == 0 && n.deposit >= minDeposit;
    }

    /// What TaskEscrow reads at `commit`, in one call: Active, the block of registration (a key registered
    /// after a task's seed block could have been ground against that seed) and the deposit (a weight input).
    function eligibility(address node) external view returns (bool active, uint64 registeredBlock, uint256 deposit) {
        Node storage n = _nodes[node];
        return (isActive(node), n.registeredBlock, n.deposit);
    }

    function nodeOf(address node) external view returns (Node memory) {
        return _nodes[node];
    }
}
