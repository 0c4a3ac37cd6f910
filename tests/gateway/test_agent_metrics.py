"""The agent's metrics through its gateway (trustcap.gateway.agent_metrics, decision 0117), over the real
channel between a real AttestationServer and a real Agent (tests/gateway/conftest.py `pair`).

The HPC is less trusted than its gateway, so the attacks are an agent answering `metrics` with what it
should not be able to inject: another component's metric name, another node's label, more series or bytes
than the budget, a type or labels outside the bounds. Each is refused whole and counted; the positive
control is the honest agent's exposition, accepted and labelled with the gateway's node.
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from trustcap.agent import metrics as agent_metrics
from trustcap.gateway import agent_metrics as gw
from trustcap.gateway.runner import Runner

HONEST_LINE = 'trustcap_agent_runs_total{node="hpc-1",reason="Completed"}'


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _served(collector: gw.AgentMetricsCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def _value(text: str, name: str, labels: dict[str, str]) -> float | None:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def _poller(pair: Any, collector: gw.AgentMetricsCollector) -> gw.AgentMetricsPoller:
    return gw.AgentMetricsPoller(pair.server, "hpc-1", collector=collector, interval_s=0.05)


def _lie(pair: Any, exposition: Any) -> None:
    """The agent answers `metrics` with this instead of its registry (a compromised HPC)."""
    assert pair.agent.channel is not None
    pair.agent.channel.handlers["metrics"] = lambda _req: {"exposition": exposition}


def test_the_agents_metrics_come_over_the_channel_labelled_with_the_gateways_node(pair: Any) -> None:
    collector = gw.AgentMetricsCollector()
    before = agent_metrics.RUNS.labels("Completed")._value.get()
    agent_metrics.observe_run("Completed", 2.5)
    kept = _poller(pair, collector).step()
    assert kept > 50  # every reason, kind and bucket exists from the start (trustcap.agent.metrics)
    text = _served(collector)
    assert _value(text, "trustcap_agent_runs_total", {"node": "hpc-1", "reason": "Completed"}) == before + 1
    assert _value(text, "trustcap_agent_audit_violations_total", {"node": "hpc-1", "kind": "write"}) is not None
    assert _value(text, "trustcap_agent_run_duration_seconds_count", {"node": "hpc-1"}) is not None
    assert "_created" not in text  # the agent's clock is not re-exported
    assert _value(text, "trustcap_gateway_agent_metrics_last_success_timestamp_seconds", {"node": "hpc-1"})


def test_the_relays_registry_serves_the_agent_metrics(pair: Any) -> None:
    """The relay serves generate_latest() of the default REGISTRY: COLLECTOR is registered on it."""
    _poller(pair, gw.COLLECTOR).step()
    assert HONEST_LINE in generate_latest(REGISTRY).decode()


def test_the_runner_starts_and_stops_the_agent_metrics_poller(pair: Any) -> None:
    class NoKube:
        def list(self, *_a: Any, **_k: Any) -> list[dict[str, Any]]:
            return []

    runner = Runner(pair.server, pair.server.root, NoKube(), namespace="ns", poll_s=0.05,  # type: ignore[arg-type]
                    agent_metrics_s=0.05)
    assert runner.agent_metrics.node == "hpc-1"  # the server's node, not a name the agent chose
    runner.start()
    try:
        assert runner.agent_metrics.running
    finally:
        runner.stop()
    assert not runner.agent_metrics.running


def _many_series(n: int) -> str:
    rows = "\n".join(f'trustcap_agent_x{{i="{i}"}} 1' for i in range(n))
    return f"# HELP trustcap_agent_x x\n# TYPE trustcap_agent_x gauge\n{rows}\n"


@pytest.mark.parametrize(("exposition", "reason"), [
    pytest.param('# HELP trustcap_gateway_node_trusted t\n# TYPE trustcap_gateway_node_trusted gauge\n'
                 'trustcap_gateway_node_trusted{node="hpc-1"} 1\n', "foreign_name", id="poses-as-the-gateway"),
    pytest.param('# TYPE trustcap_capsules gauge\ntrustcap_capsules{phase="Completed"} 99\n', "foreign_name",
                 id="poses-as-the-operator"),
    pytest.param("trustcap_agent_untyped 1\n", "bad_type", id="untyped"),
    pytest.param(_many_series(gw.MAX_SERIES + 1), "too_many_series", id="too-many-series"),
    pytest.param("# HELP trustcap_agent_y " + "y" * gw.MAX_BYTES + "\n", "too_large", id="too-large"),
    pytest.param('# TYPE trustcap_agent_z gauge\ntrustcap_agent_z{a="1",b="2",c="3",d="4",e="5"} 1\n',
                 "bad_labels", id="too-many-labels"),
    pytest.param(f'# TYPE trustcap_agent_z gauge\ntrustcap_agent_z{{a="{"v" * 65}"}} 1\n', "bad_labels",
                 id="label-value-too-long"),
    pytest.param("# TYPE trustcap_agent_z gauge\ntrustcap_agent_z{a=1} 1\n", "unparsable", id="not-prometheus-text"),
    pytest.param(["not", "text"], "unparsable", id="not-a-string"),
])
def test_what_an_agent_must_not_inject_is_refused_whole_and_counted(pair: Any, exposition: Any,
                                                                    reason: str) -> None:
    collector = gw.AgentMetricsCollector()
    poller = _poller(pair, collector)
    assert poller.step() > 0 and HONEST_LINE in _served(collector)  # positive control: the honest agent
    _lie(pair, exposition)
    assert poller.step() == 0
    text = _served(collector)
    served = {f.name for f in text_string_to_metric_families(text)}
    assert not [n for n in served if n.startswith(gw.PREFIX)], served  # the old snapshot is gone too
    assert served == {"trustcap_gateway_agent_metrics_last_success_timestamp_seconds",
                      "trustcap_gateway_agent_metrics_refused"}  # nothing the lie named
    assert _value(text, "trustcap_gateway_agent_metrics_refused_total", {"node": "hpc-1", "reason": reason}) == 1


def test_an_agent_cannot_speak_for_another_node(pair: Any) -> None:
    collector = gw.AgentMetricsCollector()
    _lie(pair, '# TYPE trustcap_agent_z gauge\ntrustcap_agent_z{node="hpc-other"} 7\n')
    assert _poller(pair, collector).step() == 1
    text = _served(collector)
    assert _value(text, "trustcap_agent_z", {"node": "hpc-1"}) == 7
    assert 'node="hpc-other"' not in text


def test_no_agent_is_counted_unavailable_and_serves_nothing(pair: Any) -> None:
    collector = gw.AgentMetricsCollector()
    poller = _poller(pair, collector)
    assert poller.step() > 0
    pair.server.drop_session()
    assert poller.step() == 0
    text = _served(collector)
    assert HONEST_LINE not in text
    assert _value(text, "trustcap_gateway_agent_metrics_refused_total",
                  {"node": "hpc-1", "reason": "unavailable"}) == 1


def test_a_snapshot_older_than_max_age_is_no_longer_served() -> None:
    clock = Clock()
    collector = gw.AgentMetricsCollector(max_age_s=30, clock=clock)
    collector.update("hpc-1", agent_metrics.exposition())
    clock.t += 29
    assert HONEST_LINE in _served(collector)
    clock.t += 2
    assert HONEST_LINE not in _served(collector)  # stale in Prometheus, not a repeated old number


def test_the_agents_own_names_follow_prometheus_naming() -> None:
    families = list(text_string_to_metric_families(agent_metrics.exposition()))
    named = [f for f in families if not f.name.endswith("_created")]
    assert {f.name for f in named} == {"trustcap_agent_runs", "trustcap_agent_run_duration_seconds",
                                       "trustcap_agent_wipe_duration_seconds", "trustcap_agent_audit_violations"}
    for fam in named:
        assert fam.name.startswith(gw.PREFIX) and fam.documentation, fam.name
        assert fam.type in gw.TYPES
        if fam.type == "histogram":
            assert fam.name.endswith("_seconds"), fam.name
    assert len(gw.accept(agent_metrics.exposition(), "hpc-1")) == len(named)
