"""The in-process gateway and agent pair the attestation and node benches time.

A software trust root, the gateway's attestation server on loopback, a one-time token armed for the
boot, and an agent enrolled with it: the same parts `python3 -m trustcap.gateway` and the agent run,
without processes or namespaces, so a bench times the protocol and not the launch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustcap.agent.identity import BootConfig, BootKey
from trustcap.agent.service import Agent
from trustcap.gateway.enrol import TokenBook
from trustcap.gateway.server import AttestationServer
from trustcap.trustroot import SoftwareTrustRoot


@dataclass
class Pair:
    root: SoftwareTrustRoot
    server: AttestationServer
    agent: Agent
    channel: Any  # the agent's AgentChannel: the caller serves it on a thread of its own

    def close(self) -> None:
        self.server.close()
        self.root.close()


def loopback_pair(folder: Path, boot: str, *, node: str = "hpc-bench", rekey_after: int = 16) -> Pair:
    """Trust root in `folder/tr`, the server listening, and the agent connected (not yet served)."""
    home = folder / "tr"
    home.mkdir()
    root = SoftwareTrustRoot.create(home, os.urandom(32))
    tokens = TokenBook([boot])
    server = AttestationServer(root, node, tokens, rekey_after=rekey_after)
    host, port = server.address
    agent = Agent(BootConfig(str(host), int(port), tokens.issue(node), boot, root.address, node), key=BootKey())
    return Pair(root, server, agent, agent.connect())
