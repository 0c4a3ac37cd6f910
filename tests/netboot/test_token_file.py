"""The gateway's token file drives which one-time token DHCP hands out, and whether it answers at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustcap.cli import main
from trustcap.gateway.boot import write_private
from trustcap.netboot.tokens import TokenFileWatch, read_gateway_address, read_token

MAC = "52:54:00:00:00:01"
ADDR = "0x" + "ab" * 20


class Services:
    """Records what the watch hands on (the real NetbootServices restarts dnsmasq: e2e/netboot)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.addresses: list[str | None] = []

    def set_token(self, mac: str, token: str | None, gateway_address: str | None = None) -> None:
        self.calls.append((mac, token))
        self.addresses.append(gateway_address)


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
        def set_token(self, mac: str, token: str | None, gateway_address: str | None = None) -> None:
            super().set_token(mac, token, gateway_address)
            if token == "tok-bad":  # noqa: S105 -- a test token
                raise RuntimeError("dnsmasq exited at start")

    services = Broken()
    watch = TokenFileWatch(path, MAC, services)
    _write(path, "tok-bad")
    assert watch.poll()  # logged, not raised: the watch thread keeps following the file
    _write(path, "tok-good")
    assert watch.poll()
    assert services.calls[-1] == (MAC, "tok-good")


@pytest.mark.parametrize(("content", "expected"), [
    pytest.param(None, None, id="missing"),
    pytest.param("", None, id="empty"),
    pytest.param(ADDR + "\n", ADDR, id="address"),
    pytest.param("0x" + "ab" * 19, None, id="short"),
    pytest.param(ADDR + '"; rm -rf /', None, id="injection-is-not-an-address"),
])
def test_read_gateway_address(tmp_path: Path, content: str | None, expected: str | None) -> None:
    path = tmp_path / "gateway-address"
    if content is not None:
        path.write_text(content)
    assert read_gateway_address(path) == expected


def test_the_gateways_address_goes_with_each_token_and_none_without_it(tmp_path: Path) -> None:
    """The agent pins the address DHCP hands it, and on a Pi only the gateway knows it (its Zymkey's): a
    token is served with the address the gateway wrote, and not at all while that file is unreadable."""
    token, address = tmp_path / "token", tmp_path / "gateway-address"
    services = Services()
    watch = TokenFileWatch(token, MAC, services, address_path=address)
    _write(token, "tok-a\n")
    assert not watch.poll()  # armed, but no address yet: still not served
    assert services.calls == [(MAC, None)]
    _write(address, ADDR + "\n")
    assert watch.poll()
    assert services.calls[-1] == (MAC, "tok-a") and services.addresses[-1] == ADDR
    _write(address, "not an address")
    assert watch.poll() and services.calls[-1] == (MAC, None)  # a broken file stops serving, fail closed
    other = "0x" + "cd" * 20
    _write(address, other)
    assert watch.poll() and services.calls[-1] == (MAC, "tok-a") and services.addresses[-1] == other
    # positive control: without an address file the token alone is served, as before
    plain = Services()
    TokenFileWatch(token, MAC, plain)
    assert plain.calls == [(MAC, "tok-a")] and plain.addresses == [None]


@pytest.mark.parametrize(("argv", "message"), [
    pytest.param(["--token-file", "t"], "--token-file needs --dhcp-interface", id="no-dhcp"),
    pytest.param(["--dhcp-interface", "nbgw0", "--dhcp-range", "10.77.0.100,10.77.0.150", "--token-file", "t"],
                 "exactly one --mac", id="no-mac"),
    pytest.param(["--dhcp-interface", "nbgw0", "--dhcp-range", "10.77.0.100,10.77.0.150", "--token-file", "t",
                  "--mac", f"{MAC}=tok@n"], "no token", id="token-twice"),
    pytest.param(["--dhcp-interface", "nbgw0", "--dhcp-range", "10.77.0.100,10.77.0.150", "--token-file", "t",
                  "--mac", f"{MAC}@n", "--container"], "--token-file", id="container"),
    pytest.param(["--gateway-address-file", "a"], "--gateway-address-file needs --token-file", id="address-no-token"),
    pytest.param(["--dhcp-interface", "nbgw0", "--dhcp-range", "10.77.0.100,10.77.0.150", "--token-file", "t",
                  "--mac", f"{MAC}@n", "--gateway-address", ADDR, "--gateway-address-file", "a"],
                 "give one", id="address-twice"),
])
def test_token_file_cli_errors_name_the_option(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    assert main(["netboot", "serve", "--root", str(tmp_path), "--bind", "127.0.0.1", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
