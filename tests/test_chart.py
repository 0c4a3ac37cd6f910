"""The Helm chart (the repository root), rendered by the real helm binary of the tool cache.

Lint (also --strict), several value sets (defaults, the Prometheus Operator present, a gateway on amd64,
an external chain RPC), the schema refusing bad values by name, least-privilege RBAC (the operator's
rules cover every call its code makes; the gateway can patch HPCNode status only under the admission
policy that keeps it to its own fields), and the dashboards shipped exactly as dashboards/build.py
writes them. helm renders offline: nothing here talks to a cluster (the admission policy itself is
tested against the real API server in e2e/observe/test_chart_admission_e2e.py).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from trustcap.stack import paths

ROOT = Path(__file__).resolve().parents[1]
HELM = paths.bin_dir() / "helm"
GROUP = "trustcap.io"
# What the gateway itself writes into HPCNode status (gateway/publish.py, actions.py, boot.py).
GATEWAY_STATUS_FIELDS = {"enrolment", "lastWipe", "quarantineRequest"}


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"trustcap_dashboards_{name}", ROOT / "dashboards" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load("build")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert HELM.is_file(), f"{HELM} is missing: `make stack` builds helm into the tool cache (trustcap/stack)"
    proc = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120, check=False,
                          env={"HOME": str(Path.home()), "PATH": "/usr/bin:/bin", "KUBECONFIG": "/nonexistent"})
    if check:
        assert proc.returncode == 0, f"helm {' '.join(args)}: {proc.stderr}"
    return proc


def render(*flags: str) -> list[dict[str, Any]]:
    out = helm("template", "rel", str(ROOT), "--namespace", "trustcap", *flags).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def kinds(docs: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def one(docs: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


@pytest.fixture(scope="module")
def defaults() -> list[dict[str, Any]]:
    return render()


# -- lint and packaging --------------------------------------------------------------------------------
@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_lint_is_clean(strict: bool) -> None:
    out = helm("lint", str(ROOT), *(["--strict"] if strict else []))
    assert "0 chart(s) failed" in out.stdout
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


def test_the_package_holds_only_what_helm_reads(tmp_path: Path) -> None:
    helm("package", str(ROOT), "-d", str(tmp_path))
    (pkg,) = tmp_path.glob("trustcap-*.tgz")
    with tarfile.open(pkg) as tar:
        names = set(tar.getnames())
    assert pkg.stat().st_size < 100_000, f"{pkg.name} is {pkg.stat().st_size} bytes: .helmignore lets too much in"
    tops = {n.split("/")[1] for n in names if n.count("/") >= 1}
    assert tops == {"Chart.yaml", "values.yaml", "values.schema.json", ".helmignore", "templates", "charts", "crds",
                    "dashboards"}, tops
    assert {f"trustcap/charts/{c}/Chart.yaml" for c in ("operator", "gateway", "netboot", "chain")} <= names
    assert "trustcap/dashboards/out/alerts.yaml" in names
    assert not [n for n in names if n.endswith(".py") or "/tests/" in n.replace("templates/tests/", "")]


def test_crds_come_from_crds_including_the_kopf_peering_subfolder() -> None:
    out = helm("template", "rel", str(ROOT), "--include-crds").stdout
    crds = {d["metadata"]["name"] for d in yaml.safe_load_all(out) if d and d["kind"] == "CustomResourceDefinition"}
    on_disk = {yaml.safe_load(p.read_text())["metadata"]["name"] for p in (ROOT / "crds").rglob("*.yaml")}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev", "hpcnodes.trustcap.io"} <= on_disk
    assert crds == on_disk


# -- value sets ----------------------------------------------------------------------------------------
def test_defaults_render_every_part_without_monitoring_objects(defaults: list[dict[str, Any]]) -> None:
    by = kinds(defaults)
    assert {d["metadata"]["name"] for d in by["Deployment"]} == {"rel-trustcap-operator"}
    assert {d["metadata"]["name"] for d in by["DaemonSet"]} == {"rel-trustcap-gateway", "rel-trustcap-netboot"}
    assert "ServiceMonitor" not in by and "PrometheusRule" not in by  # no monitoring.coreos.com/v1 offline
    assert "ConfigMap" in by and "ValidatingAdmissionPolicy" in by
    assert not [d for d in defaults if d["metadata"]["name"] == "rel-trustcap-chain"]  # chain off by default


def test_operator_serves_metrics_on_the_pod_address(defaults: list[dict[str, Any]]) -> None:
    dep = one(defaults, "Deployment", "rel-trustcap-operator")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[args.index("--metrics") + 1] == "0.0.0.0:9464"
    assert "--peering" in args and "--standalone" not in args
    assert c["image"] == "trustcap/operator:0.1.0" and c["imagePullPolicy"] == "IfNotPresent"
    assert "command" not in c  # the image's entrypoint (python -m trustcap.operator) runs
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["TRUSTCAP_SYSTEM_NAMESPACE"] == "trustcap"
    assert "TRUSTCAP_CHAIN_RPC" not in env
    assert one(defaults, "ClusterKopfPeering", "trustcap")


def test_images_are_the_three_trustcap_images_at_app_version(defaults: list[dict[str, Any]]) -> None:
    images = {c["image"] for d in defaults if d["kind"] in ("Deployment", "DaemonSet")
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {"trustcap/operator:0.1.0", "trustcap/gateway:0.1.0", "trustcap/netboot:0.1.0"}
    other = render("--set", "global.image.tag=dev1", "--set", "global.image.registry=registry.local:5000/")
    images = {c["image"] for d in other if d["kind"] in ("Deployment", "DaemonSet")
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {f"registry.local:5000/trustcap/{p}:dev1" for p in ("operator", "gateway", "netboot")}


def test_gateway_daemonset_runs_on_pis_on_the_host_network_with_the_zymkey(defaults: list[dict[str, Any]]) -> None:
    ds = one(defaults, "DaemonSet", "rel-trustcap-gateway")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["nodeSelector"] == {"kubernetes.io/arch": "arm64"}
    zymkey = next(v for v in spec["volumes"] if v["name"] == "zymkey")
    assert zymkey["hostPath"] == {"path": "/dev/i2c-1", "type": "CharDevice"}
    (c,) = spec["containers"]
    assert {"name": "zymkey", "mountPath": "/dev/i2c-1"} in c["volumeMounts"]
    assert c["args"][c["args"].index("--kubeconfig") + 1] == "in-cluster"
    assert c["args"][c["args"].index("--node") + 1] == "$(NODE_NAME)"
    assert "privileged" not in c["securityContext"]  # the local API server refuses privileged pods


@pytest.mark.parametrize(("flags", "selector"), [
    pytest.param(["--set", "gateway.nodeSelector.kubernetes\\.io/arch=amd64"], {"kubernetes.io/arch": "amd64"},
                 id="amd64"),
    pytest.param(["--set", "gateway.nodeSelector=null"], None, id="every-node"),
])
def test_gateway_node_selector_is_overridable(flags: list[str], selector: dict[str, str] | None) -> None:
    ds = one(render(*flags), "DaemonSet", "rel-trustcap-gateway")
    assert ds["spec"]["template"]["spec"].get("nodeSelector") == selector


def test_zymkey_device_comes_from_values() -> None:
    ds = one(render("--set", "gateway.trustRoot.zymkey.device=/dev/i2c-3"), "DaemonSet", "rel-trustcap-gateway")
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert vols["zymkey"]["hostPath"]["path"] == "/dev/i2c-3"
    soft = one(render("--set", "gateway.trustRoot.zymkey.enabled=false"), "DaemonSet", "rel-trustcap-gateway")
    assert "zymkey" not in {v["name"] for v in soft["spec"]["template"]["spec"]["volumes"]}


def test_monitoring_objects_when_the_prometheus_operator_is_there() -> None:
    # without TLS for its metrics listener a gateway serves them on the Pi's loopback: no monitor (0114)
    plain = {d["metadata"]["name"] for d in render("--api-versions", "monitoring.coreos.com/v1")
             if d["kind"] == "ServiceMonitor"}
    assert plain == {"rel-trustcap-operator"}
    docs = render("--api-versions", "monitoring.coreos.com/v1", "--set", "monitoring.labels.release=kps",
                  "--set", "gateway.metrics.tlsSecret=gw-metrics-tls", "--set", "gateway.metrics.scrapeSecret=scrape")
    by = kinds(docs)
    monitors = {d["metadata"]["name"]: d for d in by["ServiceMonitor"]}
    assert set(monitors) == {"rel-trustcap-operator", "rel-trustcap-gateway"}
    assert monitors["rel-trustcap-operator"]["spec"]["endpoints"][0]["port"] == "metrics"
    gateway = monitors["rel-trustcap-gateway"]["spec"]["endpoints"][0]
    assert (gateway["port"], gateway["scheme"]) == ("metrics", "https")  # never the relay port
    assert gateway["tlsConfig"]["keySecret"] == {"name": "scrape", "key": "tls.key"}
    for d in (*by["ServiceMonitor"], *by["PrometheusRule"]):
        assert d["metadata"]["labels"]["release"] == "kps"
    # each monitor's selector matches its Service (else Prometheus scrapes nothing)
    for m in by["ServiceMonitor"]:
        svc = one(docs, "Service", m["metadata"]["name"])
        assert m["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (rule,) = by["PrometheusRule"]
    assert rule["spec"]["groups"] == build.sibling("alerts").rule_file()["groups"]
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert any("trustcap_hpcnode_phase" in e and "Quarantined" in e for e in exprs)
    assert any("trustcap_attestation_rounds_decided_total" in e and "Failed" in e for e in exprs)
    assert any("trustcap_chain_records_pending" in e for e in exprs)


def test_chain_pointing_at_an_external_rpc() -> None:
    url = "https://rpc.chain.example.invalid:8545"
    docs = render("--set", "global.chain.enabled=true", "--set", f"global.chain.rpcUrl={url}",
                  "--set", "global.chain.keysSecret=chain-keys", "--set", "global.chain.deployment.chainId=31337")
    cm = one(docs, "ConfigMap", "rel-trustcap-chain")
    assert cm["data"]["rpcUrl"] == url and json.loads(cm["data"]["deployment.json"]) == {"chainId": 31337}
    (op,) = one(docs, "Deployment", "rel-trustcap-operator")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in op["env"]}
    assert env["TRUSTCAP_CHAIN_RPC"]["valueFrom"]["configMapKeyRef"] == {"name": "rel-trustcap-chain", "key": "rpcUrl"}
    assert env["TRUSTCAP_CHAIN_DEPLOYMENT"]["value"] == "/etc/trustcap/chain/deployment.json"
    (gw,) = one(docs, "DaemonSet", "rel-trustcap-gateway")["spec"]["template"]["spec"]["containers"]
    assert gw["args"][gw["args"].index("--chain-rpc") + 1] == "$(TRUSTCAP_CHAIN_RPC)"
    # a deployment kept in the user's own ConfigMap is mounted instead
    docs = render("--set", "global.chain.enabled=true", "--set", "global.chain.keysSecret=chain-keys",
                  "--set", "global.chain.existingConfigMap=my-deployment")
    pod = one(docs, "Deployment", "rel-trustcap-operator")["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["chain"]["configMap"]["name"] == "my-deployment"


def test_the_default_gateway_policy_is_one_the_gateway_loads() -> None:
    """values.yaml's gateway.policy with its boot images (gateway.bootDigests, as 0x hex) is a policy
    gateway/policy.py accepts; without an attestation section it refuses to start (the control)."""
    from trustcap.gateway.errors import PolicyError
    from trustcap.gateway.policy import parse_gateway_policy

    policy = yaml.safe_load((ROOT / "values.yaml").read_text())["gateway"]["policy"]
    assert policy["attestation"]["bootImages"] == []  # the chart fills them from gateway.bootDigests
    filled = {**policy, "attestation": {**policy["attestation"], "bootImages": ["0x" + "ab" * 32]}}
    parsed = parse_gateway_policy(yaml.safe_dump(filled))
    assert parsed.attestation.boot_images == ["0x" + "ab" * 32] and parsed.actions["critical"] == "quarantine"
    with pytest.raises(PolicyError, match="attestation"):
        parse_gateway_policy(yaml.safe_dump({k: v for k, v in policy.items() if k != "attestation"}))


def test_the_rendered_gateway_policy_names_the_boot_digests_and_loads() -> None:
    """The chart fills attestation.bootImages from gateway.bootDigests, so the default policy is one the
    gateway starts with; an explicit list is kept as given."""
    import json as _json

    from trustcap.gateway.policy import parse_gateway_policy

    digest = "sha256:" + "ab" * 32
    cm = one(render("--set", f"gateway.bootDigests[0]={digest}"), "ConfigMap", "rel-trustcap-gateway")
    policy = parse_gateway_policy(cm["data"]["policy.yaml"])
    assert policy.attestation.boot_images == ["0x" + "ab" * 32]
    given = "0x" + "cd" * 32
    cm = one(render("--set", f"gateway.bootDigests[0]={digest}",
                    "--set", f"gateway.policy.attestation.bootImages[0]={given}"), "ConfigMap", "rel-trustcap-gateway")
    assert _json.loads(cm["data"]["policy.yaml"])["attestation"]["bootImages"] == [given]


def _gateway_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(docs, "DaemonSet", "rel-trustcap-gateway")["spec"]["template"]["spec"]["containers"]
    return c


def test_the_gateway_guards_its_hpc_link_when_the_interface_is_named(defaults: list[dict[str, Any]]) -> None:
    assert "--hpc-link" not in _gateway_container(defaults)["args"]  # "" = unguarded (NOTES says to set it)
    args = _gateway_container(render("--set", "gateway.hpcLink.interface=eth1",
                                     "--set", "gateway.hpcLink.httpPort=0"))["args"]
    assert args[args.index("--hpc-link") + 1] == "eth1"
    assert args[args.index("--netboot-tftp-port") + 1] == "69"
    assert args[args.index("--netboot-http-port") + 1] == "0"
    for bad in ("eth1; rm -rf /", "x" * 16):
        proc = helm("template", "rel", str(ROOT), "--set", f"gateway.hpcLink.interface={bad}", check=False)
        assert proc.returncode != 0 and "hpcLink" in proc.stderr, proc.stderr



def test_the_guarded_link_never_reaches_the_clusters_networks_by_default() -> None:
    """Beyond the Pi no address check tells a pod from the internet: by default every private and shared
    IPv4 range is denied (decision 0118), [] denies none, and a value that is no CIDR is refused by name;
    the rendered arguments are parsed by the gateway's own CLI."""
    import ipaddress

    from trustcap.gateway.__main__ import parser

    args = _gateway_container(render("--set", "gateway.hpcLink.interface=eth1",
                                     "--set-json", f'gateway.bootDigests=["sha256:{"ab" * 32}"]'))["args"]
    denied = [args[i + 1] for i, a in enumerate(args) if a == "--deny-network"]
    assert denied == ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"]
    for pod in ("10.42.0.7", "10.43.0.1", "192.168.1.20"):  # k3s's pod and service networks, a Pi LAN
        assert any(ipaddress.ip_address(pod) in ipaddress.ip_network(n) for n in denied), pod
    parsed = parser().parse_args([a.replace("$(NODE_NAME)", "pi-1").replace("$(POD_IP)", "192.0.2.7")
                                  for a in args])
    assert parsed.deny_network == denied
    none = _gateway_container(render("--set", "gateway.hpcLink.interface=eth1",
                                     "--set-json", "gateway.hpcLink.denyNetworks=[]"))["args"]
    assert "--deny-network" not in none
    proc = helm("template", "rel", str(ROOT), "--set", "gateway.hpcLink.interface=eth1",
                "--set-json", 'gateway.hpcLink.denyNetworks=["the-cluster"]', check=False)
    assert proc.returncode != 0 and "denyNetworks" in proc.stderr, proc.stderr


