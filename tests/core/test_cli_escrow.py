"""`trustcap escrow fund|status|refund` against a real anvil with the contracts deployed: the line the
operator prints in a Capsule's Funded condition funds the task as it is, and every refusal (chain down,
unknown task, the contract's reverts, a readable key file) is one line naming the cause and the fix."""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trustcap.chain.anvil import Anvil, anvil_path, free_port
from trustcap.chain.client import ChainClient, Deployment
from trustcap.chain.errors import ChainError
from trustcap.chain.escrow import Escrow, deploy_network
from trustcap.chain.keys import ANVIL_KEYS, KeySigner
from trustcap.cli import main

PAYER, OTHER = KeySigner(ANVIL_KEYS[1]), KeySigner(ANVIL_KEYS[5])


def _have_anvil() -> bool:
    try:
        anvil_path()
    except ChainError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _have_anvil(), reason="anvil is not installed (scripts/install-chain-tools)")


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Anvil, Path]]:
    with Anvil() as anvil:
        d = deploy_network(anvil.url, KeySigner(ANVIL_KEYS[0]), [])
        path = tmp_path_factory.mktemp("chain") / "deployment.json"
        d.save(path)
        yield anvil, path


@pytest.fixture
def env(chain: tuple[Anvil, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """What `trustcap world up` exports: the chain, its deployment and the payer's key file (0600)."""
    anvil, deployment = chain
    key = tmp_path / "payer.key"
    key.write_text(ANVIL_KEYS[1] + "\n")
    key.chmod(0o600)
    monkeypatch.setenv("TRUSTCAP_CHAIN_RPC", anvil.url)
    monkeypatch.setenv("TRUSTCAP_CHAIN_DEPLOYMENT", str(deployment))
    monkeypatch.setenv("TRUSTCAP_PAYER_KEY", str(key))
    return tmp_path


def _task() -> str:
    return "0x" + os.urandom(32).hex()


def _escrow(chain: tuple[Anvil, Path]) -> Escrow:
    anvil, deployment = chain
    return Escrow(ChainClient(anvil.url, PAYER), Deployment.load(deployment))


def _fund(task: str, *extra: str, k: str = "3", wei: str = "1000", seconds: str = "900") -> int:
    return main(["escrow", "fund", "--task-id", task, "--k", k, "--amount-wei", wei, "--deadline-seconds", seconds,
                 *extra])


def _fund_hint(task: bytes) -> str:
    from trustcap.operator.capsule import Driver

    capsule: dict[str, Any] = {"spec": {"committee": {"size": 3}, "payment": {"amountWei": "1000000000000000"},
                                        "timeoutSeconds": 60}}
    hint: str = object.__new__(Driver)._fund_hint(capsule, task)  # the message only reads the capsule
    return hint


def test_the_operators_fund_hint_funds_the_task_as_printed(env: Path, chain: tuple[Anvil, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    task = os.urandom(32)
    hint = _fund_hint(task)
    argv = shlex.split(hint[hint.index("trustcap escrow fund"):])
    before = time.time()
    assert main(argv[1:]) == 0, capsys.readouterr().err
    assert f"funded task 0x{task.hex()}" in capsys.readouterr().out
    info = _escrow(chain).task(task)
    assert info is not None and info.state == "Funded" and info.payer == PAYER.address.lower()
    assert info.payment == 10**15 and info.k == 3
    seconds = int(argv[argv.index("--deadline-seconds") + 1])
    assert before + seconds - 5 <= info.deadline <= time.time() + seconds + 5


def test_status_shows_the_task_as_the_escrow_holds_it(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = _task()
    assert _fund(task, wei="4242") == 0
    capsys.readouterr()
    assert main(["escrow", "status", "--task-id", task]) == 0
    out = capsys.readouterr().out
    assert "Funded" in out and "4242 wei" in out and PAYER.address.lower() in out and "not assigned yet" in out


def test_funding_twice_is_refused_naming_the_revert(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = _task()
    assert _fund(task) == 0
    assert _fund(task) == 1
    err = capsys.readouterr().err
    assert "TaskExists" in err and "escrow status" in err and "Traceback" not in err


@pytest.mark.parametrize(("kw", "expected"), [
    pytest.param({"k": "4"}, "InvalidCommitteeSize", id="even-committee"),
    pytest.param({"wei": "0"}, "NoPayment", id="no-payment"),
    pytest.param({"seconds": str(400 * 86400)}, "DeadlineTooFar", id="deadline-too-far"),
    pytest.param({"seconds": "0"}, "must be positive", id="deadline-not-positive"),
])
def test_a_refused_fund_names_the_cause(env: Path, kw: dict[str, str], expected: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert _fund(_task(), **kw) == 1
    assert expected in capsys.readouterr().err


def test_an_unknown_task_says_how_it_comes_to_exist(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["escrow", "status", "--task-id", _task()]) == 1
    err = capsys.readouterr().err
    assert "no escrow task" in err and "trustcap escrow fund" in err


def test_an_unreachable_chain_names_its_url_and_how_to_start_it(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["escrow", "status", "--task-id", _task(), "--rpc", url]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the chain at {url}" in err and "trustcap world up" in err


def test_refund_waits_for_the_deadline_and_only_the_payer_takes_it(env: Path, chain: tuple[Anvil, Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    anvil, _ = chain
    task = _task()
    assert _fund(task, seconds="60") == 0
    assert main(["escrow", "refund", "--task-id", task]) == 1
    assert "DeadlineNotReached" in capsys.readouterr().err
    anvil.rpc("evm_increaseTime", [120])
    anvil.rpc("evm_mine")
    other = env / "other.key"
    other.write_text(ANVIL_KEYS[5])
    other.chmod(0o600)
    assert main(["escrow", "refund", "--task-id", task, "--key", str(other)]) == 1
    err = capsys.readouterr().err
    assert "NotPayer" in err and PAYER.address in err
    assert main(["escrow", "refund", "--task-id", task]) == 0, capsys.readouterr().err
    assert "refunded" in capsys.readouterr().out
    info = _escrow(chain).task(bytes.fromhex(task[2:]))
    assert info is not None and info.state == "Refunded"
    assert main(["escrow", "refund", "--task-id", task]) == 1
    assert "WrongState: the task is Refunded" in capsys.readouterr().err


@pytest.mark.parametrize(("setup", "expected"), [
    pytest.param(lambda p: (p.write_text(ANVIL_KEYS[1]), p.chmod(0o644)), "chmod 600", id="readable-by-others"),
    pytest.param(lambda p: (p.write_text("not hex"), p.chmod(0o600)), "not a secp256k1 private key", id="not-hex"),
    pytest.param(lambda p: (p.write_text("00" * 32), p.chmod(0o600)), "not a secp256k1 private key", id="zero-key"),
    pytest.param(lambda p: None, "does not exist", id="missing"),
])
def test_a_bad_payer_key_file_is_refused_before_the_chain(env: Path, setup: Any, expected: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    key = env / "bad.key"
    setup(key)
    assert _fund(_task(), "--key", str(key)) == 1
    assert expected in capsys.readouterr().err


def test_a_task_id_that_is_not_32_bytes_is_refused(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["escrow", "status", "--task-id", "0x1234"]) == 1
    assert "status.taskId" in capsys.readouterr().err
