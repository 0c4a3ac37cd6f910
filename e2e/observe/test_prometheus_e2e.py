"""Observability end to end: the world (trustcap/world.py) runs one PSI capsule to Completed while a real
Prometheus (Debian's binary) scrapes the operator's /metrics, every gateway's /metrics (its loopback
metrics listener, which also carries its HPC agent's trustcap_agent_* metrics, fetched over the channel:
gateway/agent_metrics.py) and
a real netboot process's /metrics each second. The world runs no netboot (its agents start directly, in
their network namespaces, with no PXE boot), so this test starts one on the first gateway's HPC link,
serves it one approved boot file and asks it for two it must refuse. Then every PromQL query of every
dashboard (dashboards/build.py) must return data from it, every
alert rule (dashboards/alerts.py, loaded from dashboards/out/alerts.yaml as Prometheus's rule file) must be
evaluated healthy and watch series that exist, and the trust dashboard's data is drawn to
docs/img/trust-dashboard.png (dashboards/render.py) from the real query results.

Proves that the names the dashboards query are the names the running processes serve, that the
operator's lifecycle metrics follow a real capsule (finished, rounds decided, latency observed, chain
records written), and that every scrape target is up. Needs root and the stack, as e2e/lifecycle does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow

NS = "trustcap-e2e-observe"
ROOT = Path(__file__).resolve().parents[2]
NAMES_B = ["alice", "bob", "carol", "dave", "erin"]
NAMES_C = ["bob", "erin", "grace", "alice", "ivan"]
# Grafana's own variables, as Grafana would substitute them over this short run.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__range": "15m"}


RULES = ROOT / "dashboards" / "out" / "alerts.yaml"
PICTURE = ROOT / "docs" / "img" / "trust-dashboard.png"
# The components scraped here: the world's operator and gateways (with their agents' metrics), and the
# netboot this test starts.
WORLD_EXPORTS = {"operator", "gateway", "netboot"}
KERNEL = b"trustcap e2e observe: a boot file netboot serves\n"


def _build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trustcap_dashboards_build", ROOT / "dashboards" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    found = shutil.which("prometheus")
    if not found:
        pytest.skip("prometheus is not installed (Debian package `prometheus`; scripts/install-deps installs it)")
    return found


@pytest.fixture(scope="module")
def metrics_port() -> Iterator[int]:
    """The world's operator inherits this environment: it serves /metrics here (operator/__main__.py)."""
    port = _free_port()
    old = os.environ.get("TRUSTCAP_METRICS_ADDR")
    os.environ["TRUSTCAP_METRICS_ADDR"] = f"127.0.0.1:{port}"
    yield port
    if old is None:
        os.environ.pop("TRUSTCAP_METRICS_ADDR", None)
    else:
        os.environ["TRUSTCAP_METRICS_ADDR"] = old


