"""The chart's ValidatingAdmissionPolicy against the real API server (issue 12 item 12, decision 0113): a
gateway pod writes only its own sub-fields of its own HPCNodes; the phase and every other field of the
operator's are refused, and so is any write to another gateway's HPCNode.

Real identities, not impersonation: two Node objects, one ServiceAccount (the chart's, as the DaemonSet
shares it) and a pod bound to each node; `kubectl create token --bound-object-kind Pod` asks the API
server for each pod's bound token, which then carries the pod's node in
`authentication.kubernetes.io/node-name`, exactly as the kubelet's projected token does. No kubelet runs:
the pods stay Pending, which does not matter to the token. Gateway A (spec.nodeName = node A) owns
HPCNode A, gateway B owns HPCNode B.

The attacks: gateway B writes HPCNode A (a quarantine request), either gateway writes a phase or the
operator's conditions. The controls: gateway A writes HPCNode A's own fields; with the policy's node
rules removed (the field rules kept) gateway B's write to HPCNode A goes through, and with the binding
deleted RBAC lets a gateway write the phase, so each refusal is the policy's own rule.
Everything is named after one random release; the policy matches only that release's gateway user, so
nothing else on the shared stack is affected. Needs the stack (and its helm), not a World.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from trustcap.stack import paths

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
Kubectl = Callable[..., Any]
NS = "default"  # pods and ServiceAccounts need an existing namespace; one made here would never finish deleting
KEY = "0x0332f0552e3d3633882edb25d67d96d3a2d71277a2395ee76383990f5c0e1aa85b"
ADDR = "0x4C9183C39E36BD8bfb8e86f073b3F5693E57d128"
ENROLMENT = {"agentKey": "0x02" + "11" * 32, "bootImageDigest": "sha256:" + "ab" * 32, "gateway": ADDR,
             "quote": "{}", "time": "2026-12-03T12:00:00Z"}


def _helm() -> str:
    helm = paths.bin_dir() / "helm"
    assert helm.is_file(), f"{helm} is missing: `make stack` builds helm into the tool cache"
    return str(helm)


def _render(name: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [_helm(), "template", name, str(ROOT), "--namespace", NS,
         "--show-only", "charts/gateway/templates/rbac.yaml", "--show-only", "templates/admissionpolicy.yaml"],
        capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # Only the cluster-scoped objects (the Role and RoleBinding live in the system namespace).
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d and not d["metadata"].get("namespace")]
    assert {d["kind"] for d in docs} == {"ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
                                         "ValidatingAdmissionPolicyBinding"}, [d["kind"] for d in docs]
    return docs


@pytest.fixture(scope="module")
def release(kubectl: Kubectl) -> Iterator[dict[str, Any]]:
    name = f"vap{secrets.token_hex(3)}"
    docs = _render(name)
    sa = f"{name}-trustcap-gateway"
    info: dict[str, Any] = {"name": name, "sa": sa, "gateway_user": f"system:serviceaccount:{NS}:{sa}",
                            "policy": f"{name}-trustcap-gateway-hpcnode-status", "docs": docs,
                            "hpc": {s: f"{name}-hpc-{s}" for s in ("a", "b", "orphan")},
                            "node": {s: f"{name}-pi-{s}" for s in ("a", "b")}}
    objects: list[dict[str, Any]] = []
    for side in ("a", "b"):
        objects += [
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": info["node"][side]}},
            {"apiVersion": "trustcap.io/v1alpha1", "kind": "Gateway", "metadata": {"name": f"{name}-gw-{side}"},
             "spec": {"address": ADDR, "signingKey": KEY, "vrfKey": KEY, "endpoint": f"pi-{side}.local:7443",
                      "nodeName": info["node"][side]}},
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-gateway-{side}", "namespace": NS},
             "spec": {"nodeName": info["node"][side], "serviceAccountName": sa,
                      "containers": [{"name": "gateway", "image": "trustcap-gateway:unused"}]}},
        ]
    for side, gateway in (("a", f"{name}-gw-a"), ("b", f"{name}-gw-b"), ("orphan", f"{name}-gw-none")):
        objects.append({"apiVersion": "trustcap.io/v1alpha1", "kind": "HPCNode",
                        "metadata": {"name": info["hpc"][side]},
                        "spec": {"gateway": gateway, "mac": "02:00:00:00:00:01", "bootImage": "default"}})
    sa_obj = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": NS}}
    for crd in ("hpcnode", "gateway"):
        kubectl("apply", "-f", str(ROOT / "crds" / f"{crd}.yaml"))
        kubectl("wait", "--for=condition=Established", f"crd/{crd}s.trustcap.io", "--timeout=30s")
    rendered = yaml.safe_dump_all(docs)
    try:
        kubectl("apply", "-f", "-", input=rendered)
        kubectl("apply", "-f", "-", input=yaml.safe_dump_all([sa_obj, *objects]))
        info["token"] = {side: kubectl("create", "token", sa, "-n", NS, "--bound-object-kind", "Pod",
                                       "--bound-object-name", f"{name}-gateway-{side}").stdout.strip()
                         for side in ("a", "b")}
        yield info
    finally:
        for obj in objects:
            if obj["kind"] == "Pod":
                kubectl("delete", "pod", obj["metadata"]["name"], "-n", NS, "--force", "--grace-period=0",
                        "--ignore-not-found", check=False)
        kubectl("delete", "-f", "-", "--ignore-not-found", "--wait=false",
                input=yaml.safe_dump_all([o for o in objects if o["kind"] != "Pod"] + [sa_obj]), check=False)
        kubectl("delete", "-f", "-", "--ignore-not-found", input=rendered, check=False)


@dataclass
class Outcome:
    returncode: int
    stderr: str


@pytest.fixture(scope="module")
def clients(kubeconfig: Path, release: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The admin's client, one per gateway pod (its own bound token, no client certificate), and one that
    impersonates the gateway's ServiceAccount with no node (what a legacy Secret token would be). All
    patch the way the gateway does (a merge patch of the status subresource, no read first)."""
    from kubernetes import client, config

    admin = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    made = [admin]
    apis: dict[str, Any] = {"admin": client.CustomObjectsApi(admin)}
    for side in ("a", "b"):
        cfg = client.Configuration()
        cfg.host = admin.configuration.host
        cfg.ssl_ca_cert = admin.configuration.ssl_ca_cert
        cfg.api_key = {"authorization": release["token"][side]}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        api = client.ApiClient(cfg)
        made.append(api)
        apis[side] = client.CustomObjectsApi(api)
    nameless = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    nameless.set_default_header("Impersonate-User", release["gateway_user"])
    made.append(nameless)
    apis["nameless"] = client.CustomObjectsApi(nameless)
    try:
        yield apis
    finally:
        for api in made:
            api.close()


