"""Read-only view of NodeRegistry's boot-image approvals: is an image id approved, and by which transaction.

Reads need no account, so this does not go through ChainClient (which is built around a signer). Every
RPC goes through `errors.call`: an unreachable node surfaces as RpcUnavailable, which the operator treats
as "unknown" (keep the last status), never as "revoked".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from web3 import HTTPProvider, Web3

from trustcap.chain import artifacts
from trustcap.chain.errors import call

__all__ = ["ApprovalHistory", "BootImageRegistry"]

log = logging.getLogger("trustcap.chain")


@dataclass(frozen=True)
class ApprovalHistory:
    """What the registry's events say about one image id."""

    ever_approved: bool
    #: transaction hash (0x + 64 hex) of the latest BootImageApproved event, None if there is none
    latest_approval_tx: str | None


class BootImageRegistry:
    """`approvedBootImage(id)` and the BootImageApproved/Revoked events of one NodeRegistry."""

    def __init__(self, rpc_url: str, registry: str, *, timeout: float = 10, from_block: int = 0) -> None:
        self.w3 = Web3(HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}, exception_retry_configuration=None))
        self.contract = self.w3.eth.contract(address=Web3.to_checksum_address(registry),
                                             abi=artifacts.load("NodeRegistry").abi)
        #: first block to scan for events (the registry's deployment block in production)
        self.from_block = from_block

    def is_approved(self, image_id: bytes) -> bool:
        fn = self.contract.functions.approvedBootImage(image_id)
        return bool(call("read approvedBootImage", fn.call))

    def history(self, image_id: bytes) -> ApprovalHistory:
        """eth_getLogs filtered by the indexed digest: cheap, one topic, read only when the status changes."""
        events = self.contract.events

        def get(ev: Any) -> list[Any]:
            return list(ev.get_logs(from_block=self.from_block, to_block="latest",
                                    argument_filters={"digest": image_id}))

        approved = call("read BootImageApproved events", lambda: get(events.BootImageApproved))
        if not approved:
            return ApprovalHistory(ever_approved=False, latest_approval_tx=None)
        last = max(approved, key=lambda e: (int(e["blockNumber"]), int(e["logIndex"])))
        return ApprovalHistory(ever_approved=True, latest_approval_tx="0x" + bytes(last["transactionHash"]).hex())