def test_the_reboot_wipe_watches_the_named_carrier_link(defaults: list[dict[str, Any]]) -> None:
    """Decision 0119: "" leaves the gateway's default (its --hpc-link); a name is passed with the command."""
    assert "--carrier-link" not in _gateway_container(defaults)["args"]
    args = _gateway_container(render("--set", "gateway.rebootCommand=/usr/local/bin/relay-cycle",
                                     "--set", "gateway.carrierLink=eth2"))["args"]
    assert args[args.index("--reboot-command") + 1] == "/usr/local/bin/relay-cycle"
    assert args[args.index("--carrier-link") + 1] == "eth2"
    proc = helm("template", "rel", str(ROOT), "--set", "gateway.carrierLink=eth2; reboot", check=False)
    assert proc.returncode != 0 and "carrierLink" in proc.stderr, proc.stderr
    proc = helm("template", "rel", str(ROOT), "--set", "gateway.rebootCommand=/usr/local/bin/relay-cycle",
                check=False)  # no link to watch: the proofs could never be clean, so the chart says so
    assert proc.returncode != 0 and "needs gateway.carrierLink or gateway.hpcLink.interface" in proc.stderr
    args = _gateway_container(render("--set", "gateway.rebootCommand=/usr/local/bin/relay-cycle",
                                     "--set", "gateway.hpcLink.interface=eth1"))["args"]
    assert "--carrier-link" not in args and args[args.index("--hpc-link") + 1] == "eth1"  # the gateway's default


