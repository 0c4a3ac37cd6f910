"""The errors of the chain subsystem.

    TrustcapError
    └── ChainError                    anything on the chain path
        ├── ArtifactError             a compiled contract artifact is missing or malformed
        ├── RpcUnavailable            the RPC endpoint did not answer (refused, reset, timed out): retry later
        ├── ContractReverted          the contract refused a call; `.error` names the custom error
        ├── TransactionFailed         a mined transaction has status 0, or was never mined in time
        ├── NonceConflict             our account's nonce was used by a transaction we did not journal
        └── JournalError              the writer's on-disk journal is unreadable or inconsistent

Errors of web3, requests and eth-abi are translated here, in `translate()`, and nowhere else, so a
caller only ever catches ChainError; tests/chain/test_errors.py checks that every upstream error we can
meet maps to one of these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import requests
from web3 import exceptions as w3x

from trustcap.errors import TrustcapError

__all__ = [
    "ArtifactError",
    "ChainError",
    "ContractReverted",
    "JournalError",
    "NonceConflict",
    "RpcUnavailable",
    "TransactionFailed",
    "translate",
]

T = TypeVar("T")


class ChainError(TrustcapError):
    """Base of every chain error."""


class ArtifactError(ChainError):
    """A contract artifact (contracts/artifacts/*.json) is missing or malformed."""


class RpcUnavailable(ChainError):
    """The RPC endpoint did not answer; waiting can help (the writer backs off and retries)."""


class ContractReverted(ChainError):
    """The contract reverted; `error` is the custom error's name (e.g. "BatchAlreadyRecorded") or ""."""

    def __init__(self, message: str, error: str = "", args_: tuple[Any, ...] = ()) -> None:
        super().__init__(message)
        self.error = error
        self.error_args = args_


class TransactionFailed(ChainError):
    """A transaction was mined with status 0 or was not mined in time."""


class NonceConflict(ChainError):
    """A nonce the writer journaled was consumed by a transaction it never signed: another process is
    sending from the same account. The writer stops rather than guess."""


class JournalError(ChainError):
    """The writer's journal cannot be read or contradicts itself."""


# Custom errors of our contracts and of the OpenZeppelin libraries they use, by 4-byte selector; filled
# from the ABIs by trustcap.chain.artifacts (so a new error in Solidity needs no edit here).
ERROR_SELECTORS: dict[str, tuple[str, list[str]]] = {}


def _decode_custom(data: str) -> tuple[str, tuple[Any, ...]]:
    from eth_abi import decode  # type: ignore[attr-defined]

    raw = data[2:] if data.startswith("0x") else data
    sel = "0x" + raw[:8]
    if sel not in ERROR_SELECTORS:
        return "", ()
    name, types = ERROR_SELECTORS[sel]
    try:
        from eth_utils.address import to_checksum_address

        values = tuple(
            to_checksum_address(x) if t == "address" else x
            for t, x in zip(types, decode(types, bytes.fromhex(raw[8:])), strict=True)
        )
    except Exception:
        values = ()
    return name, values


_UNAVAILABLE: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    w3x.ProviderConnectionError,
    w3x.RequestTimedOut,
    w3x.TooManyRequests,
    ConnectionError,
    TimeoutError,
)


def translate(exc: BaseException, what: str) -> ChainError:
    """Our error for an upstream one met while doing `what` (a short phrase for the message)."""
    if isinstance(exc, ChainError):
        return exc
    if isinstance(exc, _UNAVAILABLE):
        return RpcUnavailable(f"{what}: the chain RPC endpoint did not answer ({type(exc).__name__})")
    if isinstance(exc, w3x.ContractCustomError):
        data = exc.data if isinstance(exc.data, str) else str(exc.message or "")
        name, values = _decode_custom(data)
        shown = f"{name}{values!r}" if name else f"unknown custom error {data[:10]}"
        return ContractReverted(f"{what}: the contract reverted with {shown}", name, values)
    if isinstance(exc, w3x.ContractPanicError):
        return ContractReverted(f"{what}: the contract panicked ({exc.message})", "Panic")
    if isinstance(exc, w3x.ContractLogicError):
        data = exc.data if isinstance(exc.data, str) else ""
        name, values = _decode_custom(data) if data else ("", ())
        return ContractReverted(f"{what}: the contract reverted: {name or exc.message}", name, values)
    if isinstance(exc, w3x.TimeExhausted):
        return TransactionFailed(f"{what}: the transaction was not mined in time")
    if isinstance(exc, w3x.Web3RPCError):
        return ChainError(f"{what}: the node refused the request: {exc.message}")
    if isinstance(exc, w3x.Web3Exception):
        return ChainError(f"{what}: {type(exc).__name__}: {exc}")
    raise exc


def call(what: str, fn: Callable[[], T]) -> T:
    """Run `fn` (one RPC round trip), translating any upstream error into a ChainError."""
    try:
        return fn()
    except Exception as exc:
        raise translate(exc, what) from exc
