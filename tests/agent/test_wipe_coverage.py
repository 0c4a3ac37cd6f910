"""What the agent's wipe proofs say they do not cover (issue 12 item 19), read from the kernel's own files.

`/proc/cmdline` and `/proc/swaps` are replaced by files of the test's making, so each kernel the HPC may
boot is a case: with and without init_on_free=1, with swap, without, and unreadable. The proofs are the
real ones of the tmpfs path and of a host file's overwrite (neither needs root; the block path is the
e2e's, e2e/node/test_wipe.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import trustcap.agent.wipe as wipe

SWAPS_HEADER = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cmdline").write_text("console=ttyS0 quiet\n")
    (proc / "swaps").write_text(SWAPS_HEADER)
    monkeypatch.setattr(wipe, "_PROC_CMDLINE", proc / "cmdline")
    monkeypatch.setattr(wipe, "_PROC_SWAPS", proc / "swaps")
    return proc


def test_ram_is_stated_as_not_wiped_and_whether_the_kernel_zeroes_freed_pages(kernel: Path) -> None:
    gaps = wipe.memory_not_covered()
    assert len(gaps) == 1 and gaps[0].startswith("RAM:") and "does not zero freed pages" in gaps[0]
    (kernel / "cmdline").write_text("console=ttyS0 init_on_free=1 quiet\n")
    gaps = wipe.memory_not_covered()
    assert "RAM" in gaps[0] and "zeroes freed pages (init_on_free=1)" in gaps[0]
    (kernel / "cmdline").write_text("xinit_on_free=1\n")  # a look-alike option is not the kernel's
    assert "does not zero" in wipe.memory_not_covered()[0]


@pytest.mark.parametrize(("swaps", "expected"), [
    pytest.param(SWAPS_HEADER, None, id="no-swap"),
    pytest.param(SWAPS_HEADER + "/dev/sda2 partition 8388604 0 -2\n/swapfile file 1048572 0 -3\n",
                 "swap: 2 active swap area(s)", id="two-swap-areas"),
    pytest.param(None, "whether pages of the run were swapped out is unknown", id="unreadable"),
])
def test_swap_is_stated_when_there_is_any_or_when_it_is_unknown(kernel: Path, swaps: str | None,
                                                                expected: str | None) -> None:
    if swaps is None:
        (kernel / "swaps").unlink()
    else:
        (kernel / "swaps").write_text(swaps)
    gaps = wipe.memory_not_covered()
    if expected is None:
        assert not any(g.startswith("swap") for g in gaps), gaps
    else:
        assert any(expected in g for g in gaps), gaps


def test_the_tmpfs_proof_states_its_scratch_and_the_ram_as_not_covered(kernel: Path) -> None:
    proof = wipe.TmpfsScratch(1 << 20, "/scratch").wipe()
    assert proof["verified"] is False
    assert proof["not_covered"][0].startswith("the scratch itself")
    assert any(g.startswith("RAM:") for g in proof["not_covered"])


def test_a_verified_file_overwrite_still_states_what_it_does_not_cover(kernel: Path, tmp_path: Path) -> None:
    """The positive case is the one that matters: a proof that says verified: true names its limits."""
    log = tmp_path / "c-json.log"
    log.write_bytes(b'{"log":"out\\n"}\n' * 50)
    proof = wipe.overwrite_file(log, "log")
    assert proof["verified"] is True
    gaps = " | ".join(proof["not_covered"])
    assert "RAM:" in gaps and "the host file system under c-json.log" in gaps
    assert "unknown" not in gaps.split("under c-json.log (")[1].split(")")[0]  # the host fs is named
