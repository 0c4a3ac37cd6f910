"""`trustcap exec`: run one command under exactly the capsule isolation on the local Docker Engine.

What a capsule author uses to try a function before submitting it. Prints ONE JSON object: `reason`,
`exit_code`, `violations`, `wipe`, `stdout`, `stderr` (plus run details). Exit status: 0 when the run
completed with exit code 0 and no violation, 2 otherwise (the JSON says why), 1 on a usage/engine error.
With `--egress`, the run's network namespace is linked to a per-run gateway namespace on this machine
whose nftables rules allow only the declared endpoints (trustcap.gateway.egress).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from trustcap.errors import ConfigError

DEFAULT_IMAGE = "trustcap/base:bookworm"


def register(sub: Any) -> None:
    p = sub.add_parser("exec", help="run a command under the capsule isolation and print a JSON report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"image to run (default {DEFAULT_IMAGE}, built locally)")
    p.add_argument("--egress", action="append", default=[], metavar="HOST:PORT",
                   help="a declared endpoint (IP:PORT); repeat for more. Default: no network at all")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS", help="hard timeout (default 60)")
    p.add_argument("--memory", type=int, default=256, metavar="MIB", help="memory limit, swap off (default 256)")
    p.add_argument("--pids", type=int, default=64, help="process limit (default 64)")
    p.add_argument("--scratch", type=int, default=64, metavar="MIB", help="scratch size (default 64)")
    p.add_argument("--on-violation", choices=("stop", "report"), default="stop",
                   help="stop the run at the first violation (default) or only report it")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from trustcap.agent.executor import Executor
    from trustcap.agent.isolation import IsolationSpec, parse_endpoint

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("trustcap exec: no command given; usage: trustcap exec [OPTIONS] -- COMMAND...")
    spec = IsolationSpec(image=args.image, command=tuple(command),
                         egress=tuple(parse_endpoint(e) for e in args.egress), timeout_s=args.timeout,
                         memory_bytes=args.memory * 1024 * 1024, pids_limit=args.pids,
                         scratch_bytes=args.scratch * 1024 * 1024, on_violation=args.on_violation)
    attacher = None
    if spec.egress:
        from trustcap.gateway.egress import LocalGatewayAttacher

        attacher = LocalGatewayAttacher()
    if args.image == DEFAULT_IMAGE:
        from trustcap.stack.images import ensure_base_image

        ensure_base_image()
    result = Executor(attacher=attacher).run(spec)
    json.dump(result.to_json(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0 if result.reason == "completed" and result.exit_code == 0 and not result.violations else 2
