"""Monitor records are exported before the in-memory window can drop them (issue 4, defect 8).

The real server, channel, agent and appraisal (the `pair` fixture); the journal is a real file. The
claims: every record reaches every sink (more records than memory keeps), the journal holds them all
as JSON lines across rotations up to its stated bound, the Prometheus counter counts each outcome, and a
failing sink never stops monitoring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trustcap.gateway.errors import GatewayError
from trustcap.gateway.monitor import CHECKS, CheckRecord, JournalSink, Monitor
from trustcap.gateway.policy import parse_gateway_policy


def _count(outcome: str, action: str) -> float:
    return float(CHECKS.labels(outcome=outcome, action=action)._value.get())


def _journal_lines(sink: JournalSink) -> list[dict[str, Any]]:
    return [json.loads(line) for p in sink.files() for line in p.read_text().splitlines()]


def test_every_record_is_exported_before_memory_drops_it(pair: Any, policy_yaml: Any, tmp_path: Path) -> None:
    seen: list[CheckRecord] = []
    journal = JournalSink(tmp_path / "monitor.jsonl", node_id="hpc-1")
    mon = Monitor(pair.server, parse_gateway_policy(policy_yaml()), sinks=[seen.append, journal], keep=3)
    recs = [mon.check_once() for _ in range(5)]
    pair.measurements["kernel"] = "0x" + "99" * 32
    recs.append(mon.check_once())
    assert list(mon.records) == recs[-3:]  # memory keeps the window it says
    assert seen == recs  # ... and nothing was lost to it
    lines = _journal_lines(journal)
    assert [ln["quote_digest"] for ln in lines] == [r.quote_digest for r in recs]
    assert {ln["node"] for ln in lines} == {"hpc-1"}
    assert lines[-1]["ok"] is False and lines[-1]["failed"][0]["id"] == "policy.measurements.kernel.mismatch"
    assert (tmp_path / "monitor.jsonl").stat().st_mode & 0o777 == 0o600


def test_the_counter_counts_each_outcome(pair: Any, policy_yaml: Any) -> None:
    mon = Monitor(pair.server, parse_gateway_policy(policy_yaml()))
    passed, failed = _count("passed", "none"), _count("failed", "stop")
    mon.check_once()
    pair.measurements["kernel"] = "0x" + "99" * 32
    mon.check_once()
    assert (_count("passed", "none"), _count("failed", "stop")) == (passed + 1, failed + 1)


def test_the_journal_rotates_and_keeps_what_it_says(tmp_path: Path) -> None:
    sink = JournalSink(tmp_path / "j.jsonl", node_id="hpc-1", max_bytes=1024, backups=2)
    for i in range(40):  # each line is ~150 bytes: several rotations
        sink(CheckRecord(at=float(i), ok=True, failed=[], action="none", policy_digest="0x" + "00" * 32))
    files = sink.files()
    assert [p.name for p in files] == ["j.jsonl.2", "j.jsonl.1", "j.jsonl"]
    assert all(p.stat().st_size <= 1024 for p in files)
    ats = [ln["at"] for ln in _journal_lines(sink)]
    assert ats == sorted(ats) and ats[-1] == 39.0, "oldest first, newest last, contiguous"
    assert ats == [float(i) for i in range(int(ats[0]), 40)]


@pytest.mark.parametrize(("kwargs", "named"), [
    pytest.param({"max_bytes": 10}, "max_bytes=10", id="tiny-max-bytes"),
    pytest.param({"backups": 0}, "backups=0", id="no-backups"),
])
def test_bad_journal_settings_are_named(tmp_path: Path, kwargs: dict[str, int], named: str) -> None:
    with pytest.raises(GatewayError, match=named):
        JournalSink(tmp_path / "j.jsonl", node_id="hpc-1", **kwargs)


def test_a_failing_sink_never_stops_monitoring(pair: Any, policy_yaml: Any) -> None:
    def broken(_: CheckRecord) -> None:
        raise OSError(28, "No space left on device")

    seen: list[CheckRecord] = []
    mon = Monitor(pair.server, parse_gateway_policy(policy_yaml()), sinks=[broken, seen.append])
    rec = mon.check_once()
    assert rec.ok and seen == [rec] and list(mon.records) == [rec]
