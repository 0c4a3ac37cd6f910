"""The capsule lifecycle end to end on the real stack: the operator, four gateways and their HPC agents as
separate processes (each agent in its own network namespace), anvil with the contracts, the owners'
brokers, the local store, the PSI image on the real Docker engine.

Proves, each on the whole path a user takes (`kubectl apply`, fund, wait, open):
- the happy path: B's and C's results open to the intersection, signed by the attested executor key;
  `verify_capsule` passes every check; until completion nothing a submitter reads names the executor;
- two capsules at once both complete;
- a capsule deleted mid-run stops, wipes, and only then goes (finalizer);
- a timeout ends Failed with reason Timeout, after the wipe;
- an input that cannot be opened fails the capsule naming the input, and no other input is released.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

pytestmark = pytest.mark.slow

NS = "trustcap-e2e-lifecycle"
NAMES_B = ["alice", "bob", "carol", "dave", "erin", "Zoë"]
NAMES_C = ["bob", "erin", "grace", "Zoë", "alice", "ivan"]
COMMON = sorted(set(NAMES_B) & set(NAMES_C))


@pytest.fixture(scope="module")
def world(stack: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from netlab import need_root

    from trustcap.world import World

    need_root("the lifecycle e2e")
    with World.up(n=4, workdir=tmp_path_factory.mktemp("world"), namespace=NS) as w:
        yield w


@pytest.fixture(scope="module")
def image() -> str:
    from trustcap.cli.capsule import build_image
    from trustcap.scenario import PSI_DIR

    image_id, _tag = build_image(PSI_DIR)
    return str(image_id)


@pytest.fixture(scope="module")
def custom(world: Any) -> Any:
    from kubernetes import client, config

    return client.CustomObjectsApi(config.new_client_from_config(config_file=str(world.kubeconfig)))


def _owners(world: Any, names_b: list[str] = NAMES_B, names_c: list[str] = NAMES_C) -> list[Any]:
    from trustcap.capsule.keys import KeyPair
    from trustcap.scenario import Owner

    return [Owner(name=n, keys=KeyPair.load(Path(world.owners[n]["key_file"])),
                  broker_url=world.owners[n]["broker_url"], names=names)
            for n, names in (("b", names_b), ("c", names_c))]


def _submit(world: Any, custom: Any, image: str, name: str, *, owners: list[Any] | None = None,
            mutate: Any = None, seal: bool = True) -> tuple[dict[str, Any], list[Any]]:
    """Seal, apply, fund: what A, B and C do; returns the capsule after funding."""
    from trustcap import scenario
    from trustcap.store import open_store

    owners = owners or _owners(world)
    doc = scenario.manifest_for(name=name, namespace=NS, image_digest=image, owners=owners,
                                payer=world.payer_address, amount_wei=10**15)
    if mutate:
        mutate(doc)
    if seal:
        scenario.seal_inputs(doc, owners, open_store(world.store_url))
    custom.create_namespaced_custom_object("trustcap.io", "v1alpha1", NS, "capsules", doc)
    obj = scenario.wait_capsule(custom, NS, name, lambda o: bool((o.get("status") or {}).get("taskId")), timeout=60)
    scenario.fund(world.rpc_url, world.deployment, world.payer, bytes.fromhex(obj["status"]["taskId"][2:]),
                  k=int(doc["spec"]["committee"]["size"]), amount_wei=10**15,
                  timeout_s=int(doc["spec"]["timeoutSeconds"]))
    return obj, owners


def _final(custom: Any, name: str, timeout: float = 420) -> dict[str, Any]:
    from trustcap import scenario

    return scenario.wait_capsule(custom, NS, name, lambda o: (o.get("status") or {}).get("phase") in scenario.TERMINAL,
                                 timeout=timeout)


def _cond(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def _events(world: Any, name: str) -> list[dict[str, Any]]:
    from kubernetes import client, config

    core = client.CoreV1Api(config.new_client_from_config(config_file=str(world.kubeconfig)))
    items = core.list_namespaced_event(NS, field_selector=f"involvedObject.name={name}").items
    return [{"type": e.type, "reason": e.reason, "message": e.message or ""} for e in items]


def _run_of(custom: Any, obj: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return dict(custom.get_namespaced_custom_object("trustcap.io", "v1alpha1", "trustcap-system", "capsuleruns",
                                                        f"run-{obj['status']['taskId'][2:18]}"))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def test_psi_happy_path_results_open_and_the_record_verifies(world: Any, custom: Any, image: str) -> None:
    from trustcap import scenario
    from trustcap.cli.verify import chain_view
    from trustcap.store import open_store
    from trustcap.verify import verify_capsule

    _, owners = _submit(world, custom, image, "psi-happy")
    gateways = {g["address"].lower() for g in world.gateways}
    leaks: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # everything a submitter can read, sampled until completion
        while not stop.is_set():
            o = custom.get_namespaced_custom_object("trustcap.io", "v1alpha1", NS, "capsules", "psi-happy")
            st = dict(o.get("status") or {})
            if st.get("phase") == "Completed":
                return
            vrf = dict(st.get("vrf") or {})
            vrf.pop("commitments", None)  # every committer is listed there, the executor among them: no tell
            text = str({**st, "vrf": vrf}).lower() + str(o["metadata"].get("labels")).lower()
            text += str(_events(world, "psi-happy")).lower()
            leaks.extend(g for g in gateways if g in text or g[2:] in text)
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    final = _final(custom, "psi-happy")
    stop.set()
    watcher.join(10)
    st = final["status"]
    assert st["phase"] == "Completed", (st.get("conditions"), world.logs_tail())
    assert leaks == [], f"the executor's identity was readable before completion: {sorted(set(leaks))}"
    for c in ("Funded", "Scheduled", "Attested", "InputsReleased", "Ran", "Sealed", "Wiped", "Recorded", "Ready"):
        assert _cond(final, c).get("status") == "True", (c, _cond(final, c))
    assert st["outcome"] == "Paid"
    assert st["vrf"]["executor"] in gateways
    results = scenario.open_results(final, owners, open_store(world.store_url))
    assert results == {"b": COMMON, "c": COMMON}
    view, recorded = chain_view(world.rpc_url, world.deployment)
    checks = verify_capsule(final, view, batch_recorded=recorded)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert {r["phase"] for r in st["record"]} >= {"pre", "post"}
    warnings = [e for e in _events(world, "psi-happy") if e["type"] == "Warning"]
    assert warnings == []  # a healthy capsule leaves only Normal events


def test_a_tampered_result_signer_fails_verification(world: Any, custom: Any, image: str) -> None:
    """Positive control for the happy path's verification: the same record with another signer fails."""
    from trustcap.cli.verify import chain_view
    from trustcap.verify import verify_capsule

    final = _final(custom, "psi-happy", timeout=5)
    forged = {**final, "status": {**final["status"], "resultSigner": "0x02" + "11" * 32}}
    view, recorded = chain_view(world.rpc_url, world.deployment)
    bad = [c.name for c in verify_capsule(forged, view, batch_recorded=recorded) if not c.ok]
    assert bad == ["result signer"]


