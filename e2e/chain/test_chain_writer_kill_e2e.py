"""The chain-writer is SIGKILLed 20 times between signing and sending, and 20 times between sending and the
receipt (a real process, killed by the kernel at that line): afterwards every verdict is on chain exactly
once, provable, and the writer's nonces run 0..n-1 without a gap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from chainkit import Chain, audit, deploy, make_verdict

from trustcap.chain.anvil import Anvil
from trustcap.chain.writer import KILLPOINT_ENV

HERE = Path(__file__).parent
KILLS = 20


def _run_child(chain: Chain, tmp: Path, verdicts: list[object], killpoint: str | None) -> int:
    vfile = tmp / "verdicts.json"
    vfile.write_text(json.dumps([v.model_dump() for v in verdicts]))  # type: ignore[attr-defined]
    dep = tmp / "deployment.json"
    chain.d.save(dep)
    env = dict(os.environ)
    env.pop(KILLPOINT_ENV, None)
    env["PYTHONPATH"] = str(HERE)  # chainkit; PYTHONSAFEPATH=1 (make test) keeps the script dir off sys.path
    if killpoint:
        env[KILLPOINT_ENV] = killpoint
    proc = subprocess.run(
        [sys.executable, "-P", str(HERE / "writer_child.py"), chain.anvil.url, str(dep), str(tmp / "journal.sqlite"),
         str(vfile), "1"], env=env, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode not in (0, -signal.SIGKILL):
        pytest.fail(f"writer child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("killpoint", [pytest.param("after_sign", id="between-sign-and-send"),
                                       pytest.param("after_send", id="between-send-and-receipt")])
def test_writer_killed_twenty_times_loses_and_doubles_nothing(tmp_path: Path, killpoint: str) -> None:
    with Anvil(log_file=tmp_path / "anvil.log") as anvil:
        chain = deploy(anvil)
        added: list[object] = []
        kills = 0
        for epoch in range(1, KILLS + 1):
            added += [make_verdict(epoch=epoch) for _ in range(3)]
            # every run re-adds everything so far: the journal must ignore what it already has
            if _run_child(chain, tmp_path, added, killpoint) == -signal.SIGKILL:
                kills += 1
        assert kills == KILLS, f"the writer was killed {kills} times, not {KILLS}"
        assert _run_child(chain, tmp_path, added, None) == 0
        result = audit(chain, tmp_path / "journal.sqlite", added)  # type: ignore[arg-type]
        assert result["batches"] == KILLS
        print(f"{killpoint}: {result}")


@pytest.mark.slow
def test_writer_killed_at_random_moments_loses_and_doubles_nothing(tmp_path: Path) -> None:
    """Kills from outside at random instants (mid-seal, mid-journal-write, mid-RPC, anywhere), 20 times."""
    import random
    import time

    rng = random.Random(0x7C)  # noqa: S311 - kill timing, not crypto; fixed seed so a failure reproduces
    with Anvil(log_file=tmp_path / "anvil.log") as anvil:
        chain = deploy(anvil)
        dep = tmp_path / "deployment.json"
        chain.d.save(dep)
        env = dict(os.environ)
        env.pop(KILLPOINT_ENV, None)
        env["PYTHONPATH"] = str(HERE)
        added: list[object] = []
        killed = 0
        for epoch in range(1, KILLS + 1):
            added += [make_verdict(epoch=epoch) for _ in range(3)]
            vfile = tmp_path / "verdicts.json"
            vfile.write_text(json.dumps([v.model_dump() for v in added]))  # type: ignore[attr-defined]
            proc = subprocess.Popen(
                [sys.executable, "-P", str(HERE / "writer_child.py"), anvil.url, str(dep),
                 str(tmp_path / "journal.sqlite"), str(vfile), "1"], env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(rng.uniform(0.3, 1.6))  # the child needs ~0.5 s to import, then works for ~1 s
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed += 1
            _, err = proc.communicate(timeout=60)
            assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-3000:]
        assert killed >= KILLS // 2, f"only {killed} of {KILLS} runs were killed mid-way"
        assert _run_child(chain, tmp_path, added, None) == 0
        result = audit(chain, tmp_path / "journal.sqlite", added)  # type: ignore[arg-type]
        print(f"random kills: {killed} killed, {result}")
