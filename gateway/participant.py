"""A gateway's part in selection: commit on chain to its VRF draw for each funded capsule, reveal privately.

Decision 0090 and docs/lifecycle-interfaces.md section 4. The operator cannot add, drop or edit a
commitment (each gateway commits from its own chain account), and nobody outside the system namespace
learns a draw before completion (the reveal is a Secret there).

    Capsule (any ns)                 Participant (this gateway)                 chain (TaskEscrow)       system ns
     status: Pending, taskId,  --->  | taskId recomputed from {namespace, name, uid}
             vrf.seed                | task Funded?  no commitment of mine yet? ----> getTask, commitmentOf
                                     | seed == hash(funded block + 1)? ------------> block hash
                                     | alpha = selection_alpha(taskId hex, seed)
                                     | pi = root.vrf_prove(alpha); salt (or both from my reveal Secret)
                                     |-- Secret reveal-<task16>-<addr> {node, pi, salt} ---------------------> (private)
                                     |-- commit(taskId, sha256(alpha, node, pi, salt)) --> commit

Why the Secret is written before the commit: a commitment without its reveal is lost work (the node is
skipped), and the salt is random, so a gateway restarted between the two would have to commit anew and
the chain refuses a second commit. Written first, the Secret is what a restart reads back: the same pi
and salt, the same commitment. A reveal whose node never committed counts for nothing
(`select_from_chain` looks only at on-chain committers), so writing it early gives nothing away that
the commitment would not. Every decision is derived from the Capsule, the Secret and the chain; the
memory of committed tasks only saves chain reads.
"""

from __future__ import annotations

import base64
import builtins
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol, cast

from trustcap import sortition
from trustcap.api import CAPSULES, GROUP, VERSION
from trustcap.capsule.ids import capsule_id, task_id
from trustcap.chain.errors import ContractReverted
from trustcap.errors import TrustcapError
from trustcap.forms import hex_bytes
from trustcap.gateway._loop import PollingLoop
from trustcap.gateway.errors import GatewayError
from trustcap.kubeclient import api_call
from trustcap.kubeclient import api_client as kube_api_client

__all__ = ["REVEAL_LABEL", "KubeCapsules", "LifecycleError", "Participant", "ParticipantKube", "reveal_name"]

log = logging.getLogger("trustcap.gateway")
REVEAL_LABEL: Final = "trustcap.io/reveal"
TIMEOUT_S: Final = 15.0


class LifecycleError(GatewayError):
    """A lifecycle object could not be read or written, or does not say what the protocol needs."""


def reveal_name(task: bytes, address: str) -> str:
    """`reveal-<taskid hex[:16]>-<addr without 0x>` (lifecycle interfaces section 4)."""
    return f"reveal-{task.hex()[:16]}-{address.lower().removeprefix('0x')}"


class ParticipantKube(Protocol):
    """What the participant reads and writes in the cluster (a fake in unit tests)."""

    def capsules(self) -> list[dict[str, Any]]: ...

    def secret(self, namespace: str, name: str) -> dict[str, str] | None: ...

    def create_secret(self, namespace: str, name: str, labels: Mapping[str, str], data: Mapping[str, str]) -> bool: ...


