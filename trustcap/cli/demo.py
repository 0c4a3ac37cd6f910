"""`trustcap demo`: the main job on the local stack, step by step with progress.

Today it runs the walking skeleton: install the CRDs, start the operator, submit the seed's PSI capsule
(Task 7) and show the phase the operator gives it. Each later stage of the capsule lifecycle (scheduling,
attestation, execution, sealing, wipe, chain records) joins this command as it lands.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from trustcap.errors import TrustcapError
from trustcap.stack import paths
from trustcap.stack.stack import Stack

console = Console(highlight=False)


class DemoError(TrustcapError):
    """A demo step failed; the message names the step and where its log is."""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("demo", help="run the seed's scenario on the local stack")
    p.add_argument("--capsule", type=Path, default=paths.repo_root() / "capsules" / "psi" / "capsule.yaml",
                   help="the capsule manifest to submit (default: the PSI example)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each step")
    p.set_defaults(func=_demo)


def _kubectl(stack: Stack, *args: str, input: str | None = None) -> str:
    env = dict(os.environ, KUBECONFIG=str(stack.kubeconfig))
    proc = subprocess.run([str(stack.bin / "kubectl"), *args], capture_output=True, text=True, env=env,
                          input=input, timeout=120, check=False)
    if proc.returncode != 0:
        raise DemoError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _demo(args: argparse.Namespace) -> int:
    stack = Stack()
    if not stack.apiserver_ready():
        raise DemoError("the stack is not up: run `trustcap stack up` (or `make demo`, which does it)")
    root = paths.repo_root()
    manifest = args.capsule.read_text()
    doc = next(d for d in yaml.safe_load_all(manifest) if d)
    name, namespace = doc["metadata"]["name"], doc["metadata"].get("namespace", "default")
    log = stack.state / "logs" / "operator-demo.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    operator: subprocess.Popen[bytes] | None = None
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        try:
            step = bar.add_task("installing the CRDs", total=None)
            # -R: kopf's peering CRDs sit in crds/kopf-peering/, which a plain `-f crds` does not read (a
            # fresh machine's `make demo` once stopped here; .ci/run now runs the demo too).
            _kubectl(stack, "apply", "-R", "-f", str(root / "crds"))
            _kubectl(stack, "wait", "--for=condition=Established", "--timeout=60s", "-R", "-f", str(root / "crds"))
            bar.update(step, description="[green]CRDs installed and established")
            bar.stop_task(step)

            step = bar.add_task("starting the operator", total=None)
            env = dict(os.environ, KUBECONFIG=str(stack.kubeconfig))
            with log.open("wb") as fh:
                operator = subprocess.Popen([sys.executable, "-P", "-m", "trustcap.operator"], stdout=fh,
                                            stderr=subprocess.STDOUT, env=env)
            bar.update(step, description=f"[green]operator running[/] (log: {log})")
            bar.stop_task(step)

            step = bar.add_task(f"submitting capsule {namespace}/{name}", total=None)
            # A capsule left by an earlier run is removed first (the operator releases its finalizer), so
            # every demo shows the operator picking up a fresh object.
            _kubectl(stack, "delete", "-f", "-", "--ignore-not-found", "--wait=true", "--timeout=60s",
                     input=manifest)
            _kubectl(stack, "apply", "-f", "-", input=manifest)
            deadline = time.monotonic() + args.timeout
            phase = ""
            while time.monotonic() < deadline:
                if operator.poll() is not None:
                    raise DemoError(f"the operator exited ({operator.returncode}); see {log}")
                obj = json.loads(_kubectl(stack, "get", "capsule", name, "-n", namespace, "-o", "json"))
                phase = obj.get("status", {}).get("phase", "")
                if phase:
                    break
                bar.update(step, description=f"waiting for the operator to pick up {namespace}/{name}")
                time.sleep(1)
            if not phase:
                raise DemoError(f"the capsule got no phase within {args.timeout:.0f}s; see {log}")
            bar.update(step, description=f"[green]capsule {namespace}/{name} is {phase}")
            bar.stop_task(step)
        finally:
            if operator is not None and operator.poll() is None:
                operator.terminate()
                try:
                    operator.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    operator.kill()
                    operator.wait()
    print(_kubectl(stack, "get", "capsules", "-n", namespace, "-o", "wide"), end="")
    return 0
