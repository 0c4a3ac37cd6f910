"""`python3 -m trustcap.gateway` refuses bad configuration with one line naming the cause, before it
listens anywhere, mints a token or touches the trust root's secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trustcap.trustroot import SoftwareTrustRoot, new_kek_file

BOOT = "sha256:" + "ab" * 32
VERIFIER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"  # a committee member's address (anvil's 2nd account)


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-P", "-m", "trustcap.gateway", *args], capture_output=True, text=True,
                          timeout=60, check=False, cwd=cwd)


@pytest.fixture
def good(tmp_path: Path) -> dict[str, str]:
    home, kek = tmp_path / "tr", tmp_path / "kek"
    home.mkdir()
    SoftwareTrustRoot.create(home, new_kek_file(kek)).close()
    policy = tmp_path / "policy.yaml"
    policy.write_text("kind: GatewayPolicy\nattestation:\n  bootImages: ['0x" + "ab" * 32 + "']\n")
    return {"--trustroot": str(home), "--kek-file": str(kek), "--node": "hpc-1", "--boot-digest": BOOT,
            "--policy": str(policy), "--listen": "127.0.0.1:0", "--relay": "127.0.0.1:0",
            "--token-file": str(tmp_path / "token"), "--journal": str(tmp_path / "monitor.jsonl"),
            "--verifier": VERIFIER, "--metrics-address": "127.0.0.1:0"}


@pytest.mark.parametrize(("flag", "value", "code", "needle"), [
    pytest.param("--listen", "no-port", 2, "is not HOST:PORT", id="bad-listen"),
    pytest.param("--relay", "host:99999", 2, "is not HOST:PORT", id="bad-relay-port"),
    pytest.param("--boot-digest", "md5:abc", 2, "is not sha256:<64 hex>", id="bad-boot-digest"),
    pytest.param("--policy", "/nonexistent/policy.yaml", 1, "cannot read gateway policy", id="missing-policy"),
    pytest.param("--trustroot", "/nonexistent", 1, "no trust root in /nonexistent", id="missing-trust-root"),
    pytest.param("--kek-file", "/nonexistent/kek", 1, "/nonexistent/kek", id="missing-kek"),
    pytest.param("--journal", "/proc/version/monitor.jsonl", 1, "cannot open the monitor journal",
                 id="unwritable-journal"),
    pytest.param("--metrics-address", "0.0.0.0:9466", 1, "is not a loopback address", id="metrics-off-loopback"),
    pytest.param("--metrics-address", "metrics", 2, "is not HOST:PORT", id="bad-metrics-address"),
    pytest.param("--rekey-after", "64", 1, "every 1..32 requests; the agent closes a channel", id="rekey-too-late"),
    pytest.param("--deny-network", "10.42.0.0/16", 1, "--deny-network needs --hpc-link", id="deny-without-link"),
    pytest.param("--verifier", "0x1234", 1, "'0x1234' is not an Ethereum address", id="bad-verifier-address"),
    pytest.param("--verifier", VERIFIER.lower()[:-1] + "g", 1, "is not an Ethereum address", id="verifier-not-hex"),
    pytest.param("--verifier", VERIFIER[:-1] + ("c" if VERIFIER[-1] == "C" else "C"), 1, "EIP-55",
                 id="verifier-bad-checksum"),
])
def test_bad_configuration_is_one_line_naming_the_cause(good: dict[str, str], tmp_path: Path, flag: str, value: str,
                                                        code: int, needle: str) -> None:
    args = {**good, flag: value}
    proc = _run(*[x for kv in args.items() for x in kv], cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(good["--token-file"])  # nothing minted


def test_no_verifier_directory_is_one_line_saying_to_give_one(good: dict[str, str], tmp_path: Path) -> None:
    args = {k: v for k, v in good.items() if k != "--verifier"}  # and no --kubeconfig either
    proc = _run(*[x for kv in args.items() for x in kv], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no verifier directory" in proc.stderr and "--verifier" in proc.stderr and "--kubeconfig" in proc.stderr
    assert not os.path.exists(good["--token-file"])  # nothing minted, nothing listening


@pytest.mark.parametrize(("extra", "needle"), [
    pytest.param({"--listen": "0.0.0.0:7000"}, "must be this link's own IPv4 address", id="unspecified-listen"),
    pytest.param({"--listen": "[::1]:7000"}, "must be this link's own IPv4 address", id="ipv6-listen"),
    pytest.param({"--listen": "127.0.0.1:7000", "--netboot-tftp-port": "70000"}, "tftp_port 70000 is not a port",
                 id="bad-tftp-port"),
    pytest.param({"--listen": "127.0.0.1:7000", "--deny-network": "10.42.0.1/16"}, "'10.42.0.1/16' is not a network",
                 id="bad-deny-network"),
])
def test_a_guarded_hpc_link_needs_the_links_own_address(good: dict[str, str], tmp_path: Path,
                                                        extra: dict[str, str], needle: str) -> None:
    """The guard admits the agent channel to exactly --listen's address, so it must be one; refused before
    any rule is installed or any token minted."""
    args = {**good, "--hpc-link": "tcgnone0", **extra}
    proc = _run(*[x for kv in args.items() for x in kv], cwd=tmp_path)
    assert proc.returncode == 1 and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(good["--token-file"])


@pytest.mark.parametrize(("extra", "needle"), [
    pytest.param({}, "--reboot-command needs the HPC link whose carrier the reboot wipe watches",
                 id="no-link-to-watch"),
    pytest.param({"--carrier-link": "tcgnone0"}, "--carrier-link tcgnone0: cannot read the carrier count",
                 id="no-such-link"),
])
def test_a_reboot_wipe_needs_a_carrier_it_can_watch(good: dict[str, str], tmp_path: Path, extra: dict[str, str],
                                                    needle: str) -> None:
    """Without the carrier the Pi sees, no reboot proof could be clean (decision 0119): refused at start,
    before a token is minted, rather than a gateway whose every reboot wipe fails."""
    args = {**good, "--reboot-command": "/bin/true", **extra}
    proc = _run(*[x for kv in args.items() for x in kv], cwd=tmp_path)
    assert proc.returncode == 1 and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not os.path.exists(good["--token-file"])


def test_a_malformed_policy_names_its_field(good: dict[str, str], tmp_path: Path) -> None:
    Path(good["--policy"]).write_text("kind: GatewayPolicy\nmonitor: {meanIntervalSeconds: -1}\nattestation:\n"
                                      "  bootImages: ['0x" + "ab" * 32 + "']\n")
    proc = _run(*[x for kv in good.items() for x in kv], cwd=tmp_path)
    assert proc.returncode == 1 and "monitor.meanIntervalSeconds" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_starts_mints_one_private_token_and_stops_cleanly_on_sigterm(good: dict[str, str], tmp_path: Path) -> None:
    import signal

    good["--address-file"] = str(tmp_path / "gateway-address")  # netboot hands it to the HPC with the token
    proc = subprocess.Popen([sys.executable, "-P", "-m", "trustcap.gateway", *[x for kv in good.items() for x in kv]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready.startswith("ready agent=127.0.0.1:") and " relay=http://127.0.0.1:" in ready, ready
        assert " metrics=http://127.0.0.1:" in ready, ready  # its own listener, not the relay's port
        token = Path(good["--token-file"])
        assert oct(token.stat().st_mode & 0o777) == "0o600" and len(token.read_text().strip()) >= 16
        assert Path(good["--journal"]).exists(), "the journal is opened at start"
        with SoftwareTrustRoot.open(Path(good["--trustroot"]),
                                    bytes.fromhex(Path(good["--kek-file"]).read_text().strip())) as root:
            assert Path(good["--address-file"]).read_text() == root.address + "\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _out, err = proc.communicate(timeout=10)
    assert "Traceback" not in err, err


class _Loop:
    def __init__(self, name: str, seen: list[str]) -> None:
        self.name, self.seen = name, seen

    def start(self) -> None:
        self.seen.append(f"start {self.name}")

    def stop(self) -> None:
        self.seen.append(f"stop {self.name}")


def test_the_assembly_starts_its_parts_in_order_and_stops_them_in_reverse(good: dict[str, str]) -> None:
    """In-process, with the capsule lifecycle injected: what `main` runs between `ready` and SIGTERM."""
    import socket

    from trustcap.gateway.__main__ import Hooks, assemble, parser

    seen: list[str] = []

    def lifecycle(args: Any, root: Any, server: Any, policy: Any, link: Any = None) -> Any:
        return [_Loop("participant", seen), _Loop("committee", seen)], None, None, None

    args = parser().parse_args([x for kv in good.items() for x in kv])
    gw = assemble(args, Hooks(lifecycle=lifecycle))
    assert gw.capsules and oct(Path(good["--token-file"]).stat().st_mode & 0o777) == "0o600"
    # A capsule gateway answers no idle challenge, and its trust root answers the operator's liveness probe.
    assert gw.relay.serve_idle is False and gw.relay.liveness is gw.root
    assert gw.metrics is not None and gw.metrics.address[1] != gw.relay.address[1]
    gw.start()
    assert seen == ["start participant", "start committee"]
    assert gw.services[0].__class__.__name__ == "Monitor"  # the monitor starts before any loop
    host, port = gw.server.address
    gw.stop()
    assert seen[2:] == ["stop committee", "stop participant"]
    with socket.socket() as s:  # the agent port is closed with the server
        assert s.connect_ex((host, port)) != 0
    with socket.socket() as s:  # and the metrics listener with the gateway
        assert s.connect_ex(gw.metrics.address) != 0
