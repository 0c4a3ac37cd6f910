"""The HPC agent's metrics, fetched over the channel and re-exported from this gateway's /metrics.

Nobody can scrape the HPC: on a real network only the agent channel crosses the Pi-HPC link. So the
agent keeps its own registry (trustcap.agent.metrics) and answers a `metrics` channel operation with
its text exposition; this gateway takes the snapshot in and serves it, with a `node` label naming its
HPC, from the relay's /metrics (the relay serves prometheus_client's default REGISTRY, on which
`COLLECTOR` is registered at import). Decision 0117.

    Prometheus          relay /metrics            AgentMetricsPoller            agent (HPC)
      |-- GET /metrics -->| COLLECTOR.collect():     | every interval_s:          |
      |                   |   last accepted snapshot |-- REQ metrics {} =========>| REGISTRY
      |<-- text ----------|   + node="<hpc>"         |<== {exposition} ===========|
      |                   |                          | bound, parse, relabel, keep (or refuse all)

Why a kept snapshot and not a fetch on scrape: /metrics is unauthenticated, and the channel serves one
request at a time (AgentSession holds a lock with no timeout) for the committees' quotes and the
runner's capsule ops. A fetch on scrape would let anyone who reaches the relay port put traffic on the
HPC link and queue in front of a quote, and a hung agent would hang the scrape. The poller asks at its
own fixed rate instead; a snapshot older than `max_age_s` is dropped, so the series go stale in
Prometheus rather than repeat a number the agent no longer vouches for.

The agent is less trusted than its gateway (a compromised HPC controls what it answers), so what it
can inject is bounded, and a snapshot that breaks a bound is refused whole (counted by reason in
`trustcap_gateway_agent_metrics_refused_total`), never trimmed into something half true:
- at most `MAX_BYTES` of text and `MAX_SERIES` samples;
- only families named `trustcap_agent_*`, of type counter, gauge or histogram (so it cannot pose as
  the gateway's or the operator's metrics, and no `_created` timestamps in the agent's clock);
- at most `MAX_LABELS` labels a sample, label values of at most `MAX_LABEL_VALUE` characters, help
  text cut to `MAX_HELP`;
- the `node` label is always this gateway's HPC: one the agent sends is overwritten, so an HPC cannot
  speak for another node.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Protocol

from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from trustcap.errors import TrustcapError
from trustcap.gateway._loop import PollingLoop

__all__ = ["COLLECTOR", "AgentMetricsCollector", "AgentMetricsPoller", "Refused", "accept"]

log = logging.getLogger("trustcap.gateway")

PREFIX: Final = "trustcap_agent_"
MAX_BYTES: Final = 64 * 1024
MAX_SERIES: Final = 500   # the agent exports about 120 (trustcap.agent.metrics); room for a few more
MAX_LABELS: Final = 4
MAX_LABEL_VALUE: Final = 64
MAX_HELP: Final = 256
TYPES: Final = frozenset({"counter", "gauge", "histogram"})
REASONS: Final = ("unavailable", "too_large", "unparsable", "foreign_name", "bad_type", "too_many_series",
                  "bad_labels")


class Refused(ValueError):
    """A snapshot the gateway does not re-export; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def accept(text: str, node: str) -> list[Metric]:
    """The families of an agent's exposition, bounded and labelled with `node`; Refused naming the bound."""
    if len(text.encode()) > MAX_BYTES:
        raise Refused("too_large", f"the agent's metrics are {len(text.encode())} bytes, more than {MAX_BYTES}")
    try:
        parsed = list(text_string_to_metric_families(text))
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise Refused("unparsable", f"the agent's metrics are not Prometheus text: {exc}") from exc
    out: list[Metric] = []
    series = 0
    for fam in parsed:
        if fam.type == "gauge" and fam.name.endswith("_created"):
            continue  # the creation time of a counter or histogram, in the agent's clock: not re-exported
        if not fam.name.startswith(PREFIX):
            raise Refused("foreign_name", f"the agent sent {fam.name!r}; only {PREFIX}* names are accepted")
        if fam.type not in TYPES:
            raise Refused("bad_type", f"{fam.name} is a {fam.type}; only {', '.join(sorted(TYPES))} are accepted")
        metric = Metric(fam.name, fam.documentation[:MAX_HELP], fam.type, fam.unit)
        for s in fam.samples:
            if not s.name.startswith(fam.name):
                raise Refused("foreign_name", f"sample {s.name!r} is not of family {fam.name}")
            series += 1
            if series > MAX_SERIES:
                raise Refused("too_many_series", f"the agent sent more than {MAX_SERIES} series")
            labels = {k: v for k, v in s.labels.items() if k != "node"}
            if len(labels) > MAX_LABELS or any(len(v) > MAX_LABEL_VALUE for v in labels.values()):
                raise Refused("bad_labels", f"{s.name}: more than {MAX_LABELS} labels or a value longer than "
                                            f"{MAX_LABEL_VALUE} characters")
            metric.samples.append(Sample(s.name, {**labels, "node": node}, s.value))
        out.append(metric)
    return out


