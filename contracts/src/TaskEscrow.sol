// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {AttestationLog} from "./AttestationLog.sol";
import {NodeRegistry} from "./NodeRegistry.sol";

/// @title TaskEscrow: a capsule's payment, paid out only on a proven post-execution attestation.
/// @notice The payer escrows the payment under the capsule's task id (a hash; no task data). After the
/// run the coordinator (the operator's chain account) binds the task to its post-execution attestation,
/// the revealed executor and the verifiers, once. Anyone may then settle with a quorum of included
/// verdicts of that attestation (phase post): passed pays the executor its share and splits the rest
/// among the verifiers; failed refunds the payer and slashes the executor's deposit to the payer.
/// There is no other path to a slash. Payouts are credited and pulled (`withdraw`), so one failing
/// recipient cannot block a settlement.
/// @dev Timeout refund (decision 0030, "Escrow deadline"): every task carries a deadline fixed at
/// `createTask` (after now, at most `MAX_DEADLINE` ahead). Once it has passed, a task still Funded or
/// Assigned can be refunded by its payer: the whole payment is credited back (`owed`, pulled as usual)
/// and the task becomes Refunded, closed for good. A timeout proves nothing about the executor, so it
/// never slashes. Until a refund happens, `assign` and `settle` keep working after the deadline:
/// a late but proven quorum still pays the work that was done; the refund is what closes the task.
/// Only the payer may refund: a refund can only ever pay the payer, and letting anyone call it would
/// let a third party race a late settlement and cancel the executor's pay, a choice that belongs to
/// the one who paid (who, having lost its key, could not withdraw a refund anyway).
///
///   payer --createTask(deadline)--> Funded --assign--> Assigned --settle--> Paid | Slashed
///                                     |                  |
///                                     +---- refund (payer, block.timestamp > deadline) ---> Refunded
contract TaskEscrow is Ownable, ReentrancyGuard {
    uint8 public constant PHASE_POST = 3;
    /// The furthest a deadline may lie ahead at `createTask`: a payment should not be locked for longer
    /// than any capsule plausibly runs (and a typo of a few digits must not lock it for centuries).
    uint64 public constant MAX_DEADLINE = 30 days;

    enum State {
        None,
        Funded,
        Assigned,
        Paid,
        Slashed,
        Refunded
    }

    struct Task {
        address payer;
        uint96 minVerdicts;
        uint256 payment;
        bytes32 attestationId;
        address executor;
        State state;
        uint64 deadline;
        address[] verifiers;
    }

    NodeRegistry public immutable registry;
    AttestationLog public immutable log;
    address public coordinator;
    uint16 public immutable executorShareBps;
    uint256 public immutable slashAmount;

    mapping(bytes32 => Task) private _tasks;
    mapping(address => uint256) public owed;

    event TaskFunded(bytes32 indexed taskId, address indexed payer, uint256 payment);
    event TaskAssigned(bytes32 indexed taskId, bytes32 indexed attestationId, address indexed executor);
    event TaskPaid(bytes32 indexed taskId, address indexed executor, uint256 executorAmount, uint256 perVerifier);
    event TaskSlashed(bytes32 indexed taskId, address indexed executor, uint256 slashed);
    event TaskRefunded(bytes32 indexed taskId, address indexed payer, uint256 payment);
    event Withdrawn(address indexed to, uint256 amount);
    event CoordinatorSet(address indexed coordinator);

    error TaskExists(bytes32 taskId);
    error NoPayment();
    error InvalidMinVerdicts(uint256 minVerdicts);
    error NotCoordinator(address caller);
    error WrongState(bytes32 taskId, State state);
    error NoVerifiers();
    error WrongAttestation(bytes32 got, bytes32 expected);
    error WrongNode(address got, address expected);
    error WrongPhase(uint8 got);
    error NothingOwed(address to);
    error TransferFailed(address to, uint256 amount);
    error DeadlineInPast(uint64 deadline, uint256 now_);
    error DeadlineTooFar(uint64 deadline, uint256 latest);
    error DeadlineNotReached(bytes32 taskId, uint64 deadline, uint256 now_);
    error NotPayer(address caller, address payer);

    constructor(
        address owner_,
        NodeRegistry registry_,
        AttestationLog log_,
        address coordinator_,
        uint16 executorShareBps_,
        uint256 slashAmount_
    ) Ownable(owner_) {
        registry = registry_;
        log = log_;
        coordinator = coordinator_;
        executorShareBps = executorShareBps_;
        slashAmount = slashAmount_;
        emit CoordinatorSet(coordinator_);
    }

    function setCoordinator(address coordinator_) external onlyOwner {
        coordinator = coordinator_;
        emit CoordinatorSet(coordinator_);
    }

    /// @notice Escrow `msg.value` for `taskId`; refundable to the payer after `deadline` (unix seconds,
    /// strictly after this block and at most MAX_DEADLINE ahead) unless settled first.
    function createTask(bytes32 taskId, uint96 minVerdicts, uint64 deadline) external payable {
        Task storage t = _tasks[taskId];
        if (t.state != State.None) revert TaskExists(taskId);
        if (msg.value == 0) revert NoPayment();
        if (minVerdicts < 2) revert InvalidMinVerdicts(minVerdicts);
        if (deadline <= block.timestamp) revert DeadlineInPast(deadline, block.timestamp);
        if (deadline > block.timestamp + MAX_DEADLINE) revert DeadlineTooFar(deadline, block.timestamp + MAX_DEADLINE);
        t.payer = msg.sender;
        t.minVerdicts = minVerdicts;
        t.payment = msg.value;
        t.deadline = deadline;
        t.state = State.Funded;
        emit TaskFunded(taskId, msg.sender, msg.value);
    }

    function assign(bytes32 taskId, bytes32 attestationId, address executor, address[] calldata verifiers)
        external
    {
        if (msg.sender != coordinator) revert NotCoordinator(msg.sender);
        Task storage t = _tasks[taskId];
        if (t.state != State.Funded) revert WrongState(taskId, t.state);
        if (verifiers.length == 0) revert NoVerifiers();
        t.attestationId = attestationId;
        t.executor = executor;
        t.verifiers = verifiers;
        t.state = State.Assigned;
        emit TaskAssigned(taskId, attestationId, executor);
    }

    function settle(
        bytes32 taskId,
        AttestationLog.Verdict[] calldata vs,
        bytes32[] calldata roots,
        bytes32[][] calldata proofs
    ) external nonReentrant {
        Task storage t = _tasks[taskId];
        if (t.state != State.Assigned) revert WrongState(taskId, t.state);
        AttestationLog.Verdict memory o = log.proveOutcome(vs, roots, proofs, t.minVerdicts);
        if (o.attestationId != t.attestationId) revert WrongAttestation(o.attestationId, t.attestationId);
        if (o.node != t.executor) revert WrongNode(o.node, t.executor);
        if (o.phase != PHASE_POST) revert WrongPhase(o.phase);
        if (o.passed) {
            t.state = State.Paid;
            uint256 toExecutor = t.payment * executorShareBps / 10_000;
            uint256 perVerifier = (t.payment - toExecutor) / t.verifiers.length;
            uint256 dust = t.payment - toExecutor - perVerifier * t.verifiers.length;
            owed[t.executor] += toExecutor + dust;
            for (uint256 i = 0; i < t.verifiers.length; ++i) {
                owed[t.verifiers[i]] += perVerifier;
            }
            emit TaskPaid(taskId, t.executor, toExecutor + dust, perVerifier);
        } else {
            t.state = State.Slashed;
            owed[t.payer] += t.payment;
            uint256 taken = registry.slash(t.executor, slashAmount, address(this));
            owed[t.payer] += taken;
            emit TaskSlashed(taskId, t.executor, taken);
        }
    }

    /// @notice After the deadline, give an unsettled (Funded or Assigned) task's payment back to its payer
    /// and close it. No slash: a timeout is not proof of misbehaviour.
    function refund(bytes32 taskId) external {
        Task storage t = _tasks[taskId];
        if (t.state != State.Funded && t.state != State.Assigned) revert WrongState(taskId, t.state);
        if (msg.sender != t.payer) revert NotPayer(msg.sender, t.payer);
        if (block.timestamp <= t.deadline) revert DeadlineNotReached(taskId, t.deadline, block.timestamp);
        t.state = State.Refunded;
        owed[t.payer] += t.payment;
        emit TaskRefunded(taskId, t.payer, t.payment);
    }

    function withdraw() external nonReentrant {
        uint256 amount = owed[msg.sender];
        if (amount == 0) revert NothingOwed(msg.sender);
        owed[msg.sender] = 0;
        emit Withdrawn(msg.sender, amount);
        (bool ok,) = msg.sender.call{value: amount}("");
        if (!ok) revert TransferFailed(msg.sender, amount);
    }

    function taskOf(bytes32 taskId) external view returns (Task memory) {
        return _tasks[taskId];
    }

    /// Receives slashed deposits from the registry; nothing else sends value here without a task.
    receive() external payable {
        if (msg.sender != address(registry)) revert NotCoordinator(msg.sender);
    }
}