def test_the_gateway_metrics_stay_on_loopback_unless_served_over_tls(defaults: list[dict[str, Any]]) -> None:
    c = _gateway_container(defaults)
    assert c["args"][c["args"].index("--metrics-address") + 1] == "127.0.0.1:9466"
    assert "--metrics-tls-cert" not in c["args"] and [p["name"] for p in c["ports"]] == ["relay"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["TRUSTCAP_ENROLMENT_REFRESH_SECONDS"] == "600"
    c = _gateway_container(render("--set", "gateway.metrics.tlsSecret=gw-metrics"))
    args = c["args"]
    assert args[args.index("--metrics-address") + 1] == "$(POD_IP):9466"
    assert args[args.index("--metrics-client-ca") + 1] == "/etc/trustcap/metrics-tls/ca.crt"
    assert "metrics" in [p["name"] for p in c["ports"]]
    assert {"name": "metrics-tls", "mountPath": "/etc/trustcap/metrics-tls", "readOnly": True} in c["volumeMounts"]


def test_netboot_serves_metrics_on_loopback_or_on_the_pod_address_behind_a_headless_service(
        defaults: list[dict[str, Any]]) -> None:
    loopback = one(defaults, "DaemonSet", "rel-trustcap-netboot")  # the default: the Pi's own Prometheus
    args = loopback["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--metrics-address") + 1] == "127.0.0.1"
    docs = render("--set", "netboot.metricsAddress=")
    ds = one(docs, "DaemonSet", "rel-trustcap-netboot")
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[args.index("--metrics-address") + 1] == "$(POD_IP)" and args[args.index("--bind") + 1] != "$(POD_IP)"
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert {"name": "metrics", "containerPort": 9465} in c["ports"]
    svc = one(docs, "Service", "rel-trustcap-netboot")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["ports"] == [
        {"name": "metrics", "port": 9465, "targetPort": "metrics"}]
    assert svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