def test_two_capsules_at_once_both_complete(world: Any, custom: Any, image: str) -> None:
    _submit(world, custom, image, "psi-two-a")
    _submit(world, custom, image, "psi-two-b")
    a, b = _final(custom, "psi-two-a"), _final(custom, "psi-two-b")
    assert (a["status"]["phase"], b["status"]["phase"]) == ("Completed", "Completed"), (
        _cond(a, "Ready"), _cond(b, "Ready"))
    assert a["status"]["taskId"] != b["status"]["taskId"]


def _sleeper(seconds: int, timeout: int) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        doc["spec"]["function"]["entrypoint"] = ["python3", "-c", f"import time; time.sleep({seconds})"]
        doc["spec"]["timeoutSeconds"] = timeout
    return mutate


def test_a_timeout_fails_with_reason_timeout_after_the_wipe(world: Any, custom: Any, image: str) -> None:
    _submit(world, custom, image, "psi-timeout", mutate=_sleeper(600, 8))
    final = _final(custom, "psi-timeout")
    assert final["status"]["phase"] == "Failed"
    assert _cond(final, "Ready")["reason"] == "Timeout", _cond(final, "Ready")
    assert _cond(final, "Wiped").get("status") == "True", _cond(final, "Wiped")
    run = _run_of(custom, final)
    assert run is not None and run["status"].get("wipe"), run


