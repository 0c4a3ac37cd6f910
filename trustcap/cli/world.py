"""`trustcap world up`: a whole trustcap network on this machine (trustcap/world.py), left running for a
person to play a scenario by hand (README, "The PSI scenario by hand").

    trustcap world up [--gateways N] [--workdir DIR] [--namespace NS]

It brings the world up with a progress display (as `trustcap demo psi` does), writes the payer's chain key
(anvil's dev account 1, public knowledge, local chains only) to DIR/payer.key (0600), prints what the
parties need (the namespace, store, chain, deployment, B's and C's key folders and brokers) and writes the
same as `export` lines to DIR/env.sh, then prints `world ready` and serves until Ctrl-C or SIGTERM, when
everything it started is stopped and every object it made removed. If a process of the world dies while
it waits, it says which (with the end of its log) and tears the world down: a half world misleads.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from rich.console import Console

from trustcap.cli._progress import step_bar, step_reporter
from trustcap.errors import ConfigError

__all__ = ["env_lines", "register"]

console = Console(highlight=False)
ALIVE_CHECK_SECONDS = 2.0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("world", help="a whole trustcap network on this machine, to play by hand")
    sub = parser.add_subparsers(dest="world_command", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="bring a world up, print how to reach it, serve until Ctrl-C (as root)")
    up.add_argument("--gateways", type=int, default=4, help="gateway+HPC pairs (at least committee size + 1)")
    up.add_argument("--workdir", type=Path, default=None,
                    help="a new or empty folder for keys, logs, the store and env.sh (default: the stack's "
                         "state folder, world/)")
    up.add_argument("--namespace", default="default", help="the namespace capsules are applied in")
    up.set_defaults(func=_up)


def env_lines(w: Any, payer_key: Path) -> list[str]:
    """The `export` lines for the hand-run: the CLI's own variables, then the parties' names."""
    from trustcap.stack.stack import Stack

    b, c = w.owners["b"], w.owners["c"]
    pairs = [
        ("KUBECONFIG", str(w.kubeconfig)),
        ("TRUSTCAP_CHAIN_RPC", w.rpc_url),
        ("TRUSTCAP_CHAIN_DEPLOYMENT", str(w.deployment)),
        ("TRUSTCAP_STORE", w.store_url),
        ("TRUSTCAP_PAYER_KEY", str(payer_key)),
        ("NS", w.namespace),
        ("PAYER", w.payer_address),
        ("B_KEYS", b["key_dir"]), ("B_BROKER", b["broker_url"]),
        ("C_KEYS", c["key_dir"]), ("C_BROKER", c["broker_url"]),
    ]
    path = f"{shlex.quote(str(Path(sys.executable).parent))}:{shlex.quote(str(Stack().bin))}:$PATH"
    return [f"export {k}={shlex.quote(v)}" for k, v in pairs] + [f'export PATH="{path}"']


def _up(args: argparse.Namespace) -> int:
    from trustcap.chain.keys import ANVIL_KEYS
    from trustcap.stack.stack import Stack
    from trustcap.trustroot._files import write_private_file
    from trustcap.world import World

    if args.gateways < 4:
        raise ConfigError(f"--gateways {args.gateways}: a committee of 3 needs at least 4 gateways (an executor "
                          "and 3 verifiers)")
    workdir: Path = args.workdir or (Stack().state / "world")
    if (workdir / "owners").exists():
        raise ConfigError(f"{workdir} holds an earlier world's owner keys ({workdir / 'owners'}): pass a new "
                          f"--workdir, or remove {workdir} if nothing in it is needed")
    signal.signal(signal.SIGTERM, _interrupt)  # while it comes up: unwind, so what is up is torn down
    with step_bar(console) as bar:
        progress = step_reporter(bar)

        world = World.up(n=args.gateways, workdir=workdir, namespace=args.namespace, progress=progress)
        w = world.__enter__()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # from now on a signal only ends the wait: teardown runs whole
        signal.signal(sig, lambda *_: stop.set())
    try:
        payer_key = w.workdir / "payer.key"
        write_private_file(payer_key, ANVIL_KEYS[1].encode() + b"\n")
        lines = env_lines(w, payer_key)
        (w.workdir / "env.sh").write_text("\n".join(lines) + "\n")
        _tell(w, payer_key, lines)
        while not stop.wait(ALIVE_CHECK_SECONDS):
            w.check_alive()
        console.print("stopping the world (its capsules are deleted first, so runners wipe and release)")
    except BaseException:
        if not world.__exit__(*sys.exc_info()):
            raise
    else:
        world.__exit__(None, None, None)
    console.print("world stopped")
    return 0


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _tell(w: Any, payer_key: Path, lines: list[str]) -> None:
    console.rule("[bold]the world is up")
    rows = [
        ("namespace", w.namespace),
        ("store", w.store_url),
        ("chain RPC", w.rpc_url),
        ("deployment", str(w.deployment)),
        ("payer (A)", f"{w.payer_address}, key {payer_key}"),
    ]
    for who in ("b", "c"):
        o = w.owners[who]
        rows.append((f"owner {who.upper()}", f"keys {o['key_dir']} (key, key.pub), broker {o['broker_url']}"))
    rows.append(("logs", str(w.workdir / "logs")))
    for name, value in rows:
        console.print(f"  {name:11} {value}", soft_wrap=True)
    console.print(f"\nin another shell: [bold]source {w.workdir / 'env.sh'}[/], which holds")
    for line in lines:
        console.print(f"  {line}", soft_wrap=True)
    console.print("\nworld ready; Ctrl-C (or SIGTERM) stops it and removes what it made", soft_wrap=True)
