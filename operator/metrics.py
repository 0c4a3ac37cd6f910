"""Prometheus metrics of the capsule lifecycle, derived from the cluster's objects at scrape time.

Why from objects and not from counters bumped in handlers: the Capsule, Attestation, HPCNode and Gateway
objects already say everything a dashboard shows (phases, round results, `decidedAt`, the chain-writer's
`status.chain.txHash`), they survive an operator restart, and reading them keeps this module free of
kopf and of every controller's code. A scrape lists the four kinds cluster-wide (at most once per `ttl_s`,
so a 1 s scrape interval costs one list per kind every couple of seconds) and answers from that snapshot.

    Prometheus --GET /metrics--> start_http_server (operator process) --collect()--> LifecycleCollector
                                                                                  |  stale? list capsules,
                                                                                  |  attestations, hpcnodes,
                                                                                  |  gateways (ObjectSource)
                                                                                  v
                                                     gauges from the snapshot; counters and the latency
                                                     histogram from what this process has seen change

Gauges (capsules by phase, rounds by phase and result, node phase and readiness, gateway reputation,
chain records pending) are exact for the snapshot. Counters and the histogram count each object once,
when this process first sees it finished, decided, recorded or quarantined; they start again from the
objects present when the operator restarts (Prometheus' `rate()` treats that as a counter reset). An
object created and deleted between two refreshes is not counted.

Label values are bounded: phases and results are the CRDs' enums (anything else is `Unknown`), `node`
and `gateway` are object names of the cluster's own machines. Capsule names never become labels.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from trustcap.api import ATTESTATIONS, CAPSULES, GATEWAYS, GROUP, HPCNODES, VERSION, GatewayPhase, HPCNodePhase
from trustcap.forms import parse_rfc3339

__all__ = [
    "CAPSULE_PHASES",
    "LATENCY_BUCKETS_S",
    "KubeSource",
    "LifecycleCollector",
    "ObjectSource",
    "parse_address",
]

log = logging.getLogger("trustcap.operator.metrics")

TIMEOUT_S: Final = 10.0
DEFAULT_TTL_S: Final = 2.0

# The CRDs' enums (crds/*.yaml): every value is always exported, so a panel shows 0 rather than no data.
CAPSULE_PHASES: Final = ("Pending", "Scheduled", "Attesting", "Running", "Sealing", "Wiping", "Completed", "Failed")
CAPSULE_TERMINAL: Final = ("Completed", "Failed")
ROUND_PHASES: Final = ("boot", "pre", "during", "post", "wipe")
ROUND_RESULTS: Final = ("Pending", "Passed", "Failed", "Expired")
ROUND_DECIDED: Final = ("Passed", "Failed", "Expired")
CHAIN_RECORDED_RESULTS: Final = ("Passed", "Failed")  # what the chain-writer records (operator/chainwriter.py)
NODE_PHASES: Final = tuple(HPCNodePhase)
GATEWAY_PHASES: Final = tuple(GatewayPhase)
UNKNOWN: Final = "Unknown"
LATENCY_BUCKETS_S: Final = (1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ObjectSource(Protocol):
    """Lists every object of one trustcap.io/v1alpha1 kind, across namespaces (plural: "capsules")."""

    def list_all(self, plural: str) -> list[dict[str, Any]]: ...


class KubeSource:
    """An ObjectSource over the API server. The client is made on first use, so an operator without
    credentials yet still starts; the failure is then a counted refresh error, not a crash."""

    def __init__(self, kubeconfig: str | None = None) -> None:
        self._kubeconfig = kubeconfig
        self._custom: Any = None

    def list_all(self, plural: str) -> list[dict[str, Any]]:
        if self._custom is None:
            from trustcap.operator.kube import Kube

            self._custom = Kube(self._kubeconfig).custom
        doc = self._custom.list_cluster_custom_object(GROUP, VERSION, plural, _request_timeout=TIMEOUT_S)
        return list(doc.get("items") or [])


def parse_address(value: str) -> tuple[str, int] | None:
    """"host:port" -> (host, port); "off" (or empty) -> None. Raises ValueError naming the fix."""
    value = value.strip()
    if value.lower() in ("", "off"):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics address {value!r} is not HOST:PORT (e.g. 127.0.0.1:9464) or 'off'")
    return host.strip("[]"), int(port)


def _label(value: Any, allowed: tuple[str, ...]) -> str:
    return str(value) if value in allowed else UNKNOWN


_time = parse_rfc3339


def _ready(obj: Mapping[str, Any]) -> bool:
    conds = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


@dataclass
class _Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


@dataclass
class _Snapshot:
    capsules: dict[str, int]
    rounds: dict[tuple[str, str], int]
    nodes: dict[str, tuple[str, bool]]            # name -> (phase, Ready)
    gateways: dict[str, tuple[str, bool, float | None]]  # name -> (phase, Ready, reputation ratio)
    chain_pending: int


class LifecycleCollector(Collector):
    """A prometheus_client collector; register it once: `REGISTRY.register(LifecycleCollector(KubeSource()))`."""

    def __init__(self, source: ObjectSource, *, ttl_s: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self._source = source
        self._ttl_s = ttl_s
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._at: float | None = None
        self._snap: _Snapshot | None = None
        self._refreshed_wall = 0.0
        self._errors = 0
        # What this process has already counted, by object uid (pruned to the objects that still exist).
        self._finished: dict[str, str] = {}
        self._decided: dict[str, tuple[str, str]] = {}
        self._recorded: set[str] = set()
        self._node_phase: dict[str, str] = {}
        self._finished_total: dict[str, int] = dict.fromkeys(CAPSULE_TERMINAL, 0)
        self._decided_total: dict[tuple[str, str], int] = {}
        self._recorded_total = 0
        self._quarantines_total = 0
        # Every phase from the start: a series born at its first observation hides it from increase().
        self._latency: dict[str, _Histogram] = {phase: _Histogram() for phase in ROUND_PHASES}

    # --- prometheus_client -----------------------------------------------------------------------------
    def describe(self) -> Iterable[Metric]:
        """The families without samples: registering must not list the cluster."""
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            self._refresh_if_stale()
            return list(self._families(self._snap))

    # --- refresh ---------------------------------------------------------------------------------------
    def _refresh_if_stale(self) -> None:
        now = self._clock()
        if self._at is not None and now - self._at < self._ttl_s:
            return
        self._at = now
        try:
            lists = {plural: self._source.list_all(plural)
                     for plural in (CAPSULES, ATTESTATIONS, HPCNODES, GATEWAYS)}
        except Exception as exc:  # an unreachable API server must not fail the scrape: serve the last snapshot
            self._errors += 1
            log.warning("metrics: cannot list the cluster's objects, serving the last snapshot: %s", exc)
            return
        self._snap = self._digest(lists)
        self._refreshed_wall = self._wall()

    def _digest(self, lists: Mapping[str, list[dict[str, Any]]]) -> _Snapshot:
        return _Snapshot(capsules=self._capsules(lists[CAPSULES]), rounds=self._rounds(lists[ATTESTATIONS]),
                         nodes=self._nodes(lists[HPCNODES]), gateways=self._gateways(lists[GATEWAYS]),
                         chain_pending=self._chain(lists[ATTESTATIONS]))

    def _capsules(self, items: list[dict[str, Any]]) -> dict[str, int]:
        by_phase = dict.fromkeys((*CAPSULE_PHASES, UNKNOWN), 0)
        present: set[str] = set()
        for obj in items:
            phase = _label((obj.get("status") or {}).get("phase"), CAPSULE_PHASES)
            by_phase[phase] += 1
            uid = str(obj["metadata"].get("uid", ""))
            present.add(uid)
            if phase in CAPSULE_TERMINAL and uid not in self._finished:
                self._finished[uid] = phase
                self._finished_total[phase] += 1
        self._finished = {u: p for u, p in self._finished.items() if u in present}
        return by_phase

    def _rounds(self, items: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
        counts = {(p, r): 0 for p in ROUND_PHASES for r in ROUND_RESULTS}
        present: set[str] = set()
        for obj in items:
            phase = _label((obj.get("spec") or {}).get("phase"), ROUND_PHASES)
            status = obj.get("status") or {}
            result = _label(status.get("result") or "Pending", ROUND_RESULTS)
            counts[(phase, result)] = counts.get((phase, result), 0) + 1
            uid = str(obj["metadata"].get("uid", ""))
            present.add(uid)
            if result in ROUND_DECIDED and uid not in self._decided:
                self._decided[uid] = (phase, result)
                self._decided_total[(phase, result)] = self._decided_total.get((phase, result), 0) + 1
                opened, decided = _time(obj["metadata"].get("creationTimestamp")), _time(status.get("decidedAt"))
                if opened is not None and decided is not None:
                    self._latency.setdefault(phase, _Histogram()).observe(max(0.0, decided - opened))
        self._decided = {u: v for u, v in self._decided.items() if u in present}
        return counts

    def _chain(self, items: list[dict[str, Any]]) -> int:
        pending = 0
        present: set[str] = set()
        for obj in items:
            status = obj.get("status") or {}
            uid = str(obj["metadata"].get("uid", ""))
            present.add(uid)
            if (status.get("chain") or {}).get("txHash"):
                if uid not in self._recorded:
                    self._recorded.add(uid)
                    self._recorded_total += 1
            elif status.get("result") in CHAIN_RECORDED_RESULTS:
                pending += 1
        self._recorded &= present
        return pending

    def _nodes(self, items: list[dict[str, Any]]) -> dict[str, tuple[str, bool]]:
        out: dict[str, tuple[str, bool]] = {}
        seen: dict[str, str] = {}
        for obj in items:
            phase = _label((obj.get("status") or {}).get("phase"), NODE_PHASES)
            uid = str(obj["metadata"].get("uid", ""))
            if phase == "Quarantined" and self._node_phase.get(uid) != "Quarantined":
                self._quarantines_total += 1
            seen[uid] = phase
            out[str(obj["metadata"]["name"])] = (phase, _ready(obj))
        self._node_phase = seen
        return out

    @staticmethod
    def _gateways(items: list[dict[str, Any]]) -> dict[str, tuple[str, bool, float | None]]:
        out: dict[str, tuple[str, bool, float | None]] = {}
        for obj in items:
            status = obj.get("status") or {}
            rep = status.get("reputation")
            ratio = int(rep) / 10_000 if isinstance(rep, int) else None  # basis points on chain
            out[str(obj["metadata"]["name"])] = (_label(status.get("phase"), GATEWAY_PHASES), _ready(obj), ratio)
        return out

    # --- families --------------------------------------------------------------------------------------
    def _families(self, snap: _Snapshot | None) -> Iterator[Metric]:
        yield from self._capsule_families(snap)
        yield from self._round_families(snap)
        yield from self._trust_families(snap)
        yield from self._chain_families(snap)
        errors = CounterMetricFamily("trustcap_operator_metrics_refresh_errors",
                                     "Scrapes that could not list the cluster's objects and served the last snapshot.")
        last = GaugeMetricFamily("trustcap_operator_metrics_last_refresh_timestamp_seconds",
                                 "When the objects behind these metrics were last listed (Unix time; 0: never).")
        if snap is not None or self._errors:
            errors.add_metric([], self._errors)
            last.add_metric([], self._refreshed_wall)
        yield errors
        yield last

    def _capsule_families(self, snap: _Snapshot | None) -> Iterator[Metric]:
        by_phase = GaugeMetricFamily("trustcap_capsules", "Capsules in the cluster, by phase.", labels=["phase"])
        finished = CounterMetricFamily("trustcap_capsules_finished",
                                       "Capsules this operator has seen reach Completed or Failed, by phase.",
                                       labels=["phase"])
        if snap is not None:
            for phase, n in snap.capsules.items():
                by_phase.add_metric([phase], n)
            for phase, n in self._finished_total.items():
                finished.add_metric([phase], n)
        yield by_phase
        yield finished

    def _round_families(self, snap: _Snapshot | None) -> Iterator[Metric]:
        rounds = GaugeMetricFamily("trustcap_attestation_rounds",
                                   "Attestation rounds in the cluster, by phase and result.",
                                   labels=["phase", "result"])
        decided = CounterMetricFamily("trustcap_attestation_rounds_decided",
                                      "Attestation rounds this operator has seen decided (Passed, Failed, Expired), "
                                      "by phase and result.", labels=["phase", "result"])
        latency = HistogramMetricFamily("trustcap_attestation_round_decision_seconds",
                                        "Time from an Attestation's creation to its status.decidedAt, by phase.",
                                        labels=["phase"])
        if snap is not None:
            for (phase, result), n in snap.rounds.items():
                rounds.add_metric([phase, result], n)
            for phase in ROUND_PHASES:
                for result in ROUND_DECIDED:
                    decided.add_metric([phase, result], self._decided_total.get((phase, result), 0))
            for phase, hist in sorted(self._latency.items()):
                latency.add_metric([phase], hist.cumulative(), hist.total)
        yield rounds
        yield decided
        yield latency

    def _trust_families(self, snap: _Snapshot | None) -> Iterator[Metric]:
        node_phase = GaugeMetricFamily("trustcap_hpcnode_phase", "1 for the HPCNode's current phase, else 0.",
                                       labels=["node", "phase"])
        node_ready = GaugeMetricFamily("trustcap_hpcnode_ready", "1 if the HPCNode's Ready condition is True.",
                                       labels=["node"])
        quarantines = CounterMetricFamily("trustcap_hpcnode_quarantines",
                                          "HPCNodes this operator has seen enter the Quarantined phase.")
        gw_phase = GaugeMetricFamily("trustcap_gateway_phase",
                                     "1 for the Gateway's current phase (from the NodeRegistry), else 0.",
                                     labels=["gateway", "phase"])
        gw_ready = GaugeMetricFamily("trustcap_gateway_ready",
                                     "1 if the Gateway is registered, active and staked on chain.", labels=["gateway"])
        reputation = GaugeMetricFamily("trustcap_gateway_reputation_ratio",
                                       "The Gateway's reputation on chain, 0 to 1 (basis points / 10000).",
                                       labels=["gateway"])
        if snap is not None:
            for name, (phase, ready) in sorted(snap.nodes.items()):
                for p in (*NODE_PHASES, UNKNOWN):
                    node_phase.add_metric([name, p], 1.0 if p == phase else 0.0)
                node_ready.add_metric([name], 1.0 if ready else 0.0)
            quarantines.add_metric([], self._quarantines_total)
            for name, (phase, ready, ratio) in sorted(snap.gateways.items()):
                for p in (*GATEWAY_PHASES, UNKNOWN):
                    gw_phase.add_metric([name, p], 1.0 if p == phase else 0.0)
                gw_ready.add_metric([name], 1.0 if ready else 0.0)
                if ratio is not None:
                    reputation.add_metric([name], ratio)
        yield from (node_phase, node_ready, quarantines, gw_phase, gw_ready, reputation)

    def _chain_families(self, snap: _Snapshot | None) -> Iterator[Metric]:
        written = CounterMetricFamily("trustcap_chain_records_written",
                                      "Attestation rounds this operator has seen recorded on chain "
                                      "(status.chain.txHash).")
        pending = GaugeMetricFamily("trustcap_chain_records_pending",
                                    "Decided rounds (Passed or Failed) the chain-writer has not recorded yet.")
        if snap is not None:
            written.add_metric([], self._recorded_total)
            pending.add_metric([], snap.chain_pending)
        yield written
        yield pending
