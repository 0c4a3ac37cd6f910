"""Killing the gateway or the agent mid-run loses no record: the run ends as failed, with a reason.

Real engine, real software trust root, real channel over loopback TCP.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from trustcap.agent.executor import Executor, RunResult
from trustcap.agent.identity import BootConfig, BootKey
from trustcap.agent.isolation import IsolationSpec
from trustcap.agent.service import Agent
from trustcap.gateway.enrol import TokenBook
from trustcap.gateway.monitor import Monitor
from trustcap.gateway.policy import parse_gateway_policy
from trustcap.gateway.server import AttestationServer
from trustcap.trustroot import SoftwareTrustRoot

BOOT = "0x" + "ab" * 32


def _setup(tmp_path: Path, docker_engine: Any) -> tuple[AttestationServer, Agent, Executor, threading.Event]:
    (tmp_path / "tr").mkdir()
    root = SoftwareTrustRoot.create(tmp_path / "tr", os.urandom(32))
    tokens = TokenBook([BOOT])
    server = AttestationServer(root, "hpc-1", tokens)
    host, port = server.address
    ex = Executor(docker_engine, scratch_root=tmp_path / "scratch")
    agent = Agent(BootConfig(str(host), int(port), tokens.issue("hpc-1"), BOOT, root.address, "hpc-1"),
                  key=BootKey(), stop=ex.request_stop,
                  state=lambda: {"phase": "running" if ex.running else "idle"})
    stop = threading.Event()
    threading.Thread(target=agent.serve_forever, args=(stop, 0.2), daemon=True).start()
    server.wait_for_agent(10)
    return server, agent, ex, stop


def _run_in_thread(ex: Executor) -> tuple[threading.Thread, list[RunResult]]:
    out: list[RunResult] = []
    spec = IsolationSpec(image="trustcap/base:bookworm", command=("sh", "-c", "echo started; sleep 40; echo done"),
                         timeout_s=60, on_violation="report")
    t = threading.Thread(target=lambda: out.append(ex.run(spec)), daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not ex.running and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # the capsule is running
    return t, out


def test_gateway_killed_mid_run_stops_the_run_with_a_reason(docker_engine: Any, tmp_path: Path,
                                                             no_leftovers: None) -> None:
    server, _agent, ex, stop = _setup(tmp_path, docker_engine)
    try:
        t, out = _run_in_thread(ex)
        server.close()  # the gateway dies
        t.join(timeout=60)
        assert out, "the run did not end"
        r = out[0]
        assert r.reason == "killed-by-policy" and "gateway lost" in r.error, (r.reason, r.error)
        assert "started" in r.stdout and "done" not in r.stdout
        assert r.wipe["verified"] and r.seconds < 40
    finally:
        stop.set()
        server.close()


def test_agent_killed_mid_run_is_recorded_and_acted_on(docker_engine: Any, tmp_path: Path,
                                                       no_leftovers: None) -> None:
    import yaml

    server, agent, ex, stop = _setup(tmp_path, docker_engine)
    pol = parse_gateway_policy(yaml.safe_dump({
        "attestation": {"bootImages": [BOOT], "allowUnlistedMeasurements": True}}))
    actions: list[str] = []
    mon = Monitor(server, pol, on_action={"stop": lambda r: actions.append(r.failed[0]["id"])})
    try:
        t, _ = _run_in_thread(ex)
        first = mon.check_once()
        assert first.ok, first.failed
        stop.set()  # the agent process dies: its channel goes away and it does not come back
        assert agent.channel is not None
        agent.channel.chan.close()
        rec = mon.check_once()
        assert not rec.ok and rec.failed[0]["id"] == "agent.unreachable" and rec.action == "stop"
        assert actions == ["agent.unreachable"] and list(mon.records)[-1] is rec
        ex.request_stop("test cleanup")
        t.join(timeout=60)
    finally:
        server.close()
