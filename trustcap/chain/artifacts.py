"""Compiled contracts (contracts/artifacts/*.json, written by contracts/compile.mjs and committed).

The artifacts are committed so that running trustcap needs no Solidity compiler; a test recompiles and
checks that they are byte-for-byte what the pinned solc-js makes. `TRUSTCAP_CONTRACTS_DIR` points at
another `contracts/` folder (an installed, non-editable trustcap has none of its own).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from eth_utils.crypto import keccak

from trustcap.chain.errors import ERROR_SELECTORS, ArtifactError

__all__ = ["CONTRACTS", "Artifact", "contracts_dir", "load"]

CONTRACTS = ("NodeRegistry", "AttestationLog", "Reputation", "TaskEscrow", "NaiveLog")


@dataclass(frozen=True)
class Artifact:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str


def contracts_dir() -> Path:
    env = os.environ.get("TRUSTCAP_CONTRACTS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "contracts"


def _canonical_type(item: dict[str, Any]) -> str:
    t = str(item["type"])
    if t.startswith("tuple"):
        return "(" + ",".join(_canonical_type(c) for c in item["components"]) + ")" + t[len("tuple"):]
    return t


@cache
def load(name: str) -> Artifact:
    if name not in CONTRACTS:
        raise ArtifactError(f"unknown contract {name!r}; known: {', '.join(CONTRACTS)}")
    path = contracts_dir() / "artifacts" / f"{name}.json"
    try:
        data = json.loads(path.read_text())
        art = Artifact(name=name, abi=list(data["abi"]), bytecode=str(data["bytecode"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"cannot read the artifact {path}: {exc} (run: node contracts/compile.mjs)") from exc
    for item in art.abi:
        if item.get("type") == "error":
            types = [_canonical_type(i) for i in item["inputs"]]
            sig = f"{item['name']}({','.join(types)})"
            ERROR_SELECTORS["0x" + keccak(text=sig)[:4].hex()] = (item["name"], types)
    return art


def load_all() -> dict[str, Artifact]:
    return {n: load(n) for n in CONTRACTS}
