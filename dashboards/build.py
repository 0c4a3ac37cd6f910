"""Grafana dashboards of trustcap, as code (grafanalib): `python dashboards/build.py` writes dashboards/out/.

Why code: a dashboard edited by hand in Grafana drifts from the metrics the code exports; here every
panel is a PromQL query over the names operator/metrics.py, gateway/relay.py, gateway/monitor.py,
gateway/agent_metrics.py, agent/metrics.py (re-exported by the gateways), netboot/store.py and
trustcap/chain/metrics.py define, and tests/test_dashboards.py fails when a query names anything else
or when dashboards/out/ is not exactly what this script writes (so nobody edits the JSON).

For each dashboard it writes `out/<name>.json` (import it into Grafana) and `out/<name>-configmap.yaml`,
a ConfigMap labelled `grafana_dashboard: "1"`, which the Grafana sidecar of the prometheus-community
kube-prometheus-stack chart (and the grafana chart with `sidecar.dashboards.enabled`) loads by itself.
The Helm chart (templates/dashboards.yaml) ships the same JSON files as ConfigMaps of the release.
It also writes `out/alerts.yaml`, the Prometheus rule file of dashboards/alerts.py (promtool, the chart's
PrometheusRule and e2e/observe all read that one file).

Queries use Grafana's `$__rate_interval` and `$__range`; `queries()` lists every panel's queries so the
e2e (e2e/observe) can run them against a real Prometheus with those variables substituted.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import yaml
from grafanalib._gen import DashboardEncoder
from grafanalib.core import Dashboard, GridPos, Stat, Target, Template, Templating, Time, TimeSeries

HERE: Final = Path(__file__).resolve().parent
OUT: Final = HERE / "out"
DATASOURCE: Final = {"type": "prometheus", "uid": "${datasource}"}
TAGS: Final = ["trustcap"]
FULL_WIDTH: Final = 24


def sibling(name: str) -> ModuleType:
    """A module of dashboards/ by file (dashboards/ is scripts, not a package on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"trustcap_dashboards_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _targets(*exprs: tuple[str, str]) -> list[Target]:
    return [Target(expr=expr, legendFormat=legend, refId=chr(ord("A") + i), datasource=DATASOURCE)
            for i, (expr, legend) in enumerate(exprs)]


def _series(title: str, description: str, *exprs: tuple[str, str], unit: str = "short", w: int = 12,
            stacked: bool = False) -> TimeSeries:
    return TimeSeries(title=title, description=description, dataSource=DATASOURCE, targets=_targets(*exprs),
                      unit=unit, gridPos=GridPos(h=8, w=w, x=0, y=0),
                      stacking={"mode": "normal", "group": "A"} if stacked else {"mode": "none"})


def _stat(title: str, description: str, expr: str, *, unit: str = "none", legend: str = "") -> Stat:
    return Stat(title=title, description=description, dataSource=DATASOURCE, targets=_targets((expr, legend)),
                format=unit, reduceCalc="lastNotNull", graphMode="none", gridPos=GridPos(h=4, w=6, x=0, y=0),
                thresholds=[{"color": "green", "value": None}])


def _layout(panels: list[Any]) -> list[Any]:
    """Left to right, top to bottom, each panel where its width fits."""
    x = y = row_h = 0
    for p in panels:
        w, h = p.gridPos.w, p.gridPos.h
        if x + w > FULL_WIDTH:
            x, y, row_h = 0, y + row_h, 0
        p.gridPos = GridPos(h=h, w=w, x=x, y=y)
        x, row_h = x + w, max(row_h, h)
    return panels


def _dashboard(uid: str, title: str, description: str, panels: list[Any]) -> Dashboard:
    datasource = Template(name="datasource", label="Prometheus", query="prometheus", type="datasource",
                          default="Prometheus")
    return Dashboard(uid=uid, title=title, description=description, tags=TAGS, timezone="browser",
                     refresh="30s", time=Time("now-6h", "now"), templating=Templating(list=[datasource]),
                     panels=_layout(panels), schemaVersion=39).auto_panel_ids()


def trust() -> Dashboard:
    return _dashboard("trustcap-trust", "trustcap / Trust",
                      "Which HPC nodes and gateways are trusted now, and why not.", [
        _stat("Nodes ready", "HPCNodes whose Ready condition is True.", "sum(trustcap_hpcnode_ready)"),
        _stat("Nodes quarantined", "HPCNodes in the Quarantined phase (sticky: a person clears it).",
              'sum(trustcap_hpcnode_phase{phase="Quarantined"})'),
        _stat("Quarantines", "Nodes that entered quarantine in the time range.",
              "sum(increase(trustcap_hpcnode_quarantines_total[$__range]))"),
        _stat("Gateways active", "Gateways registered, active and staked on chain.", "sum(trustcap_gateway_ready)"),
        _series("Nodes by trust level", "HPCNodes by phase (Registered, Booting, Enrolled ... Quarantined).",
                ("sum by (phase) (trustcap_hpcnode_phase)", "{{phase}}"), stacked=True),
        _series("Node trusted (gateway monitor)", "1 while the node's last check by its gateway passed and is fresh.",
                ("max by (node) (trustcap_gateway_node_trusted)", "{{node}}")),
        _series("Gateway reputation", "Reputation on chain (NodeRegistry), per gateway.",
                ("trustcap_gateway_reputation_ratio", "{{gateway}}"), unit="percentunit"),
        _series("Gateways by phase", "Gateways by their phase on chain.",
                ("sum by (phase) (trustcap_gateway_phase)", "{{phase}}"), stacked=True),
        _series("Monitor checks", "The gateways' periodic checks of their HPC, by outcome.",
                ("sum by (outcome) (rate(trustcap_gateway_monitor_checks_total[$__rate_interval]))", "{{outcome}}"),
                unit="ops", w=FULL_WIDTH),
        _series("Boot files served and refused", "netboot on the Pis: verified boot files handed out, and requests "
                "refused by reason (not approved, digest mismatch, path).",
                ("sum(rate(trustcap_netboot_served_total[$__rate_interval]))", "served"),
                ("sum by (reason) (rate(trustcap_netboot_refused_total[$__rate_interval]))", "refused {{reason}}"),
                unit="ops", w=FULL_WIDTH),
    ])


def attestation() -> Dashboard:
    return _dashboard("trustcap-attestation", "trustcap / Attestation",
                      "Committee rounds: how many, their results, how long a decision takes, which fail.", [
        _stat("Rounds open", "Attestation rounds not decided yet.",
              'sum(trustcap_attestation_rounds{result="Pending"})'),
        _stat("Rounds decided", "Rounds decided in the time range.",
              "sum(increase(trustcap_attestation_rounds_decided_total[$__range]))"),
        _stat("Quorum failures", "Rounds that Failed (a pass can no longer be reached) or Expired, in the range.",
              'sum(increase(trustcap_attestation_rounds_decided_total{result=~"Failed|Expired"}[$__range]))'),
        _stat("Decision p95", "95th percentile of creation to decision, over the range.",
              "histogram_quantile(0.95, sum by (le) (increase("
              "trustcap_attestation_round_decision_seconds_bucket[$__range])))", unit="s"),
        _series("Rounds by phase and result", "Attestation objects in the cluster.",
                ("sum by (phase, result) (trustcap_attestation_rounds)", "{{phase}} {{result}}")),
        _series("Decisions", "Rounds decided per second, by result.",
                ("sum by (result) (rate(trustcap_attestation_rounds_decided_total[$__rate_interval]))", "{{result}}"),
                unit="ops", stacked=True),
        _series("Decision latency", "Creation of the Attestation to status.decidedAt, by round phase.",
                ("histogram_quantile(0.5, sum by (le, phase) (rate("
                 "trustcap_attestation_round_decision_seconds_bucket[$__rate_interval])))", "p50 {{phase}}"),
                ("histogram_quantile(0.95, sum by (le, phase) (rate("
                 "trustcap_attestation_round_decision_seconds_bucket[$__rate_interval])))", "p95 {{phase}}"),
                unit="s"),
        _series("Relay challenges", "Committee challenges through the gateways' relays, by result.",
                ("sum by (result) (rate(trustcap_gateway_relay_challenges_total[$__rate_interval]))", "{{result}}"),
                unit="ops"),
        _series("Challenge latency", "A served challenge's request to its countersigned quote (relay).",
                ("histogram_quantile(0.95, sum by (le) (rate("
                 "trustcap_gateway_relay_challenge_seconds_bucket[$__rate_interval])))", "p95"),
                unit="s"),
        _series("Refused relay connections", "Connections closed at once because every relay slot was taken.",
                ("sum(rate(trustcap_gateway_relay_refused_connections_total[$__rate_interval]))", "refused"),
                unit="ops"),
    ])


def capsules() -> Dashboard:
    return _dashboard("trustcap-capsules", "trustcap / Capsules",
                      "Capsules by phase and how many finish; their runs, wipes and violations on the HPCs.", [
        _stat("In flight", "Capsules neither Completed nor Failed.",
              'sum(trustcap_capsules{phase!~"Completed|Failed"})'),
        _stat("Completed", "Capsules that completed in the time range.",
              'sum(increase(trustcap_capsules_finished_total{phase="Completed"}[$__range]))'),
        _stat("Failed", "Capsules that failed in the time range.",
              'sum(increase(trustcap_capsules_finished_total{phase="Failed"}[$__range]))'),
        _stat("Metrics age", "Seconds since the operator last listed the cluster's objects for these metrics.",
              "time() - max(trustcap_operator_metrics_last_refresh_timestamp_seconds)", unit="s"),
        _series("Capsules by phase", "Capsule objects in the cluster, by phase.",
                ("sum by (phase) (trustcap_capsules)", "{{phase}}"), stacked=True),
        _series("Throughput", "Capsules finishing per second, by final phase.",
                ("sum by (phase) (rate(trustcap_capsules_finished_total[$__rate_interval]))", "{{phase}}"),
                unit="ops"),
        # The HPC agents' own metrics, which reach Prometheus through their gateways' /metrics
        # (gateway/agent_metrics.py): what happened on the HPC itself, with a `node` label.
        _series("Runs on the agents", "Capsule runs the HPC agents ended, by reason (agent/metrics.py).",
                ("sum by (reason) (rate(trustcap_agent_runs_total[$__rate_interval]))", "{{reason}}"),
                unit="ops", stacked=True),
        _series("Run and wipe durations", "p95 of a run on the agent (order to result) and of the executor's "
                "teardown and verified wipe after it.",
                ("histogram_quantile(0.95, sum by (le) (rate("
                 "trustcap_agent_run_duration_seconds_bucket[$__rate_interval])))", "run p95"),
                ("histogram_quantile(0.95, sum by (le) (rate("
                 "trustcap_agent_wipe_duration_seconds_bucket[$__rate_interval])))", "wipe p95"),
                unit="s"),
        _series("Isolation violations", "What the executors saw capsules attempt (kernel audit, seccomp, cgroup "
                "limits, egress), by kind.",
                ("sum by (kind) (rate(trustcap_agent_audit_violations_total[$__rate_interval]))", "{{kind}}"),
                unit="ops", stacked=True),
        _series("Agent metrics age", "Seconds since each gateway last took in its agent's metrics over the channel.",
                ("time() - max by (node) (trustcap_gateway_agent_metrics_last_success_timestamp_seconds)",
                 "{{node}}"), unit="s"),
        _series("Metrics refresh errors", "Scrapes that could not list the cluster and served the last snapshot.",
                ("sum(rate(trustcap_operator_metrics_refresh_errors_total[$__rate_interval]))", "errors"),
                unit="ops", w=FULL_WIDTH),
    ])


def chain() -> Dashboard:
    return _dashboard("trustcap-chain", "trustcap / Chain", "What the chain-writer has recorded and what waits.", [
        _stat("Records pending", "Decided rounds (Passed or Failed) not yet recorded on chain.",
              "sum(trustcap_chain_records_pending)"),
        _stat("Records written", "Rounds recorded on chain in the time range.",
              "sum(increase(trustcap_chain_records_written_total[$__range]))"),
        _stat("Unconfirmed batches", "Sealed batches not yet confirmed on chain.",
              "sum(trustcap_chain_writer_unconfirmed_batches)"),
        _stat("Last batch", "Verdicts in the last sealed batch.", "max(trustcap_chain_writer_last_batch_verdicts)"),
        _series("Records", "Rounds recorded per second, and decided rounds still waiting.",
                ("sum(rate(trustcap_chain_records_written_total[$__rate_interval]))", "written/s"),
                ("sum(trustcap_chain_records_pending)", "pending")),
        _series("Chain-writer events", "sent, resent, replaced, underpriced, rpc_unavailable, confirmed.",
                ("sum by (event) (rate(trustcap_chain_writer_events_total[$__rate_interval]))", "{{event}}"),
                unit="ops"),
    ])


DASHBOARDS: Final = {"trust": trust, "attestation": attestation, "capsules": capsules, "chain": chain}


def render(dashboard: Dashboard) -> str:
    """The dashboard's JSON, byte-stable (sorted keys), as grafanalib's own writer formats it."""
    out = io.StringIO()
    json.dump(dashboard.to_json_data(), out, sort_keys=True, indent=2, cls=DashboardEncoder)
    return out.getvalue() + "\n"


def configmap(name: str, dashboard_json: str) -> str:
    doc = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {
            "name": f"trustcap-dashboard-{name}",
            "labels": {"grafana_dashboard": "1", "app.kubernetes.io/name": "trustcap",
                       "app.kubernetes.io/component": "dashboards", "app.kubernetes.io/part-of": "trustcap"},
        },
        "data": {f"trustcap-{name}.json": dashboard_json},
    }
    header = "# Generated by dashboards/build.py from code; do not edit (tests/test_dashboards.py checks).\n"
    return header + yaml.dump(doc, Dumper=_LiteralDumper, sort_keys=False, width=1 << 16)


