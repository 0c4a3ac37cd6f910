"""`trustcap demo psi`: the seed's scenario end to end on the local stack, told as it happens.

It brings up a world (trustcap/world): N gateway processes, each with its HPC agent in its own network
namespace, an anvil chain with the contracts, the operator, and owners B and C with their own keys and
brokers. Then the parties play the scenario (trustcap/scenario.py): B and C seal their name lists, A
submits and funds the capsule, the operator drives it, and B and C open their results. It prints a
short account: who sealed what, which node ran it (revealed at the end), each round's verdicts, the
wipe proof, the chain transactions, B's and C's results, and the time of each step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from trustcap.api import CAPSULES, GROUP, VERSION
from trustcap.cli._progress import step_bar, step_reporter
from trustcap.errors import TrustcapError
from trustcap.kubeclient import local_api_client
from trustcap.stack import paths
from trustcap.stack.stack import Stack

console = Console(highlight=False)
PSI = paths.repo_root() / "capsules" / "psi"


class DemoError(TrustcapError):
    """A demo step failed; the message names the step and where its log is."""


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("demo", help="run the seed's scenario on the local stack")
    which = p.add_subparsers(dest="scenario", metavar="SCENARIO")
    psi = which.add_parser("psi", help="private set intersection of B's and C's name lists (the seed's Task 7)")
    for q in (p, psi):
        q.add_argument("--names-b", type=Path, default=PSI / "names-b.txt", help="B's names, UTF-8, one a line")
        q.add_argument("--names-c", type=Path, default=PSI / "names-c.txt", help="C's names, UTF-8, one a line")
        q.add_argument("--gateways", type=int, default=4, help="gateway+HPC pairs (at least committee size + 1)")
        q.add_argument("--workdir", type=Path, default=None, help="where keys, logs and the store go")
        q.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the capsule")
        q.add_argument("--keep", action="store_true", help="leave the world running after the account")
        q.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from trustcap import scenario
    from trustcap.capsule.keys import KeyPair
    from trustcap.store import open_store
    from trustcap.world import World

    stack = Stack()
    if not stack.apiserver_ready():
        raise DemoError("the stack is not up: run `trustcap stack up` (or `make demo`, which does it)")
    names = {"b": scenario.read_names(args.names_b), "c": scenario.read_names(args.names_c)}
    workdir = args.workdir or (stack.state / "demo" / time.strftime("%Y%m%d-%H%M%S"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.gateways < 4:
        raise DemoError(f"--gateways {args.gateways}: the PSI capsule's committee of 3 needs at least 4 gateways "
                        "(an executor and 3 verifiers)")
    with step_bar(console) as bar:
        progress = step_reporter(bar)

        progress("building the PSI function image")
        digest = _build_image()
        progress("building the PSI function image", done=True)
        with World.up(n=args.gateways, workdir=workdir, progress=progress) as w:
            outcome = _play(w, names, digest, args, bar, KeyPair, open_store, scenario)
            _account(outcome, w, names, scenario)
            if args.keep:
                console.print(f"world left running (workdir {workdir}); Ctrl-C to stop")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
    ok = outcome.capsule["status"].get("phase") == "Completed" and all(c.ok for c in outcome.checks)
    return 0 if ok else 1


def _build_image() -> str:
    from trustcap.cli.capsule import build_image

    image_id, _tag = build_image(PSI)
    return str(image_id)


def _play(w: Any, names: dict[str, list[str]], digest: str, args: argparse.Namespace, bar: Progress,
          KeyPair: Any, open_store: Any, scenario: Any) -> Any:
    from kubernetes import client

    store = open_store(w.store_url)
    owners = [scenario.Owner(name=n, keys=KeyPair.load(Path(w.owners[n]["key_file"])),
                             broker_url=w.owners[n]["broker_url"], names=names[n]) for n in ("b", "c")]
    doc = scenario.manifest_for(name="psi", namespace=w.namespace, image_digest=digest, owners=owners,
                                payer=w.payer_address, amount_wei=10**15)
    step = bar.add_task("B and C seal their lists to their own keys, bound to the capsule", total=None)
    scenario.seal_inputs(doc, owners, store)
    bar.update(step, description="[green]B and C sealed and stored their lists: "
               + ", ".join(f"{o.name.upper()} {len(o.names)} names -> {o.cid[:16]}…" for o in owners))
    bar.stop_task(step)
    custom = client.CustomObjectsApi(local_api_client(w.kubeconfig))
    _delete_if_there(custom, w.namespace, "psi")
    custom.create_namespaced_custom_object(GROUP, VERSION, w.namespace, CAPSULES, doc)
    t_apply = time.time()
    step = bar.add_task("A applied the capsule; waiting for its task id", total=None)
    obj = scenario.wait_capsule(custom, w.namespace, "psi", lambda o: bool((o.get("status") or {}).get("taskId")),
                                timeout=60, alive=w.check_alive)
    task_id = bytes.fromhex(obj["status"]["taskId"][2:])
    scenario.fund(w.rpc_url, w.deployment, w.payer, task_id, k=int(doc["spec"]["committee"]["size"]),
                  amount_wei=int(doc["spec"]["payment"]["amountWei"]), timeout_s=int(doc["spec"]["timeoutSeconds"]))
    bar.update(step, description=f"[green]A funded the escrow for task 0x{task_id.hex()[:16]}…")
    bar.stop_task(step)
    step = bar.add_task("the operator drives the capsule", total=None)

    def show(o: dict[str, Any]) -> None:
        st = o.get("status") or {}
        last = next((c for c in reversed(st.get("conditions") or []) if c["type"] != "Ready"), None)
        what = f"{last['type']}={last['status']} ({last['reason']})" if last else ""
        bar.update(step, description=f"capsule {st.get('phase')}: {what}")

    final = scenario.wait_capsule(custom, w.namespace, "psi",
                                  lambda o: (o.get("status") or {}).get("phase") in scenario.TERMINAL,
                                  timeout=args.timeout, on_change=show, alive=w.check_alive)
    t_done = time.time()
    bar.update(step, description=f"[green]capsule {final['status']['phase']} in {t_done - t_apply:.1f} s")
    bar.stop_task(step)
    outcome = scenario.Outcome(capsule=final)
    if final["status"].get("phase") == "Completed":
        from trustcap.cli.verify import chain_view
        from trustcap.verify import verify_capsule

        view, recorded = chain_view(w.rpc_url, w.deployment)
        outcome.checks = verify_capsule(final, view, batch_recorded=recorded)
        outcome.results = scenario.open_results(final, owners, store)
        outcome.seconds = scenario.step_seconds(final)
        outcome.seconds["opened"] = round(time.time() - float(final["status"]["timeline"]["accepted"]), 2)
    return outcome


def _delete_if_there(custom: Any, namespace: str, name: str) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, CAPSULES, name)
    except ApiException as exc:
        if exc.status == 404:
            return
        raise
    for _ in range(120):
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, CAPSULES, name)
        except ApiException as exc:
            if exc.status == 404:
                return
        time.sleep(0.5)
    raise DemoError(f"an earlier capsule {namespace}/{name} is still being deleted")


def _account(outcome: Any, w: Any, names: dict[str, list[str]], scenario: Any) -> None:
    from trustcap.cli.verify import print_checks

    st = outcome.capsule.get("status") or {}
    console.rule("[bold]the PSI capsule, as it happened")
    for o in ("b", "c"):
        console.print(f"{o.upper()} sealed {len(names[o])} names to its own key; only its broker can release them")
    ready: dict[str, Any] = next((c for c in st.get("conditions") or [] if c["type"] == "Ready"), {})
    console.print(f"capsule: {st.get('phase')} ({ready.get('reason')}: {ready.get('message')})")
    for c in st.get("conditions") or []:
        if c["type"] != "Ready":
            console.print(f"  {c['type']:15} {c['status']:5} {c['reason']}: {c['message']}")
    vrf = st.get("vrf") or {}
    if vrf.get("executor"):
        console.print(f"executor (revealed at completion): {vrf['executor']}, VRF proof {vrf.get('proof', '')[:26]}…")
    for rnd in st.get("record") or []:
        votes = ", ".join(f"{v['verifier'][:10]}… {'pass' if _passed(v) else 'FAIL'}"
                          for v in rnd.get("verdicts") or [])
        tx = (rnd.get("chain") or {}).get("txHash", "")
        console.print(f"round {rnd['phase']:6} {rnd.get('result', ''):7} verdicts: {votes}; on chain {tx[:18]}…")
    if st.get("wipe"):
        console.print(f"wipe proof: {st['wipe']}")
    for tx in (st.get("chain") or {}).get("transactions") or []:
        console.print(f"chain tx: {tx}")
    if outcome.checks:
        print_checks(outcome.checks)
    for o, found in outcome.results.items():
        console.print(f"[bold]{o.upper()}'s result[/]: {', '.join(found) or '(no common names)'}")
    if outcome.seconds:
        console.print("time since apply: " + ", ".join(f"{k} {v:.1f} s" for k, v in outcome.seconds.items()))


def _passed(item: dict[str, Any]) -> bool:
    return bool(((item.get("verdict") or {}).get("verdict") or {}).get("passed"))
