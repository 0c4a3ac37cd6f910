// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {AttestationLog} from "./AttestationLog.sol";
import {NodeRegistry} from "./NodeRegistry.sol";
import {Reputation} from "./Reputation.sol";

/// @title TaskEscrow: a capsule's payment, its selection commitments, and a settlement the chain checks itself.
/// @notice The payer escrows the payment under the capsule's task id (a hash; no task data) with the committee
/// size k and a deadline (`fund`); the funding block fixes the selection seed (decision 0090). Until the
/// commit deadline (`commitWindow` seconds after funding) registered active nodes commit to their VRF draw
/// (`commit`, once each, only once the seed block exists, and only nodes registered before the seed block); a
/// commitment locks the node's deposit in the registry and keeps the node's weight inputs (stake, reputation)
/// as they were at the commit, which is what every selection weighs (decision 0115). After the run the
/// coordinator (the operator's chain account) binds the task to its post-execution attestation, the
/// executor and the k verifiers (`assign`), with each one's reveal: all distinct, committed before the commit
/// deadline, each reveal opening its node's commitment; the participants stay locked until the task closes,
/// every other committer is unlocked. The chain does not verify the VRF proofs (too costly): the brokers, the
/// co-signers and `trustcap verify capsule` recompute the exact selection from the reveals `assign` publishes
/// (decision 0096). Anyone may then `settle` with the verifiers' signed verdicts: each signature is recovered
/// here (EIP-712 under AttestationLog's domain, the one verifiers sign with), each signer must be a distinct
/// member of this task's committee, and each verdict must be about the bound attestation, the executor and
/// phase POST. ceil(2k/3) passed pays the executor its share and
/// splits the rest among the committee; ceil(2k/3) failed refunds the payer and slashes the executor's
/// deposit (what is left of it, never reverting the settlement) to the payer; anything less is NoQuorum.
/// The outcome, and only a settled outcome, moves the executor's reputation. Payouts are credited and
/// pulled (`withdraw`), so one failing recipient cannot block a settlement.
/// @dev Deadline (decision 0030): once it has passed, a Funded or Assigned task can be refunded by its payer
/// (whole payment, no slash: a timeout proves nothing). Until then `assign` and `settle` keep working after
/// the deadline. A task that fails before assignment is cancelled by the coordinator (full refund).
///
/// A commit locks the committer's deposit; `assign` releases the committers it does not name, `cancel` and a
/// refund while Funded release them all, and a settlement or a refund while Assigned releases the participants.
///
///   payer --fund(k, deadline)--> Funded --assign--> Assigned --settle--> Paid | Slashed
///                                  |  |                |
///                                  |  +-- cancel (coordinator) --> Cancelled
///                                  +------------------+-- refund (payer, block.timestamp > deadline) --> Refunded
contract TaskEscrow is Ownable, ReentrancyGuard {
    uint8 public constant PHASE_POST = 3;
    uint8 public constant MIN_K = 3;
    uint8 public constant MAX_K = 31;
    /// At most this many commitments per task: bounds `committers` and the selection's work.
    uint256 public constant MAX_COMMITTERS = 256;
    /// The furthest a deadline may lie ahead at `fund`: a payment should not be locked for longer than any
    /// capsule plausibly runs (and a typo of a few digits must not lock it for centuries).
    uint64 public constant MAX_DEADLINE = 30 days;
    /// sortition.DOMAIN (trustcap/sortition.py): the reveal check rebuilds its RFC 8785 JSON byte for byte.
    bytes private constant _SORTITION = "trustcap/sortition/v1";
    bytes16 private constant _HEX = "0123456789abcdef";

    enum State {
        None,
        Funded,
        Assigned,
        Paid,
        Slashed,
        Refunded,
        Cancelled
    }

    struct Task {
        address payer;
        uint8 k;
        State state;
        uint64 deadline;
        uint64 fundedBlock;
        uint256 payment;
        bytes32 attestationId;
        address executor;
        address[] verifiers;
        uint64 commitDeadline;
        bytes32 seed; // hash(fundedBlock + 1), kept at the first commit: blockhash forgets after 256 blocks
    }

    /// A node's private selection reveal (sortition.Reveal): its VRF proof and the commitment's salt.
    struct Reveal {
        bytes pi;
        bytes salt;
    }

    /// A node's commitment to a task's draw, with the weight inputs it is drawn with: its deposit and its
    /// reputation in basis points at the commit. Selection reads these, never the registry's later values, so
    /// every checker weighs a task's draw alike whenever it checks (a settlement or slash after the commit
    /// changes nothing), and nothing about the weights is chosen after the seed.
    struct Commitment {
        bytes32 c;
        uint128 stake;
        uint16 reputationBp;
    }

    /// What `getTask` returns (the Python TaskInfo).
    struct TaskView {
        address payer;
        uint256 payment;
        uint8 k;
        uint64 deadline;
        State state;
        uint64 fundedBlock;
        address executor;
        bytes32 attestationId;
        address[] verifiers;
    }

    NodeRegistry public immutable registry;
    AttestationLog public immutable log;
    Reputation public immutable reputation;
    address public coordinator;
    uint16 public immutable executorShareBps;
    uint256 public immutable slashAmount;
    /// Seconds after `fund` during which nodes may commit; selection and `assign` only after it.
    uint64 public immutable commitWindow;

    mapping(bytes32 => Task) private _tasks;
    mapping(bytes32 => mapping(address => Commitment)) private _commitments;
    /// Reputation.maxScore (immutable there): a score in basis points of it, as the weight wants.
    uint256 private immutable _maxScore;
    mapping(bytes32 => address[]) private _committers;
    /// 1-based position of a verifier in its task's committee; 0 = not a member.
    mapping(bytes32 => mapping(address => uint256)) private _seat;
    /// An attestation settles one task only (its reputation counts once).
    mapping(bytes32 => bool) public attestationAssigned;
    mapping(address => uint256) public owed;

    event TaskFunded(bytes32 indexed taskId, address indexed payer, uint256 payment, uint8 k, uint64 deadline);
    event Committed(bytes32 indexed taskId, address indexed node, bytes32 commitment);
    event Revealed(bytes32 indexed taskId, address indexed node, bytes pi, bytes salt);
    event TaskAssigned(bytes32 indexed taskId, bytes32 indexed attestationId, address indexed executor);
    event TaskPaid(bytes32 indexed taskId, address indexed executor, uint256 executorAmount, uint256 perVerifier);
    event TaskSlashed(bytes32 indexed taskId, address indexed executor, uint256 slashed);
    event TaskCancelled(bytes32 indexed taskId, address indexed payer, uint256 payment);
    event TaskRefunded(bytes32 indexed taskId, address indexed payer, uint256 payment);
    event Withdrawn(address indexed to, uint256 amount);
    event CoordinatorSet(address indexed coordinator);

    error TaskExists(bytes32 taskId);
    error NoPayment();
    error InvalidCommitteeSize(uint256 k);
    error NotCoordinator(address caller);
    error WrongState(bytes32 taskId, State state);
    error NotActiveNode(address node);
    error InvalidCommitment();
    error AlreadyCommitted(bytes32 taskId, address node);
    error TooManyCommitters(bytes32 taskId);
    error WrongCommitteeSize(uint256 got, uint256 expected);
    error NotCommitted(address node);
    error DuplicateNode(address node);
    error ExecutorInCommittee(address executor);
    error InvalidAttestation();
    error AttestationAlreadyAssigned(bytes32 attestationId);
    error LengthMismatch();
    error WrongAttestation(uint256 index, bytes32 got);
    error WrongNode(uint256 index, address got);
    error WrongPhase(uint256 index, uint8 got);
    error NotInCommittee(uint256 index, address verifier);
    error BadSignature(uint256 index, address verifier);
    error DuplicateVerifier(uint256 index, address verifier);
    error NoQuorum(uint256 passed, uint256 failed, uint256 required);
    error NothingOwed(address to);
    error TransferFailed(address to, uint256 amount);
    error DeadlineInPast(uint64 deadline, uint256 now_);
    error DeadlineTooFar(uint64 deadline, uint256 latest);
    error DeadlineNotReached(bytes32 taskId, uint64 deadline, uint256 now_);
    error NotPayer(address caller, address payer);
    error CommitWindowClosed(bytes32 taskId, uint64 commitDeadline, uint256 now_);
    error CommitWindowOpen(bytes32 taskId, uint64 commitDeadline, uint256 now_);
    error SeedNotKnown(bytes32 taskId, uint256 seedBlock);
    error WrongRevealCount(uint256 got, uint256 expected);
    error RevealMismatch(address node);
    error RegisteredAfterSeed(address node, uint64 registeredBlock, uint256 seedBlock);

    constructor(
        address owner_,
        NodeRegistry registry_,
        AttestationLog log_,
        Reputation reputation_,
        address coordinator_,
        uint16 executorShareBps_,
        uint256 slashAmount_,
        uint64 commitWindow_
    ) Ownable(owner_) {
        registry = registry_;
        log = log_;
        reputation = reputation_;
        coordinator = coordinator_;
        executorShareBps = executorShareBps_;
        slashAmount = slashAmount_;
        commitWindow = commitWindow_;
        _maxScore = reputation_.maxScore();
        emit CoordinatorSet(coordinator_);
    }

    function setCoordinator(address coordinator_) external onlyOwner {
        coordinator = coordinator_;
        emit CoordinatorSet(coordinator_);
    }

    /// @notice Escrow `msg.value` for `taskId` with committee size `k` (odd, 3..31); refundable to the payer
    /// after `deadline` (unix seconds, after this block, at most MAX_DEADLINE ahead) unless settled first.
    function fund(bytes32 taskId, uint8 k, uint64 deadline) external payable {
        Task storage t = _tasks[taskId];
        if (t.state != State.None) revert TaskExists(taskId);
        if (msg.value == 0) revert NoPayment();
        if (k < MIN_K || k > MAX_K || k % 2 == 0) revert InvalidCommitteeSize(k);
        if (deadline <= block.timestamp) revert DeadlineInPast(deadline, block.timestamp);
        if (deadline > block.timestamp + MAX_DEADLINE) revert DeadlineTooFar(deadline, block.timestamp + MAX_DEADLINE);
        t.payer = msg.sender;
        t.k = k;
        t.payment = msg.value;
        t.deadline = deadline;
        t.fundedBlock = uint64(block.number);
        t.commitDeadline = uint64(block.timestamp) + commitWindow;
        t.state = State.Funded;
        emit TaskFunded(taskId, msg.sender, msg.value, k, deadline);
    }

    /// @notice A registered, active node commits to its selection draw for `taskId`, once, while Funded, after
    /// the seed block and no later than the commit deadline, if it registered before the seed block. Its
    /// deposit is locked from here: a node that learns it is the executor cannot leave before the settlement
    /// that may slash it. Its stake and reputation are kept with the commitment as its weight in the draw.
    function commit(bytes32 taskId, bytes32 c) external {
        Task storage t = _tasks[taskId];
        if (t.state != State.Funded) revert WrongState(taskId, t.state);
        // Closed on the chain's clock, so every checker reads the same committer set once it has passed, and
        // nobody can join after seeing the others' reveals.
        if (block.timestamp > t.commitDeadline) revert CommitWindowClosed(taskId, t.commitDeadline, block.timestamp);
        (bool active, uint64 registeredBlock, uint256 stake) = registry.eligibility(msg.sender);
        if (!active) revert NotActiveNode(msg.sender);
        // The VRF key is fixed at `register`. One registered in or after the seed block could be a key made
        // after seeing the seed: a party could register keys until one draws low (grinding, issue 12 item 7).
        // Registered at or before the funding block, the key was fixed before the seed block's hash existed.
        if (registeredBlock > t.fundedBlock) {
            revert RegisteredAfterSeed(msg.sender, registeredBlock, t.fundedBlock + 1);
        }
        if (c == bytes32(0)) revert InvalidCommitment();
        if (_commitments[taskId][msg.sender].c != bytes32(0)) revert AlreadyCommitted(taskId, msg.sender);
        if (_committers[taskId].length >= MAX_COMMITTERS) revert TooManyCommitters(taskId);
        if (t.seed == bytes32(0)) {
            bytes32 seed = blockhash(t.fundedBlock + 1); // 0 while that block is this one or not yet mined
            if (seed == bytes32(0)) revert SeedNotKnown(taskId, t.fundedBlock + 1);
            t.seed = seed;
        }
        _commitments[taskId][msg.sender] = Commitment({
            c: c,
            stake: SafeCast.toUint128(stake),
            reputationBp: uint16(_maxScore == 0 ? 0 : reputation.scoreOf(msg.sender) * 10_000 / _maxScore)
        });
        _committers[taskId].push(msg.sender);
        registry.lock(msg.sender);
        emit Committed(taskId, msg.sender, c);
    }

    function commitmentOf(bytes32 taskId, address node) external view returns (bytes32) {
        return _commitments[taskId][node].c;
    }

    /// The weight inputs `node` was drawn with in `taskId`: its deposit and reputation (basis points of
    /// Reputation.maxScore) when it committed. All zero for a node that did not commit.
    function committedWeightOf(bytes32 taskId, address node)
        external
        view
        returns (uint256 stake, uint16 reputationBp)
    {
        Commitment storage k = _commitments[taskId][node];
        return (k.stake, k.reputationBp);
    }

    function committers(bytes32 taskId) external view returns (address[] memory) {
        return _committers[taskId];
    }

    /// The commit deadline (unix seconds) and the selection seed (0 until the first commit) of `taskId`.
    function selectionOf(bytes32 taskId) external view returns (uint64 commitDeadline, bytes32 seed) {
        Task storage t = _tasks[taskId];
        return (t.commitDeadline, t.seed);
    }

    /// @notice Bind the task to its post attestation, executor and committee, each with its reveal
    /// (`reveals[0]` the executor's, `reveals[1 + i]` verifiers[i]'s). Each must have committed before the
    /// commit deadline (so it was registered and active then, and its deposit has been locked since) and its
    /// reveal must open that commitment; no node twice, the executor not in the committee, exactly k
    /// verifiers. The participants stay locked until the task closes; every other committer is released.
    function assign(
        bytes32 taskId,
        bytes32 attestationId,
        address executor,
        address[] calldata verifiers,
        Reveal[] calldata reveals
    ) external {
        if (msg.sender != coordinator) revert NotCoordinator(msg.sender);
        Task storage t = _tasks[taskId];
        if (t.state != State.Funded) revert WrongState(taskId, t.state);
        if (block.timestamp <= t.commitDeadline) revert CommitWindowOpen(taskId, t.commitDeadline, block.timestamp);
        if (verifiers.length != t.k) revert WrongCommitteeSize(verifiers.length, t.k);
        if (reveals.length != verifiers.length + 1) revert WrongRevealCount(reveals.length, verifiers.length + 1);
        if (attestationId == bytes32(0)) revert InvalidAttestation();
        if (attestationAssigned[attestationId]) revert AttestationAlreadyAssigned(attestationId);
        bytes memory alphaHex = _hex(_alpha(taskId, t.seed));
        _checkParticipant(taskId, executor, reveals[0], alphaHex);
        for (uint256 i = 0; i < verifiers.length; ++i) {
            address v = verifiers[i];
            if (v == executor) revert ExecutorInCommittee(executor);
            if (_seat[taskId][v] != 0) revert DuplicateNode(v);
            _checkParticipant(taskId, v, reveals[i + 1], alphaHex);
            _seat[taskId][v] = i + 1;
        }
        attestationAssigned[attestationId] = true;
        t.attestationId = attestationId;
        t.executor = executor;
        t.verifiers = verifiers;
        t.state = State.Assigned;
        address[] storage cs = _committers[taskId];
        for (uint256 i = 0; i < cs.length; ++i) {
            address c = cs[i];
            if (c != executor && _seat[taskId][c] == 0) registry.unlock(c);
        }
        emit TaskAssigned(taskId, attestationId, executor);
    }

    /// Active is checked at `commit`, not here: a participant's deposit is locked from its commitment on, and
    /// an executor slashed below the minimum by another task must still be assignable (and slashable) here.
    function _checkParticipant(bytes32 taskId, address node, Reveal calldata r, bytes memory alphaHex) private {
        bytes32 c = _commitments[taskId][node].c;
        if (c == bytes32(0)) revert NotCommitted(node);
        if (_commitment(alphaHex, node, r) != c) revert RevealMismatch(node);
        emit Revealed(taskId, node, r.pi, r.salt);
    }

    /// sortition.selection_alpha(taskId.hex(), seed): RFC 8785 JSON, keys sorted, the task id without 0x.
    function _alpha(bytes32 taskId, bytes32 seed) private pure returns (bytes memory) {
        return abi.encodePacked(
            '{"capsule":"', _hex(abi.encodePacked(taskId)), '","domain":"', _SORTITION,
            '","role":"executor","round":0,"seed":"0x', _hex(abi.encodePacked(seed)), '"}'
        );
    }

    /// sortition.commitment(alpha, node, pi, salt): sha256 of its RFC 8785 JSON, the node in lowercase hex.
    function _commitment(bytes memory alphaHex, address node, Reveal calldata r) private pure returns (bytes32) {
        return sha256(
            abi.encodePacked(
                '{"alpha":"0x', alphaHex, '","domain":"', _SORTITION, '/commit","node":"0x',
                _hex(abi.encodePacked(node)), '","pi":"0x', _hex(r.pi), '","salt":"0x', _hex(r.salt), '"}'
            )
        );
    }

    /// Lowercase hex of `b`, no prefix. In assembly: the bounds-checked bytes indexing of plain Solidity made
    /// each reveal check cost ~200k gas, most of an assignment.
    function _hex(bytes memory b) private pure returns (bytes memory out) {
        out = new bytes(2 * b.length);
        bytes32 table = _HEX;
        assembly ("memory-safe") {
            let src := add(b, 32)
            let dst := add(out, 32)
            let n := mload(b)
            for { let i := 0 } lt(i, n) { i := add(i, 1) } {
                let v := byte(0, mload(add(src, i)))
                mstore8(add(dst, mul(i, 2)), byte(shr(4, v), table))
                mstore8(add(dst, add(mul(i, 2), 1)), byte(and(v, 0x0f), table))
            }
        }
    }

    /// Releases every committer of a task that closes before assignment.
    function _unlockCommitters(bytes32 taskId) private {
        address[] storage cs = _committers[taskId];
        for (uint256 i = 0; i < cs.length; ++i) {
            registry.unlock(cs[i]);
        }
    }

    /// @notice Settle an Assigned task from its committee's signed post-round verdicts. Reverts naming the
    /// first verdict that is not a valid, distinct committee member's verdict of the bound round, or NoQuorum.
    function settle(bytes32 taskId, AttestationLog.Verdict[] calldata vs, bytes[] calldata signatures)
        external
        nonReentrant
    {
        Task storage t = _tasks[taskId];
        if (t.state != State.Assigned) revert WrongState(taskId, t.state);
        if (vs.length != signatures.length) revert LengthMismatch();
        uint256 seen; // bit (seat - 1) set once that member's verdict counted
        uint256 passed;
        uint256 failed;
        for (uint256 i = 0; i < vs.length; ++i) {
            AttestationLog.Verdict calldata v = vs[i];
            if (v.attestationId != t.attestationId) revert WrongAttestation(i, v.attestationId);
            if (v.node != t.executor) revert WrongNode(i, v.node);
            if (v.phase != PHASE_POST) revert WrongPhase(i, v.phase);
            uint256 seat = _seat[taskId][v.verifier];
            if (seat == 0) revert NotInCommittee(i, v.verifier);
            (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(log.verdictDigest(v), signatures[i]);
            if (err != ECDSA.RecoverError.NoError || signer != v.verifier) revert BadSignature(i, v.verifier);
            uint256 bit = 1 << (seat - 1);
            if (seen & bit != 0) revert DuplicateVerifier(i, v.verifier);
            seen |= bit;
            if (v.passed) passed += 1;
            else failed += 1;
        }
        uint256 need = (2 * uint256(t.k) + 2) / 3;
        if (passed >= need) {
            _pay(taskId, t);
        } else if (failed >= need) {
            _slash(taskId, t);
        } else {
            revert NoQuorum(passed, failed, need);
        }
        _unlockAll(t);
    }

    function _pay(bytes32 taskId, Task storage t) private {
        t.state = State.Paid;
        uint256 n = t.verifiers.length;
        uint256 toExecutor = t.payment * executorShareBps / 10_000;
        uint256 perVerifier = (t.payment - toExecutor) / n;
        uint256 dust = t.payment - toExecutor - perVerifier * n;
        owed[t.executor] += toExecutor + dust;
        for (uint256 i = 0; i < n; ++i) {
            owed[t.verifiers[i]] += perVerifier;
        }
        reputation.record(t.executor, t.attestationId, true);
        emit TaskPaid(taskId, t.executor, toExecutor + dust, perVerifier);
    }

    function _slash(bytes32 taskId, Task storage t) private {
        t.state = State.Slashed;
        owed[t.payer] += t.payment;
        uint256 taken;
        // A slash takes what is left of the deposit (the registry caps it); should the registry refuse for any
        // reason, the proven failure still settles: the payer is refunded and the reputation falls.
        try registry.slash(t.executor, slashAmount, address(this)) returns (uint256 got) {
            taken = got;
        } catch {
            taken = 0;
        }
        owed[t.payer] += taken;
        reputation.record(t.executor, t.attestationId, false);
        emit TaskSlashed(taskId, t.executor, taken);
    }

    function _unlockAll(Task storage t) private {
        registry.unlock(t.executor);
        for (uint256 i = 0; i < t.verifiers.length; ++i) {
            registry.unlock(t.verifiers[i]);
        }
    }

    /// @notice A task that failed before assignment: the coordinator gives the whole payment back.
    function cancel(bytes32 taskId) external {
        if (msg.sender != coordinator) revert NotCoordinator(msg.sender);
        Task storage t = _tasks[taskId];
        if (t.state != State.Funded) revert WrongState(taskId, t.state);
        t.state = State.Cancelled;
        owed[t.payer] += t.payment;
        _unlockCommitters(taskId);
        emit TaskCancelled(taskId, t.payer, t.payment);
    }

    /// @notice After the deadline, give an unsettled (Funded or Assigned) task's payment back to its payer
    /// and close it. No slash: a timeout is not proof of misbehaviour.
    function refund(bytes32 taskId) external {
        Task storage t = _tasks[taskId];
        State s = t.state;
        if (s != State.Funded && s != State.Assigned) revert WrongState(taskId, s);
        if (msg.sender != t.payer) revert NotPayer(msg.sender, t.payer);
        if (block.timestamp <= t.deadline) revert DeadlineNotReached(taskId, t.deadline, block.timestamp);
        t.state = State.Refunded;
        owed[t.payer] += t.payment;
        if (s == State.Assigned) _unlockAll(t);
        else _unlockCommitters(taskId);
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

    function getTask(bytes32 taskId) external view returns (TaskView memory) {
        Task storage t = _tasks[taskId];
        return TaskView({
            payer: t.payer,
            payment: t.payment,
            k: t.k,
            deadline: t.deadline,
            state: t.state,
            fundedBlock: t.fundedBlock,
            executor: t.executor,
            attestationId: t.attestationId,
            verifiers: t.verifiers
        });
    }

    /// Receives slashed deposits from the registry; nothing else sends value here without a task.
    receive() external payable {
        if (msg.sender != address(registry)) revert NotCoordinator(msg.sender);
    }
}
