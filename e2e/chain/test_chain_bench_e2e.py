"""The committed gas figures (bench/results/chain.json) are what a fresh run measures: gas is deterministic,
so any change to the contracts, compiler settings or batching shows up here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_fresh_bench_run_reproduces_committed_gas_figures() -> None:
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "bench" / "bench_chain_gas.py"), "--check"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((ROOT / "bench" / "results" / "chain.json").read_text())
    assert set(res["batch"]) == {"1", "10", "100", "1000"}
    assert res["ratio_batch_1000_vs_naive"] == round(
        res["batch"]["1000"]["gas_per_verdict"] / res["naive_gas_per_verdict"], 5)
