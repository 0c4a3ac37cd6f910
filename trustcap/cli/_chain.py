"""The CLI's one way onto the chain: a client for the RPC URL, checked against the deployment file.

Every command that reads or pays through the contracts (broker, escrow, verify) opens the chain here, so
each names a chain that is down, or one the deployment is not for, in the same words.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trustcap.errors import ConfigError, TrustcapError

__all__ = ["open_chain", "open_escrow"]


def open_chain(rpc: str | None, deployment: Path | str | None, signer: Any = None, *,
               error: type[TrustcapError] = ConfigError) -> tuple[Any, Any]:
    """(ChainClient, Deployment) for `rpc`, refused with `error` unless the chain answers with the chain id
    the deployment is for. Without a signer the client holds a throwaway key that never signs (reads only)."""
    from trustcap.chain.client import ChainClient, Deployment
    from trustcap.chain.errors import ChainError
    from trustcap.chain.keys import KeySigner

    if not rpc or not deployment:
        raise error("--rpc and --deployment are needed (or TRUSTCAP_CHAIN_RPC and TRUSTCAP_CHAIN_DEPLOYMENT; "
                    "`trustcap world up` prints them)")
    d = Deployment.load(Path(deployment))
    client = ChainClient(rpc, signer or KeySigner(os.urandom(32)))
    try:
        chain_id = client.chain_id
    except ChainError as exc:
        raise error(f"cannot reach the chain at {rpc}: {exc} (is it running? `trustcap world up` or "
                    "`trustcap stack up` starts one and prints its RPC URL)") from exc
    if chain_id != d.chain_id:
        raise error(f"the chain at {rpc} has chain id {chain_id}, the deployment {deployment} is for "
                    f"{d.chain_id}: pass the RPC URL of the chain the contracts are deployed on")
    return client, d


def open_escrow(rpc: str | None, deployment: Path | str | None, signer: Any = None, *,
                error: type[TrustcapError] = ConfigError) -> Any:
    """An Escrow over `open_chain`."""
    from trustcap.chain.escrow import Escrow

    client, d = open_chain(rpc, deployment, signer, error=error)
    return Escrow(client, d)
