"""Every kopf timer of the operator has a timeout (issue 10 item 4): a timer stuck on an API server or an
RPC endpoint that never answers must fail and retry, not hold its object's handler forever."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _timers() -> list[tuple[str, ast.Call]]:
    found = []
    for path in sorted((ROOT / "operator").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "timer" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "kopf":
                found.append((f"{path.name}:{node.lineno}", node))
    return found


@pytest.mark.parametrize(("where", "call"), _timers(), ids=[w for w, _ in _timers()])
def test_the_timer_has_a_timeout(where: str, call: ast.Call) -> None:
    assert any(k.arg == "timeout" for k in call.keywords), f"{where}: give the kopf.timer a timeout="


def test_the_operator_has_timers_to_check() -> None:  # the check above cannot pass by finding none
    assert len(_timers()) >= 4
