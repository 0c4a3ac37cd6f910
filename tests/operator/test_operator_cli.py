"""`python -m trustcap.operator` flags: scope and peering choices that contradict each other are refused."""

from __future__ import annotations

import pytest

from trustcap.operator.__main__ import build_parser, default_priority


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["-n", "a", "-A"], id="namespace-and-all-namespaces"),
        pytest.param(["--standalone", "--peering", "trustcap"], id="standalone-and-peering"),
        pytest.param(["--priority", "high"], id="priority-not-int"),
    ],
)
def test_contradictions_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_repeatable_namespaces() -> None:
    args = build_parser().parse_args(["-n", "a", "--namespace", "b-*", "--peering", "trustcap"])
    assert args.namespace == ["a", "b-*"] and args.peering == "trustcap" and not args.standalone


def test_default_priorities_are_positive_and_spread() -> None:
    """Replicas must not tie (kopf pauses all of them on a tie): 50 draws, no repeat, all above kopf's 0."""
    draws = [default_priority() for _ in range(50)]
    assert all(0 < d < 2**31 for d in draws)
    assert len(set(draws)) == len(draws)
