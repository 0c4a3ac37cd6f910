"""`trustcap verify capsule NAME`: check a finished capsule's record against the chain (trustcap/verify.py)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, cast

from rich.console import Console
from rich.table import Table

from trustcap.api import CAPSULES, GROUP, VERSION
from trustcap.cli._chain import open_chain
from trustcap.errors import TrustcapError
from trustcap.kubeclient import TRANSPORT_ERRORS, local_api_client

console = Console(highlight=False)


class VerifyError(TrustcapError):
    """The record could not be read (the checks themselves report, they do not raise)."""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("verify", help="check a finished capsule's record offline")
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    c = what.add_parser("capsule", help="VRF proofs, selection, verdict signatures, quorum, chain inclusion, results")
    c.add_argument("name")
    c.add_argument("-n", "--namespace", default="default")
    c.add_argument("--rpc", default=os.environ.get("TRUSTCAP_CHAIN_RPC"), help="chain RPC URL (env TRUSTCAP_CHAIN_RPC)")
    c.add_argument("--deployment", type=Path, default=os.environ.get("TRUSTCAP_CHAIN_DEPLOYMENT"),
                   help="the contracts' deployment JSON (env TRUSTCAP_CHAIN_DEPLOYMENT)")
    c.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    c.set_defaults(func=_verify)


def read_capsule(name: str, namespace: str, kubeconfig: str | None) -> dict[str, Any]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        api = client.CustomObjectsApi(local_api_client(kubeconfig))
        doc = cast(dict[str, Any], api.get_namespaced_custom_object(GROUP, VERSION, namespace,
                                                                   CAPSULES, name))
    except ApiException as exc:
        raise VerifyError(f"cannot read Capsule {namespace}/{name}: {exc.status} {exc.reason}") from None
    except TRANSPORT_ERRORS as exc:
        raise VerifyError(f"cannot reach the API server: {exc} (set KUBECONFIG; `trustcap stack env`)") from None
    return doc


def chain_view(rpc: str | None, deployment: Path | None) -> tuple[Any, Any]:
    """(ChainView, batch_recorded) over a read-only client."""
    from trustcap.chain.escrow import Escrow

    client, d = open_chain(rpc, deployment, error=VerifyError)

    def batch_recorded(batch_id: str, root: str) -> bool:
        return client.find_batch(d, bytes.fromhex(batch_id[2:]), bytes.fromhex(root[2:])) is not None

    return Escrow(client, d), batch_recorded


def print_checks(checks: Any) -> None:
    table = Table(show_header=True, header_style="bold")
    table.add_column("check")
    table.add_column("")
    table.add_column("what was compared", overflow="fold")
    for c in checks:
        table.add_row(c.name, "[green]ok[/]" if c.ok else "[bold red]FAILED[/]", c.detail)
    console.print(table)


def _verify(args: argparse.Namespace) -> int:
    from trustcap.verify import all_ok, verify_capsule

    capsule = read_capsule(args.name, args.namespace, args.kubeconfig)
    view, recorded = chain_view(args.rpc, args.deployment)
    checks = verify_capsule(capsule, view, batch_recorded=recorded)
    print_checks(checks)
    if all_ok(checks):
        console.print(f"[green]capsule {args.namespace}/{args.name}: every check passed[/]")
        return 0
    console.print(f"[bold red]capsule {args.namespace}/{args.name}: {sum(not c.ok for c in checks)} check(s) failed[/]")
    return 1