def test_chain_without_keys_fails_naming_the_value() -> None:
    out = helm("template", "rel", str(ROOT), "--set", "global.chain.enabled=true", check=False)
    assert out.returncode != 0 and "global.chain.keysSecret" in out.stderr, out.stderr


def test_several_replicas_need_peering() -> None:
    out = helm("template", "rel", str(ROOT), "--set", "operator.replicas=2", "--set", "operator.peering.enabled=false",
               check=False)
    assert out.returncode != 0 and "operator.peering.enabled" in out.stderr, out.stderr


# -- schema --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("setting", "field"), [
    pytest.param("global.image.pullPolicy=Sometimes", "pullPolicy", id="pull-policy-enum"),
    pytest.param("operator.replica=2", "replica", id="unknown-key"),
    pytest.param("operator.replicas=0", "replicas", id="no-replicas"),
    pytest.param("gateway.bootDigests={abc}", "bootDigests", id="digest-format"),
    pytest.param("gateway.relayPort=70000", "relayPort", id="port-range"),
    pytest.param("gateway.listen=10.99.0.1", "listen", id="listen-hostport"),
    pytest.param("gateway.trustRoot.zymkey.device=/tmp/i2c", "device", id="zymkey-device"),
    pytest.param("gateway.verifiers={0x12}", "verifiers", id="verifier-address"),
    pytest.param("global.chain.rpcUrl=anvil:8545", "rpcUrl", id="rpc-url"),
    pytest.param("dashboards.labelValue=1", "labelValue", id="label-value-not-a-string"),
    pytest.param("admissionPolicy.validationActions={Block}", "validationActions", id="vap-action"),
    pytest.param("monitoring.serviceMonitor.interval=soon", "interval", id="interval"),
    pytest.param("gateway.policy.attestation.bootImages={sha256:" + "ab" * 32 + "}", "bootImages",
                 id="policy-boot-image-is-0x-hex"),
    pytest.param("gateway.policy.attestation.measurements.kernel.is=1", "is", id="policy-rule-unknown-key"),
    pytest.param("netboot.metricsAddress=0.0.0.0", "metricsAddress", id="netboot-metrics-every-address"),
    pytest.param("gateway.policy.actions.low=report", "low", id="policy-severity-no-failure-has"),
    pytest.param("gateway.policy.actions.high=ignore", "high", id="policy-action-unknown"),
])
def test_schema_refuses_bad_values_naming_the_field(setting: str, field: str) -> None:
    out = helm("template", "rel", str(ROOT), "--set", setting, check=False)
    assert out.returncode != 0, f"--set {setting} was accepted"
    assert "schema" in out.stderr and field in out.stderr, out.stderr


