"""`trustcap exec` as a capsule author runs it: one JSON object, real engine, real nftables on this host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

KEYS = {"reason", "exit_code", "violations", "wipe", "stdout", "stderr"}


def _exec(*args: str, timeout: float = 120) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run([sys.executable, "-P", "-m", "trustcap.cli", "exec", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.stdout.strip(), f"no JSON on stdout (exit {proc.returncode}): {proc.stderr}"
    return proc.returncode, json.loads(proc.stdout)


def test_exec_prints_one_json_object(docker_engine: Any) -> None:
    rc, out = _exec("--timeout", "30", "--", "sh", "-c", "echo hello; echo oops >&2")
    assert KEYS <= set(out) and rc == 0
    assert out["reason"] == "completed" and out["exit_code"] == 0 and out["violations"] == []
    assert out["stdout"] == "hello\n" and out["stderr"] == "oops\n"
    assert out["wipe"]["verified"] and out["wipe"]["state_restored"]


def test_exec_reports_a_violation_and_exits_2(docker_engine: Any) -> None:
    rc, out = _exec("--", "python3", "-c", "import socket; socket.socket()")
    assert rc == 2 and out["reason"] in ("killed-by-policy", "completed"), out  # "error" names its cause
    assert any(v["kind"] == "socket" and v["attempted"] for v in out["violations"])


def test_exec_usage_errors_are_one_line() -> None:
    proc = subprocess.run([sys.executable, "-P", "-m", "trustcap.cli", "exec", "--egress", "example.com:80", "--",
                           "true"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and "must be an IP address" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def host_endpoint() -> Iterator[str]:
    """A veth on this host (no dummy driver here) holding a 198.18/15 test address, with a listener on it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to add a dummy interface")
    dev = f"tcd{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "link", "add", dev, "type", "veth", "peer", "name", dev + "p"], check=True, timeout=30)
    listener = None
    try:
        subprocess.run(["ip", "addr", "add", "198.18.77.1/32", "dev", dev], check=True, timeout=30)
        subprocess.run(["ip", "link", "set", dev, "up"], check=True, timeout=30)
        subprocess.run(["ip", "link", "set", dev + "p", "up"], check=True, timeout=30)
        code = textwrap.dedent("""
            import socket
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("198.18.77.1", 18080)); s.listen(); print("ready", flush=True)
            while True:
                c, _ = s.accept(); c.sendall(b"declared-ok"); c.close()
        """)
        listener = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        yield "198.18.77.1:18080"
    finally:
        if listener is not None:
            listener.kill()
            listener.wait(timeout=10)
            if listener.stdout is not None:
                listener.stdout.close()
        subprocess.run(["ip", "link", "del", dev], capture_output=True, timeout=30, check=False)


def test_exec_with_declared_egress(docker_engine: Any, host_endpoint: str) -> None:
    script = textwrap.dedent("""
        import socket
        for port in (18080, 18081):
            s = socket.socket(); s.settimeout(1.5)
            try:
                s.connect(("198.18.77.1", port)); print("CONNECTED", port, s.recv(32).decode())
            except OSError as e:
                print("BLOCKED", port, type(e).__name__)
    """)
    rc, out = _exec("--egress", host_endpoint, "--on-violation", "report", "--", "python3", "-c", script)
    assert "CONNECTED 18080 declared-ok" in out["stdout"], out
    assert "BLOCKED 18081" in out["stdout"]
    assert "tcp 198.18.77.1:18081" in {v["attempted"] for v in out["violations"]}
    assert rc == 2
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=30).stdout
    assert "trustcap_eg_" not in tables
