"""Start and stop a real anvil (the npm package's binary) on a free loopback port.

Used by the chain tests, the reliability tests and the gas bench: each run gets its own chain, and can
stop it and start it again on the same port with its state (--dump-state / --load-state), which is how
the tests make the RPC endpoint go away for a while.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from trustcap.chain.artifacts import contracts_dir
from trustcap.chain.errors import ChainError

__all__ = ["Anvil", "anvil_path", "free_port"]

log = logging.getLogger("trustcap.chain")


def anvil_path() -> Path:
    env = os.environ.get("TRUSTCAP_ANVIL")
    if env:
        return Path(env)
    candidates = [
        contracts_dir() / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil",
        Path.home() / ".cache" / "trustcap" / "npm" / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin"
        / "anvil",
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise ChainError("anvil is not installed: run scripts/install-chain-tools (or set TRUSTCAP_ANVIL)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Anvil:
    """One anvil process on 127.0.0.1:`port`; `stop()` dumps its state when `state` is set, `start()`
    loads it again, so a restart keeps every block and balance."""

    def __init__(
        self,
        port: int | None = None,
        *,
        chain_id: int = 31337,
        state: Path | None = None,
        block_time: float | None = None,
        extra: list[str] | None = None,
        log_file: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.chain_id = chain_id
        self.state = state
        self.block_time = block_time
        self.extra = extra or []
        self.log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> Anvil:
        cmd = [str(anvil_path()), "--host", "127.0.0.1", "--port", str(self.port), "--chain-id",
               str(self.chain_id), "--accounts", "10"]
        if self.block_time:
            cmd += ["--block-time", str(self.block_time)]
        if self.state is not None:
            cmd += ["--dump-state", str(self.state)]
            if self.state.exists():
                cmd += ["--load-state", str(self.state)]
        cmd += self.extra
        if self.log_file:
            with open(self.log_file, "ab") as out:  # the child keeps its own copy of the descriptor
                self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        else:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ChainError(f"anvil exited with {self._proc.returncode} on start (port {self.port})")
            try:
                self.rpc("eth_chainId")
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise ChainError(f"anvil did not answer on {self.url} within {timeout}s")

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM so anvil writes --dump-state; SIGKILL if it does not exit."""
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout)
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def rpc(self, method: str, params: list[Any] | None = None) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
        req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})  # noqa: S310
        # our own http://127.0.0.1 URL, never a file: or other scheme
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
            reply = json.loads(r.read())
        if "error" in reply:
            raise ChainError(f"anvil {method}: {reply['error']}")
        return reply["result"]

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
