"""Every upstream error the chain code can meet maps to one ChainError subclass, with a message that says
what was being done; a contract's custom error comes out by name with its arguments."""

from __future__ import annotations

import pytest
import requests
from eth_abi import encode
from eth_utils.crypto import keccak
from web3 import exceptions as w3x

from trustcap.chain import artifacts
from trustcap.chain.errors import (
    ChainError,
    ContractReverted,
    RpcUnavailable,
    TransactionFailed,
    call,
    translate,
)
from trustcap.errors import TrustcapError


def _custom(sig: str, types: list[str], values: list[object]) -> str:
    return "0x" + (keccak(text=sig)[:4] + encode(types, values)).hex()


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        pytest.param(requests.exceptions.ConnectionError("refused"), RpcUnavailable, id="connection-refused"),
        pytest.param(requests.exceptions.ReadTimeout("slow"), RpcUnavailable, id="read-timeout"),
        pytest.param(w3x.ProviderConnectionError("down"), RpcUnavailable, id="provider-connection"),
        pytest.param(w3x.RequestTimedOut("slow"), RpcUnavailable, id="request-timed-out"),
        pytest.param(w3x.TooManyRequests("429"), RpcUnavailable, id="too-many-requests"),
        pytest.param(ConnectionResetError("reset"), RpcUnavailable, id="connection-reset"),
        pytest.param(w3x.TimeExhausted("never mined"), TransactionFailed, id="receipt-timeout"),
        pytest.param(w3x.ContractLogicError("execution reverted"), ContractReverted, id="plain-revert"),
        pytest.param(w3x.ContractPanicError("panic", data="0x4e487b71"), ContractReverted, id="panic"),
        pytest.param(w3x.Web3RPCError("nonce too low"), ChainError, id="rpc-error"),
        pytest.param(w3x.BadFunctionCallOutput("no code"), ChainError, id="bad-output"),
    ],
)
def test_upstream_errors_are_mapped(exc: BaseException, expected: type[ChainError]) -> None:
    got = translate(exc, "do a thing")
    assert type(got) is expected
    assert isinstance(got, TrustcapError) and str(got).startswith("do a thing: ")


def test_custom_errors_come_out_by_name_with_checksummed_addresses() -> None:
    artifacts.load("AttestationLog")
    data = _custom("UnknownVerifier(address)", ["address"], ["0x90f79bf6eb2c4f870365e785982e1f101e93b906"])
    got = translate(w3x.ContractCustomError(data, data=data), "record a batch")
    assert isinstance(got, ContractReverted)
    assert got.error == "UnknownVerifier"
    assert got.error_args == ("0x90F79bf6EB2c4f870365E785982E1f101E93b906",)
    openzeppelin = _custom("ECDSAInvalidSignatureS(bytes32)", ["bytes32"], [b"\x01" * 32])
    assert translate(w3x.ContractCustomError(openzeppelin, data=openzeppelin), "x").error == "ECDSAInvalidSignatureS"  # type: ignore[attr-defined]


def test_unknown_selector_still_reverts_cleanly() -> None:
    got = translate(w3x.ContractCustomError("0xdeadbeef", data="0xdeadbeef"), "x")
    assert isinstance(got, ContractReverted) and got.error == "" and "0xdeadbeef" in str(got)


def test_errors_we_do_not_know_are_not_swallowed() -> None:
    def boom() -> None:
        raise KeyError("a bug, not a chain error")

    with pytest.raises(KeyError):
        call("x", boom)
