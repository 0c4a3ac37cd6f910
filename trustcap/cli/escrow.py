"""`trustcap escrow fund|status|refund`: the payer's side of TaskEscrow (trustcap/chain/escrow.py).

    trustcap escrow fund --task-id 0x.. --k 3 --amount-wei N --deadline-seconds S [--key FILE] [CHAIN]
    trustcap escrow status --task-id 0x.. [CHAIN]
    trustcap escrow refund --task-id 0x.. [--key FILE] [CHAIN]

    CHAIN is --rpc URL (env TRUSTCAP_CHAIN_RPC) and --deployment FILE (env TRUSTCAP_CHAIN_DEPLOYMENT);
    --key is the payer's chain private key, 64 hex digits in a file of mode 0600 (env TRUSTCAP_PAYER_KEY).

Why a command of its own: the operator never pays. A Capsule waits in Pending until its payer funds the
task it names, and its Funded condition prints exactly the `fund` line above (operator/capsule.py
`_fund_hint`), so with the environment set (`trustcap world up` writes it) a person pastes it as it is.
The deadline is S seconds after the later of the chain's latest block and this machine's clock: the
contract checks it against block time, the operator against the wall clock, and both must accept it.
Every refusal is one line naming its cause and the fix; a revert names the contract's custom error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from trustcap.cli._chain import open_escrow
from trustcap.errors import ConfigError, TrustcapError

__all__ = ["EscrowCliError", "parse_task_id", "read_payer_key", "register"]

console = Console(highlight=False)
ZERO_ADDRESS = "0x" + "00" * 20


class EscrowCliError(TrustcapError):
    """An escrow command could not be done; the message names the cause and the fix."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("escrow", help="fund, inspect and refund a capsule's escrow task (the payer)")
    sub = parser.add_subparsers(dest="escrow_command", metavar="ACTION", required=True)

    fund = sub.add_parser("fund", help="pay for a capsule's task: the line its Funded condition prints")
    _task(fund)
    fund.add_argument("--k", required=True, type=int, help="committee size (the Capsule's spec.committee.size)")
    fund.add_argument("--amount-wei", required=True, type=int, metavar="N",
                      help="the payment in wei (at least the Capsule's spec.payment.amountWei)")
    fund.add_argument("--deadline-seconds", required=True, type=int, metavar="S",
                      help="after S seconds from now, an unsettled task can be refunded")
    _key(fund)
    _chain(fund)
    fund.set_defaults(func=_fund)

    status = sub.add_parser("status", help="show the task as the escrow holds it (getTask)")
    _task(status)
    _chain(status)
    status.set_defaults(func=_status)

    refund = sub.add_parser("refund", help="take back the payment of a task left unsettled after its deadline")
    _task(refund)
    _key(refund)
    _chain(refund)
    refund.set_defaults(func=_refund)


def _task(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task-id", required=True, metavar="0xHEX",
                   help="the Capsule's status.taskId (kubectl get capsule NAME -o jsonpath='{.status.taskId}')")


def _key(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", type=Path, default=os.environ.get("TRUSTCAP_PAYER_KEY"), metavar="FILE",
                   help="the payer's chain private key, hex in a 0600 file (env TRUSTCAP_PAYER_KEY)")


def _chain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpc", default=os.environ.get("TRUSTCAP_CHAIN_RPC"), metavar="URL",
                   help="chain RPC URL (env TRUSTCAP_CHAIN_RPC)")
    p.add_argument("--deployment", type=Path, default=os.environ.get("TRUSTCAP_CHAIN_DEPLOYMENT"), metavar="FILE",
                   help="the contracts' deployment JSON (env TRUSTCAP_CHAIN_DEPLOYMENT)")


# --- pieces others may call ---------------------------------------------------------------------------
def parse_task_id(text: str) -> bytes:
    raw = text[2:] if text.startswith("0x") else text
    try:
        task = bytes.fromhex(raw)
    except ValueError:
        task = b""
    if len(task) != 32:
        raise ConfigError(f"--task-id {text!r} is not 32 bytes of hex: copy the Capsule's status.taskId "
                          "(kubectl get capsule NAME -o jsonpath='{.status.taskId}')")
    return task


def read_payer_key(path: Path | None) -> Any:
    """A KeySigner from a 0600 file holding the 32-byte private key as hex (optionally 0x-prefixed)."""
    from eth_utils.exceptions import ValidationError

    from trustcap.chain.keys import KeySigner
    from trustcap.trustroot._files import check_private_file

    if path is None:
        raise ConfigError("--key FILE is needed (or TRUSTCAP_PAYER_KEY): the payer's chain private key, hex, "
                          "mode 0600; `trustcap world up` writes one as DIR/payer.key")
    try:
        check_private_file(path, "payer key file")
    except TrustcapError as exc:
        raise ConfigError(f"{exc} (chmod 600 {path} if it is yours)") from exc
    text = path.read_text(errors="replace").strip()
    try:
        raw = bytes.fromhex(text[2:] if text.startswith("0x") else text)
        if len(raw) != 32:
            raise ValueError
        return KeySigner(raw)
    except (ValueError, ValidationError) as exc:  # eth_keys refuses 0 and keys >= n with ValidationError
        raise ConfigError(f"payer key file {path}: not a secp256k1 private key (64 hex digits)") from exc