class KubeCapsules:
    """The lifecycle objects a gateway touches, through the real API server; failures become LifecycleError.

    Credentials: `kubeconfig` when given, else the in-cluster service account. It serves both the
    participant (Capsules in every namespace, reveal Secrets) and the runner (Attestations, CapsuleRuns
    and their status, the task's reveal Secrets)."""

    def __init__(self, kubeconfig: str | None = None, *, timeout_s: float = TIMEOUT_S) -> None:
        from kubernetes import client

        api = kube_api_client(kubeconfig)
        self._custom = client.CustomObjectsApi(api)
        self._core = client.CoreV1Api(api)
        self._timeout = timeout_s

    # -- participant --------------------------------------------------------------------------------
    def capsules(self) -> list[dict[str, Any]]:
        doc = _call("cannot list Capsules in all namespaces", lambda: self._custom.list_cluster_custom_object(
            GROUP, VERSION, CAPSULES, _request_timeout=self._timeout))
        return list(cast(dict[str, Any], doc).get("items") or [])

    def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        item = _call(f"cannot read Secret {namespace}/{name}", lambda: self._core.read_namespaced_secret(
            name, namespace, _request_timeout=self._timeout), absent=404)
        return None if item is None else _decoded(item.data)

    def create_secret(self, namespace: str, name: str, labels: Mapping[str, str], data: Mapping[str, str]) -> bool:
        """Create the Secret; False when one of that name exists already (it is left as it is)."""
        from kubernetes import client

        body = client.V1Secret(metadata=client.V1ObjectMeta(name=name, labels=dict(labels)), type="Opaque",
                               data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()})
        made = _call(f"cannot create Secret {namespace}/{name}", lambda: self._core.create_namespaced_secret(
            namespace, body, _request_timeout=self._timeout) or True, absent=409)
        return made is not None

    # -- runner -------------------------------------------------------------------------------------
    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        return cast("dict[str, Any] | None", _call(
            f"cannot read {plural} {namespace}/{name}", lambda: self._custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, _request_timeout=self._timeout), absent=404))

    def list(self, plural: str, namespace: str, label_selector: str = "") -> list[dict[str, Any]]:
        doc = _call(f"cannot list {plural} in {namespace}", lambda: self._custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, label_selector=label_selector, _request_timeout=self._timeout))
        return list(cast(dict[str, Any], doc).get("items") or [])

    def patch_status(self, plural: str, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """A JSON merge patch of the status subresource (the client sends a dict body as merge-patch+json)."""
        _call(f"cannot patch {plural} {namespace}/{name} status",
              lambda: self._custom.patch_namespaced_custom_object_status(
                  GROUP, VERSION, namespace, plural, name, {"status": dict(status)}, _request_timeout=self._timeout))

    def secrets(self, namespace: str, label_selector: str) -> builtins.list[dict[str, str]]:
        """Each matching Secret's decoded data."""
        found = _call(f"cannot list Secrets in {namespace}", lambda: self._core.list_namespaced_secret(
            namespace, label_selector=label_selector, _request_timeout=self._timeout))
        return [_decoded(item.data) for item in found.items]


def _call(what: str, call: Callable[[], Any], *, absent: int | None = None) -> Any:
    """One API call of the lifecycle, its failure a LifecycleError naming the object."""
    return api_call(what, call, error=LifecycleError, absent=absent)


def _decoded(data: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): base64.b64decode(v).decode("utf-8", "replace") for k, v in (data or {}).items()}


class _Root(Protocol):
    @property
    def address(self) -> str: ...

    def vrf_prove(self, alpha: bytes) -> bytes: ...


