"""The seed's PSI scenario (Task 7) as its parties play it, on a running world (trustcap/world).

    A (payer)        defines the function (capsules/psi), funds the escrow once the capsule has a task id
    B, C (owners)    seal their name lists to their own keys, bound to the capsule (its namespace and name,
                     and the manifest's binding digest), put them in the store, run their own brokers
    operator         the lifecycle (operator/capsule.py)
    B, C             fetch their result envelopes, open them with their own keys, and accept them only
                     when the signer is the executor key the committee attested (trustcap/verify.py)

Used by `trustcap demo psi` and by the lifecycle e2e, so both run the same path a person runs by hand.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trustcap.api import CAPSULES, GROUP, VERSION
from trustcap.errors import TrustcapError
from trustcap.stack import paths

PSI_DIR = paths.repo_root() / "capsules" / "psi"
TERMINAL = ("Completed", "Failed")


class ScenarioError(TrustcapError):
    """A step of the scenario failed; the message names the step and where to look."""


@dataclass
class Owner:
    """An input owner (B or C): its key pair, its broker, its name list."""

    name: str
    keys: Any           # trustcap.capsule.keys.KeyPair
    broker_url: str
    names: list[str]
    cid: str = ""
    sealed_bytes: int = 0


@dataclass
class Outcome:
    capsule: dict[str, Any]
    results: dict[str, list[str]] = field(default_factory=dict)   # owner name -> opened names
    checks: list[Any] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)       # step -> seconds since apply


def read_names(path: Path) -> list[str]:
    """UTF-8, one name a line; blank lines ignored; a clear error for anything else."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ScenarioError(f"cannot read {path}: {exc.strerror}") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ScenarioError(f"{path}: no names (one a line)")
    return names


def manifest_for(*, name: str, namespace: str, image_digest: str, owners: Sequence[Owner], payer: str,
                 amount_wei: int, template: Path = PSI_DIR / "capsule.yaml") -> dict[str, Any]:
    """The PSI Capsule for these parties: the example's function, bounds and committee, their keys."""
    doc = next(d for d in yaml.safe_load_all(template.read_text()) if d)
    doc = copy.deepcopy(doc)
    doc["metadata"] = {"name": name, "namespace": namespace, "labels": dict(doc["metadata"].get("labels") or {})}
    spec = doc["spec"]
    spec["function"]["digest"] = image_digest
    spec["inputs"] = [{"name": f"names-{o.name}", "cid": o.cid or _placeholder_cid(),
                       "owner": "0x" + o.keys.public_key().hex(), "sizeBytes": max(o.sealed_bytes, 1),
                       "broker": o.broker_url} for o in owners]
    spec["recipients"] = [{"name": f"node-{o.name}", "publicKey": "0x" + o.keys.public_key().hex()} for o in owners]
    spec["payment"] = {"payer": payer, "amountWei": str(amount_wei)}
    return dict(doc)


def _placeholder_cid() -> str:
    from trustcap.cid import compute

    return compute(b"not yet sealed")


def seal_inputs(doc: dict[str, Any], owners: Sequence[Owner], store: Any) -> None:
    """Each owner seals its list to its own key, bound to the capsule, and puts it in the store.

    The binding digest leaves the inputs' CIDs out (decision 0090), so sealing before the CIDs are known
    and filling them in afterwards does not change what the envelopes bind."""
    from trustcap.capsule.envelope import seal_bytes
    from trustcap.capsule.ids import capsule_id
    from trustcap.capsule.manifest import parse_manifest

    meta = doc["metadata"]
    cid_bytes = capsule_id(meta["namespace"], meta["name"])
    binding = parse_manifest(doc["spec"]).binding_digest()
    for o, item in zip(owners, doc["spec"]["inputs"], strict=True):
        blob = seal_bytes(("\n".join(o.names) + "\n").encode("utf-8"), recipients=[o.keys.public_key()],
                          owner=o.keys, capsule_id=cid_bytes, manifest_digest=binding)
        o.cid = store.put(blob)
        o.sealed_bytes = len(blob)
        item["cid"], item["sizeBytes"] = o.cid, len(blob)
    if parse_manifest(doc["spec"]).binding_digest() != binding:  # pragma: no cover - the design's invariant
        raise ScenarioError("filling in the CIDs changed the binding digest: the envelopes would not open")


def wait_capsule(custom: Any, namespace: str, name: str, until: Callable[[dict[str, Any]], bool], *,
                 timeout: float, on_change: Callable[[dict[str, Any]], None] | None = None,
                 alive: Callable[[], None] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        obj: dict[str, Any] = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, CAPSULES,
                                                                  name)
        st = obj.get("status") or {}
        sig = f"{st.get('phase')}|{[(c['type'], c['status'], c['reason']) for c in st.get('conditions') or []]}"
        if sig != last and on_change:
            on_change(obj)
        last = sig
        if until(obj):
            return obj
        if time.monotonic() > deadline:
            ready: dict[str, Any] = next((c for c in st.get("conditions") or [] if c["type"] == "Ready"), {})
            raise ScenarioError(f"capsule {namespace}/{name} is still {st.get('phase')} after {timeout:.0f} s: "
                                f"{ready.get('reason', '')}: {ready.get('message', '')}")
        if alive:
            alive()
        time.sleep(0.5)


def fund(rpc: str, deployment: Path, payer_signer: Any, task_id: bytes, *, k: int, amount_wei: int,
         timeout_s: int) -> Mapping[str, Any]:
    from trustcap.chain.client import ChainClient, Deployment
    from trustcap.chain.escrow import Escrow

    escrow = Escrow(ChainClient(rpc, payer_signer), Deployment.load(deployment))
    deadline = int(time.time()) + timeout_s + 900
    receipt: Mapping[str, Any] = escrow.fund(task_id, k, deadline, amount_wei)
    return receipt


def open_results(capsule: Mapping[str, Any], owners: Sequence[Owner], store: Any) -> dict[str, list[str]]:
    """Each owner opens its own result: it must be bound to this capsule and signed by the result signer
    the record names (whose match with the attested executor key `verify_capsule` checks)."""
    from trustcap.capsule.envelope import open_bytes
    from trustcap.capsule.ids import capsule_id
    from trustcap.capsule.manifest import parse_manifest

    st = capsule.get("status") or {}
    meta = capsule["metadata"]
    signer = bytes.fromhex(str(st.get("resultSigner", ""))[2:])
    binding = parse_manifest(capsule["spec"]).binding_digest()
    by_recipient = {r["recipient"]: r["cid"] for r in st.get("results") or []}
    out: dict[str, list[str]] = {}
    for o in owners:
        cid = by_recipient.get(f"node-{o.name}")
        if cid is None:
            raise ScenarioError(f"no result for node-{o.name} in the capsule's status")
        plain = open_bytes(store.get(cid), key=o.keys, capsule_id=capsule_id(meta["namespace"], meta["name"]),
                           manifest_digest=binding, owner=signer)
        out[o.name] = [n for n in plain.decode("utf-8").splitlines() if n]
    return out


def step_seconds(capsule: Mapping[str, Any]) -> dict[str, float]:
    """Each step's time since the capsule was accepted, from status.timeline."""
    tl = (capsule.get("status") or {}).get("timeline") or {}
    t0 = float(tl.get("accepted") or 0)
    return {k: round(float(v) - t0, 2) for k, v in sorted(tl.items(), key=lambda kv: kv[1]) if t0}