def _patch(clients: dict[str, Any], who: str, node: str, status: dict[str, Any]) -> Outcome:
    from kubernetes.client.exceptions import ApiException

    try:
        clients[who].patch_cluster_custom_object_status(
            "trustcap.io", "v1alpha1", "hpcnodes", node, {"status": status}, _request_timeout=15)
    except ApiException as exc:
        return Outcome(exc.status or 1, str(exc.body))
    return Outcome(0, "")


def _status(kubectl: Kubectl, node: str) -> dict[str, Any]:
    out = kubectl("get", "hpcnode", node, "-o", "json").stdout
    return dict(json.loads(out).get("status") or {})


def _request(n: int) -> dict[str, Any]:
    return {"quarantineRequest": {"reason": "MonitorCheckFailed", "message": f"gateway monitor: check {n}",
                                  "time": f"2026-12-03T12:00:{n % 60:02d}Z"}}


def _another_phase(clients: dict[str, Any], node: str) -> str:
    """A phase that differs from the HPCNode's current one (read as the admin)."""
    obj = clients["admin"].get_cluster_custom_object("trustcap.io", "v1alpha1", "hpcnodes", node, _request_timeout=15)
    current = (obj.get("status") or {}).get("phase")
    return "Ready" if current != "Ready" else "Booting"


