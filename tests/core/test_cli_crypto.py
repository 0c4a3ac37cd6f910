"""`trustcap keys new`, `seal`, `open` as a user runs them (subprocess): round trip, and every failure
is one clear line on stderr with a non-zero exit, never a traceback, and never a partial output file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TRUSTCAP = [sys.executable, "-P", "-m", "trustcap.cli"]


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TRUSTCAP, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.fixture
def world(tmp_path: Path) -> Path:
    for who in ("alice", "bob", "mallory"):
        r = run("keys", "new", "--out", who, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    (tmp_path / "plain").write_bytes(os.urandom(200_000))
    return tmp_path


def test_keys_new_writes_a_private_secret_and_a_public_key(world: Path) -> None:
    assert (world / "alice" / "key").stat().st_mode & 0o777 == 0o600
    pub = (world / "alice" / "key.pub").read_text().strip()
    assert pub.startswith("0x0") and len(pub) == 68
    r = run("keys", "new", "--out", "alice", cwd=world)
    assert r.returncode == 1 and "refusing to overwrite" in r.stderr


def test_seal_and_open_round_trip_for_each_recipient(world: Path) -> None:
    r = run("seal", "--to", "alice/key.pub", "--to", "bob/key.pub", "--in", "plain", "--out", "sealed",
            "--key", "bob/key", "--capsule-id", "11" * 32, cwd=world)
    assert r.returncode == 0, r.stderr
    for who in ("alice", "bob"):
        r = run("open", "--key", f"{who}/key", "--in", "sealed", "--out", f"{who}.out", "--owner", "bob/key.pub",
                "--capsule-id", "11" * 32, cwd=world)
        assert r.returncode == 0, r.stderr
        assert (world / f"{who}.out").read_bytes() == (world / "plain").read_bytes()


def _tamper(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 1
    path.write_bytes(bytes(data))


def _tamper_signature(path: Path) -> None:
    _tamper(path, at=-40)  # inside the owner's 65-byte signature at the end, every chunk left intact


BOUND = "11" * 32  # the capsule id every envelope below is sealed to, by bob


def _open(key: str = "alice/key", owner: str = "bob/key.pub", capsule_id: str | None = BOUND) -> list[str]:
    """`trustcap open` with the honest owner and the envelope's binding unless a case changes one."""
    return ["open", "--key", key, "--owner", owner, *(["--capsule-id", capsule_id] if capsule_id else [])]


def _seal_bound(world: Path) -> None:
    r = run("seal", "--to", "alice/key.pub", "--in", "plain", "--out", "sealed", "--key", "bob/key",
            "--capsule-id", BOUND, cwd=world)
    assert r.returncode == 0, r.stderr


def test_open_with_the_honest_owner_and_binding_succeeds(world: Path) -> None:
    """Positive control of the failure cases below: the same envelope, opened as they open it but unchanged."""
    _seal_bound(world)
    r = run(*_open(), "--in", "sealed", "--out", "out", cwd=world)
    assert r.returncode == 0, r.stderr
    assert (world / "out").read_bytes() == (world / "plain").read_bytes()


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        pytest.param(None, _open(key="mallory/key"), "not a recipient", id="wrong-key"),
        pytest.param(_tamper, _open(), "chunk 1 does not authenticate", id="tampered"),
        pytest.param(_tamper_signature, _open(), "signature does not verify", id="signature-tampered"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:-100]), _open(), "header says", id="truncated"),
        pytest.param(None, _open(capsule_id="22" * 32), "bound to capsule", id="replayed-for-another-capsule"),
        pytest.param(None, _open(capsule_id=None), f"bound to capsule 0x{BOUND}, not 0x{'00' * 32}",
                     id="bound-envelope-opened-as-unbound"),
        pytest.param(None, _open(owner="mallory/key.pub"), "expected owner", id="other-owner"),
        pytest.param(lambda p: (p.parent / "alice" / "key").chmod(0o644), _open(), "chmod 600",
                     id="key-open-to-others"),
        pytest.param(None, _open(key="nobody/key"), "does not exist", id="missing-key"),
        pytest.param(None, _open(owner="nobody.pub"), "cannot read public key file", id="missing-owner-key"),
        pytest.param(None, _open(capsule_id="12"), "--capsule-id must be 32 bytes", id="bad-capsule-id"),
    ],
)
def test_open_failures_are_one_clear_line(world: Path, setup: object, args: list[str], message: str) -> None:
    _seal_bound(world)
    if callable(setup):
        setup(world / "sealed")
    r = run(*args, "--in", "sealed", "--out", "out", cwd=world)
    assert r.returncode == 1
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (world / "out").exists()
    assert not [p for p in world.iterdir() if p.name.endswith(".partial")]


def test_open_without_owner_is_refused_by_the_command_line(world: Path) -> None:
    _seal_bound(world)
    r = run("open", "--key", "alice/key", "--capsule-id", BOUND, "--in", "sealed", "--out", "out", cwd=world)
    assert r.returncode == 2  # argparse's usage error, before any key is read
    assert "the following arguments are required: --owner" in r.stderr and "Traceback" not in r.stderr
    assert not (world / "out").exists()


def test_open_refuses_an_envelope_signed_by_a_one_off_key(world: Path) -> None:
    """Sealed without --key, the envelope proves no owner; an opener naming the owner it expects refuses it."""
    r = run("seal", "--to", "alice/key.pub", "--in", "plain", "--out", "sealed", cwd=world)
    assert r.returncode == 0, r.stderr
    r = run(*_open(capsule_id=None), "--in", "sealed", "--out", "out", cwd=world)
    assert r.returncode == 1 and "expected owner" in r.stderr and "Traceback" not in r.stderr
    assert not (world / "out").exists()


def test_unbound_envelope_opens_without_binding_flags(world: Path) -> None:
    r = run("seal", "--to", "alice/key.pub", "--in", "plain", "--out", "sealed", "--key", "bob/key", cwd=world)
    assert r.returncode == 0, r.stderr
    r = run(*_open(capsule_id=None), "--in", "sealed", "--out", "out", cwd=world)
    assert r.returncode == 0, r.stderr
    assert (world / "out").read_bytes() == (world / "plain").read_bytes()
    r = run(*_open(), "--in", "sealed", "--out", "out2", cwd=world)  # and is not taken for a bound one
    assert r.returncode == 1 and "bound to capsule" in r.stderr
    assert not (world / "out2").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--to", "nobody.pub"], "cannot read public key file", id="missing-pubkey"),
        pytest.param(["--to", "plain"], "public key", id="not-a-pubkey"),
        pytest.param(["--to", "alice/key.pub", "--in", "missing"], "cannot seal", id="missing-input"),
    ],
)
def test_seal_failures_are_one_clear_line(world: Path, args: list[str], message: str) -> None:
    full = ["seal", *args]
    if "--in" not in args:
        full += ["--in", "plain"]
    r = run(*full, "--out", "sealed", cwd=world)
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (world / "sealed").exists()
