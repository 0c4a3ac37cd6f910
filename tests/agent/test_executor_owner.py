"""An executor's before/after snapshot looks only at its own resources on a shared engine.

Several agents share one Docker Engine in the test world (an HPC runs one): a run of another agent that
overlaps this one must not make this run's wipe unverified, and this agent's own leftovers must still."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trustcap.agent.executor import Executor


class _Listing:
    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.filters: list[Any] = []

    def list(self, **kw: Any) -> list[Any]:
        self.filters.append(kw.get("filters"))
        want = kw.get("filters", {}).get("label")
        if isinstance(want, list):  # ["io.trustcap.owner=<node>"]
            owner = want[0].split("=", 1)[1]
            return [i for i in self.items if i.labels.get("io.trustcap.owner") == owner]
        return list(self.items)


class _Container:
    def __init__(self, cid: str, owner: str) -> None:
        self.id, self.labels = cid, {"io.trustcap.run": "r", "io.trustcap.owner": owner}


class _Client:
    def __init__(self) -> None:
        self.containers = _Listing([])
        self.volumes = _Listing([])


def test_another_agents_run_does_not_change_this_agents_snapshot(tmp_path: Path) -> None:
    client = _Client()
    ex = Executor(client, scratch_root=tmp_path, owner="hpc-1")
    before = ex.snapshot()["digest"]
    client.containers.items.append(_Container("c-other", "hpc-2"))  # another agent's run, overlapping
    assert ex.snapshot()["digest"] == before
    client.containers.items.append(_Container("c-mine", "hpc-1"))  # control: this agent's leftover counts
    assert ex.snapshot()["digest"] != before and ex.snapshot()["containers"] == ["c-mine"]
    assert ex.labels("r1") == {"io.trustcap.run": "r1", "io.trustcap.owner": "hpc-1"}