class Participant(PollingLoop):
    """Commits this gateway to its draw for every funded, seeded, Pending capsule, once per task."""

    loop_name = "trustcap-gateway-participant"
    step_label = "selection pass"

    def __init__(self, root: _Root, escrow: Any, kube: ParticipantKube, *, namespace: str,
                 eligible: Callable[[], bool] = lambda: True, poll_s: float = 1.0) -> None:
        self.root, self.escrow, self.kube = root, escrow, kube
        self.namespace = namespace
        self.eligible = eligible
        self.address = str(root.address).lower()
        self._done: set[bytes] = set()  # tasks committed (or found committed, or past Funded)
        self._init_loop(poll_s)

    def step(self) -> int:
        """One pass over the Capsules; returns how many commitments this pass sent."""
        committed = 0
        eligible: bool | None = None
        for capsule in self.kube.capsules():
            task = self._candidate(capsule)
            if task is None:
                continue
            if eligible is None:
                eligible = bool(self.eligible())
            if not eligible:
                log.debug("not eligible: skipping selection of task 0x%s", task.hex())
                return committed
            try:
                committed += self._take_part(capsule, task)
            except (TrustcapError, OSError) as exc:
                log.warning("task 0x%s: cannot take part in selection yet: %s", task.hex(), exc)
        return committed

    # -- one capsule ----------------------------------------------------------------------------------
    def _candidate(self, capsule: Mapping[str, Any]) -> bytes | None:
        """The task id of a capsule awaiting commitments, recomputed from the object; else None."""
        st = capsule.get("status") or {}
        if st.get("phase") != "Pending" or not (st.get("vrf") or {}).get("seed"):
            return None
        claimed = hex_bytes(st.get("taskId"), 32)
        if claimed is None or claimed in self._done:
            return None
        meta = capsule.get("metadata") or {}
        try:
            mine = task_id(capsule_id(str(meta.get("namespace")), str(meta.get("name"))), str(meta.get("uid")))
        except TrustcapError:
            return None
        if mine != claimed:
            log.warning("capsule %s/%s: status.taskId 0x%s is not its task id 0x%s; not taking part",
                        meta.get("namespace"), meta.get("name"), claimed.hex(), mine.hex())
            self._done.add(claimed)
            return None
        return mine

    def _take_part(self, capsule: Mapping[str, Any], task: bytes) -> int:
        info = self.escrow.task(task)
        if info is None:
            return 0  # not funded yet (the seed says it was: a reorg or a lagging node; look again)
        if info.state != "Funded":
            self._done.add(task)  # commitments close once the task leaves Funded
            return 0
        if self.escrow.commitment(task, self.address) is not None:
            self._done.add(task)
            return 0
        seed = self.escrow.block_hash(info.funded_block + 1)
        claimed = hex_bytes(((capsule.get("status") or {}).get("vrf") or {}).get("seed"), 32)
        if seed is None or seed != claimed:
            raise LifecycleError(f"status.vrf.seed {claimed.hex() if claimed else None} is not the hash of block "
                                 f"{info.funded_block + 1} on chain ({seed.hex() if seed else 'not mined'})")
        alpha = sortition.selection_alpha(task.hex(), seed)
        reveal = self._reveal(task, alpha)
        c = sortition.commitment(alpha, self.address, reveal.pi, reveal.salt)
        try:
            self.escrow.commit(task, c)
        except (TrustcapError, OSError) as exc:
            if self.escrow.commitment(task, self.address) is not None:
                self._done.add(task)  # committed already (a lost receipt, another instance): done
                return 0
            if isinstance(exc, ContractReverted) and exc.error == "RegisteredAfterSeed":
                self._done.add(task)  # registered after this task's seed block: never eligible (decision 0115)
                log.info("not eligible for task 0x%s: this node registered after its seed block", task.hex())
                return 0
            raise LifecycleError(f"commit to task 0x{task.hex()} was refused: {exc}") from exc
        self._done.add(task)
        log.info("committed to the draw of task 0x%s", task.hex())
        return 1

    def _reveal(self, task: bytes, alpha: bytes) -> sortition.Reveal:
        """My reveal for this task: the one in my Secret when it exists and opens this alpha, else a new one."""
        name = reveal_name(task, self.address)
        existing = self.kube.secret(self.namespace, name)
        if existing is None:
            _, reveal = sortition.participate_with(self.address, self.root.vrf_prove, alpha)
            data = {"node": self.address, "pi": "0x" + reveal.pi.hex(), "salt": "0x" + reveal.salt.hex()}
            if self.kube.create_secret(self.namespace, name, {REVEAL_LABEL: task.hex()[:16]}, data):
                return reveal
            existing = self.kube.secret(self.namespace, name)  # made meanwhile by another pass: use that one
            if existing is None:
                raise LifecycleError(f"reveal Secret {self.namespace}/{name} exists and cannot be read")
        try:
            old = sortition.Reveal(existing["node"].lower(), bytes.fromhex(existing["pi"].removeprefix("0x")),
                                   bytes.fromhex(existing["salt"].removeprefix("0x")))
        except (KeyError, ValueError) as exc:
            raise LifecycleError(f"reveal Secret {self.namespace}/{name} is malformed ({exc}); delete it to "
                                 "take part") from exc
        if old.node_id != self.address or old.pi != self.root.vrf_prove(alpha):
            raise LifecycleError(f"reveal Secret {self.namespace}/{name} is not this gateway's proof for this "
                                 "task's draw; delete it to take part")
        return old