@pytest.fixture(scope="module")
def world(stack: dict[str, Any], prometheus_bin: str, metrics_port: int,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from netlab import need_root

    from trustcap.world import World

    need_root("the observability e2e")
    with World.up(n=4, workdir=tmp_path_factory.mktemp("world"), namespace=NS) as w:
        yield w


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url
        self.started = time.time()

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:  # noqa: S310 (loopback)
                doc = json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry the reason in the body
            doc = json.loads(exc.read())
        return doc

    def query(self, expr: str) -> dict[str, Any]:
        return dict(self.api("/api/v1/query", query=expr))

    def value(self, expr: str) -> float | None:
        doc = self.query(expr)
        assert doc["status"] == "success", (expr, doc)
        result = doc["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        doc = self.api("/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")
        assert doc["status"] == "success", (expr, doc)
        return list(doc["data"]["result"])

    def wait(self, expr: str, ok: Any, timeout: float, what: str) -> float | None:
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = self.value(expr)
            if got is not None and ok(got):
                return got
            time.sleep(1)
        raise AssertionError(f"{what}: {expr} is {got} after {timeout:.0f}s")


def _netboot_argv(root: Path, manifest: Path, bind: str, metrics: int, metrics_address: str) -> list[str]:
    return [sys.executable, "-P", "-m", "trustcap.netboot", "serve", "--root", str(root), "--manifest", str(manifest),
            "--bind", bind, "--tftp-port", "0", "--http-port", "0", "--metrics-port", str(metrics),
            "--metrics-address", metrics_address]


@pytest.fixture(scope="module")
def netboot(world: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real `python -m trustcap.netboot serve` on the first gateway's HPC link (169.254.80.1), its
    /metrics on loopback: the kernel is approved with its digest, the initrd with another digest (a
    tampered file), and nothing else."""
    home = tmp_path_factory.mktemp("netboot")
    root = home / "root"
    root.mkdir()
    (root / "kernel").write_bytes(KERNEL)
    (root / "initrd").write_bytes(b"not the approved initrd\n")
    manifest = home / "approved.json"
    manifest.write_text(json.dumps({"kernel": "sha256:" + hashlib.sha256(KERNEL).hexdigest(),
                                    "initrd": "sha256:" + hashlib.sha256(b"the approved initrd\n").hexdigest()}))
    link = world.gateways[0]["ip"]
    port = _free_port()
    # the HPC link is no place for /metrics: refused before anything listens (the positive control is below)
    refused = subprocess.run(_netboot_argv(root, manifest, link, port, link), capture_output=True, text=True,
                             timeout=60, check=False)
    assert refused.returncode == 1 and "--metrics-address" in refused.stderr, refused.stderr
    log = (home / "netboot.log").open("wb")
    proc = subprocess.Popen(_netboot_argv(root, manifest, link, port, "127.0.0.1"), stdout=subprocess.PIPE,
                            stderr=log, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"netboot did not start: {(home / 'netboot.log').read_text()[-2000:]}"
        ports = json.loads(line)
        yield {"metrics": f"127.0.0.1:{port}", "http": f"http://{link}:{ports['http_port']}", "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
        log.close()


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (the test's own netboot)
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.fixture(scope="module")
def booted(netboot: dict[str, Any], prometheus: Prometheus) -> None:
    """What an HPC's PXE boot asks netboot for: the approved kernel is served, a tampered initrd and an
    unlisted file are refused; Prometheus sees both. Two boots, a few scrapes apart: a counter's first
    sample is where its series starts, so only the second boot shows as a rate on the dashboard."""
    for boot in (1, 2):
        assert _get(f"{netboot['http']}/kernel") == 200
        assert _get(f"{netboot['http']}/initrd") == 403
        assert _get(f"{netboot['http']}/not-listed") == 403
        prometheus.wait('sum(trustcap_netboot_served_total{protocol="http"})', lambda v, n=boot: v >= n, 30,
                        f"boot {boot}'s served file")
        prometheus.wait("sum(trustcap_netboot_refused_total)", lambda v, n=boot: v >= 2 * n, 30,
                        f"boot {boot}'s refused files")


@pytest.fixture(scope="module")
def prometheus(world: Any, netboot: dict[str, Any], prometheus_bin: str, metrics_port: int,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    home = tmp_path_factory.mktemp("prometheus")
    # each gateway's metrics listener (gateway MetricsService), apart from its relay since decision 0114
    relays = [f"127.0.0.1:{g['metrics_port']}" for g in world.gateways]
    assert RULES.is_file(), f"{RULES} is missing: run python dashboards/build.py"
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(RULES)],
              "scrape_configs": [
                  {"job_name": "trustcap-operator", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]},
                  {"job_name": "trustcap-gateway", "static_configs": [{"targets": relays}]},
                  {"job_name": "trustcap-netboot", "static_configs": [{"targets": [netboot["metrics"]]}]}]}
    (home / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (home / "prometheus.log").open("wb")
    proc = subprocess.Popen([prometheus_bin, f"--config.file={home / 'prometheus.yml'}",
                             f"--storage.tsdb.path={home / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--storage.tsdb.retention.time=1h"], stdout=log, stderr=log, start_new_session=True)
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2):  # noqa: S310 (loopback)
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (home / "prometheus.log").read_text()[-2000:]
                    raise AssertionError(f"prometheus did not start: {tail}") from None
                time.sleep(0.5)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def completed(world: Any, prometheus: Prometheus) -> dict[str, Any]:
    """One PSI capsule from apply to Completed, the way e2e/lifecycle submits it, while Prometheus scrapes."""
    from kubernetes import client, config

    from trustcap import scenario
    from trustcap.capsule.keys import KeyPair
    from trustcap.cli.capsule import build_image
    from trustcap.store import open_store

    api = config.new_client_from_config(config_file=str(world.kubeconfig))  # type: ignore[no-untyped-call]
    custom = client.CustomObjectsApi(api)
    image_id, _tag = build_image(scenario.PSI_DIR)
    owners = [scenario.Owner(name=n, keys=KeyPair.load(Path(world.owners[n]["key_file"])),
                             broker_url=world.owners[n]["broker_url"], names=names)
              for n, names in (("b", NAMES_B), ("c", NAMES_C))]
    doc = scenario.manifest_for(name="psi-observe", namespace=NS, image_digest=str(image_id), owners=owners,
                                payer=world.payer_address, amount_wei=10**15)
    scenario.seal_inputs(doc, owners, open_store(world.store_url))
    custom.create_namespaced_custom_object("trustcap.io", "v1alpha1", NS, "capsules", doc)
    obj = scenario.wait_capsule(custom, NS, "psi-observe", lambda o: bool((o.get("status") or {}).get("taskId")),
                                timeout=60)
    scenario.fund(world.rpc_url, world.deployment, world.payer, bytes.fromhex(obj["status"]["taskId"][2:]),
                  k=int(doc["spec"]["committee"]["size"]), amount_wei=10**15,
                  timeout_s=int(doc["spec"]["timeoutSeconds"]))
    final = scenario.wait_capsule(custom, NS, "psi-observe",
                                  lambda o: (o.get("status") or {}).get("phase") in scenario.TERMINAL, timeout=420)
    assert final["status"]["phase"] == "Completed", (final["status"].get("conditions"), world.logs_tail())
    return dict(final)


def test_every_target_is_up(world: Any, prometheus: Prometheus) -> None:
    n = len(world.gateways)
    prometheus.wait('sum(up{job="trustcap-operator"})', lambda v: v == 1, 30, "the operator's /metrics")
    prometheus.wait('sum(up{job="trustcap-gateway"})', lambda v: v == n, 30, f"all {n} relays' /metrics")
    prometheus.wait('sum(up{job="trustcap-netboot"})', lambda v: v == 1, 30, "netboot's /metrics")
    # every HPC agent's metrics, through its own gateway, labelled with its own node
    nodes = sorted(g["node"] for g in world.gateways)
    prometheus.wait('count(count by (node) (trustcap_agent_runs_total{job="trustcap-gateway"}))', lambda v: v == n,
                    30, "each agent's metrics through its gateway")
    by_node = prometheus.query('count by (node, instance) (trustcap_agent_runs_total)')["data"]["result"]
    relay_of = {g["node"]: f"127.0.0.1:{g['metrics_port']}" for g in world.gateways}
    assert sorted(r["metric"]["node"] for r in by_node) == nodes
    assert all(r["metric"]["instance"] == relay_of[r["metric"]["node"]] for r in by_node), by_node


def test_agent_metrics_follow_the_run_on_the_executor(world: Any, prometheus: Prometheus,
                                                      completed: dict[str, Any]) -> None:
    """The executor's agent counted the capsule's run, timed it and its verified wipe (the real Docker
    executor); no honest agent's snapshot was refused (the gateways' bounds, decision 0117)."""
    prometheus.wait('sum(trustcap_agent_runs_total{reason="Completed"})', lambda v: v >= 1, 30,
                    "the completed run on the executor's agent")
    prometheus.wait("sum(trustcap_agent_run_duration_seconds_count)", lambda v: v >= 1, 10, "the run's duration")
    prometheus.wait('sum(trustcap_agent_wipe_duration_seconds_count{verified="true"})', lambda v: v >= 1, 10,
                    "the run's verified wipe")
    assert prometheus.value('sum(trustcap_agent_wipe_duration_seconds_count{verified="false"})') == 0
    assert prometheus.value('sum(trustcap_agent_runs_total{reason!="Completed"})') == 0
    refused = prometheus.value('sum(trustcap_gateway_agent_metrics_refused_total{reason!="unavailable"})')
    assert refused in (None, 0), f"{refused} honest agent snapshots refused"


def test_lifecycle_metrics_follow_the_capsule(world: Any, prometheus: Prometheus, completed: dict[str, Any]) -> None:
    n = len(world.gateways)
    prometheus.wait('sum(trustcap_capsules_finished_total{phase="Completed"})', lambda v: v >= 1, 30,
                    "the completed capsule")
    prometheus.wait('sum(trustcap_capsules{phase="Completed"})', lambda v: v >= 1, 10, "capsules by phase")
    # PSI runs a pre and a post round at least; both passed, and their latency was observed.
    prometheus.wait('sum(trustcap_attestation_rounds_decided_total{result="Passed"})', lambda v: v >= 2, 30,
                    "passed rounds")
    prometheus.wait("sum(trustcap_attestation_round_decision_seconds_count)", lambda v: v >= 2, 10,
                    "decision latency observations")
    assert prometheus.value('sum(trustcap_attestation_rounds_decided_total{result=~"Failed|Expired"})') == 0
    # HPCNodes and Gateways are cluster-scoped and the stack is shared: look at this world's own.
    nodes = "|".join(g["node"] for g in world.gateways)
    gateways = "|".join(g["name"] for g in world.gateways)
    prometheus.wait(f'sum(trustcap_hpcnode_phase{{node=~"{nodes}"}})', lambda v: v == n, 10,
                    "each node in exactly one phase")
    prometheus.wait(f'sum(trustcap_gateway_ready{{gateway=~"{gateways}"}})', lambda v: v == n, 30,
                    "every gateway active on chain")
    prometheus.wait(f'count(trustcap_gateway_reputation_ratio{{gateway=~"{gateways}"}} <= 1)', lambda v: v == n, 30,
                    "each gateway's reputation as a ratio")
    prometheus.wait("sum(trustcap_chain_records_written_total)", lambda v: v >= 2, 90, "rounds recorded on chain")
    prometheus.wait("sum(trustcap_chain_records_pending)", lambda v: v == 0, 90, "no decided round left unrecorded")
    prometheus.wait('sum(trustcap_gateway_relay_challenges_total{result="served"})', lambda v: v >= 1, 10,
                    "challenges the relays served")


def test_every_dashboard_query_returns_data(prometheus: Prometheus, completed: dict[str, Any], booted: None) -> None:
    build = _build()
    prometheus.wait("sum(trustcap_chain_records_written_total)", lambda v: v >= 1, 90, "a chain record")
    time.sleep(3)  # a few more scrapes after the last change
    empty: list[str] = []
    invalid: list[str] = []
    ran = 0
    for name, make in build.DASHBOARDS.items():
        doc = json.loads(build.render(make()))
        for title, expr in build.queries(doc):
            promql = expr
            for var, value in GRAFANA_VARS.items():
                promql = promql.replace(var, value)
            answer = prometheus.query(promql)
            ran += 1
            if answer.get("status") != "success":
                invalid.append(f"{name}/{title}: {promql}: {answer.get('error')}")
            elif not answer["data"]["result"]:
                empty.append(f"{name}/{title}: {promql}")
    assert ran >= 41, f"only {ran} queries: the dashboards lost panels"
    assert invalid == [], "queries Prometheus refuses:\n" + "\n".join(invalid)
    # Every series a panel reads exists from the first scrape or after this run (none is legitimately empty).
    assert empty == [], "panels with no data after a completed capsule:\n" + "\n".join(empty)


def test_every_alert_rule_is_evaluated_and_watches_series_the_world_exports(
        prometheus: Prometheus, completed: dict[str, Any], booted: None) -> None:
    """The alert rules as Prometheus itself loads them: every rule of dashboards/alerts.py is in the rule
    file it runs, is evaluated without error, its expression is accepted by the query API, and its signal
    (the expression before the threshold) has series where this world runs the exporting component."""
    alerts = _build().sibling("alerts").alerts()
    assert len(alerts) >= 10, f"only {len(alerts)} alert rules"
    deadline = time.monotonic() + 30
    while True:  # each rule group is evaluated once per second; wait until every rule was
        groups = prometheus.api("/api/v1/rules", type="alert")["data"]["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        evaluated = all(not str(r.get("lastEvaluation", "")).startswith("0001") for r in loaded.values())
        if (set(loaded) >= {a.name for a in alerts} and evaluated) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert set(loaded) == {a.name for a in alerts}, f"Prometheus loaded {sorted(loaded)} from {RULES}"
    unhealthy = [f"{n}: {r.get('health')} {r.get('lastError', '')}" for n, r in loaded.items()
                 if r.get("health") != "ok"]
    assert unhealthy == [], "rules Prometheus cannot evaluate:\n" + "\n".join(unhealthy)
    refused: list[str] = []
    empty: list[str] = []
    for alert in alerts:
        answer = prometheus.query(alert.expr)
        if answer.get("status") != "success":
            refused.append(f"{alert.name}: {alert.expr}: {answer.get('error')}")
            continue
        if alert.exported_by in WORLD_EXPORTS:
            signal = prometheus.query(alert.signal)
            if signal.get("status") != "success" or not signal["data"]["result"]:
                empty.append(f"{alert.name}: {alert.signal}")
    assert refused == [], "alert expressions the query API refuses:\n" + "\n".join(refused)
    assert empty == [], "alerts watching series this world does not export:\n" + "\n".join(empty)


def test_trust_dashboard_picture_from_the_real_query_results(prometheus: Prometheus, completed: dict[str, Any],
                                                             booted: None) -> None:
    """Runs last: draws the trust dashboard over this run from Prometheus's query_range answers into
    docs/img/trust-dashboard.png (docs/observability.md shows it; the lead commits the file)."""
    build = _build()
    render = build.sibling("render")
    end = time.time()
    start = max(prometheus.started, end - 15 * 60)
    step = max(1.0, (end - start) / 300)

    def fetch(expr: str) -> list[Any]:
        return [render.Series(dict(r["metric"]), [(float(t), float(v)) for t, v in r["values"]])
                for r in prometheus.query_range(expr, start, end, step)]

    doc = json.loads(build.render(build.DASHBOARDS["trust"]()))
    drawn = render.render(doc, fetch, PICTURE, substitute={"$__rate_interval": "5m", "$__range": "15m"})
    assert drawn >= len(doc["panels"]), f"only {drawn} series for {len(doc['panels'])} panels in {PICTURE}"
    assert PICTURE.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
