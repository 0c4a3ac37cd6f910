"""Quote round trip through the gateway, beside a plain local sign+verify of the same bytes, same run.

    round trip   = verifier nonce -> gateway (relay) -> encrypted channel over loopback TCP -> agent
                   (measures, builds and signs the quote) -> gateway countersigns with its trust root ->
                   verifier appraises (both signatures, nonce once, identity, age) and checks the policy
    baseline     = the agent key signs the quote's agent digest and the verifier recovers the signer:
                   the two secp256k1 operations any attestation needs, with no transport, measuring or
                   countersigning
Three round trips are timed: with fixed measurements (what the protocol itself costs), the same through
the relay's HTTP service as a committee verifier on another Pi would call it (loopback here), and with
real readings of this machine (what a check costs the HPC). A burst of simultaneous verifiers then
shows the relay's bound at work: at most `relay_bound` challenges in flight, the rest refused (503).
Printed as median seconds and ratios to the baseline; channel key rotations during the run are counted
(rotation is part of the cost).

    .venv/bin/python -P bench/bench_attest.py [--rounds 200] [--real-rounds 20] [--burst 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from trustcap.agent import measure
from trustcap.agent.identity import BootKey
from trustcap.chain.keys import KeySigner
from trustcap.evidence import NonceRegistry, appraise_quote, check_policy, quote_digest, recover_address
from trustcap.evidence.policy import Policy
from trustcap.gateway.relay import RelayService
from trustcap.gateway.relay_client import request_quote
from trustcap.gateway.verifiers import StaticDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself (safe-path mode leaves it off)
from _pair import loopback_pair

BOOT = "0x" + "ab" * 32
relay_bound = 4
FIXED = {"kernel": "0x" + "11" * 32, "modules": "0x" + "22" * 32}
VERIFIER = KeySigner(os.urandom(32))  # the committee member that signs each challenge (the relay checks it)


def median_time(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(rounds: int, real_rounds: int, burst_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pair = loopback_pair(Path(tmp), BOOT)
        root, server, agent, chan = pair.root, pair.server, pair.agent, pair.channel
        mode = {"real": False}
        agent._measure = lambda: measure.measure() if mode["real"] else dict(FIXED)
        t = threading.Thread(target=lambda: _serve(chan), daemon=True)
        t.start()
        session = server.wait_for_agent(10)
        nonces = NonceRegistry(300, capacity=rounds * 4)
        policy = Policy(boot_images=[BOOT], allow_unlisted_measurements=True)
        agent_key = agent.key.public_key()

        relay = RelayService(server, verifiers=StaticDirectory([VERIFIER.address]), max_inflight=relay_bound,
                             max_connections=burst_size + 8)
        via = {"http": False}

        def round_trip() -> None:
            nonce = nonces.issue()
            signed = (request_quote(relay.url, nonce, signer=VERIFIER, node="hpc-bench") if via["http"]
                      else server.relay(nonce))
            report = appraise_quote(signed, nonces=nonces, expected_nonce=nonce, node_id="hpc-bench",
                                    agent_key=agent_key, gateway_address=root.address, now=time.time(),
                                    max_age_seconds=60)
            report.merge(check_policy(signed.quote, policy))
            if not report.ok:
                raise SystemExit(f"bench round trip failed appraisal: {report.summary()}")

        sample = server.relay(nonces.issue()).quote
        digest = quote_digest(sample)
        key = BootKey()

        def baseline() -> None:
            sig = key.sign_digest(digest)
            if recover_address(digest, sig) != key.address:
                raise SystemExit("baseline signature did not verify")

        t_base = median_time(baseline, rounds)
        t_fixed = median_time(round_trip, rounds)
        via["http"] = True
        t_http = median_time(round_trip, rounds)
        via["http"] = False
        mode["real"] = True
        t_real = median_time(round_trip, real_rounds)
        mode["real"] = False
        burst_result = burst(relay.url, burst_size, nonces)
        rotations = session.rotations
        relay.close()
        server.close()
        root.close()
        t.join(timeout=5)

    table = Table(title=f"quote round trip through the gateway (median of {rounds}; real: {real_rounds})")
    for col in ("what", "seconds", "ratio to sign+verify"):
        table.add_column(col, justify="right" if col != "what" else "left")
    table.add_row("local sign+verify (baseline)", f"{t_base:.6f}", "1.0")
    table.add_row("round trip, fixed measurements", f"{t_fixed:.6f}", f"{t_fixed / t_base:.1f}")
    table.add_row("round trip via relay HTTP (signed challenge), fixed", f"{t_http:.6f}", f"{t_http / t_base:.1f}")
    table.add_row("round trip, real measurements", f"{t_real:.6f}", f"{t_real / t_base:.1f}")
    Console().print(table)
    served, busy, lat = burst_result
    print(f"burst of {burst_size} simultaneous verifiers (relay bound {relay_bound} in flight): {served} served, "
          f"{busy} told busy (503, retry); served median {statistics.median(lat):.6f} s = "
          f"{statistics.median(lat) / t_base:.1f}x baseline, max {max(lat):.6f} s = {max(lat) / t_base:.1f}x")
    print(f"channel key rotations during the run: {rotations}")


def burst(url: str, n: int, nonces: NonceRegistry) -> tuple[int, int, list[float]]:
    """n verifiers challenge at once: the relay serves up to its bound and refuses the rest at once."""
    from trustcap.gateway.attest_errors import RelayBusy, RelayError

    start = threading.Barrier(n)
    lat: list[float] = []
    busy = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        nonce = nonces.issue()
        start.wait()
        t0 = time.perf_counter()
        try:
            request_quote(url, nonce, signer=VERIFIER, node="hpc-bench")
        except RelayBusy:
            with lock:
                busy[0] += 1
            return
        except RelayError as exc:
            with lock:
                errors.append(str(exc))
            return
        with lock:
            lat.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise SystemExit(f"{len(errors)} verifiers failed outright (neither served nor told busy): {errors[0]}")
    return len(lat), busy[0], lat or [float("nan")]


def _serve(chan: object) -> None:
    from trustcap.agent.errors import ChannelError

    try:
        chan.serve()  # type: ignore[attr-defined]
    except ChannelError:
        pass  # the server closed the channel at the end of the run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--real-rounds", type=int, default=20)
    ap.add_argument("--burst", type=int, default=32, help="simultaneous verifiers in the burst")
    args = ap.parse_args()
    run(args.rounds, args.real_rounds, args.burst)


if __name__ == "__main__":
    main()
