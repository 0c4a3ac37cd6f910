"""A gateway (real software trust root, real loopback TCP) and an agent serving it in a thread.

Measurements are fixed (our own collaborator, faked) so policy outcomes are deterministic; the channel,
signatures, enrolment and appraisal are the real code.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from trustcap.agent.channel import AgentChannel
from trustcap.agent.identity import BootConfig, BootKey
from trustcap.agent.service import Agent
from trustcap.gateway.enrol import TokenBook
from trustcap.gateway.server import AttestationServer
from trustcap.trustroot import SoftwareTrustRoot

BOOT = "0x" + "ab" * 32
MEASURED = {"kernel": "0x" + "11" * 32, "modules": "0x" + "22" * 32}


@pytest.fixture
def trust_root(tmp_path: Path) -> Iterator[SoftwareTrustRoot]:
    (tmp_path / "tr").mkdir()
    root = SoftwareTrustRoot.create(tmp_path / "tr", os.urandom(32))
    yield root
    root.close()


@dataclass
class Pair:
    server: AttestationServer
    agent: Agent
    token: str
    stopped: list[str] = field(default_factory=list)
    measurements: dict[str, str] = field(default_factory=lambda: dict(MEASURED))
    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def serve(self, channel: AgentChannel) -> None:
        def run() -> None:
            try:
                channel.serve()
            except BaseException as exc:  # recorded for the test to inspect
                self.errors.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)


@pytest.fixture
def pair(trust_root: SoftwareTrustRoot) -> Iterator[Pair]:
    tokens = TokenBook([BOOT])
    server = AttestationServer(trust_root, "hpc-1", tokens, rekey_after=4)
    token = tokens.issue("hpc-1")
    host, port = server.address
    config = BootConfig(str(host), int(port), token, BOOT, trust_root.address, "hpc-1")
    p = Pair(server=server, agent=Agent(config, key=BootKey()), token=token)
    p.agent._measure = lambda: dict(p.measurements)
    p.agent._stop = p.stopped.append
    p.serve(p.agent.connect())
    p.server.wait_for_agent(10)
    yield p
    server.close()
    for t in p.threads:
        t.join(timeout=5)


@pytest.fixture
def boot_digest() -> str:
    return BOOT


@pytest.fixture
def policy_yaml() -> Any:
    return _policy_yaml


def _policy_yaml(**overrides: Any) -> str:
    import yaml

    doc: dict[str, Any] = {
        "apiVersion": "trustcap.io/v1alpha1", "kind": "GatewayPolicy",
        "monitor": {"meanIntervalSeconds": 5, "maxQuoteAgeSeconds": 30},
        "actions": {"critical": "quarantine", "high": "stop", "medium": "report", "unreachable": "stop"},
        "attestation": {"bootImages": [BOOT], "measurements": {k: {"equals": v} for k, v in MEASURED.items()},
                        "capsuleState": {"phase": {"oneOf": ["idle", "wiped"]}}},
    }
    doc.update(overrides)
    return str(yaml.safe_dump(doc))