def _until(what: str, attempt: Callable[[], Outcome], done: Callable[[Outcome], bool]) -> Outcome:
    """The API server loads a new or changed policy (and its Gateway params) within seconds; until then
    a result says nothing. Retry (bounded) until `done`, then the cases run against the loaded policy."""
    deadline = time.monotonic() + 45
    while True:
        out = attempt()
        if done(out):
            return out
        assert time.monotonic() < deadline, f"{what}: still {out} after 45 s"
        time.sleep(1)


def test_a_gateway_writes_its_own_fields_of_its_own_node(kubectl: Kubectl, release: dict[str, Any],
                                                         clients: dict[str, Any]) -> None:
    """Positive control: the pod on node A writes HPCNode A's enrolment, quarantine request and wipe."""
    hpc = release["hpc"]["a"]
    # Each try writes a phase other than the node's current one: a write that lands before the policy is
    # loaded sets the phase, and the same value again would be no change, which the policy rightly lets by.
    _until("the policy to refuse a phase write",
           lambda: _patch(clients, "a", hpc, {"phase": _another_phase(clients, hpc)}),
           lambda o: o.returncode != 0 and "status.phase" in o.stderr)
    assert _patch(clients, "a", hpc, {"enrolment": ENROLMENT}).returncode == 0
    out = _patch(clients, "a", hpc, _request(1))
    assert out.returncode == 0, out.stderr
    wipe = {"lastWipe": {"level": "Reboot", "request": "r1", "state": "InProgress",
                         "startedAt": "2026-12-03T12:00:00Z"}}
    assert _patch(clients, "a", hpc, wipe).returncode == 0
    st = _status(kubectl, hpc)
    assert st["quarantineRequest"]["message"] == "gateway monitor: check 1" and st["lastWipe"]["request"] == "r1"


