"""TaskEscrow and NodeRegistry from Python: the writes a payer, a node and the coordinator make, and the
reads (`ChainView`) that selection, brokers, `trustcap verify capsule` and the operator recompute from.

    payer            node (gateway)         coordinator (operator)        anyone
      | fund(k, deadline) -> Funded at block F  |                              |
      |                  | commit(c) (own key, until the commit deadline; locks its deposit)   |
      |                  |                      | assign(post round, executor, committee, reveals) -> Assigned
      |                  |                      |                              | settle(signed post verdicts)
      |                  |                      |                              |   -> Paid | Slashed
      |                  |                      | cancel (Funded)  | refund (payer, after the deadline)

Every check that decides money is the contract's (docs/decisions/0091): this module only shapes the
arguments. A refusal surfaces as ContractReverted naming the contract's custom error. Addresses come back
lowercase `0x` hex (the protocol's form); bytes32 values as bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from web3 import Web3

from trustcap import sortition
from trustcap.chain.client import ChainClient, Deployment
from trustcap.chain.errors import ChainError
from trustcap.chain.typed import verdict_tuple
from trustcap.evidence.signing import Signer
from trustcap.evidence.verdict import Domain, SignedVerdict
from trustcap.sortition import Reveal, commitment, selection_alpha

__all__ = ["STATES", "ChainView", "Escrow", "NodeInfo", "NodeSpec", "TaskInfo", "deploy_network", "quorum_of"]

#: TaskEscrow.State, by its uint8 value.
STATES: Final = ("None", "Funded", "Assigned", "Paid", "Slashed", "Refunded", "Cancelled")
_ZERO32: Final = b"\0" * 32


def quorum_of(k: int) -> int:
    """ceil(2k/3): the distinct committee verdicts that settle a task of committee size k (as the contract)."""
    return (2 * k + 2) // 3


@dataclass(frozen=True)
class TaskInfo:
    payer: str
    payment: int
    k: int
    deadline: int
    state: str
    funded_block: int
    executor: str
    attestation_id: bytes
    verifiers: tuple[str, ...]


@dataclass(frozen=True)
class NodeInfo:
    address: str
    vrf_public_key: bytes
    stake: int
    reputation_bp: int
    active: bool


class ChainView(sortition.ChainView, Protocol):
    """Reads only: what brokers, `verify capsule` and the operator need from the chain: the selection's
    reads (`trustcap.sortition.ChainView`) and the verdicts' EIP-712 domain."""

    def domain(self) -> Domain: ...


