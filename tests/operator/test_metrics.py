"""The operator's lifecycle metrics (operator/metrics.py), from a fake cluster (our own ObjectSource, never
the kube client) through prometheus_client's real exposition and parser; a frozen clock for the cache.

Also the /metrics server of `python -m trustcap.operator` (a real HTTP server on 127.0.0.1) and the
Gateway controller writing reputation drift, which the trust dashboard reads.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from trustcap.operator import gateway as gw
from trustcap.operator import metrics as m
from trustcap.operator.__main__ import serve_metrics

T0 = "2025-03-01T12:00:00Z"


def _obj(kind: str, name: str, uid: str, *, spec: dict[str, Any] | None = None, status: dict[str, Any] | None = None,
         created: str = T0, namespace: str | None = "ns") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": uid, "creationTimestamp": created}
    if namespace:
        meta["namespace"] = namespace
    return {"kind": kind, "metadata": meta, "spec": spec or {}, "status": status or {}}


def _ready(value: str) -> list[dict[str, str]]:
    return [{"type": "Ready", "status": value, "reason": "R", "message": "", "lastTransitionTime": T0}]


class FakeCluster:
    """An ObjectSource whose objects the test edits; counts the lists so the cache can be checked."""

    def __init__(self) -> None:
        self.objects: dict[str, list[dict[str, Any]]] = {p: [] for p in ("capsules", "attestations", "hpcnodes",
                                                                           "gateways")}
        self.lists = 0
        self.fail: Exception | None = None

    def list_all(self, plural: str) -> list[dict[str, Any]]:
        if self.fail is not None:
            raise self.fail
        self.lists += 1
        return [dict(o) for o in self.objects[plural]]


class Tripwire:
    def list_all(self, plural: str) -> list[dict[str, Any]]:
        raise AssertionError(f"Must not be called! (listed {plural})")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cluster() -> FakeCluster:
    c = FakeCluster()
    c.objects["capsules"] = [
        _obj("Capsule", "a", "c1", status={"phase": "Running"}),
        _obj("Capsule", "b", "c2", status={"phase": "Completed"}),
        _obj("Capsule", "c", "c3", status={"phase": "Completed"}),
        _obj("Capsule", "d", "c4"),  # not yet seen by the controller: no phase
    ]
    c.objects["attestations"] = [
        _obj("Attestation", "r1", "a1", spec={"phase": "pre"},
             status={"result": "Passed", "decidedAt": "2025-03-01T12:00:04Z", "chain": {"txHash": "0xab"}}),
        _obj("Attestation", "r2", "a2", spec={"phase": "post"},
             status={"result": "Failed", "decidedAt": "2025-03-01T12:00:40Z"}),
        _obj("Attestation", "r3", "a3", spec={"phase": "post"}, status={"result": "Expired",
                                                                          "decidedAt": "2025-03-01T12:01:00Z"}),
        _obj("Attestation", "r4", "a4", spec={"phase": "during"}),  # open: no result yet
    ]
    c.objects["hpcnodes"] = [
        _obj("HPCNode", "hpc-0", "n1", namespace=None, status={"phase": "Ready", "conditions": _ready("True")}),
        _obj("HPCNode", "hpc-1", "n2", namespace=None, status={"phase": "Quarantined",
                                                               "conditions": _ready("False")}),
    ]
    c.objects["gateways"] = [
        _obj("Gateway", "gw-0", "g1", namespace=None,
             status={"phase": "Active", "reputation": 9950, "conditions": _ready("True")}),
        _obj("Gateway", "gw-1", "g2", namespace=None, status={"phase": "Pending"}),
    ]
    return c


def _scrape(collector: m.LifecycleCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reg = CollectorRegistry()
    reg.register(collector)
    text = generate_latest(reg).decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _v(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.mark.parametrize(("name", "labels", "value"), [
    pytest.param("trustcap_capsules", {"phase": "Running"}, 1, id="capsules-running"),
    pytest.param("trustcap_capsules", {"phase": "Completed"}, 2, id="capsules-completed"),
    pytest.param("trustcap_capsules", {"phase": "Failed"}, 0, id="capsules-failed-zero-not-absent"),
    pytest.param("trustcap_capsules", {"phase": "Unknown"}, 1, id="capsules-without-phase"),
    pytest.param("trustcap_capsules_finished_total", {"phase": "Completed"}, 2, id="finished-completed"),
    pytest.param("trustcap_attestation_rounds", {"phase": "pre", "result": "Passed"}, 1, id="rounds-pre-passed"),
    pytest.param("trustcap_attestation_rounds", {"phase": "during", "result": "Pending"}, 1, id="rounds-open"),
    pytest.param("trustcap_attestation_rounds", {"phase": "post", "result": "Expired"}, 1, id="rounds-expired"),
    pytest.param("trustcap_attestation_rounds_decided_total", {"phase": "post", "result": "Failed"}, 1,
                 id="decided-post-failed"),
    pytest.param("trustcap_attestation_rounds_decided_total", {"phase": "during", "result": "Passed"}, 0,
                 id="open-round-not-decided"),
    pytest.param("trustcap_attestation_round_decision_seconds_count", {"phase": "post"}, 2, id="latency-count"),
    pytest.param("trustcap_attestation_round_decision_seconds_sum", {"phase": "post"}, 100, id="latency-sum"),
    pytest.param("trustcap_attestation_round_decision_seconds_count", {"phase": "boot"}, 0,
                 id="latency-series-exist-before-any-round"),
    pytest.param("trustcap_attestation_round_decision_seconds_bucket", {"phase": "pre", "le": "5.0"}, 1,
                 id="latency-4s-in-5s-bucket"),
    pytest.param("trustcap_attestation_round_decision_seconds_bucket", {"phase": "pre", "le": "2.0"}, 0,
                 id="latency-4s-not-in-2s-bucket"),
    pytest.param("trustcap_attestation_round_decision_seconds_bucket", {"phase": "post", "le": "30.0"}, 0,
                 id="latency-40s-60s"),
    pytest.param("trustcap_attestation_round_decision_seconds_bucket", {"phase": "post", "le": "60.0"}, 2,
                 id="latency-cumulative"),
    pytest.param("trustcap_hpcnode_phase", {"node": "hpc-1", "phase": "Quarantined"}, 1, id="node-quarantined"),
    pytest.param("trustcap_hpcnode_phase", {"node": "hpc-1", "phase": "Ready"}, 0, id="node-one-phase-only"),
    pytest.param("trustcap_hpcnode_ready", {"node": "hpc-0"}, 1, id="node-ready"),
    pytest.param("trustcap_hpcnode_ready", {"node": "hpc-1"}, 0, id="node-not-ready"),
    pytest.param("trustcap_hpcnode_quarantines_total", {}, 1, id="quarantines"),
    pytest.param("trustcap_gateway_phase", {"gateway": "gw-0", "phase": "Active"}, 1, id="gateway-active"),
    pytest.param("trustcap_gateway_ready", {"gateway": "gw-1"}, 0, id="gateway-not-ready"),
    pytest.param("trustcap_gateway_reputation_ratio", {"gateway": "gw-0"}, 0.995, id="reputation-from-basis-points"),
    pytest.param("trustcap_chain_records_written_total", {}, 1, id="chain-written"),
    pytest.param("trustcap_chain_records_pending", {}, 1, id="chain-pending-failed-not-expired"),
])
def test_metrics_from_objects(cluster: FakeCluster, name: str, labels: dict[str, str], value: float) -> None:
    samples = _scrape(m.LifecycleCollector(cluster))
    assert _v(samples, name, **labels) == pytest.approx(value)


def test_a_gateway_without_reputation_exports_none(cluster: FakeCluster) -> None:
    samples = _scrape(m.LifecycleCollector(cluster))
    assert ("trustcap_gateway_reputation_ratio", (("gateway", "gw-1"),)) not in samples
    assert ("trustcap_gateway_reputation_ratio", (("gateway", "gw-0"),)) in samples  # positive control


def test_counters_count_each_object_once_and_the_cache_holds(cluster: FakeCluster) -> None:
    clock = Clock()
    c = m.LifecycleCollector(cluster, ttl_s=2.0, clock=clock)
    reg = CollectorRegistry()
    reg.register(c)
    assert cluster.lists == 0, "registering must not list the cluster"
    first = _scrape_reg(reg)
    assert cluster.lists == 4
    clock.now += 1.0
    cluster.objects["capsules"][0]["status"] = {"phase": "Completed"}
    assert _scrape_reg(reg) == first and cluster.lists == 4, "within ttl the snapshot is reused"
    clock.now += 1.5
    again = _scrape_reg(reg)
    assert cluster.lists == 8
    assert _v(again, "trustcap_capsules_finished_total", phase="Completed") == 3
    assert _v(again, "trustcap_attestation_rounds_decided_total", phase="post", result="Failed") == 1, "not twice"
    assert _v(again, "trustcap_attestation_round_decision_seconds_count", phase="post") == 2
    assert _v(again, "trustcap_chain_records_written_total") == 1
    # a deleted capsule leaves the gauge, never the counter
    cluster.objects["capsules"] = cluster.objects["capsules"][1:]
    clock.now += 5
    later = _scrape_reg(reg)
    assert _v(later, "trustcap_capsules", phase="Completed") == 2
    assert _v(later, "trustcap_capsules_finished_total", phase="Completed") == 3


def test_quarantine_counted_per_entry_not_per_scrape(cluster: FakeCluster) -> None:
    clock = Clock()
    reg = CollectorRegistry()
    reg.register(m.LifecycleCollector(cluster, ttl_s=1.0, clock=clock))
    assert _v(_scrape_reg(reg), "trustcap_hpcnode_quarantines_total") == 1
    clock.now += 2
    assert _v(_scrape_reg(reg), "trustcap_hpcnode_quarantines_total") == 1, "still the same quarantine"
    node = cluster.objects["hpcnodes"][1]
    node["status"] = {"phase": "Registered"}  # a person cleared it
    clock.now += 2
    _scrape_reg(reg)
    node["status"] = {"phase": "Quarantined"}
    clock.now += 2
    assert _v(_scrape_reg(reg), "trustcap_hpcnode_quarantines_total") == 2


def test_an_unreachable_api_server_serves_the_last_snapshot_and_counts(cluster: FakeCluster) -> None:
    clock = Clock()
    wall = Clock()
    reg = CollectorRegistry()
    reg.register(m.LifecycleCollector(cluster, ttl_s=1.0, clock=clock, wall=wall))
    first = _scrape_reg(reg)
    assert _v(first, "trustcap_operator_metrics_refresh_errors_total") == 0
    assert _v(first, "trustcap_operator_metrics_last_refresh_timestamp_seconds") == 1000.0
    cluster.fail = ConnectionRefusedError("apiserver down")
    clock.now += 2
    wall.now += 2
    second = _scrape_reg(reg)
    assert _v(second, "trustcap_operator_metrics_refresh_errors_total") == 1
    assert _v(second, "trustcap_operator_metrics_last_refresh_timestamp_seconds") == 1000.0, "the old snapshot's"
    assert _v(second, "trustcap_capsules", phase="Completed") == 2


def test_never_listed_serves_only_the_error_count() -> None:
    c = FakeCluster()
    c.fail = TimeoutError("no route")
    samples = _scrape(m.LifecycleCollector(c))
    assert {name for name, _ in samples} == {"trustcap_operator_metrics_refresh_errors_total",
                                             "trustcap_operator_metrics_last_refresh_timestamp_seconds"}


def test_describe_lists_nothing_and_every_family_is_named_by_convention() -> None:
    fams = list(m.LifecycleCollector(Tripwire()).describe())
    assert len(fams) >= 14
    for fam in fams:
        assert fam.name.startswith("trustcap_"), fam.name
        assert fam.documentation.strip(), f"{fam.name} has no help"
        assert not fam.name.endswith("_total"), "prometheus_client adds _total to a counter itself"
        if fam.type == "histogram":
            assert fam.name.endswith("_seconds"), fam.name


def test_label_values_are_bounded(cluster: FakeCluster) -> None:
    cluster.objects["capsules"].append(_obj("Capsule", "e", "c9", status={"phase": "made-up-by-a-user"}))
    cluster.objects["attestations"].append(_obj("Attestation", "rx", "ax", spec={"phase": "x" * 200},
                                                status={"result": "Whatever"}))
    samples = _scrape(m.LifecycleCollector(cluster))
    phases = {dict(labels).get("phase") for (name, labels) in samples if name == "trustcap_capsules"}
    assert phases == {*m.CAPSULE_PHASES, "Unknown"}
    assert _v(samples, "trustcap_attestation_rounds", phase="Unknown", result="Unknown") == 1
    assert not any(dict(labels).get("capsule") or "made-up" in str(labels) for _, labels in samples)


def _scrape_reg(reg: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.parametrize(("value", "expected"), [
    pytest.param("127.0.0.1:9464", ("127.0.0.1", 9464), id="ipv4"),
    pytest.param("[::1]:9000", ("::1", 9000), id="ipv6"),
    pytest.param("off", None, id="off"),
    pytest.param("OFF", None, id="off-any-case"),
    pytest.param("", None, id="empty"),
])
def test_parse_address(value: str, expected: tuple[str, int] | None) -> None:
    assert m.parse_address(value) == expected


@pytest.mark.parametrize("value", [
    pytest.param("9464", id="no-host"), pytest.param("localhost:", id="no-port"),
    pytest.param("h:99999", id="port-out-of-range"), pytest.param("h:http", id="port-not-a-number"),
])
def test_parse_address_refuses(value: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        m.parse_address(value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(cluster: FakeCluster) -> Iterator[tuple[int, CollectorRegistry]]:
    port = _free_port()
    reg = CollectorRegistry()
    server = serve_metrics(None, f"127.0.0.1:{port}", registry=reg, source=cluster)
    assert server is not None
    yield port, reg
    server.shutdown()
    server.server_close()


def test_the_operator_serves_metrics_over_http(served: tuple[int, CollectorRegistry]) -> None:
    port, _ = served
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert 'trustcap_capsules{phase="Completed"} 2.0' in text
    assert "# HELP trustcap_attestation_round_decision_seconds " in text


def test_an_explicit_address_in_use_is_fatal_the_default_is_not(served: tuple[int, CollectorRegistry],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    port, _ = served
    with pytest.raises(SystemExit, match="cannot serve metrics"):
        serve_metrics(f"127.0.0.1:{port}", None, registry=CollectorRegistry(), source=Tripwire())
    from trustcap.operator import __main__ as entry

    monkeypatch.setattr(entry, "METRICS_DEFAULT", f"127.0.0.1:{port}")
    assert serve_metrics(None, None, registry=CollectorRegistry(), source=Tripwire()) is None


def test_off_serves_nothing() -> None:
    assert serve_metrics("off", "127.0.0.1:1", registry=CollectorRegistry(), source=Tripwire()) is None
    with pytest.raises(SystemExit, match="HOST:PORT"):
        serve_metrics("nonsense", None, registry=CollectorRegistry(), source=Tripwire())


# --- the Gateway controller keeps the reputation the trust dashboard reads up to date ---------------------
class FakeEscrow:
    def __init__(self, info: Any) -> None:
        self.info = info

    def node(self, address: str) -> Any:
        return self.info


def _gateway_tick(status: dict[str, Any], info: Any) -> dict[str, Any]:
    memo = kopf.Memo()
    memo["capsules"] = SimpleNamespace(escrow=FakeEscrow(info))
    patch = kopf.Patch()
    body: Any = {"apiVersion": "trustcap.io/v1alpha1", "kind": "Gateway", "metadata": {"name": "gw-0", "uid": "g1"}}
    gw.gateway_on_chain(body=kopf.Body(body), spec={"address": "0xAB"}, status=status, meta={"generation": 1},
                        memo=memo, patch=patch)
    return dict(patch.get("status") or {})


def test_gateway_status_follows_a_reputation_change_without_a_phase_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kopf, "event", lambda *a, **k: None)
    info = SimpleNamespace(active=True, stake=10**18, reputation_bp=10_000)
    first = _gateway_tick({}, info)
    assert first["phase"] == "Active" and first["reputation"] == 10_000
    settled = {**first}
    assert _gateway_tick(settled, info) == {}, "nothing changed: no write (positive control for the next)"
    info.reputation_bp = 9_000
    moved = _gateway_tick(settled, info)
    assert moved["reputation"] == 9_000 and moved["phase"] == "Active"