# --- the commands -------------------------------------------------------------------------------------
def _fund(args: argparse.Namespace) -> int:
    task = parse_task_id(args.task_id)
    if args.deadline_seconds <= 0:
        raise ConfigError(f"--deadline-seconds {args.deadline_seconds}: must be positive (seconds from now)")
    payer = read_payer_key(args.key)
    escrow = open_escrow(args.rpc, args.deployment, payer, error=EscrowCliError)
    deadline = max(_block_time(escrow), int(time.time())) + int(args.deadline_seconds)
    receipt = _write(escrow, "fund", task, lambda: escrow.fund(task, args.k, deadline, args.amount_wei), args)
    console.print(f"funded task 0x{task.hex()} with {args.amount_wei} wei from {payer.address}: committee "
                  f"{args.k}, deadline {_when(deadline)}; {_receipt(receipt)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    task = parse_task_id(args.task_id)
    escrow = open_escrow(args.rpc, args.deployment, error=EscrowCliError)
    info = _read(escrow, task, args)
    table = Table(show_header=False, title=f"escrow task 0x{task.hex()}", title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in _rows(info):
        table.add_row(name, value)
    console.print(table)
    return 0


def _refund(args: argparse.Namespace) -> int:
    task = parse_task_id(args.task_id)
    payer = read_payer_key(args.key)
    escrow = open_escrow(args.rpc, args.deployment, payer, error=EscrowCliError)
    info = _read(escrow, task, args)
    receipt = _write(escrow, "refund", task, lambda: escrow.refund(task), args)
    console.print(f"refunded task 0x{task.hex()}: {info.payment} wei are owed to the payer {info.payer} "
                  f"(TaskEscrow.withdraw pays them out); {_receipt(receipt)}")
    return 0


def _read(escrow: Any, task: bytes, args: argparse.Namespace) -> Any:
    from trustcap.chain.errors import ChainError

    try:
        info = escrow.task(task)
    except ChainError as exc:
        raise EscrowCliError(f"cannot read task 0x{task.hex()} at {args.rpc}: {exc}") from exc
    if info is None:
        raise EscrowCliError(f"no escrow task 0x{task.hex()} on the chain at {args.rpc} (deployment "
                             f"{args.deployment}): it exists once the payer funds it (`trustcap escrow fund`, the "
                             "line in the Capsule's Funded condition); check the task id and the chain")
    return info


def _write(escrow: Any, what: str, task: bytes, send: Any, args: argparse.Namespace) -> Mapping[str, Any]:
    from trustcap.chain.errors import ChainError, ContractReverted

    try:
        receipt: Mapping[str, Any] = send()
    except ContractReverted as exc:
        raise EscrowCliError(f"{what} of task 0x{task.hex()} refused: {_revert_hint(exc, escrow, task, args)}"
                             ) from exc
    except ChainError as exc:
        raise EscrowCliError(f"{what} of task 0x{task.hex()} at {args.rpc} failed: {exc}") from exc
    return receipt


def _revert_hint(exc: Any, escrow: Any, task: bytes, args: argparse.Namespace) -> str:
    """The contract's custom error, and what to do about it."""
    error, values = exc.error, tuple(exc.error_args)
    if error == "TaskExists":
        return "TaskExists: this task is already funded (`trustcap escrow status --task-id 0x" + task.hex() + "`)"
    if error == "NoPayment":
        return "NoPayment: --amount-wei must be more than 0 (the Capsule's spec.payment.amountWei)"
    if error == "InvalidCommitteeSize":
        return f"InvalidCommitteeSize({args.k}): --k must be odd and within the contract's bounds (spec.committee.size)"
    if error == "DeadlineInPast":
        return "DeadlineInPast: the chain's clock is past the deadline; give a larger --deadline-seconds"
    if error == "DeadlineTooFar":
        latest = f" (the latest allowed is {_when(int(values[1]))})" if len(values) > 1 else ""
        return f"DeadlineTooFar: give a smaller --deadline-seconds{latest}"
    if error == "WrongState" and len(values) > 1:
        from trustcap.chain.escrow import STATES

        state = STATES[int(values[1])] if int(values[1]) < len(STATES) else str(values[1])
        return f"WrongState: the task is {state}; only a Funded or Assigned task can be refunded"
    if error == "NotPayer" and len(values) > 1:
        return f"NotPayer: the task was funded by {values[1]}, not {values[0]}: pass that payer's --key"
    if error == "DeadlineNotReached" and len(values) > 1:
        return (f"DeadlineNotReached: the deadline is {_when(int(values[1]))}; refund after it (a task the "
                "committee settles pays out instead)")
    return str(exc)


# --- formatting ---------------------------------------------------------------------------------------
def _block_time(escrow: Any) -> int:
    from trustcap.chain.errors import call

    return int(call("read the latest block", lambda: escrow.client.w3.eth.get_block("latest"))["timestamp"])


def _when(ts: int) -> str:
    at = dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    left = ts - int(time.time())
    rel = f"in {left} s" if left >= 0 else f"{-left} s ago"
    return f"{ts} ({at}, {rel})"


def _receipt(receipt: Mapping[str, Any]) -> str:
    tx = receipt.get("transactionHash")
    tx_hex = tx.hex() if isinstance(tx, (bytes, bytearray)) else str(tx or "")
    tx_hex = tx_hex if tx_hex.startswith("0x") else "0x" + tx_hex
    return f"tx {tx_hex} in block {receipt.get('blockNumber')}"


def _rows(info: Any) -> list[tuple[str, str]]:
    assigned = info.executor and info.executor != ZERO_ADDRESS
    return [
        ("state", info.state),
        ("payer", info.payer),
        ("payment", f"{info.payment} wei"),
        ("committee size", str(info.k)),
        ("deadline", _when(info.deadline)),
        ("funded in block", str(info.funded_block)),
        ("executor", info.executor if assigned else "(not assigned yet)"),
        ("attestation", "0x" + info.attestation_id.hex() if assigned else "(not assigned yet)"),
        ("committee", "\n".join(info.verifiers) if info.verifiers else "(not assigned yet)"),
    ]