def test_every_property_of_the_schema_is_described_and_closed() -> None:
    schema = json.loads((ROOT / "values.schema.json").read_text())
    missing: list[str] = []

    def walk(node: dict[str, Any], where: str) -> None:
        if not node.get("description"):
            missing.append(where or "(root)")
        for name, sub in (node.get("properties") or {}).items():
            walk(sub, f"{where}.{name}".lstrip("."))
        if "properties" in node and node.get("additionalProperties") is not False:
            missing.append(f"{where}: additionalProperties is not false")

    walk(schema, "")
    assert missing == []


def test_values_yaml_documents_every_key() -> None:
    """Each key of values.yaml sits under a comment line (its documentation)."""
    lines = (ROOT / "values.yaml").read_text().splitlines()
    assert lines[0] == "# yaml-language-server: $schema=values.schema.json"
    undocumented = []
    for i, line in enumerate(lines):
        key = re.match(r"^(\s*)([A-Za-z][\w.]*):", line)
        if key and not lines[i - 1].strip().startswith("#"):
            undocumented.append(line.strip())
    assert undocumented == []


# -- RBAC ----------------------------------------------------------------------------------------------
def _rules(docs: list[dict[str, Any]], component: str) -> dict[str, list[dict[str, Any]]]:
    """Rules of a component's ClusterRole ("*") and Roles (by namespace)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        if d["kind"] in ("ClusterRole", "Role") and d["metadata"]["name"] == f"rel-trustcap-{component}":
            out.setdefault(d["metadata"].get("namespace", "*"), []).extend(d["rules"])
    return out


def allows(rules: dict[str, list[dict[str, Any]]], group: str, resource: str, verb: str, namespace: str = "*") -> bool:
    scopes = ["*"] if namespace == "*" else ["*", namespace]
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
               for scope in scopes for r in rules.get(scope, []))


def _operator_needs() -> set[tuple[str, str, str, str]]:
    """(group, resource, verb, namespace) of every API call in operator/*.py, read from the code: kopf's
    decorators (watch, list, patch for finalizers/annotations), the Kube wrapper (operator/kube.py) and
    direct list_cluster_custom_object calls. "sys" is the system namespace."""
    from trustcap import api

    def plural(token: str) -> str:  # a literal "plural", or trustcap/api.py's constant for it
        return token.strip('"') if token.startswith('"') else str(getattr(api, token))

    word = r"(\"\w+\"|[A-Z_]+)"
    needs: set[tuple[str, str, str, str]] = set()
    for path in sorted((ROOT / "operator").glob("*.py")):
        text = path.read_text()
        for token in re.findall(r"@kopf\.(?:on\.\w+|timer|daemon|index)\(GROUP, VERSION, " + word, text):
            needs |= {(GROUP, plural(token), v, "*") for v in ("list", "watch", "patch")}
        for verb, token in re.findall(r"\.kube\.(get|create|patch_status|patch_spec|list)\(" + word, text):
            name = plural(token)
            resource, kverb = {"patch_status": (f"{name}/status", "patch"), "patch_spec": (name, "patch")}.get(
                verb, (name, verb))
            needs.add((GROUP, resource, kverb, "*"))
        for token in re.findall(r"list_cluster_custom_object\((?:K?GROUP|\"trustcap.io\"), VERSION, " + word, text):
            needs.add((GROUP, plural(token), "list", "*"))
        if re.search(r"\.kube\.secrets\(", text):
            needs.add(("", "secrets", "list", "sys"))
        if re.search(r"ensure_namespace\(", text):
            needs.add(("", "namespaces", "create", "*"))
        if re.search(r"kopf\.(event|warn|info)\(", text):
            needs.add(("", "events", "create", "*"))
    # kopf itself: leader election and resource discovery (docs.kopf.dev, "Deployment: RBAC")
    needs |= {("kopf.dev", "clusterkopfpeerings", v, "*") for v in ("get", "list", "watch", "patch")}
    needs |= {("apiextensions.k8s.io", "customresourcedefinitions", v, "*") for v in ("list", "watch")}
    return needs


def _missing(rules: dict[str, list[dict[str, Any]]], needs: set[tuple[str, str, str, str]]) -> list[tuple[str, ...]]:
    return sorted(n for n in needs if not allows(rules, n[0], n[1], n[2], "trustcap" if n[3] == "sys" else n[3]))


def test_operator_role_covers_every_call_the_operator_makes(defaults: list[dict[str, Any]]) -> None:
    needs = _operator_needs()
    # the scan found the calls it should (a broken regex would find nothing and pass)
    assert {(GROUP, "capsules/status", "patch", "*"), (GROUP, "attestations", "create", "*"),
            (GROUP, "hpcnodes", "watch", "*"), ("", "secrets", "list", "sys"),
            (GROUP, "capsuleruns", "get", "*")} <= needs
    rules = _rules(defaults, "operator")
    assert _missing(rules, needs) == []
    # positive control: without its Role in the system namespace the operator could not read reveals
    assert _missing({"*": rules["*"]}, needs) == [("", "secrets", "list", "sys")]


def test_operator_reads_secrets_only_in_the_system_namespace(defaults: list[dict[str, Any]]) -> None:
    rules = _rules(defaults, "operator")
    assert not allows(rules, "", "secrets", "list") and allows(rules, "", "secrets", "list", "trustcap")
    assert not any("delete" in r["verbs"] or "*" in r["verbs"] or "*" in r["resources"]
                   for scope in rules.values() for r in scope)


def test_gateway_role_writes_hpcnode_status_only_by_patch_and_nothing_else_of_hpcnodes(
        defaults: list[dict[str, Any]]) -> None:
    rules = _rules(defaults, "gateway")
    flat = [r for scope in rules.values() for r in scope]
    assert not any("*" in r["verbs"] or "*" in r["resources"] or "*" in r["apiGroups"] for r in flat)
    write = {"create", "update", "patch", "delete", "deletecollection"}
    writes = {(res, v) for r in flat for res in r["resources"] for v in r["verbs"] if v in write}
    # hpcnodes/status patch is the one cluster-wide write; everything else is in the system namespace
    cluster_writes = {(res, v) for r in rules["*"] for res in r["resources"] for v in r["verbs"] if v in write}
    assert cluster_writes == {("hpcnodes/status", "patch")}
    assert writes == {("hpcnodes/status", "patch"), ("attestations/status", "patch"),
                      ("capsuleruns/status", "patch"), ("secrets", "create")}
    assert not allows(rules, GROUP, "hpcnodes", "patch") and not allows(rules, GROUP, "hpcnodes/status", "update")
    assert not allows(rules, GROUP, "gateways/status", "patch") and not allows(rules, GROUP, "capsules/status", "patch")


def test_the_admission_policy_keeps_the_gateway_to_its_status_fields(defaults: list[dict[str, Any]]) -> None:
    """RBAC cannot restrict fields: the policy must name every HPCNode status field the gateway does not own
    (read from the CRD, so a new operator field without a rule fails here), and match only the gateway."""
    vap = one(defaults, "ValidatingAdmissionPolicy", "rel-trustcap-gateway-hpcnode-status")
    binding = one(defaults, "ValidatingAdmissionPolicyBinding", "rel-trustcap-gateway-hpcnode-status")
    assert binding["spec"] == {"policyName": vap["metadata"]["name"], "validationActions": ["Deny"],
                               # every Gateway is a param (the node rules); none at all is refused
                               "paramRef": {"selector": {}, "parameterNotFoundAction": "Deny"}}
    assert vap["spec"]["failurePolicy"] == "Fail"
    assert vap["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["hpcnodes/status"]
    (cond,) = vap["spec"]["matchConditions"]
    assert cond["expression"] == 'request.userInfo.username == "system:serviceaccount:trustcap:rel-trustcap-gateway"'
    sa = one(defaults, "ServiceAccount", "rel-trustcap-gateway")
    assert sa["metadata"]["namespace"] == "trustcap"
    crd = yaml.safe_load((ROOT / "crds" / "hpcnode.yaml").read_text())
    status = set(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"])
    assert GATEWAY_STATUS_FIELDS <= status
    messages = [v.get("message") or v.get("messageExpression", "").strip("'") for v in vap["spec"]["validations"]]
    guarded = {m.group(1) for text in messages for m in [re.match(r"status\.(\w+):", text)] if m}
    assert guarded == status - GATEWAY_STATUS_FIELDS and "phase" in guarded  # the operator alone writes trust
    assert vap["spec"]["paramKind"] == {"apiVersion": "trustcap.io/v1alpha1", "kind": "Gateway"}
    assert any("authentication.kubernetes.io/node-name" in v["expression"] for v in vap["spec"]["variables"])


def test_netboot_lists_bootimages_and_posts_events_only(defaults: list[dict[str, Any]]) -> None:
    rules = _rules(defaults, "netboot")
    assert rules == {"*": [{"apiGroups": [GROUP], "resources": ["bootimages"], "verbs": ["get", "list"]}],
                     "default": [{"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]}


# -- dashboards and helm test --------------------------------------------------------------------------
def test_dashboard_configmaps_carry_the_sidecar_label_and_the_built_json(defaults: list[dict[str, Any]]) -> None:
    cms = {d["metadata"]["name"]: d for d in defaults if d["kind"] == "ConfigMap"
           and d["metadata"]["labels"].get("app.kubernetes.io/component") == "dashboards"}
    assert set(cms) == {f"rel-trustcap-dashboard-{n}" for n in build.DASHBOARDS}
    for name, make in build.DASHBOARDS.items():
        cm = cms[f"rel-trustcap-dashboard-{name}"]
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        (key,) = cm["data"]
        assert key == f"trustcap-{name}.json"
        assert json.loads(cm["data"][key]) == json.loads(build.render(make()))
    other = render("--set", "dashboards.label=my_dashboards", "--set-string", "dashboards.labelValue=yes")
    labelled = [d for d in other if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("my_dashboards") == "yes"]
    assert len(labelled) == len(build.DASHBOARDS)


def test_helm_test_hook_checks_the_crds_and_the_operator_metrics(defaults: list[dict[str, Any]]) -> None:
    pod = one(defaults, "Pod", "rel-trustcap-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    on_disk = {yaml.safe_load(p.read_text())["metadata"]["name"] for p in (ROOT / "crds").rglob("*.yaml")}
    assert set(env["CRDS"].split(",")) == on_disk
    assert env["METRICS_URL"] == "http://rel-trustcap-operator.trustcap.svc:9464/metrics"
    script = c["args"][0]
    compile(script, "helm-test", "exec")  # the check itself is valid Python
    assert "Established" in script and "trustcap_hpcnode_quarantines_total" in script
    role = one(defaults, "ClusterRole", "rel-trustcap-test")
    assert role["rules"] == [{"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
                              "verbs": ["get"]}]


def test_parts_can_be_switched_off() -> None:
    docs = render("--set", "gateway.enabled=false", "--set", "netboot.enabled=false")
    by = kinds(docs)
    assert "DaemonSet" not in by and "ValidatingAdmissionPolicy" not in by
    assert {d["metadata"]["name"] for d in by["Deployment"]} == {"rel-trustcap-operator"}


def test_the_operator_takes_the_default_policy_digest_from_values(defaults: list[dict[str, Any]]) -> None:
    def env(docs: list[dict[str, Any]]) -> dict[str, Any]:
        (c,) = one(docs, "Deployment", "rel-trustcap-operator")["spec"]["template"]["spec"]["containers"]
        return {e["name"]: e.get("value") for e in c["env"]}

    assert "TRUSTCAP_POLICY_DIGEST" not in env(defaults)  # "" = nodes declare their own
    digest = "sha256:" + "ab" * 32
    assert env(render("--set", f"operator.policyDigest={digest}"))["TRUSTCAP_POLICY_DIGEST"] == digest
    proc = helm("template", "rel", str(ROOT), "--set", "operator.policyDigest=md5:abc", check=False)
    assert proc.returncode != 0 and "policyDigest" in proc.stderr


@pytest.mark.parametrize("sets", [
    pytest.param((), id="defaults-no-dhcp"),
    pytest.param(("netboot.dhcpInterface=eth1", "netboot.hpcMac=52:54:00:7c:00:01"), id="dhcp-with-the-hpcs-mac"),
])
def test_netboot_takes_the_args_the_chart_gives_it(sets: tuple[str, ...], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The chart's netboot arguments, parsed and checked by netboot's own CLI (the chart passed
    --token-file without --dhcp-interface, and the pod crash-looped in the install e2e). The BootImage
    source, which reads a kubeconfig, is the one collaborator faked."""
    import argparse

    from trustcap.netboot import serve
    from trustcap.netboot.serve import add_serve_arguments, build_config

    monkeypatch.setattr(serve, "BootImageApproval", lambda **_kw: object())

    docs = render(*[x for s in sets for x in ("--set", s)])
    (c,) = one(docs, "DaemonSet", "rel-trustcap-netboot")["spec"]["template"]["spec"]["containers"]
    args = [a.replace("$(NODE_NAME)", "pi-1").replace("$(POD_IP)", "192.0.2.7") for a in c["args"]]
    args[args.index("--root") + 1] = str(tmp_path)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    cfg, _ = build_config(parser.parse_args(args[args.index("serve") + 1:] if "serve" in args else args))
    assert (cfg.dhcp is not None) == bool(sets)
    if cfg.dhcp is not None:
        assert cfg.dhcp.nodes == {"52:54:00:7c:00:01": "pi-1"} and "--token-file" in args
        # the agent pins the gateway's address, which only the gateway knows: it writes the file netboot reads
        (g,) = one(docs, "DaemonSet", "rel-trustcap-gateway")["spec"]["template"]["spec"]["containers"]
        assert args[args.index("--gateway-address-file") + 1] == g["args"][g["args"].index("--address-file") + 1]


def test_netboot_dhcp_needs_the_hpcs_mac() -> None:
    proc = helm("template", "rel", str(ROOT), "--set", "netboot.dhcpInterface=eth1", check=False)
    assert proc.returncode != 0 and "netboot.dhcpInterface needs netboot.hpcMac" in proc.stderr, proc.stderr
    proc = helm("template", "rel", str(ROOT), "--set", "netboot.dhcpInterface=eth1", "--set", "netboot.hpcMac=nope",
                check=False)
    assert proc.returncode != 0 and "hpcMac" in proc.stderr, proc.stderr
