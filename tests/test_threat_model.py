"""docs/threat-model.md, checked: every test it cites exists, and every threat has a row.

The threat model names, for each threat, the test that shows it refused (`path::name`, or
`path::Class::method`). A test renamed or deleted away would leave the document citing nothing, and a
reader trusting a refusal that no test checks any more. So each citation is resolved against the source
with `ast` (no import: e2e modules need a real stack to import their fixtures), and the document's two
tables must hold every seed threat and every issue 12 item, each item with a status and, unless it is
open, the test behind it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "threat-model.md"
# `tests/core/test_evidence.py::test_replayed_nonce_is_refused`, `e2e/x.py::TestY::test_z`
CITATION = re.compile(r"`((?:tests|e2e)/[\w./-]+\.py)::([A-Za-z_]\w*(?:::[A-Za-z_]\w*)?)`")
SEED_THREATS = ("malicious node", "side channel", "replay", "tampered image", "hardware change", "egress",
                "leftover data", "colluding verifiers")
STATUSES = ("fixed", "partly", "open")
ISSUE_ITEMS = range(1, 21)


def citations(text: str) -> list[tuple[str, str]]:
    """Every (path, name) the text cites, in order, once each."""
    return list(dict.fromkeys(CITATION.findall(text)))


def unresolved(path: str, name: str, root: Path = ROOT) -> str:
    """Why `path::name` does not name a test in the repository, or "" when it does."""
    source = root / path
    if not source.is_file():
        return f"{path} does not exist"
    try:
        tree = ast.parse(source.read_text(), filename=str(source))
    except SyntaxError as exc:
        return f"{path} does not parse: {exc}"
    scope: list[ast.stmt] = tree.body
    parts = name.split("::")
    for depth, part in enumerate(parts):
        found = next((n for n in scope if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                      and n.name == part), None)
        if found is None:
            where = path if depth == 0 else f"{path}::{'::'.join(parts[:depth])}"
            return f"{where} defines no {part}"
        if depth < len(parts) - 1:
            if not isinstance(found, ast.ClassDef):
                return f"{path}::{part} is not a class, so it has no {parts[depth + 1]}"
            scope = found.body
    return ""


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table under `heading` (cells stripped)."""
    section = text.split(heading, 1)
    assert len(section) == 2, f"docs/threat-model.md has no section {heading!r}"
    rows = []
    for line in section[1].splitlines():
        if line.startswith("## "):
            break
        if line.startswith("|") and not re.match(r"^\|[\s|:-]+\|$", line):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[1:]  # the first row is the header


@pytest.fixture(scope="module")
def doc() -> str:
    assert DOC.is_file(), "docs/threat-model.md is missing"
    return DOC.read_text()


def test_every_cited_test_exists(doc: str) -> None:
    cited = citations(doc)
    assert len(cited) >= 40, f"only {len(cited)} citations found: is the `path::name` form still used?"
    missing = [f"{p}::{n}: {why}" for p, n in cited if (why := unresolved(p, n))]
    assert not missing, "docs/threat-model.md cites tests that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize(("path", "name", "why"), [
    pytest.param("tests/test_threat_model.py", "test_every_cited_test_exists", "", id="real-function"),
    pytest.param("tests/test_threat_model.py", "test_a_citation_renamed_away", "defines no", id="renamed-function"),
    pytest.param("tests/no_such_file.py", "test_x", "does not exist", id="missing-file"),
    pytest.param("tests/test_threat_model.py", "unresolved::x", "is not a class", id="method-of-a-function"),
    pytest.param("tests/test_threat_model.py", "DOC", "defines no", id="a-constant-is-not-a-test"),
])
def test_a_wrong_citation_is_named(path: str, name: str, why: str) -> None:
    got = unresolved(path, name)
    assert (why in got) if why else got == "", got


def test_citations_are_read_from_backticked_path_and_name() -> None:
    text = ("see `tests/core/test_evidence.py::test_replayed_nonce_is_refused` and "
            "`e2e/chain/test_x.py::TestY::test_z`; not tests/a.py::b nor `trustcap/vrf.py::prove`")
    assert citations(text) == [("tests/core/test_evidence.py", "test_replayed_nonce_is_refused"),
                               ("e2e/chain/test_x.py", "TestY::test_z")]


def test_every_seed_threat_has_a_row_with_a_test(doc: str) -> None:
    rows = _table_rows(doc, "## The seed's threats")
    problems = []
    for threat in SEED_THREATS:
        row = next((r for r in rows if threat in r[0].lower()), None)
        if row is None:
            problems.append(f"{threat}: no row")
        elif not citations(" ".join(row)):
            problems.append(f"{threat}: no test cited")
    assert not problems, problems


def test_every_issue_12_item_has_a_status_and_unless_open_a_test(doc: str) -> None:
    rows = {r[0]: r for r in _table_rows(doc, "## Issue 12, item by item")}
    problems = []
    for item in ISSUE_ITEMS:
        row = rows.get(str(item))
        if row is None:
            problems.append(f"item {item}: no row")
            continue
        status = row[1].split()[0].lower() if row[1] else ""
        if status not in STATUSES:
            problems.append(f"item {item}: status {row[1]!r} is not one of {', '.join(STATUSES)}")
        elif status != "open" and not citations(" ".join(row)):
            problems.append(f"item {item}: {status} but no test cited")
    assert not problems, problems
