"""The agent process: boot key, enrolment, and the handlers the gateway calls over the channel.

Entry point `python3 -m trustcap.agent` (see __main__.py). The agent answers:
    quote   {nonce[, capsule: {taskId, round, phase}]}
                      -> a quote of real measurements bound to the nonce, signed by the boot key; with
                         `capsule`, its capsule_state binds that prepared task (trustcap.agent.run)
    prepare {taskId, manifestDigest, imageDigest}      -> {executorKey}
    run     {taskId, capsuleId, manifest, inputs}      -> {started}; the run goes on in the agent
    result  {taskId}  -> {state: running} | {state: done, reason, exitCode, seconds, results, wipe, error}
    finish  {taskId}  -> the task's executor key and result dropped
    status  {}        -> the capsule state (phase, running containers)
    stop    {reason}  -> kill the running capsule and wait for its wipe (the gateway's "stop" action)
    metrics {}        -> {exposition}: the agent's own Prometheus metrics as text (trustcap.agent.metrics);
                         the gateway re-exports them, nobody scrapes the HPC
    ping    {}        -> liveness
The capsule ops and their sequence: trustcap.agent.run; the channel: docs/lifecycle-interfaces.md section 5.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trustcap.agent import measure, metrics
from trustcap.agent.channel import AgentChannel, connect
from trustcap.agent.errors import ChannelError, RunRequestError
from trustcap.agent.identity import BootConfig, BootKey
from trustcap.agent.run import CapsuleRunner
from trustcap.evidence import agent_sign_quote, new_quote

__all__ = ["Agent"]

log = logging.getLogger("trustcap.agent")
DEFAULT_SCRATCH_ROOT = Path("/var/lib/trustcap/scratch")  # the executor's (trustcap.agent.executor)


def _connect_engine() -> Any:
    from trustcap.agent import engine

    return engine.connect(timeout=10)


class Agent:
    def __init__(self, config: BootConfig, *, key: BootKey | None = None,
                 state: Callable[[], dict[str, Any]] | None = None,
                 stop: Callable[[str], None] | None = None,
                 measurements: Callable[[], dict[str, str]] | None = None,
                 docker_client: Callable[[], Any] | None = None,
                 scratch_root: Path | None = None,
                 runner: CapsuleRunner | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.key = key or BootKey()
        self._state = state or (lambda: {"phase": "idle", "containers": 0})
        self._stop = stop
        self._docker_client = docker_client or _connect_engine
        self._engine: Any = None
        # one folder per node under the default root: several agents on one machine (the test world)
        # then never see each other's run folders in their before/after snapshots; an HPC runs one agent
        self.scratch_root = scratch_root if scratch_root is not None else \
            DEFAULT_SCRATCH_ROOT / re.sub(r"[^A-Za-z0-9_.-]", "_", config.node_id)
        self._measure = measurements or self.measure
        self.wall = wall
        self.enrolled = False
        self.channel: AgentChannel | None = None
        self.runner = runner or CapsuleRunner(self._new_executor)

    def _new_executor(self) -> Any:
        """The node's executor for one capsule run, on its own engine connection."""
        from trustcap.agent.executor import Executor

        return Executor(self._docker_client(), scratch_root=self.scratch_root, owner=self.config.node_id)

    def measure(self) -> dict[str, str]:
        """The default measurements: the machine, the engine's containers, the scratch area, our own code
        and configuration (docs/design.md: configuration that decides trust is measured)."""
        out: dict[str, str] = measure.measure(containers=self._containers_reading, scratch_root=self.scratch_root,
                                              agent_config=self._config_reading())
        return out

    def _containers_reading(self) -> Any:
        """The engine's state through the Docker SDK; an engine that does not answer is a reading of its
        own ("unavailable"), never an empty state, so an idle-node policy fails closed."""
        from trustcap.agent import engine
        from trustcap.errors import TrustcapError

        try:
            if self._engine is None:
                self._engine = self._docker_client()
            with engine.translate("measuring the container state"):
                return measure.docker_state(self._engine)
        except TrustcapError as exc:
            log.warning("container state not measurable: %s", exc)
            self._engine = None  # reconnect at the next quote
            return {"engine": "unavailable"}

    def _config_reading(self) -> dict[str, Any]:
        c = self.config
        return {"gateway": f"{c.gateway_host}:{c.gateway_port}", "node": c.node_id, "boot": c.boot_digest,
                "gateway_address": c.gateway_address}

    def handle_quote(self, req: dict[str, Any]) -> dict[str, Any]:
        nonce_hex = str(req.get("nonce", ""))
        if not nonce_hex.startswith("0x") or len(nonce_hex) != 66:
            return {"error": "nonce must be 32 bytes of 0x-hex"}
        if req.get("capsule") is not None:
            try:
                state = self.runner.capsule_state(req["capsule"])
            except RunRequestError as exc:
                return {"error": str(exc)}
        else:
            state = self._state()
        quote = new_quote(nonce=bytes.fromhex(nonce_hex[2:]), issued_at=int(self.wall()), node_id=self.config.node_id,
                          gateway=self.config.gateway_address, agent_key=self.key.public_key(),
                          boot_image_digest=bytes.fromhex(self.config.boot_digest[2:]),
                          measurements=self._measure(), capsule_state=state)
        return {"quote": quote.model_dump(), "agent_signature": "0x" + agent_sign_quote(quote, self.key).hex()}

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        def stop(req: dict[str, Any]) -> dict[str, Any]:
            return self.stop_run(str(req.get("reason") or "gateway"))

        return {"quote": self.handle_quote, "status": lambda _: {**self._state(), "capsule": self.runner.status()},
                "stop": stop, "ping": lambda _: {"pong": True},
                "metrics": lambda _: {"exposition": metrics.exposition()}, **self.runner.handlers()}

    def stop_run(self, reason: str) -> dict[str, Any]:
        """Stop the capsule run in progress and answer what happened (the extra `stop` hook is told too)."""
        if self._stop is not None:
            self._stop(reason)
        answer: dict[str, Any] = self.runner.stop(reason)
        return answer

    def connect(self) -> AgentChannel:
        """Handshake with the gateway: enrol with the token the first time, plain reconnect afterwards."""
        c = self.config
        chan = connect(c.gateway_host, c.gateway_port, signer=self.key, node_id=c.node_id,
                       boot_digest=c.boot_digest, gateway_address=c.gateway_address,
                       token=None if self.enrolled else c.token)
        self.enrolled = True
        self.channel = AgentChannel(chan, self.handlers())
        return self.channel

    def serve_forever(self, stop: threading.Event | None = None, retry_s: float = 2.0) -> None:
        """Connect, serve until the channel drops, reconnect; never exits on a channel error."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                self.connect().serve()
            except ChannelError as exc:
                log.warning("channel to gateway lost: %s", exc)
                self.gateway_lost(str(exc))
            stop.wait(retry_s)

    def gateway_lost(self, why: str) -> None:
        """Fail closed: a run its gateway can no longer monitor is stopped, and the reason recorded."""
        self.stop_run(f"gateway lost: {why}")
