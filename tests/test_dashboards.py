"""The dashboards (dashboards/build.py) and alert rules (dashboards/alerts.py): dashboards/out/ is exactly
what the code writes, and every panel and every alert queries only metrics the code exports, so a renamed
metric breaks this test, not a dashboard or an alert in prod. promtool (Debian's `prometheus` package,
scripts/apt-packages.txt) checks the rule file.

The exported names are read from the code itself: the operator's LifecycleCollector (describe(), which
lists nothing) and the prometheus_client metrics that the gateway and the chain-writer register on import.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
METRIC = re.compile(r"\btrustcap_[a-zA-Z0-9_]+")


def _load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trustcap_dashboards_build", ROOT / "dashboards" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()


class Tripwire:
    def list_all(self, plural: str) -> list[dict[str, Any]]:
        raise AssertionError(f"Must not be called! (listed {plural})")


def _sample_names(families: Iterable[Any]) -> set[str]:
    names: set[str] = set()
    for fam in families:
        if fam.type == "counter":
            names |= {fam.name + "_total", fam.name + "_created"}
        elif fam.type == "histogram":
            names |= {fam.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(fam.name)
    return names


def exported_names() -> set[str]:
    from prometheus_client import REGISTRY

    from trustcap.agent import metrics as agent_metrics  # trustcap_agent_*, re-exported by the gateways
    from trustcap.chain import metrics as _chain  # noqa: F401  (registers trustcap_chain_writer_*)
    from trustcap.gateway import agent_metrics as _agent  # noqa: F401  (trustcap_gateway_agent_metrics_*)
    from trustcap.gateway import monitor as _monitor  # noqa: F401  (trustcap_gateway_monitor_*)
    from trustcap.gateway import relay as _relay  # noqa: F401  (trustcap_gateway_relay_*, node_trusted)
    from trustcap.netboot import store as _netboot  # noqa: F401  (trustcap_netboot_*)
    from trustcap.operator.metrics import LifecycleCollector

    names = _sample_names(LifecycleCollector(Tripwire()).describe())
    names |= _sample_names(REGISTRY.collect())
    names |= _sample_names(agent_metrics.REGISTRY.collect())  # the agent's own registry (agent/metrics.py)
    return {n for n in names if n.startswith("trustcap_")}


def test_out_is_exactly_what_build_writes(tmp_path: Path) -> None:
    assert build.main(["--check"]) == 0, "dashboards/out/ is edited by hand or stale: run python dashboards/build.py"
    wanted = build.files()
    assert sorted(p.name for p in (ROOT / "dashboards" / "out").iterdir()) == sorted(wanted)
    # positive control: --check notices one changed byte and one stray file
    build.main(["--out", str(tmp_path)])
    assert build.main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "trust.json").write_text(wanted["trust.json"].replace("Nodes ready", "Nodes Ready"))
    assert build.main(["--out", str(tmp_path), "--check"]) == 1
    build.main(["--out", str(tmp_path)])
    (tmp_path / "hand-made.json").write_text("{}")
    assert build.main(["--out", str(tmp_path), "--check"]) == 1


def test_the_four_dashboards_exist() -> None:
    assert set(build.DASHBOARDS) == {"trust", "attestation", "capsules", "chain"}


@pytest.mark.parametrize("name", sorted(build.DASHBOARDS))
def test_every_panel_queries_only_metrics_the_code_exports(name: str) -> None:
    known = exported_names()
    assert "trustcap_capsules" in known and "trustcap_gateway_relay_challenges_total" in known  # positive control
    doc = json.loads(build.files()[f"{name}.json"])
    assert doc["panels"], f"{name} has no panels"
    for panel in doc["panels"]:
        exprs = [t.get("expr", "") for t in panel.get("targets") or []]
        assert exprs and all(exprs), f"{name}: panel {panel['title']!r} has no PromQL target"
        for expr in exprs:
            used = set(METRIC.findall(expr))
            assert used, f"{name}: {panel['title']!r} queries no trustcap metric: {expr}"
            assert used <= known, f"{name}: {panel['title']!r} names metrics no code exports: {sorted(used - known)}"


def test_a_query_naming_an_unknown_metric_is_caught() -> None:
    """Positive control for the check above: the regex and the exported set tell a typo apart."""
    used = set(METRIC.findall("sum(rate(trustcap_capsule_finished_total[5m]))"))
    assert used and not used <= exported_names()


@pytest.mark.parametrize("name", sorted(build.DASHBOARDS))
def test_configmap_carries_the_dashboard_with_the_sidecar_label(name: str) -> None:
    files = build.files()
    cm = yaml.safe_load(files[f"{name}-configmap.yaml"])
    assert cm["kind"] == "ConfigMap"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert len(cm["metadata"]["name"]) <= 63
    (key,) = cm["data"]
    assert key.endswith(".json")
    assert json.loads(cm["data"][key]) == json.loads(files[f"{name}.json"])


def test_dashboards_have_stable_unique_uids_and_panel_ids() -> None:
    docs = [json.loads(t) for n, t in build.files().items() if n.endswith(".json")]
    uids = [d["uid"] for d in docs]
    assert len(set(uids)) == len(uids) and all(u.startswith("trustcap-") for u in uids)
    for d in docs:
        ids = [p["id"] for p in d["panels"]]
        assert len(set(ids)) == len(ids)
        assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in d["panels"])
        assert all(t["datasource"]["uid"] == "${datasource}" for p in d["panels"] for t in p["targets"])


alerts = build.sibling("alerts")


def _promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: install Debian's `prometheus` package (scripts/apt-packages.txt)"
    return found


def test_alert_rules_are_the_generated_file() -> None:
    doc = yaml.safe_load(build.files()["alerts.yaml"])
    assert doc == alerts.rule_file()
    names = [r["alert"] for g in doc["groups"] for r in g["rules"]]
    assert len(set(names)) == len(names)
    # the alerts the issue asks for: a node quarantined, quorum failures, the chain-writer lagging
    assert {"TrustcapNodeQuarantined", "TrustcapQuorumFailures", "TrustcapChainWriterLagging"} <= set(names)


@pytest.mark.parametrize("alert", alerts.alerts(), ids=lambda a: a.name)
def test_every_alert_queries_only_metrics_the_code_exports(alert: Any) -> None:
    used = set(METRIC.findall(alert.expr))
    assert used, f"{alert.name} watches no trustcap metric: {alert.expr}"
    unknown = used - exported_names()
    assert not unknown, f"{alert.name} names metrics no code exports: {sorted(unknown)}"
    assert alert.expr == f"{alert.signal} {alert.condition}" and alert.condition


def test_promtool_accepts_the_rule_file(tmp_path: Path) -> None:
    out = subprocess.run([_promtool(), "check", "rules", str(ROOT / "dashboards" / "out" / "alerts.yaml")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(alerts.alerts())} rules found" in out.stdout
    # positive control: promtool refuses a rule whose expression does not parse
    broken = alerts.rule_file()
    broken["groups"][0]["rules"][0]["expr"] = "sum(trustcap_hpcnode_phase"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    bad = subprocess.run([_promtool(), "check", "rules", str(tmp_path / "broken.yaml")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0 and "parse error" in (bad.stdout + bad.stderr).lower(), bad.stdout + bad.stderr


render = build.sibling("render")


def test_render_draws_every_panel_of_the_trust_dashboard_from_the_fetched_data(tmp_path: Path) -> None:
    """The picture's code with a fake `fetch` (e2e/observe passes the real Prometheus): every panel's query
    is asked for, Grafana's variables substituted, and each returned series drawn."""
    doc = json.loads(build.files()["trust.json"])
    asked: list[str] = []

    def by_phase(expr: str) -> bool:
        return "phase" in expr and "Quarantined" not in expr

    def fetch(expr: str) -> list[Any]:
        asked.append(expr)
        if by_phase(expr):
            return [render.Series({"phase": p}, [(1_700_000_000.0 + t, float(t % 3)) for t in range(0, 60, 5)])
                    for p in ("Ready", "Booting")]
        return [render.Series({"node": "hpc-1"}, [(1_700_000_000.0, 1.0), (1_700_000_060.0, 2.0)])]

    out = tmp_path / "trust.png"
    drawn = render.render(doc, fetch, out, substitute={"$__range": "15m", "$__rate_interval": "5m"})
    wanted = [t["expr"].replace("$__range", "15m").replace("$__rate_interval", "5m")
              for p in doc["panels"] for t in p["targets"]]
    assert asked == wanted and not any("$__" in e for e in asked)
    assert drawn == sum(2 if by_phase(e) else 1 for e in wanted)  # by-phase queries returned two series
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_render_reports_no_data_when_nothing_came_back(tmp_path: Path) -> None:
    doc = json.loads(build.files()["trust.json"])
    assert render.render(doc, lambda expr: [], tmp_path / "empty.png") == 0


@pytest.mark.parametrize(("fmt", "labels", "want"), [
    pytest.param("{{phase}}", {"phase": "Ready"}, "Ready", id="label"),
    pytest.param("p95 {{ phase }}", {"phase": "pre"}, "p95 pre", id="spaces"),
    pytest.param("", {"__name__": "x", "node": "a"}, "node=a", id="no-format"),
])
def test_legend_follows_grafana_legend_format(fmt: str, labels: dict[str, str], want: str) -> None:
    assert render.legend(fmt, labels) == want


def test_every_alert_has_its_runbook_section_in_the_docs() -> None:
    """Each rule's `runbook` annotation points at a heading of docs/observability.md."""
    doc = (ROOT / "docs" / "observability.md").read_text()
    headings = {line[4:].strip().lower() for line in doc.splitlines() if line.startswith("### ")}
    for alert in alerts.alerts():
        anchor = alert.rule()["annotations"]["runbook"].split("#", 1)[1]
        assert anchor in headings, f"docs/observability.md has no '### {alert.name}' section"
    assert "img/trust-dashboard.png" in doc