def test_a_capsule_deleted_mid_run_stops_wipes_then_goes(world: Any, custom: Any, image: str) -> None:
    from trustcap import scenario

    obj, _ = _submit(world, custom, image, "psi-delete", mutate=_sleeper(600, 300))
    scenario.wait_capsule(custom, NS, "psi-delete", lambda o: (o.get("status") or {}).get("phase") == "Running",
                          timeout=240)
    run = _run_of(custom, obj)
    assert run is not None
    scenario.wait_capsule(custom, NS, "psi-delete", lambda o: bool(((_run_of(custom, o) or {}).get("status") or {})
                                                               .get("phase") == "Running"), timeout=120)
    custom.delete_namespaced_custom_object("trustcap.io", "v1alpha1", NS, "capsules", "psi-delete")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            custom.get_namespaced_custom_object("trustcap.io", "v1alpha1", NS, "capsules", "psi-delete")
        except ApiException as exc:
            assert exc.status == 404
            break
        time.sleep(0.5)
    else:
        pytest.fail("the deleted capsule was not released within 120 s")
    run = _run_of(custom, obj)
    assert run is not None and run["spec"]["stop"] == "Deleted"
    assert run["status"]["phase"] == "Failed" and run["status"].get("wipe"), run["status"]


def test_an_input_that_cannot_be_opened_fails_naming_it_and_releases_nothing(world: Any, custom: Any,
                                                                             image: str) -> None:
    """B's envelope is bound to another capsule: B's broker refuses it; C's input is never asked for."""
    from trustcap import scenario
    from trustcap.store import open_store

    owners = _owners(world)
    store = open_store(world.store_url)
    other = scenario.manifest_for(name="psi-elsewhere", namespace=NS, image_digest=image, owners=owners,
                                  payer=world.payer_address, amount_wei=10**15)
    scenario.seal_inputs(other, owners, store)  # sealed for psi-elsewhere, never applied
    wrong_cid = other["spec"]["inputs"][0]["cid"]

    def swap(doc: dict[str, Any]) -> None:
        doc["spec"]["inputs"][0]["cid"] = wrong_cid
        doc["spec"]["inputs"][0]["sizeBytes"] = owners[0].sealed_bytes
        doc["spec"]["inputs"][1]["cid"] = other["spec"]["inputs"][1]["cid"]
        doc["spec"]["inputs"][1]["sizeBytes"] = owners[1].sealed_bytes

    _submit(world, custom, image, "psi-badinput", owners=owners, mutate=swap, seal=False)
    final = _final(custom, "psi-badinput")
    assert final["status"]["phase"] == "Failed"
    failed = _cond(final, "InputsReleased")
    assert failed.get("status") == "False" and failed.get("reason") == "InputRejected", failed
    assert "names-b" in failed["message"], failed
    run = _run_of(custom, final)
    assert run is not None and not run["status"].get("inputsReleased"), run["status"]


def test_an_hpc_reaches_only_its_gateways_agent_channel(world: Any) -> None:
    """An HPC that tries the host's other services is dropped and counted by the Pi's guard; its agent
    channel still works (positive control), and the same attempt gets through with the guard off, so the
    guard is what stops it. Traffic stays on this machine: the HPC's veth and a listener the test opens."""
    import socket

    from netlab import in_netns

    from trustcap.world import AGENT_PORT

    gw = world.gateways[0]
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))  # noqa: S104 - the host service an HPC must not reach, on every address here
    listener.listen(8)
    port = listener.getsockname()[1]

    def reaches(port_: int) -> bool:
        with in_netns(gw["netns"]):
            try:
                socket.create_connection((gw["ip"], port_), timeout=2).close()
                return True
            except OSError:
                return False

    try:
        assert reaches(AGENT_PORT), "the agent channel to its own gateway must stay open"
        before = world.guard_drops()
        assert not reaches(port), "an HPC reached a host service beside its agent channel"
        assert world.guard_drops() > before, "the refused attempt was not counted by the guard"
        world.guard_off()
        try:
            assert reaches(port), "without the guard the attempt gets through: the control shows the guard stops it"
        finally:
            world.guard_on()
        assert not reaches(port)
    finally:
        listener.close()