@dataclass(frozen=True)
class _Snapshot:
    families: list[Metric]
    taken: float  # on the collector's clock


class AgentMetricsCollector(Collector):
    """prometheus_client collector of the agents' last accepted snapshots (one per node; a gateway
    serves one HPC) and of this re-export's own health."""

    def __init__(self, *, max_age_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.max_age_s = max_age_s
        self.clock, self.wall = clock, wall
        self._lock = threading.Lock()
        self._snapshots: dict[str, _Snapshot] = {}
        self._last_success: dict[str, float] = {}
        self._refused: dict[tuple[str, str], int] = {}

    def update(self, node: str, text: str) -> int:
        """Take an agent's exposition in; returns the series kept. Refused leaves no snapshot behind."""
        try:
            families = accept(text, node)
        except Refused as exc:
            self.refuse(node, exc.reason)
            raise
        with self._lock:
            self._snapshots[node] = _Snapshot(families, self.clock())
            self._last_success[node] = self.wall()
        return sum(len(f.samples) for f in families)

    def refuse(self, node: str, reason: str) -> None:
        with self._lock:
            self._snapshots.pop(node, None)
            key = (node, reason if reason in REASONS else "unparsable")
            self._refused[key] = self._refused.get(key, 0) + 1

    def describe(self) -> Iterable[Metric]:
        return []  # the agents' names are theirs; none is fixed here, so no registry-wide name check

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        with self._lock:
            for node in [n for n, s in self._snapshots.items() if now - s.taken > self.max_age_s]:
                del self._snapshots[node]
            snapshots = list(self._snapshots.values())
            last = dict(self._last_success)
            refused = dict(self._refused)
        merged: dict[str, Metric] = {}
        for snap in snapshots:
            for fam in snap.families:
                into = merged.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
                into.samples.extend(fam.samples)
        yield from merged.values()
        ok = Metric("trustcap_gateway_agent_metrics_last_success_timestamp_seconds",
                    "When this gateway last took in its agent's metrics (re-exported as trustcap_agent_*).",
                    "gauge")
        for node, ts in last.items():
            ok.add_sample(ok.name, {"node": node}, ts)
        yield ok
        bad = Metric("trustcap_gateway_agent_metrics_refused", "Agent metrics snapshots this gateway did not "
                     "re-export, by reason (agent unreachable, or a bound on what an HPC may inject broken).",
                     "counter")
        for (node, reason), n in refused.items():
            bad.add_sample(bad.name + "_total", {"node": node, "reason": reason}, float(n))
        yield bad


COLLECTOR: Final = AgentMetricsCollector()
REGISTRY.register(COLLECTOR)


class _Server(Protocol):
    def command(self, op: str, **params: Any) -> dict[str, Any]: ...


class AgentMetricsPoller(PollingLoop):
    """Asks the agent for its metrics every `interval_s` seconds and hands them to `collector`."""

    loop_name = "trustcap-gateway-agent-metrics"
    step_label = "agent metrics fetch"

    def __init__(self, server: _Server, node: str, *, collector: AgentMetricsCollector = COLLECTOR,
                 interval_s: float = 5.0) -> None:
        self.server, self.node, self.collector = server, node, collector
        self._init_loop(interval_s)

    def step(self) -> int:
        """One fetch; returns the series kept (0 when there is no agent or its snapshot was refused)."""
        try:
            answer = self.server.command("metrics")
        except (TrustcapError, OSError) as exc:  # no session (booting, rebooting) or the agent refused
            log.debug("agent metrics of %s not fetched: %s", self.node, exc)
            self.collector.refuse(self.node, "unavailable")
            return 0
        text = answer.get("exposition")
        if not isinstance(text, str):
            self.collector.refuse(self.node, "unparsable")
            log.warning("agent of %s answered metrics without an exposition", self.node)
            return 0
        try:
            return self.collector.update(self.node, text)
        except Refused as exc:
            log.warning("agent metrics of %s refused: %s", self.node, exc)
            return 0
