"""A small web3.py client for trustcap's contracts: deploy, register, record a batch, prove inclusion, escrow.

Transactions are signed through the Signer interface (sign_digest over the transaction hash), so the
chain account can be a gateway's trust root as well as a software key. Every RPC goes through
`errors.call`, which turns web3/requests errors into ChainError subclasses; a reverted call names the
contract's custom error (ContractReverted.error). web3's own retry is off: the chain-writer decides how
to back off.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eth_account._utils.legacy_transactions import encode_transaction, serializable_unsigned_transaction_from_dict
from eth_utils.crypto import keccak
from web3 import HTTPProvider, Web3
from web3.contract import Contract
from web3.contract.contract import ContractFunction

from trustcap.chain import artifacts
from trustcap.chain.errors import ChainError, TransactionFailed, call
from trustcap.chain.typed import verdict_tuple
from trustcap.evidence.signing import Signer
from trustcap.evidence.verdict import Verdict

__all__ = ["ChainClient", "Deployment", "Fees"]

log = logging.getLogger("trustcap.chain")

GWEI = 10**9


@dataclass(frozen=True)
class Deployment:
    chain_id: int
    registry: str
    log: str
    reputation: str
    escrow: str

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Deployment:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ChainError(f"cannot read the deployment file {path}: {exc}") from exc


@dataclass(frozen=True)
class Fees:
    max_fee: int
    tip: int

    def bumped(self, percent: int = 25) -> Fees:
        """At least +percent on both (a node replaces a pending transaction only for +10% or more)."""
        return Fees(self.max_fee * (100 + percent) // 100 + 1, self.tip * (100 + percent) // 100 + 1)


class ChainClient:
    def __init__(self, rpc_url: str, signer: Signer, *, timeout: float = 10) -> None:
        self.rpc_url = rpc_url
        self.signer = signer
        self.w3 = Web3(
            HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}, exception_retry_configuration=None)
        )
        self._chain_id: int | None = None

    # -- plumbing ---------------------------------------------------------------------------------------
    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(call("read the chain id", lambda: self.w3.eth.chain_id))
        return self._chain_id

    def contract(self, name: str, address: str) -> Contract:
        return self.w3.eth.contract(address=Web3.to_checksum_address(address), abi=artifacts.load(name).abi)

    def nonce(self, block: str = "pending") -> int:
        return int(call("read the account nonce", lambda: self.w3.eth.get_transaction_count(
            self.signer.address, block)))  # type: ignore[arg-type]

    def suggest_fees(self) -> Fees:
        base = int(call("read the base fee", lambda: self.w3.eth.get_block("latest")).get("baseFeePerGas", 0))
        tip = 1 * GWEI
        return Fees(max_fee=2 * base + tip, tip=tip)

    def build(
        self, fn: ContractFunction, *, nonce: int, fees: Fees, value: int = 0, gas: int | None = None
    ) -> dict[str, Any]:
        tx: dict[str, Any] = {
            "from": self.signer.address, "nonce": nonce, "value": value, "chainId": self.chain_id,
            "maxFeePerGas": fees.max_fee, "maxPriorityFeePerGas": fees.tip,
        }
        if gas is None:
            params: Any = {"from": self.signer.address, "value": value}
            gas = int(call(f"estimate gas for {fn.fn_name}", lambda: fn.estimate_gas(params)))
            gas = gas * 12 // 10 + 10_000
        tx["gas"] = gas
        return dict(call(f"build {fn.fn_name}", lambda: fn.build_transaction(tx)))  # type: ignore[arg-type]

    def sign(self, tx: dict[str, Any]) -> tuple[bytes, bytes]:
        """(raw signed transaction, its hash), signed by the Signer over the typed transaction's hash."""
        clean = {k: v for k, v in tx.items() if k != "from"}
        unsigned = serializable_unsigned_transaction_from_dict(clean)
        sig = self.signer.sign_digest(unsigned.hash())
        vrs = (sig[64] - 27, int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"))
        raw = bytes(encode_transaction(unsigned, vrs=vrs))
        return raw, keccak(raw)

    def send_raw(self, raw: bytes) -> bytes:
        return bytes(call("send a transaction", lambda: self.w3.eth.send_raw_transaction(raw)))

    def receipt(self, tx_hash: bytes) -> dict[str, Any] | None:
        from web3.exceptions import TransactionNotFound

        def get() -> dict[str, Any] | None:
            try:
                return dict(self.w3.eth.get_transaction_receipt(tx_hash))  # type: ignore[arg-type]
            except TransactionNotFound:
                return None

        return call("read a receipt", get)

    def wait(self, tx_hash: bytes, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.receipt(tx_hash)
            if r is not None:
                if r["status"] != 1:
                    raise TransactionFailed(f"transaction 0x{tx_hash.hex()} reverted in block {r['blockNumber']}")
                return r
            time.sleep(0.05)
        raise TransactionFailed(f"transaction 0x{tx_hash.hex()} was not mined within {timeout}s")

    def transact(self, fn: ContractFunction, *, value: int = 0) -> dict[str, Any]:
        """Simple path for setup and tests: estimate (which surfaces the revert as ContractReverted), sign,
        send, wait. The chain-writer does not use this: it journals each step."""
        tx = self.build(fn, nonce=self.nonce(), fees=self.suggest_fees(), value=value)
        raw, _ = self.sign(tx)
        return self.wait(self.send_raw(raw))

    def deploy(self, name: str, *args: Any) -> str:
        art = artifacts.load(name)
        factory = self.w3.eth.contract(abi=art.abi, bytecode=art.bytecode)
        ctor = factory.constructor(*args)
        tx: dict[str, Any] = {
            "from": self.signer.address, "nonce": self.nonce(), "chainId": self.chain_id,
            "maxFeePerGas": self.suggest_fees().max_fee, "maxPriorityFeePerGas": GWEI, "value": 0,
        }
        tx["gas"] = int(call(f"estimate deploy {name}", lambda: ctor.estimate_gas({"from": self.signer.address})))
        built = dict(call(f"build deploy {name}", lambda: ctor.build_transaction(tx)))
        raw, _ = self.sign(built)
        receipt = self.wait(self.send_raw(raw))
        return str(receipt["contractAddress"])

    # -- the trustcap contracts ---------------------------------------------------------------------------
    def deploy_all(
        self,
        *,
        quorum: int = 2,
        min_deposit: int = 10**18,
        leave_delay: int = 7 * 86400,
        coordinator: str | None = None,
        executor_share_bps: int = 7000,
        slash_amount: int = 10**18,
        reputation: tuple[int, int, int, int] = (1, 1000, 1000, 1),
        commit_window: int = 15,
    ) -> Deployment:
        """Deploy and wire the four contracts: the escrow becomes the registry's only slasher (and locker)
        and the reputation's only recorder. `quorum` = AttestationLog.minQuorum, at least 2 and fixed for
        good (a batch needs it, or a third of the active nodes if that is more; decision 0115).
        `reputation` = (gain, maxScore, failPenalty, decayPerDay);
        `commit_window` = seconds after funding that nodes may commit (TaskEscrow.commitWindow)."""
        me = self.signer.address
        registry = self.deploy("NodeRegistry", me, min_deposit, leave_delay)
        log_addr = self.deploy("AttestationLog", registry, quorum)
        rep = self.deploy("Reputation", me, *reputation)
        escrow = self.deploy("TaskEscrow", me, registry, log_addr, rep, coordinator or me, executor_share_bps,
                             slash_amount, commit_window)
        self.transact(self.contract("NodeRegistry", registry).functions.setSlasher(escrow))
        self.transact(self.contract("Reputation", rep).functions.setRecorder(escrow))
        d = Deployment(self.chain_id, registry, log_addr, rep, escrow)
        log.info("deployed trustcap contracts on chain %s: log %s", d.chain_id, d.log)
        return d

    def register_node(self, d: Deployment, vrf_public_key: bytes, fingerprint_root: bytes, deposit: int) -> None:
        fn = self.contract("NodeRegistry", d.registry).functions.register(vrf_public_key, fingerprint_root)
        self.transact(fn, value=deposit)

    def is_recorded(self, d: Deployment, batch_id: bytes) -> bool:
        fn = self.contract("AttestationLog", d.log).functions.isRecorded(batch_id)
        return bool(call("read isRecorded", fn.call))

    def find_batch(self, d: Deployment, batch_id: bytes, root: bytes) -> dict[str, Any] | None:
        """The BatchRecorded event of `batch_id` (tx hash, block), or None when the canonical chain has no
        such batch. The contract keeps each batch's block number, so only that block's logs are read."""
        log_c = self.contract("AttestationLog", d.log)
        # State and logs are read at one pinned head: read at "latest" while a reorg rewinds the chain,
        # the state could name a block the node no longer has (BlockOutOfRangeError from eth_getLogs).
        head = self.block_number()
        rec = call("read batchOf", lambda: log_c.functions.batchOf(batch_id).call(block_identifier=head))
        got = call("read rootOfBatch", lambda: log_c.functions.rootOfBatch(batch_id).call(block_identifier=head))
        return self._batch_event(log_c, rec, head, batch_id, root, bytes(got))

    def find_root(self, d: Deployment, root: bytes, epoch: int) -> dict[str, Any] | None:
        """The BatchRecorded event of whichever batch recorded `root` for `epoch`, or None. A verdict of
        that epoch under that root is provable whatever batch id carried it (decision 0096)."""
        log_c = self.contract("AttestationLog", d.log)
        head = self.block_number()
        rec = call("read batchOfRoot",
                   lambda: log_c.functions.batchOfRoot(root, int(epoch)).call(block_identifier=head))
        return self._batch_event(log_c, rec, head, bytes(rec[3]), root, root)

    @staticmethod
    def _batch_event(log_c: Any, rec: Any, head: int, batch_id: bytes, root: bytes, recorded_root: bytes
                     ) -> dict[str, Any] | None:
        block = int(rec[2])
        if block == 0 or block > head or bytes(rec[3]) != batch_id or recorded_root != root:
            return None
        ev = log_c.events.BatchRecorded

        def get() -> list[Any]:
            return list(ev.get_logs(from_block=block, to_block=block, argument_filters={"batchId": batch_id}))

        logs = call("read BatchRecorded events", get)
        return dict(logs[0]) if logs else None

    def is_included(self, d: Deployment, verdict: Verdict, root: bytes, proof: Sequence[bytes]) -> bool:
        fn = self.contract("AttestationLog", d.log).functions.isIncluded(verdict_tuple(verdict), root, list(proof))
        return bool(call("check a verdict's inclusion", fn.call))

    def call_fn(self, fn: ContractFunction, value: int = 0) -> Any:
        """eth_call from our account: what the transaction would return, or ContractReverted naming why."""
        params: Any = {"from": self.signer.address, "value": value}
        return call(f"call {fn.fn_name}", lambda: fn.call(params))

    def block_number(self) -> int:
        return int(call("read the block number", lambda: self.w3.eth.block_number))

    def block_hash(self, number: int) -> str | None:
        from web3.exceptions import BlockNotFound

        def get() -> str | None:
            try:
                return "0x" + bytes(self.w3.eth.get_block(number)["hash"]).hex()
            except BlockNotFound:
                return None

        return call("read a block", get)
