"""The chain: trustcap's contracts, a web3.py client, and the chain-writer that records attestation
verdicts in epoch batches without ever losing or doubling one (docs/design.md "Chain records"; docs/decisions/0030-*).
Only hashes and signatures reach the chain, never task data."""

from trustcap.chain.client import ChainClient, Deployment, Fees
from trustcap.chain.errors import ChainError, ContractReverted, RpcUnavailable

__all__ = ["ChainClient", "ChainError", "ContractReverted", "Deployment", "Fees", "RpcUnavailable"]
