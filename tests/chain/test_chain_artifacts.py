"""The committed contract artifacts are exactly what the pinned solc-js makes from the sources: recompile
with contracts/compile.mjs --check (settings pinned there: optimizer 200 runs, evm cancun, no metadata hash)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from trustcap.chain import artifacts

CONTRACTS = Path(__file__).resolve().parents[2] / "contracts"


@pytest.mark.slow
def test_artifacts_recompile_byte_for_byte() -> None:
    if shutil.which("node") is None or not (CONTRACTS / "node_modules" / "solc").is_dir():
        pytest.fail("solc-js is not installed: run scripts/install-chain-tools")
    proc = subprocess.run(["node", str(CONTRACTS / "compile.mjs"), "--check"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "5 artifacts match" in proc.stdout


def test_compiler_is_pinned_in_package_json_and_artifacts() -> None:
    pkg = json.loads((CONTRACTS / "package.json").read_text())
    assert pkg["devDependencies"]["solc"] == "0.8.30"
    assert pkg["dependencies"]["@openzeppelin/contracts"] == "5.4.0"
    for name in artifacts.CONTRACTS:
        data = json.loads((CONTRACTS / "artifacts" / f"{name}.json").read_text())
        assert data["compiler"]["version"].startswith("0.8.30+commit.")
        assert data["compiler"]["settings"]["metadata"] == {"bytecodeHash": "none", "appendCBOR": False}
        code = artifacts.load(name).bytecode
        assert code.startswith("0x") and len(code) > 200 and int(code, 16) > 0
