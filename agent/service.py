"""The agent process: boot key, enrolment, and the handlers the gateway calls over the channel.

Entry point `python3 -m trustcap.agent` (see __main__.py). The agent answers:
    quote  {nonce}   -> a quote of real measurements bound to the nonce, signed by the boot key
    status {}        -> the capsule state (phase, running containers)
    stop   {reason}  -> kill the running capsule (the gateway's "stop" action)
    ping   {}        -> liveness
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trustcap.agent import measure
from trustcap.agent.channel import AgentChannel, connect
from trustcap.agent.errors import ChannelError
from trustcap.agent.identity import BootConfig, BootKey

from trustcap.evidence import new_quote, sign_quote

__all__ = ["Agent"]

log = logging.getLogger("trustcap.agent")
DEFAULT_SCRATCH_ROOT = Path("/var/lib/trustcap/scratch")  # the executor's (trustcap.agent.executor)


class _NoCountersign:
    """The agent produces only its own signature; the gateway countersigns (evidence.sign_quote shape)."""

    address = "0x0000000000000000000000000000000000000000"

    def public_key(self) -> bytes:  # pragma: no cover - not used
        raise NotImplementedError

    def sign_digest(self, digest32: bytes) -> bytes:
        return bytes(64) + b"\x1b"


def _connect_engine() -> Any:
    from trustcap.agent import engine

    return engine.connect(timeout=10)


class Agent:
    def __init__(self, config: BootConfig, *, key: BootKey | None = None,
                 state: Callable[[], dict[str, Any]] | None = None,
                 stop: Callable[[str], None] | None = None,
                 measurements: Callable[[], dict[str, str]] | None = None,
                 docker_client: Callable[[], Any] | None = None,
                 scratch_root: Path = DEFAULT_SCRATCH_ROOT,
                 wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.key = key or BootKey()
        self._state = state or (lambda: {"phase": "idle", "containers": 0})
        self._stop = stop
        self._docker_client = docker_client or _connect_engine
        self._engine: Any = None
        self.scratch_root = scratch_root
        self._measure = measurements or self.measure
        self.wall = wall
        self.enrolled = False
        self.channel: AgentChannel | None = None

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
        quote = new_quote(nonce=bytes.fromhex(nonce_hex[2:]), issued_at=int(self.wall()), node_id=self.config.node_id,
                          gateway=self.config.gateway_address, agent_key=self.key.public_key(),
                          boot_image_digest=bytes.fromhex(self.config.boot_digest[2:]),
                          measurements=self._measure(), capsule_state=self._state())
        signed = sign_quote(quote, self.key, _NoCountersign())
        return {"quote": quote.model_dump(), "agent_signature": signed.agent_signature}

    def handlers(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        def stop(req: dict[str, Any]) -> dict[str, Any]:
            if self._stop is not None:
                self._stop(str(req.get("reason", "gateway")))
            return {"stopped": self._stop is not None}

        return {"quote": self.handle_quote, "status": lambda _: dict(self._state()), "stop": stop,
                "ping": lambda _: {"pong": True}}

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
        if self._stop is not None:
            self._stop(f"gateway lost: {why}")