def _b32(value: bytes, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != 32:
        raise ChainError(f"{what} must be 32 bytes")
    return bytes(value)


def _addr(value: str, what: str) -> str:
    if not isinstance(value, str) or not Web3.is_address(value):
        raise ChainError(f"{what} is not an address: {value!r}")
    return str(Web3.to_checksum_address(value))


class Escrow:
    """The escrow and registry as the client's signer: writes return the mined receipt."""

    def __init__(self, client: ChainClient, d: Deployment) -> None:
        self.client = client
        self.d = d
        self._escrow = client.contract("TaskEscrow", d.escrow)
        self._registry = client.contract("NodeRegistry", d.registry)
        self._reputation = client.contract("Reputation", d.reputation)
        self._max_score: int | None = None

    # -- writes ---------------------------------------------------------------------------------------
    def fund(self, task_id: bytes, k: int, deadline: int, value: int) -> dict[str, Any]:
        fn = self._escrow.functions.fund(_b32(task_id, "task id"), int(k), int(deadline))
        return self.client.transact(fn, value=int(value))

    def commit(self, task_id: bytes, c: bytes) -> dict[str, Any]:
        return self.client.transact(self._escrow.functions.commit(_b32(task_id, "task id"), _b32(c, "commitment")))

    def assign(self, task_id: bytes, attestation_id: bytes, executor: str, verifiers: Sequence[str],
               reveals: Iterable[Reveal]) -> dict[str, Any]:
        """Bind the task; `reveals` holds (at least) the executor's and each verifier's reveal, in any order.
        The contract checks each opens its node's commitment (decision 0096); ChainError names a node whose
        reveal is missing or opens nothing before anything is sent."""
        task = _b32(task_id, "task id")
        nodes = [_addr(executor, "executor"), *(_addr(v, f"verifiers[{i}]") for i, v in enumerate(verifiers))]
        opening = self._openings(task, nodes, reveals)
        fn = self._escrow.functions.assign(task, _b32(attestation_id, "attestation id"), nodes[0], nodes[1:],
                                           [(r.pi, r.salt) for r in opening])
        return self.client.transact(fn)

    def _openings(self, task: bytes, nodes: Sequence[str], reveals: Iterable[Reveal]) -> list[Reveal]:
        """For each node, the reveal that opens its on-chain commitment (a node may have left several)."""
        _deadline, seed = self.selection(task)
        alpha = selection_alpha(task.hex(), seed)
        by_node: dict[str, list[Reveal]] = {}
        for r in reveals:
            by_node.setdefault(r.node_id.lower(), []).append(r)
        out = []
        for node in nodes:
            want = self.commitment(task, node)
            mine = by_node.get(node.lower(), [])
            hit = next((r for r in mine if want is not None
                        and commitment(alpha, node.lower(), r.pi, r.salt) == want), None)
            if hit is None:
                why = "has no commitment on chain" if want is None else (
                    "has no reveal" if not mine else "has no reveal that opens its commitment")
                raise ChainError(f"assign: node {node.lower()} {why}; only committed nodes with their reveal "
                                 "can be assigned")
            out.append(hit)
        return out

    def settle(self, task_id: bytes, signed_verdicts: Sequence[SignedVerdict]) -> dict[str, Any]:
        vs = [verdict_tuple(s.verdict) for s in signed_verdicts]
        sigs = [bytes.fromhex(s.signature[2:]) for s in signed_verdicts]
        return self.client.transact(self._escrow.functions.settle(_b32(task_id, "task id"), vs, sigs))

    def cancel(self, task_id: bytes) -> dict[str, Any]:
        return self.client.transact(self._escrow.functions.cancel(_b32(task_id, "task id")))

    def refund(self, task_id: bytes) -> dict[str, Any]:
        return self.client.transact(self._escrow.functions.refund(_b32(task_id, "task id")))

    # -- reads (ChainView) ----------------------------------------------------------------------------
    def task(self, task_id: bytes) -> TaskInfo | None:
        t = self.client.call_fn(self._escrow.functions.getTask(_b32(task_id, "task id")))
        payer, payment, k, deadline, state, funded_block, executor, attestation_id, verifiers = t
        if int(state) == 0:
            return None
        return TaskInfo(payer=str(payer).lower(), payment=int(payment), k=int(k), deadline=int(deadline),
                        state=STATES[int(state)], funded_block=int(funded_block), executor=str(executor).lower(),
                        attestation_id=bytes(attestation_id), verifiers=tuple(str(v).lower() for v in verifiers))

    def selection(self, task_id: bytes) -> tuple[int, bytes]:
        """(commit deadline in unix seconds, seed kept at the first commit or 32 zero bytes before it).
        Selection reads the committers only after the chain's clock has passed the deadline."""
        deadline, seed = self.client.call_fn(self._escrow.functions.selectionOf(_b32(task_id, "task id")))
        return int(deadline), bytes(seed)

    def block_hash(self, number: int) -> bytes | None:
        h = self.client.block_hash(int(number))
        return bytes.fromhex(h[2:]) if h else None

    def commitment(self, task_id: bytes, node: str) -> bytes | None:
        c = bytes(self.client.call_fn(self._escrow.functions.commitmentOf(_b32(task_id, "task id"),
                                                                          _addr(node, "node"))))
        return None if c == _ZERO32 else c

    def committers(self, task_id: bytes) -> list[str]:
        return [str(a).lower() for a in self.client.call_fn(self._escrow.functions.committers(
            _b32(task_id, "task id")))]

    def committed_weight(self, task_id: bytes, node: str) -> tuple[int, int] | None:
        """(stake, reputation in basis points) as the contract kept them at `node`'s commit to the task, or
        None when it did not commit: the weight inputs of its draw (decision 0115), never the registry's
        values of now, which later settlements and slashes change."""
        task, a = _b32(task_id, "task id"), _addr(node, "node")
        if self.commitment(task, a) is None:
            return None
        stake, bp = self.client.call_fn(self._escrow.functions.committedWeightOf(task, a))
        return int(stake), int(bp)

    def node(self, address: str) -> NodeInfo | None:
        a = _addr(address, "node address")
        n = self.client.call_fn(self._registry.functions.nodeOf(a))
        deposit, _root, _at, _leave, _block, registered, vrf_key = n
        if not registered:
            return None
        if self._max_score is None:
            self._max_score = int(self.client.call_fn(self._reputation.functions.maxScore()))
        score = int(self.client.call_fn(self._reputation.functions.scoreOf(a)))
        bp = score * 10_000 // self._max_score if self._max_score else 0
        active = bool(self.client.call_fn(self._registry.functions.isActive(a)))
        return NodeInfo(address=a.lower(), vrf_public_key=bytes(vrf_key), stake=int(deposit), reputation_bp=bp,
                        active=active)

    def domain(self) -> Domain:
        return Domain(chain_id=self.d.chain_id, verifying_contract=str(Web3.to_checksum_address(self.d.log)))


@dataclass(frozen=True)
class NodeSpec:
    """A node to register: its chain signer (the gateway's trust root), VRF key and fingerprint root."""

    signer: Signer
    vrf_public_key: bytes
    fingerprint_root: bytes


def deploy_network(rpc_url: str, owner: Signer, nodes: Sequence[NodeSpec], *, deposit: int = 2 * 10**18,
                   **deploy: Any) -> Deployment:
    """Deploy and wire the contracts as `owner` (`ChainClient.deploy_all` keywords pass through) and
    register each node from its own account with `deposit`: the tests' and the demo's network."""
    d = ChainClient(rpc_url, owner).deploy_all(**deploy)
    for n in nodes:
        ChainClient(rpc_url, n.signer).register_node(d, n.vrf_public_key, n.fingerprint_root, deposit)
    return d