class _LiteralDumper(yaml.SafeDumper):
    """The dashboard JSON as a `|` block, so a reviewer reads the ConfigMap as JSON, not as escapes."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_LiteralDumper.add_representer(str, _str)


def files() -> dict[str, str]:
    """Every file dashboards/out/ holds, by name."""
    out: dict[str, str] = {}
    for name, make in DASHBOARDS.items():
        text = render(make())
        out[f"{name}.json"] = text
        out[f"{name}-configmap.yaml"] = configmap(name, text)
    out["alerts.yaml"] = alert_rules()
    return out


def alert_rules() -> str:
    header = ("# Generated by dashboards/build.py from dashboards/alerts.py; do not edit. "
              "Check: promtool check rules dashboards/out/alerts.yaml\n")
    return header + yaml.dump(sibling("alerts").rule_file(), Dumper=_LiteralDumper, sort_keys=False,
                              width=1 << 16)


def queries(doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel of a dashboard's JSON."""
    for panel in doc.get("panels") or []:
        yield from ((str(panel.get("title")), str(t["expr"])) for t in panel.get("targets") or [])
        yield from queries({"panels": panel.get("panels") or []})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dashboards/build.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT, help="where to write (default dashboards/out)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when --out differs")
    args = p.parse_args(argv)
    wanted = files()
    stale = sorted(n for n, text in wanted.items()
                   if not (args.out / n).is_file() or (args.out / n).read_text() != text)
    extra = sorted(f.name for f in args.out.glob("*") if f.name not in wanted) if args.out.is_dir() else []
    if args.check:
        for n in stale + extra:
            print(f"dashboards/build.py: {args.out / n} is not what build.py writes; run python dashboards/build.py",
                  file=sys.stderr)
        return 1 if stale or extra else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for n in stale:
        (args.out / n).write_text(wanted[n])
    for n in extra:
        (args.out / n).unlink()
    print(f"dashboards/build.py: {len(wanted)} files in {args.out} ({len(stale) + len(extra)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
