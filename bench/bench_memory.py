"""Memory of the gateway and the agent under a committee's load, against the Pi's budget.

    python bench/bench_memory.py [--concurrency 32] [--rounds 4]

Both sides are real processes, started by the e2e's own launchers (e2e/attest/attestlab.py):
`python -m trustcap.gateway` in a gateway namespace and `python -m trustcap.agent` in an HPC namespace,
joined by a veth (link-local addresses inside namespaces this bench makes and removes). Once the node
is trusted (the status on the gateway's metrics listener says so), `--concurrency` committee challenges
at once, each signed by one of 8 verifiers in the gateway's directory, are sent to the relay, `--rounds`
times.
The peak resident set (VmHWM) of each process is read from /proc while they serve. The figures beside
it, measured in the same run: a bare interpreter (`python -c pass`, the floor any Python component
pays) and the budget a Pi gateway must stay under while it serves its HPC and that load (150 MiB).
A gateway started with a chain and a cluster also loads web3 and kubernetes for its capsule loops; that
part is measured alone (imports only) and added, minus the interpreter counted twice, as an upper bound.
Needs root (network namespaces). Nothing is asserted; a row says whether the budget is met.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e" / "attest"))  # attestlab's launchers
from attestlab import start_agent, start_gateway, stop_agent, trust_root_files, write_policy
from netlab import in_netns, veth_lab

from trustcap.chain.keys import KeySigner
from trustcap.evidence import NonceRegistry
from trustcap.gateway.attest_errors import RelayBusy
from trustcap.gateway.relay_client import request_quote, request_status

GW_IP, HPC_IP = "169.254.79.1", "169.254.79.2"
NODE = "hpc-bench-mem"
BOOT_HEX = "6e" * 32
RELAY = "127.0.0.1:7791"
METRICS = "127.0.0.1:7792"  # the gateway namespace's loopback, like the relay: its status listener
AGENT_PORT = 7790
BUDGET_MIB = 150.0


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def bare_interpreter_kib() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    time.sleep(0.5)
    try:
        return _kib(proc.pid, "VmHWM")
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)


_LOOPS = ("import trustcap.gateway.__main__, trustcap.gateway.participant, trustcap.gateway.runner, "
          "trustcap.gateway.committee, trustcap.gateway.cosign, trustcap.kubeclient, kubernetes, web3; "
          "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")


def capsule_loops_import_kib() -> int:
    """What a gateway with `--chain-rpc --kubeconfig` loads before it serves anything (web3, kubernetes):
    the load run above has no chain or cluster, so this part of a full gateway is measured on its own."""
    out = subprocess.run([sys.executable, "-P", "-c", _LOOPS], capture_output=True, text=True, check=True, timeout=120)
    return int(out.stdout.split()[-1])


def bench(concurrency: int, rounds: int, tmp: Path) -> tuple[int, int, int, int, float]:
    home, kek, gw_address = trust_root_files(tmp)
    policy = write_policy(tmp / "policy.yaml", node=NODE, boot="0x" + BOOT_HEX, mean_interval=0.5,
                          min_interval=0.1)
    members = [KeySigner(os.urandom(32)) for _ in range(8)]
    token = tmp / "token"
    with veth_lab("tm", GW_IP, HPC_IP) as lab:
        gw = start_gateway(lab, home=home, kek=kek, node=NODE, boot="0x" + BOOT_HEX, policy=policy,
                           listen=f"{GW_IP}:{AGENT_PORT}", relay=RELAY, token_file=token,
                           verifiers=[m.address for m in members], log=tmp / "gateway.log",
                           extra=("--metrics-address", METRICS))
        agent = None
        try:
            agent = start_agent(lab, AGENT_PORT, gw_address, token.read_text().strip(), tmp / "agent.log",
                                node=NODE, boot=BOOT_HEX, gateway_ip=GW_IP)
            agent_pid = agent.agent_pid()
            url = f"http://{RELAY}"
            deadline = time.monotonic() + 60
            while True:
                with in_netns(lab.gw):
                    if request_status(f"http://{METRICS}")["trusted"]:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"the node never became trusted:\n{agent.text()}")
                time.sleep(0.2)
            served = busy = 0
            lock = threading.Lock()

            def challenge(i: int) -> None:
                # The relay takes a few challenges at a time and answers the rest 503 (busy): a committee
                # member waits and asks again, so all `concurrency` stay open against the gateway.
                nonlocal served, busy
                with in_netns(lab.gw):
                    while True:
                        try:
                            request_quote(url, NonceRegistry(60).issue(), signer=members[i % len(members)],
                                          node=NODE)
                            break
                        except RelayBusy:
                            with lock:
                                busy += 1
                            time.sleep(0.05)
                with lock:
                    served += 1

            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                for _ in range(rounds):
                    list(pool.map(challenge, range(concurrency)))
            seconds = time.perf_counter() - t0
            return _kib(gw.proc.pid, "VmHWM"), _kib(agent_pid, "VmHWM"), served, busy, seconds
        finally:
            if agent is not None:
                stop_agent(agent)
            gw.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_memory needs root (network namespaces)")
    floor = bare_interpreter_kib()
    loops = capsule_loops_import_kib()
    with tempfile.TemporaryDirectory(prefix="trustcap-bench-mem-") as tmp:
        gw, agent, served, busy, seconds = bench(args.concurrency, args.rounds, Path(tmp))
    mib = 1024.0
    print(f"memory  gateway peak RSS {gw / mib:6.1f} MiB | bare interpreter {floor / mib:5.1f} MiB | "
          f"ratio {gw / floor:4.1f}x | Pi budget {BUDGET_MIB:.0f} MiB: {gw / mib / BUDGET_MIB:4.2f} of it "
          f"({'met' if gw / mib <= BUDGET_MIB else 'NOT met'})")
    print(f"memory  gateway capsule-loop libraries alone (web3, kubernetes; imports only) {loops / mib:6.1f} MiB; "
          f"with the load above, at most {(gw + loops - floor) / mib:6.1f} MiB of the {BUDGET_MIB:.0f} MiB budget")
    print(f"memory  agent peak RSS   {agent / mib:6.1f} MiB | bare interpreter {floor / mib:5.1f} MiB | "
          f"ratio {agent / floor:4.1f}x")
    print(f"memory  load: {served} challenges served, {args.concurrency} at once, in {seconds:.1f} s "
          f"({busy} busy answers retried)")


if __name__ == "__main__":
    main()