def test_a_gateway_cannot_raise_trust_but_writes_its_own_fields(kubectl: Kubectl, release: dict[str, Any],
                                                                clients: dict[str, Any]) -> None:
    """No gateway writes the phase at all (not even to lower trust: it asks, the operator decides), nor
    any of the operator's fields."""
    hpc = release["hpc"]["a"]
    assert _patch(clients, "admin", hpc, {"phase": "Enrolled"}).returncode == 0  # the operator's move
    for phase in ("Ready", "Booting", "Quarantined", "Registered"):
        out = _until("the policy to refuse a phase write", lambda p=phase: _patch(clients, "a", hpc, {"phase": p}),
                     lambda o: o.returncode != 0)
        assert "status.phase" in out.stderr and "only the operator decides trust" in out.stderr, out.stderr
    conditions = [{"type": "Ready", "status": "True", "reason": "Forged", "message": "by a gateway",
                   "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    for field, value in (("conditions", conditions), ("quarantineReason", "by a gateway"),
                         ("quarantineChecked", "sha256:" + "00" * 32), ("trustLevel", 3)):
        out = _patch(clients, "a", hpc, {field: value})
        assert out.returncode != 0 and f"status.{field}" in out.stderr, (field, out.stderr)
    # An operator of another suite on the shared stack may move these nodes (it derives Quarantined from
    # the request above, or takes back an Enrolled with no evidence); Ready is a phase it never writes.
    assert _status(kubectl, hpc).get("phase") != "Ready"
    assert _patch(clients, "a", hpc, _request(2)).returncode == 0  # its own field, in the same state


def test_a_gateway_cannot_write_another_gateways_node(kubectl: Kubectl, release: dict[str, Any],
                                                      clients: dict[str, Any]) -> None:
    """The attack: the pod on node B asks to quarantine HPCNode A (gateway A's), or publishes evidence
    into it, or writes an HPCNode whose Gateway does not exist."""
    a, b, orphan = (release["hpc"][s] for s in ("a", "b", "orphan"))
    before = _status(kubectl, a).get("quarantineRequest")
    out = _patch(clients, "b", a, _request(3))
    assert out.returncode != 0, "gateway B wrote gateway A's HPCNode"
    # The binding evaluates the policy once per Gateway (its params), in no set order, and reports the
    # first that refuses: as gateway A's node ("belongs to"), or as not gateway B's own ("names").
    name, node = release["name"], release["node"]
    assert (f"belongs to Gateway {name}-gw-a on node {node['a']}, not to the gateway pod on node {node['b']}"
            in out.stderr or f"names Gateway {name}-gw-a, but the pod on node {node['b']} is Gateway {name}-gw-b"
            in out.stderr), out.stderr
    assert _patch(clients, "b", a, {"enrolment": ENROLMENT}).returncode != 0
    assert _status(kubectl, a).get("quarantineRequest") == before
    assert _patch(clients, "a", b, _request(4)).returncode != 0  # and the other way round
    out = _patch(clients, "b", orphan, _request(5))
    assert out.returncode != 0 and "a gateway writes only its own HPCNodes" in out.stderr, out.stderr
    assert _patch(clients, "b", b, _request(6)).returncode == 0  # control: its own node, same request


def test_a_token_without_a_node_writes_nothing(release: dict[str, Any], clients: dict[str, Any]) -> None:
    out = _patch(clients, "nameless", release["hpc"]["a"], _request(7))
    assert out.returncode != 0 and "authentication.kubernetes.io/node-name" in out.stderr, out.stderr


def test_without_the_node_rules_the_cross_node_attack_passes(kubectl: Kubectl, release: dict[str, Any],
                                                             clients: dict[str, Any]) -> None:
    """Control for the attack above: the same policy with its three node rules removed (the field rules
    kept, so it is still loaded and enforced) lets gateway B write HPCNode A. The refusal was the node
    rule's."""
    (vap,) = [d for d in release["docs"] if d["kind"] == "ValidatingAdmissionPolicy"]
    rules = vap["spec"]["validations"]
    kept = [v for v in rules if "writerNode" not in v["expression"] and "named" not in v["expression"]]
    assert len(rules) - len(kept) == 3, [v["expression"] for v in rules]
    weakened = {**vap, "spec": {**vap["spec"], "validations": kept}}
    kubectl("apply", "-f", "-", input=yaml.safe_dump(weakened))
    a = release["hpc"]["a"]
    n = iter(range(10, 100))
    _until("gateway B's write to HPCNode A once the node rules are gone",
           lambda: _patch(clients, "b", a, _request(next(n))), lambda o: o.returncode == 0)
    assert _status(kubectl, a)["quarantineRequest"]["message"].startswith("gateway monitor: check ")
    out = _patch(clients, "b", a, {"phase": "Ready"})
    assert out.returncode != 0 and "status.phase" in out.stderr  # the field rules still hold
    kubectl("apply", "-f", "-", input=yaml.safe_dump(vap))  # back to the chart's policy


def test_without_the_policy_the_same_attack_passes(kubectl: Kubectl, release: dict[str, Any],
                                                    clients: dict[str, Any]) -> None:
    """Control: RBAC alone lets the gateway write phase Ready, so the refusal of the phase is the policy's."""
    a = release["hpc"]["a"]
    assert _patch(clients, "admin", a, {"phase": "Enrolled"}).returncode == 0
    kubectl("delete", "validatingadmissionpolicybinding", release["policy"])
    _until("the gateway's phase write without the policy binding", lambda: _patch(clients, "a", a, {"phase": "Ready"}),
           lambda o: o.returncode == 0)
    assert _status(kubectl, a)["phase"] == "Ready"
