"""Node-side costs, each beside a baseline measured in the same run (ratios, never absolute targets).

    launch   isolated capsule run of `true` (Executor: scratch on a loop device, seccomp, limits, audit rules,
             wipe with read-back, state snapshots)  vs  `docker run --rm --network none IMAGE true` of the
             same image; and vs the same docker run plus the floor of the scratch's verified wipe alone
             (`dd` zero-fill of the scratch size with fsync + an uncached `dd` read-back, as the wipe row's
             baseline): the part of the launch no arrangement of the steps can hide (decision 0102)
    wipe     BlockScratch.wipe() of a 1 GiB scratch (hash of what was there, zero-fill + fsync, read back
             the backing file past the page cache)  vs  `dd` zero-fill of 1 GiB (fsync) + one uncached
             (`iflag=direct`) `dd` read-back: the wipe's read-back is O_DIRECT, so the baseline's is too.
             Twice: into a new file (the issue's baseline, which also allocates every page and block) and
             over a file already written and cached (what the wipe overwrites: its backing file)
    quote    quote round trip through the gateway (encrypted channel, real measurements, countersign)
             vs  the agent measuring and signing locally (no transport, no countersignature)

Needs root and a Docker Engine (`trustcap stack up`). Usage:
    .venv/bin/python bench/bench_node.py [--launches 5] [--wipe-mib 1024] [--quotes 30]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from trustcap.agent.errors import AgentError
from trustcap.agent.executor import Executor
from trustcap.agent.isolation import IsolationSpec
from trustcap.agent.wipe import BlockScratch
from trustcap.stack.images import ensure_base_image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ itself (safe-path mode leaves it off)
from _pair import loopback_pair

IMAGE = "trustcap/base:bookworm"
BOOT = "0x" + "ab" * 32


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def med(fn: Callable[[], object], n: int) -> float:
    return statistics.median(timed(fn) for _ in range(n))


def _dd_fill_and_read_back(path: Path, size: int) -> None:
    """The least a verified overwrite of `size` bytes costs: zeros written and fsynced, read back uncached."""
    bs = 4 * 1024 * 1024
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", f"bs={bs}", f"count={max(1, size // bs)}", "conv=fsync",
                    "status=none"], check=True, timeout=600)
    subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={bs}", "iflag=direct", "status=none"], check=True,
                   timeout=600)
    path.unlink()


def bench_launch(n: int, root: Path) -> tuple[float, float, float]:
    """(isolated, docker run, dd floor of the scratch wipe), medians of `n` interleaved rounds."""
    import docker

    client = docker.from_env()
    ensure_base_image(client)
    ex = Executor(client, scratch_root=root / "scratch")
    spec = IsolationSpec(image=IMAGE, command=("true",), timeout_s=60, on_violation="report")

    def isolated() -> None:
        r = ex.run(spec)
        assert r.reason == "completed" and r.exit_code == 0 and r.wipe["verified"], r.to_json()

    def plain() -> None:
        subprocess.run(["docker", "run", "--rm", "--network", "none", IMAGE, "true"], check=True,
                       capture_output=True, timeout=120)

    def floor() -> None:
        _dd_fill_and_read_back(root / "launch-dd.img", spec.scratch_bytes)

    plain()
    isolated()  # warm both paths
    a, b, c = [], [], []
    for _ in range(n):  # interleaved so drift hits all alike
        a.append(timed(isolated))
        b.append(timed(plain))
        c.append(timed(floor))
    return statistics.median(a), statistics.median(b), statistics.median(c)


def bench_wipe(mib: int, root: Path) -> tuple[float, float, float]:
    size = mib * 1024 * 1024

    def ours() -> float:
        s = BlockScratch(size, root / "wipe")
        try:
            subprocess.run(["dd", "if=/dev/urandom", f"of={s.mountpoint}/fill", "bs=4M", f"count={max(1, mib // 8)}",
                            "status=none"], check=True, timeout=600)
            return timed(s.wipe)
        except BaseException:
            s._teardown_quietly()
            raise

    def baseline(in_place: bool) -> float:
        """dd: zeros with fsync, then an uncached read-back. `in_place`: over a file that already holds the
        scratch's size of written data in the page cache (conv=notrunc), as the wipe overwrites its backing
        file; otherwise into a new file, which also pays for allocating every page and block."""
        f = root / "dd.img"
        if in_place:
            subprocess.run(["dd", "if=/dev/urandom", f"of={f}", "bs=4M", f"count={mib // 4}", "status=none"],
                           check=True, timeout=600)
        t = timed(lambda: (
            subprocess.run(["dd", "if=/dev/zero", f"of={f}", "bs=4M", f"count={mib // 4}", "conv=fsync,notrunc",
                            "status=none"], check=True, timeout=600),
            subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=4M", "iflag=direct", "status=none"], check=True,
                           timeout=600)))
        f.unlink()
        return t

    return ours(), baseline(False), baseline(True)


def bench_quote(n: int, root: Path) -> tuple[float, float, int]:
    pair = loopback_pair(root, BOOT)
    server, agent, ch = pair.server, pair.agent, pair.channel

    def serve() -> None:
        with contextlib.suppress(AgentError):  # the channel closes when the bench ends
            ch.serve()

    threading.Thread(target=serve, daemon=True).start()
    server.wait_for_agent(10)
    try:
        trip = med(lambda: server.relay(os.urandom(32)), n)
        local = med(lambda: agent.handle_quote({"nonce": "0x" + os.urandom(32).hex()}), n)
        rotations = server.wait_for_agent(0).rotations
    finally:
        pair.close()
    return trip, local, rotations


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--launches", type=int, default=5)
    p.add_argument("--wipe-mib", type=int, default=1024)
    p.add_argument("--quotes", type=int, default=30)
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_node needs root (loop devices, cgroups, seccomp audit)")
    with tempfile.TemporaryDirectory(prefix="trustcap-bench-node-", dir="/var/tmp") as tmp:
        root = Path(tmp)
        iso, plain, floor = bench_launch(args.launches, root)
        print(f"launch  isolated run {iso:7.3f} s  | docker run --rm {plain:7.3f} s | ratio {iso / plain:5.2f}x "
              f"(median of {args.launches})")
        mib = IsolationSpec(image=IMAGE, command=("true",)).scratch_bytes >> 20
        print(f"launch  isolated run {iso:7.3f} s  | docker run --rm + dd fill/fsync/uncached read-back of the "
              f"{mib} MiB scratch {plain + floor:7.3f} s | ratio {iso / (plain + floor):5.2f}x "
              f"(the dd alone is {floor / plain:4.2f}x the docker run)")
        w, dd, dd_over = bench_wipe(args.wipe_mib, root)
        print(f"wipe    {args.wipe_mib} MiB verified {w:7.3f} s | dd fill+read-back (new file) {dd:7.3f} s | "
              f"ratio {w / dd:5.2f}x")
        print(f"wipe    {args.wipe_mib} MiB verified {w:7.3f} s | dd overwrite+read-back (a written, cached file, "
              f"as the wipe's) {dd_over:7.3f} s | ratio {w / dd_over:5.2f}x")
        trip, local, rot = bench_quote(args.quotes, root)
        print(f"quote   via gateway {trip * 1000:8.2f} ms | local measure+sign {local * 1000:8.2f} ms | "
              f"ratio {trip / local:5.2f}x ({rot} key rotations, median of {args.quotes})")


if __name__ == "__main__":
    main()
