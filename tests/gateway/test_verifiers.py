"""The relay's verifier directory: static addresses, the cluster's Gateway objects (listed through our own
lister wrapper, faked here; the real API server is in e2e), cached, and a failed list keeps the last good
set. Time is a frozen clock."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from trustcap.gateway.attest_errors import DirectoryError
from trustcap.gateway.verifiers import AnyDirectory, KubeGatewayDirectory, StaticDirectory, normalize_address

A = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
B = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
C = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"


def gw(name: str, address: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"address": address}}


class Lister:
    """The Kubernetes list call, scripted: each call returns the next answer or raises it."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> list[dict[str, Any]]:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return list(answer)


@pytest.mark.parametrize(("value", "expected"), [
    pytest.param(A, A, id="eip55"),
    pytest.param(A.lower(), A, id="lowercase"),
    pytest.param("0x" + A[2:].upper(), A, id="uppercase"),
])
def test_addresses_normalize_to_eip55(value: str, expected: str) -> None:
    assert normalize_address(value) == expected


@pytest.mark.parametrize("value", [
    pytest.param("0x1234", id="short"),
    pytest.param(A[2:] + "00", id="no-0x"),
    pytest.param(A[:-1] + "g", id="not-hex"),
    pytest.param(A[:-1] + "c", id="bad-checksum"),
    pytest.param(None, id="missing"),
    pytest.param(42, id="not-a-string"),
])
def test_bad_addresses_are_named(value: Any) -> None:
    with pytest.raises(DirectoryError, match="is not an Ethereum address"):
        normalize_address(value)


def test_static_directory_allows_exactly_its_members() -> None:
    d = StaticDirectory([A, B.lower()])
    assert d.allowed(A) and d.allowed(B) and not d.allowed(C)


def test_any_directory_allows_what_either_allows() -> None:
    d = AnyDirectory(StaticDirectory([A]), KubeGatewayDirectory(lister=Lister([gw("b", B)])))
    assert d.allowed(A) and d.allowed(B) and not d.allowed(C)


def test_gateway_objects_are_listed_once_per_ttl() -> None:
    now = [0.0]
    lister = Lister([gw("a", A.lower())], [gw("a", A), gw("c", C)])
    d = KubeGatewayDirectory(lister=lister, ttl_s=30, clock=lambda: now[0])
    assert d.allowed(A) and not d.allowed(C)  # lowercase spec.address is matched in EIP-55 form
    now[0] = 29.9
    assert not d.allowed(C) and lister.calls == 1  # cached
    now[0] = 30.0
    assert d.allowed(C) and lister.calls == 2  # a new Gateway object becomes a verifier within one TTL


def test_a_removed_gateway_stops_being_a_verifier_within_a_ttl() -> None:
    now = [0.0]
    d = KubeGatewayDirectory(lister=Lister([gw("a", A), gw("b", B)], [gw("a", A)]), ttl_s=30, clock=lambda: now[0])
    assert d.allowed(B)
    now[0] = 31
    assert not d.allowed(B) and d.allowed(A)


def test_a_failed_list_keeps_the_last_good_set_logs_and_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    lister = Lister([gw("a", A)], ConnectionRefusedError("api server down"), [gw("b", B)])
    d = KubeGatewayDirectory(lister=lister, ttl_s=30, retry_s=5, clock=lambda: now[0])
    assert d.allowed(A)
    now[0] = 30
    with caplog.at_level(logging.WARNING, logger="trustcap.gateway"):
        assert d.allowed(A)  # the list failed: the last good set still answers
    assert d.failures == 1 and "keeping the last good set of 1" in caplog.text and "api server down" in caplog.text
    now[0] = 34
    assert d.allowed(A) and lister.calls == 2  # no retry before retry_s: a dead API is not hammered
    now[0] = 35
    assert d.allowed(B) and not d.allowed(A) and lister.calls == 3


def test_never_listed_allows_nobody() -> None:
    d = KubeGatewayDirectory(lister=Lister(OSError("no route")), clock=lambda: 0.0)
    assert not d.allowed(A) and not d.loaded


def test_a_gateway_with_a_bad_address_is_skipped_by_name(caplog: pytest.LogCaptureFixture) -> None:
    d = KubeGatewayDirectory(lister=Lister([gw("broken", "0x12"), {"metadata": {"name": "nospec"}}, gw("a", A)]),
                             clock=lambda: 0.0)
    with caplog.at_level(logging.WARNING, logger="trustcap.gateway"):
        assert d.allowed(A)
    assert d.addresses == {A} and "Gateway broken skipped" in caplog.text


@pytest.mark.parametrize("text", [
    pytest.param("this: is: not yaml\n", id="not-yaml"),
    pytest.param("kind: Config\n", id="no-context"),
    pytest.param(None, id="missing-file"),
])
def test_an_unreadable_kubeconfig_is_a_directory_error(tmp_path: Any, text: str | None) -> None:
    bad = tmp_path / "kubeconfig"
    if text is not None:
        bad.write_text(text)
    with pytest.raises(DirectoryError, match="cannot load kubeconfig"):
        KubeGatewayDirectory(str(bad))
