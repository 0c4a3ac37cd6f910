"""The gateway's token file drives which one-time token DHCP hands out, and whether it answers at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustcap.cli import main
from trustcap.gateway.boot import write_private
from trustcap.netboot.tokens import TokenFileWatch, read_token

MAC = "52:54:00:00:00:01"


class Services:
    """Records what the watch hands on (the real NetbootServices restarts dnsmasq: e2e/netboot)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def set_token(self, mac: str, token: str | None) -> None:
        self.calls.append((mac, token))


def _write(path: Path, text: str) -> None:
    write_private(path, text)  # as the gateway writes it


@pytest.mark.parametrize(("content", "expected"), [
    pytest.param(None, None, id="missing"),
    pytest.param("", None, id="empty"),
    pytest.param("\n", None, id="blank-line"),
    pytest.param("tok-1\n", "tok-1", id="token"),
    pytest.param('tok"; rm -rf /', None, id="injection-is-not-a-token"),
    pytest.param("x" * 129, None, id="too-long"),
])
def test_read_token(tmp_path: Path, content: str | None, expected: str | None) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    assert read_token(path) == expected


def test_watch_hands_on_every_change_once(tmp_path: Path) -> None:
    path = tmp_path / "token"
    services = Services()
    watch = TokenFileWatch(path, MAC, services)
    assert services.calls == [(MAC, None)]  # the first reading at once: nothing armed, nothing served
    assert not watch.poll()
    _write(path, "tok-a\n")
    assert watch.poll() and not watch.poll()
    _write(path, "tok-b\n")
    assert watch.poll()
    _write(path, "")
    assert watch.poll()
    assert services.calls == [(MAC, None), (MAC, "tok-a"), (MAC, "tok-b"), (MAC, None)]
    assert watch.changes == 3


def test_watch_survives_a_failing_restart(tmp_path: Path) -> None:
    path = tmp_path / "token"

    class Broken(Services):
        def set_token(self, mac: str, token: str | None) -> None:
            super().set_token(mac, token)
            if token == "tok-bad":  # noqa: S105 -- a test token
                raise RuntimeError("dnsmasq exited at start")

    services = Broken()
    watch = TokenFileWatch(path, MAC, services)
    _write(path, "tok-bad")
    assert watch.poll()  # logged, not raised: the watch thread keeps following the file
    _write(path, "tok-good")
    assert watch.poll()
    assert services.calls[-1] == (MAC, "tok-good")


@pytest.mark.parametrize(("argv", "message"), [
    pytest.param(["--token-file", "t"], "--token-file needs --dhcp-interface", id="no-dhcp"),
    pytest.param(["--dhcp-interface", "nbgw0", "--dhcp-range", "10.77.0.100,10.77.0.150", "--token-file", "t"],
                 "exactly one --mac", id="no-mac"),
    pytest.param(["--dhcp-interface", "nbgw0", "--dhcp-range", "10.77.0.100,10.77.0.150", "--token-file", "t",
                  "--mac", f"{MAC}=tok@n"], "no token", id="token-twice"),
    pytest.param(["--dhcp-interface", "nbgw0", "--dhcp-range", "10.77.0.100,10.77.0.150", "--token-file", "t",
                  "--mac", f"{MAC}@n", "--container"], "--token-file", id="container"),
])
def test_token_file_cli_errors_name_the_option(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    assert main(["netboot", "serve", "--root", str(tmp_path), "--bind", "127.0.0.1", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
