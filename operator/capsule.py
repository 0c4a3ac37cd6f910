"""The Capsule controller: drives one capsule from `kubectl apply` to its sealed results (decision 0090).

kopf glue at the bottom (admit, one daemon per live capsule, the finalizer); the steps in `Driver`. Each
step derives everything from objects and the chain, never from memory, so an operator killed at any
line resumes the same step (or finds it done) on restart. One writer per field: this controller writes
the Capsule's status, the Attestation specs and decisions, and the CapsuleRun spec; gateways write their
verdicts, reveals and the run's status.

    submitter ns: Capsule                   system ns (not readable by submitters)        chain
     Pending  ── taskId ───────────────────────────────────────────────────────────────── fund (payer)
      │  Funded: payer, amount, k, deadline checked; seed = hash(block after funding)
      │  gateways commit on chain and put reveal Secrets ──────────────────────────────── commit (each)
     Scheduled ─ select_from_chain(reveals) ─► Attestation pre {executor, committee, the node's policy}
     Attesting   committee gateways write verdicts; quorum ceil(2k/3) ─► CapsuleRun {executor}
     Running     executor gateway: release (owners' brokers), run, seal; "during" rounds at random times
     Sealing     results in the store, one envelope per recipient, signed by the attested executor key
     Wiping      Attestation post (quotes carry the wipe) ─► quorum ─► chain-writer records every round
     Completed   assign + settle (Paid) ──────────────────────────────────────────────── assign, settle
                 only now: executor, every reveal, the rounds' verdicts and the results in status

Until completion nothing a submitter can read names the executor: not the Capsule's status, its events
(Normal for progress, Warning only for a failure) or this controller's log lines about the capsule.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, cast

import kopf

from trustcap.api import ATTESTATIONS, CAPSULERUNS, CAPSULES, GATEWAYS, GROUP, HPCNODES, VERSION
from trustcap.errors import TrustcapError
from trustcap.forms import rfc3339
from trustcap.operator import conditions as cond
from trustcap.operator import lifecycle, rounds
from trustcap.operator.errors import OperatorError
from trustcap.operator.kube import Kube, KubeError
from trustcap.operator.lifecycle import Phase

FINALIZER: Final = "trustcap.io/cleanup"
KOPF_PREFIX: Final = "kopf.trustcap.io"

ADMIT_TIMEOUT_S: Final = 60.0
ADMIT_RETRIES: Final = 10
RELEASE_TIMEOUT_S: Final = 3600.0  # an executor must finish its wipe within this; then deletion proceeds
RELEASE_POLL_S: Final = 2.0
DEADLINE_MARGIN_S: Final = 120  # the escrow deadline must leave this beyond timeoutSeconds

log = logging.getLogger("trustcap.operator.capsule")


@dataclass
class Settings:
    """Operator-wide configuration (kept in kopf's memo, from the environment at startup)."""

    system_namespace: str = "trustcap-system"
    store: str = ""
    commit_window_s: float = 3.0      # after the seed, how long gateways have to commit and reveal
    reveal_wait_s: float = 30.0       # how long to wait for a committed node's reveal before skipping it
    schedule_timeout_s: float = 300.0  # no selection by then: Failed (NotEnoughNodes), escrow cancelled
    round_timeout_s: int = 60
    during_rounds: int = 1
    poll_s: float = 1.0
    policy_digest: str = ""  # a round's policy for a node that declares none; unset: no such round (0116)
    escrow: Any = None                # trustcap.chain.escrow.Escrow of the coordinator, or None (no chain)
    kube: Kube | None = None
    running: dict[str, threading.Event] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Settings:
        s = cls(system_namespace=os.environ.get("TRUSTCAP_SYSTEM_NAMESPACE", "trustcap-system"),
                store=os.environ.get("TRUSTCAP_STORE", ""),
                commit_window_s=float(os.environ.get("TRUSTCAP_COMMIT_WINDOW_SECONDS", "3")),
                round_timeout_s=int(os.environ.get("TRUSTCAP_ROUND_TIMEOUT_SECONDS", "60")),
                policy_digest=os.environ.get("TRUSTCAP_POLICY_DIGEST", ""))
        if "TRUSTCAP_CHAIN_DEPLOYMENT" in os.environ:
            s.escrow = _escrow_from_env()
        return s


def _escrow_from_env() -> Any:
    import json
    from pathlib import Path

    from trustcap.chain.client import ChainClient, Deployment
    from trustcap.chain.escrow import Escrow
    from trustcap.chain.keys import KeySigner

    try:
        keys = json.loads(Path(os.environ["TRUSTCAP_CHAIN_KEYS"]).read_text())
        client = ChainClient(os.environ["TRUSTCAP_CHAIN_RPC"], KeySigner(keys["sender"]))
        return Escrow(client, Deployment.load(Path(os.environ["TRUSTCAP_CHAIN_DEPLOYMENT"])))
    except KeyError as exc:
        raise kopf.PermanentError(f"capsule controller: setting {exc.args[0]} is missing") from None
    except (OSError, ValueError) as exc:
        raise kopf.PermanentError(f"capsule controller: cannot read the chain configuration: {exc}") from None


def _now() -> float:
    return time.time()


def _stamp() -> float:
    """Now, in unix seconds truncated to milliseconds (never ahead of the clock a later look reads)."""
    return int(_now() * 1000) / 1000


_rfc3339 = rfc3339


def _hex(b: bytes) -> str:
    return "0x" + bytes(b).hex()


class StepFailed(TrustcapError):
    """The capsule cannot go on: `reason` (a condition reason) and a message that names the cause."""

    def __init__(self, condition: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.condition, self.reason = condition, reason


class Driver:
    """One step of one capsule per call. Reads the Capsule fresh, writes its status through the API."""

    def __init__(self, settings: Settings, kube: Kube, *, emit: Any = None) -> None:
        self.s, self.kube = settings, kube
        self.emit = emit or (lambda capsule, kind, reason, message: None)
        self.sys = settings.system_namespace

    # --- status writing -------------------------------------------------------------------------------
    def _set(self, capsule: dict[str, Any], *, phase: Phase | None = None, condition: str | None = None,
             status: cond.ConditionStatus = "True", reason: str = "", message: str = "",
             extra: Mapping[str, Any] | None = None, event: bool = True, timeline: str | None = None) -> None:
        st = dict(capsule.get("status") or {})
        gen = int(capsule["metadata"].get("generation") or 0)
        now = cond.utcnow()
        patch: dict[str, Any] = dict(extra or {})
        conds: list[Any] = list(st.get("conditions") or [])
        if phase is not None:
            change = lifecycle.move_to(st, phase, generation=gen, now=now,
                                       message=message if phase in lifecycle.TERMINAL else None)
            if change is not None:
                patch["phase"] = str(change.phase)
                patch["observedGeneration"] = gen
                conds = list(change.conditions)
                if phase is Phase.FAILED:
                    self.emit(capsule, "Warning", reason or cond.REASON_FAILED, message)
        if condition:
            up = cond.set_condition(conds, type_=condition, status=status, reason=reason, message=message,
                                    observed_generation=gen, now=now)
            conds = list(up.conditions)
            if up.changed and event:
                kind = "Warning" if status == "False" and reason in _FAILURE_REASONS else "Normal"
                self.emit(capsule, kind, reason, message)
        if timeline:
            patch["timeline"] = {**(st.get("timeline") or {}), timeline: _stamp()}
        patch["conditions"] = conds
        body = self.kube.patch_status(CAPSULES, capsule["metadata"]["namespace"], capsule["metadata"]["name"],
                                      patch)
        capsule["status"] = body.get("status") or {}

    def fail(self, capsule: dict[str, Any], e: StepFailed) -> None:
        """A failure before any executor holds data: Failed at once, the escrow cancelled (full refund)."""
        self._cancel(capsule)
        self._set(capsule, condition=e.condition, status="False", reason=e.reason, message=str(e))
        self._set(capsule, phase=Phase.FAILED, condition=cond.READY, status="False", reason=e.reason,
                  message=str(e), extra={"outcome": "Cancelled" if self.s.escrow else "Failed",
                                         "completedAt": _rfc3339(_now())}, event=False, timeline="failed")

    def _cancel(self, capsule: dict[str, Any]) -> None:
        if self.s.escrow is None:
            return
        task_id = self.task_id(capsule)
        info = self.s.escrow.task(task_id)
        if info is not None and info.state == "Funded":
            receipt = self.s.escrow.cancel(task_id)
            self._add_tx(capsule, receipt)

    def _add_tx(self, capsule: dict[str, Any], receipt: Mapping[str, Any] | None) -> None:
        if not receipt:
            return
        tx = receipt.get("transactionHash")
        txh = tx.hex() if isinstance(tx, bytes | bytearray) else str(tx)
        txh = "0x" + txh.removeprefix("0x")
        st = capsule.get("status") or {}
        txs = list((st.get("chain") or {}).get("transactions") or [])
        if txh not in txs:
            txs.append(txh)
            body = self.kube.patch_status(CAPSULES, capsule["metadata"]["namespace"],
                                          capsule["metadata"]["name"], {"chain": {"transactions": txs}})
            capsule["status"] = body.get("status") or {}

    # --- identities -------------------------------------------------------------------------------------
    @staticmethod
    def task_id(capsule: Mapping[str, Any]) -> bytes:
        from trustcap.capsule.ids import capsule_id, task_id

        meta = capsule["metadata"]
        return task_id(capsule_id(meta["namespace"], meta["name"]), str(meta["uid"]))

    def _round(self, capsule: Mapping[str, Any], phase: str, index: int = 0) -> dict[str, Any] | None:
        att: dict[str, Any] | None = self.kube.get(ATTESTATIONS, self.sys,
                                                   rounds.round_name(self.task_id(capsule), phase, index))
        return att

    def _run_name(self, capsule: Mapping[str, Any]) -> str:
        return f"run-{self.task_id(capsule).hex()[:16]}"

    # --- the step ---------------------------------------------------------------------------------------
    def step(self, capsule: dict[str, Any]) -> float:
        """Do what the capsule's state calls for; return seconds until the next look."""
        phase = lifecycle.parse_phase((capsule.get("status") or {}).get("phase"))
        try:
            if phase in (None, Phase.PENDING):
                self.pending(capsule)
            elif phase is Phase.SCHEDULED:
                self._set(capsule, phase=Phase.ATTESTING, event=False)
            elif phase is Phase.ATTESTING:
                self.attesting(capsule)
            elif phase in (Phase.RUNNING, Phase.SEALING):
                self.running(capsule)
            elif phase is Phase.WIPING:
                self.wiping(capsule)
        except StepFailed as e:
            if phase in lifecycle.HOLDS_DATA:
                self._to_wiping(capsule, e.reason, str(e))
            else:
                self.fail(capsule, e)
        return self.s.poll_s

    # Pending: task id, funding, seed, commitments and reveals, selection -------------------------------
    def pending(self, capsule: dict[str, Any]) -> None:
        from trustcap.capsule.manifest import parse_manifest

        st = capsule.get("status") or {}
        spec = capsule["spec"]
        task_id = self.task_id(capsule)
        if not st.get("taskId"):
            try:
                parse_manifest(spec)
            except TrustcapError as exc:
                raise StepFailed(cond.READY, cond.REASON_INVALID, f"spec: {exc}") from None
            from trustcap.capsule.ids import capsule_id

            meta = capsule["metadata"]
            self._set(capsule, phase=Phase.PENDING, condition=cond.FUNDED, status="False",
                      reason=cond.REASON_AWAITING_FUNDING, message=self._fund_hint(capsule, task_id),
                      extra={"taskId": _hex(task_id), "capsuleId": _hex(capsule_id(meta["namespace"], meta["name"])),
                             "startedAt": _rfc3339(_now())}, timeline="accepted")
            return
        escrow = self.s.escrow
        if escrow is None:
            return  # no chain configured: the capsule waits in Pending, saying it awaits funding
        vrf = st.get("vrf") or {}
        if not vrf.get("seed"):
            info = escrow.task(task_id)
            if info is None:
                return
            problem = self._escrow_problem(spec, info)
            if problem:
                self._set(capsule, condition=cond.FUNDED, status="False", reason=cond.REASON_ESCROW_MISMATCH,
                          message=problem)
                return
            seed = escrow.block_hash(info.funded_block + 1)
            if seed is None:
                self._set(capsule, condition=cond.FUNDED, status="False", reason=cond.REASON_AWAITING_SEED,
                          message=f"funded in block {info.funded_block}; the seed is the hash of the next block")
                return
            self._set(capsule, condition=cond.FUNDED, reason=cond.REASON_FUNDED,
                      message=f"escrow funded by the payer ({info.payment} wei, committee {info.k}); "
                              f"seed from block {info.funded_block + 1}",
                      extra={"vrf": {"seed": _hex(seed), "seedBlock": info.funded_block + 1,
                                     "epoch": info.funded_block + 1, "seededAt": _stamp()}},
                      timeline="funded")
            self._set(capsule, condition=cond.SCHEDULED, status="False", reason=cond.REASON_AWAITING_REVEALS,
                      message="eligible gateways commit on chain and reveal privately")
            return
        self.select(capsule, task_id, vrf)

    def _fund_hint(self, capsule: Mapping[str, Any], task_id: bytes) -> str:
        spec = capsule["spec"]
        return (f"waiting for the payer to fund the escrow: trustcap escrow fund --task-id {_hex(task_id)} "
                f"--k {spec['committee']['size']} --amount-wei {spec['payment']['amountWei']} "
                f"--deadline-seconds {int(spec['timeoutSeconds']) + DEADLINE_MARGIN_S + 600}")

    @staticmethod
    def _escrow_problem(spec: Mapping[str, Any], info: Any) -> str:
        pay = spec["payment"]
        if str(info.payer).lower() != str(pay["payer"]).lower():
            return f"the escrow's payer {info.payer} is not spec.payment.payer {pay['payer']}"
        if int(info.payment) < int(pay["amountWei"]):
            return f"the escrow holds {info.payment} wei, less than spec.payment.amountWei {pay['amountWei']}"
        if int(info.k) != int(spec["committee"]["size"]):
            return f"the escrow's committee size {info.k} is not spec.committee.size {spec['committee']['size']}"
        quorum_of = rounds.quorum_of
        asked = spec["committee"].get("quorum")
        if asked is not None and int(asked) != quorum_of(int(info.k)):
            # The escrow pays or slashes on ceil(2k/3) verdicts; a capsule asking for more would be settled on fewer.
            return (f"spec.committee.quorum {asked} is not the escrow's settlement quorum ceil(2k/3) = "
                    f"{quorum_of(int(info.k))} of committee {info.k}; omit it or set it to {quorum_of(int(info.k))}")
        need = _now() + int(spec["timeoutSeconds"]) + DEADLINE_MARGIN_S
        if int(info.deadline) < need:
            return (f"the escrow's deadline {int(info.deadline)} is too early: it must leave spec.timeoutSeconds "
                    f"plus {DEADLINE_MARGIN_S} s")
        if info.state != "Funded":
            return f"the escrow task is {info.state}, not Funded"
        return ""

    def _reveals(self, task_id: bytes) -> list[Any]:
        from trustcap.sortition import Reveal

        out = []
        for data in self.kube.secrets(self.sys, f"trustcap.io/reveal={task_id.hex()[:16]}"):
            try:
                out.append(Reveal(node_id=data["node"].lower(), pi=bytes.fromhex(data["pi"].removeprefix("0x")),
                                  salt=bytes.fromhex(data["salt"].removeprefix("0x"))))
            except (KeyError, ValueError):
                continue  # a malformed reveal is that node's fault: it is skipped like a missing one
        return out

    def select(self, capsule: dict[str, Any], task_id: bytes, vrf: Mapping[str, Any]) -> None:
        from trustcap.sortition import SortitionError, select_from_chain

        escrow = self.s.escrow
        waited = _now() - float(vrf.get("seededAt") or _now())
        if waited < self.s.commit_window_s:
            return
        # Commits close on the chain's clock (TaskEscrow.commitDeadline, decision 0096): only after it is every
        # checker's committer set the same as ours.
        commit_deadline, _seed = escrow.selection(task_id)
        if _now() <= commit_deadline + 1:
            return
        committers = [c.lower() for c in escrow.committers(task_id)]
        reveals = {r.node_id: r for r in self._reveals(task_id)}
        k = int(capsule["spec"]["committee"]["size"])
        all_in = committers and all(c in reveals for c in committers)
        if not all_in and waited < self.s.reveal_wait_s:
            return
        try:
            sel = select_from_chain(escrow, task_id, [reveals[c] for c in committers if c in reveals])
        except SortitionError as exc:
            if waited > self.s.schedule_timeout_s:
                raise StepFailed(cond.SCHEDULED, cond.REASON_NOT_ENOUGH_NODES,
                                 f"no selection after {int(waited)} s: {exc}") from None
            self._set(capsule, condition=cond.SCHEDULED, status="False", reason=cond.REASON_NOT_ENOUGH_NODES,
                      message=f"{len(committers)} commitments, {len(reveals)} reveals, need {k + 1}: {exc}")
            return
        commitments = [{"gateway": c, "commitment": _hex(escrow.commitment(task_id, c) or b"\0" * 32)}
                       for c in committers]
        self._open_round(capsule, task_id, sel, "pre")
        skipped = f"; skipped (committed, no valid reveal): {', '.join(sel.skipped)}" if sel.skipped else ""
        self._set(capsule, phase=Phase.SCHEDULED, condition=cond.SCHEDULED, reason=cond.REASON_SELECTED,
                  message=f"executor and a committee of {k} drawn by VRF from {len(committers)} commitments; "
                          f"the executor stays sealed until completion{skipped}",
                  extra={"vrf": {"commitments": commitments}}, timeline="scheduled")

    def _open_round(self, capsule: dict[str, Any], task_id: bytes, sel: Any, phase: str, index: int = 0,
                    epoch: int | None = None) -> dict[str, Any]:
        st = capsule.get("status") or {}
        pi = {r.node_id: r.pi for r in self._reveals(task_id)}
        members = [{"address": m, **({"vrfProof": _hex(pi[m])} if m in pi else {})} for m in sel.committee]
        node = self._node_of(sel.executor)
        body = rounds.new_round(
            name=rounds.round_name(task_id, phase, index), capsule=capsule, task_id=task_id,
            executor=sel.executor, node=str((node or {}).get("metadata", {}).get("name", "unknown")), phase=phase,
            epoch=int(epoch if epoch is not None else (st.get("vrf") or {}).get("epoch") or 0),
            committee=members, quorum=rounds.quorum_of(len(members)),
            policy_digest=self._policy_of(node, self.s.policy_digest), timeout_s=self.s.round_timeout_s)
        att: dict[str, Any] = self.kube.create(ATTESTATIONS, self.sys, body)
        self._note_round(capsule, att)
        return att

    def _hpcnodes(self) -> list[dict[str, Any]]:
        try:
            found = cast(dict[str, Any], self.kube.custom.list_cluster_custom_object(GROUP, VERSION, HPCNODES,
                                                                                      _request_timeout=15))
        except Exception as exc:
            # Not "unknown": a round opened now could not be put under the node's own policy (decision 0116).
            raise KubeError(f"cannot list HPCNodes to open a round under the node's policy: {exc}") from None
        return list(found.get("items", []))

    def _node_of(self, gateway_address: str) -> dict[str, Any] | None:
        """The HPCNode behind a gateway (its name is the Attestation's spec.node), via its Gateway object;
        None when no Gateway has that address or no HPCNode names that Gateway."""
        nodes = self._hpcnodes()
        try:
            gws = cast(dict[str, Any], self.kube.custom.list_cluster_custom_object(GROUP, VERSION, GATEWAYS,
                                                                                    _request_timeout=15))
        except Exception as exc:
            raise KubeError(f"cannot list Gateways to find the executor's HPCNode: {exc}") from None
        gw_names = {str(g["spec"].get("address", "")).lower(): g["metadata"]["name"] for g in gws.get("items", [])}
        gw = gw_names.get(gateway_address.lower())
        return next((n for n in nodes if gw is not None and n["spec"].get("gateway") == gw), None)

    @staticmethod
    def _policy_of(node: Mapping[str, Any] | None, default: str) -> str:
        """The round's policyDigest: the node's declared policy, else `default` (rounds.round_policy_digest)."""
        try:
            return str(rounds.round_policy_digest(node, default))
        except OperatorError as exc:
            # No reason of its own in the vocabulary yet (operator/conditions.py): the message names cause and fix.
            raise StepFailed(cond.SCHEDULED, cond.REASON_FAILED, str(exc)) from None

    def _note_round(self, capsule: dict[str, Any], att: Mapping[str, Any], passed: bool | None = None) -> None:
        st = capsule.get("status") or {}
        items = [dict(a) for a in st.get("attestations") or []]
        name = att["metadata"]["name"]
        entry = next((a for a in items if a["name"] == name), None)
        if entry is None:
            entry = {"name": name, "phase": att["spec"]["phase"]}
            items.append(entry)
        if passed is not None:
            entry["passed"] = passed
        if entry != next((a for a in (st.get("attestations") or []) if a["name"] == name), None):
            body = self.kube.patch_status(CAPSULES, capsule["metadata"]["namespace"], capsule["metadata"]["name"],
                                          {"attestations": items})
            capsule["status"] = body.get("status") or {}

    # --- rounds -----------------------------------------------------------------------------------------
    def decide(self, capsule: dict[str, Any], att: dict[str, Any]) -> str | None:
        """Count the round's verdicts; write its result once decided. Returns Passed, Failed, Expired or None."""
        st = att.get("status") or {}
        if st.get("result") in (rounds.PASSED, rounds.FAILED, rounds.EXPIRED):
            return str(st["result"])
        if self.s.escrow is None:
            return None
        spec = att["spec"]
        t = rounds.tally(att, self.s.escrow.domain())
        created = datetime.strptime(att["metadata"]["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        result = t.result(len(spec["committee"]["members"]), int(spec["committee"]["quorum"]),
                          expired=rounds.expired(att, created.timestamp()))
        if result is None:
            return None
        now = cond.utcnow()
        message = (f"{len(t.passed)} passed, {len(t.failed)} failed of {len(spec['committee']['members'])}; "
                   f"quorum {spec['committee']['quorum']}")
        if t.refused:
            message += "; not counted: " + "; ".join(t.refused)
        up = cond.set_condition(st.get("conditions") or [], type_=cond.READY,
                                status="True" if result == rounds.PASSED else "False",
                                reason=_ROUND_REASON[result],
                                message=message, observed_generation=int(att["metadata"].get("generation") or 0),
                                now=now)
        # The chain-writer records a decided round from the counted verdicts only.
        counted = {s.verdict.verifier.lower() for s in t.signed}
        verdicts = [v for v in st.get("verdicts") or [] if str(v.get("verifier", "")).lower() in counted]
        body = self.kube.patch_status(ATTESTATIONS, self.sys, att["metadata"]["name"],
                                      {"result": result, "decidedAt": cond.format_time(now),
                                       "conditions": up.conditions,
                                       **({"verdicts": verdicts} if len(verdicts) != len(st.get("verdicts") or [])
                                          else {})})
        att["status"] = (body or {}).get("status") or {**st, "result": result, "conditions": up.conditions}
        self._note_round(capsule, att, passed=result == rounds.PASSED)
        return str(result)

    # Attesting: the pre-run round ---------------------------------------------------------------------
    def attesting(self, capsule: dict[str, Any]) -> None:
        pre = self._round(capsule, "pre")
        if pre is None:
            raise StepFailed(cond.ATTESTED, cond.REASON_QUORUM_FAILED, "the pre-run round is missing")
        result = self.decide(capsule, pre)
        if result is None:
            self._set(capsule, condition=cond.ATTESTED, status="False", reason=cond.REASON_AWAITING_QUORUM,
                      message="the committee is challenging the executor", event=False)
            return
        if result != rounds.PASSED:
            raise StepFailed(cond.ATTESTED, cond.REASON_QUORUM_FAILED if result == rounds.FAILED
                             else cond.REASON_ROUND_EXPIRED,
                             f"the pre-run round {result.lower()}: no input was released")
        spec = pre["spec"]
        meta = capsule["metadata"]
        self.kube.create(CAPSULERUNS, self.sys, {
            "apiVersion": "trustcap.io/v1alpha1", "kind": "CapsuleRun",
            "metadata": {"name": self._run_name(capsule), "labels": {"trustcap.io/task": spec["taskId"][2:18]}},
            "spec": {"capsuleRef": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]},
                     "taskId": spec["taskId"], "executor": spec["executor"].lower(), "node": spec["node"],
                     "preRound": pre["metadata"]["name"], "store": self.s.store, "stop": ""},
        })
        decided = cond.get_condition((pre.get("status") or {}).get("conditions"), cond.READY) or {}
        self._set(capsule, condition=cond.ATTESTED, reason=cond.REASON_QUORUM_PASSED,
                  message=f"pre-run quorum of the committee: {decided.get('message', '')}", timeline="attested")
        self._set(capsule, phase=Phase.RUNNING, condition=cond.INPUTS_RELEASED, status="False",
                  reason=cond.REASON_AWAITING_QUORUM, message="the executor asks each input owner's broker",
                  event=False)

    # Running / Sealing: the run, "during" rounds, the timeout ------------------------------------------
    def running(self, capsule: dict[str, Any]) -> None:
        run = self.kube.get(CAPSULERUNS, self.sys, self._run_name(capsule))
        if run is None:
            raise StepFailed(cond.RAN, cond.REASON_RUN_FAILED, "the run order is missing")
        rst = run.get("status") or {}
        st = capsule.get("status") or {}
        timeline = st.get("timeline") or {}
        started = float(timeline.get("attested") or _now())
        if rst.get("inputsReleased") and not cond.is_true(st.get("conditions"), cond.INPUTS_RELEASED):
            self._set(capsule, condition=cond.INPUTS_RELEASED, reason=cond.REASON_RELEASED,
                      message=f"the owners' brokers released {len(rst['inputsReleased'])} input key(s) "
                              "to the attested executor key", timeline="released")
        phase = rst.get("phase")
        if phase in ("Preparing", "Running", None):
            self._during(capsule, started)
            limit = int(capsule["spec"]["timeoutSeconds"]) + 15
            if _now() > started + limit and not run["spec"].get("stop"):
                self.kube.patch_spec(CAPSULERUNS, self.sys, run["metadata"]["name"], {"stop": cond.REASON_TIMEOUT})
            return
        reason = str(rst.get("reason") or ("Completed" if phase == "Succeeded" else cond.REASON_RUN_FAILED))
        if phase == "Succeeded":
            self._set(capsule, condition=cond.RAN, reason=cond.REASON_SUCCEEDED,
                      message=f"the function exited {rst.get('exitCode', 0)} in {rst.get('seconds', '?')} s "
                              "under the node isolation", timeline="ran")
            results = rst.get("results") or []
            self._set(capsule, phase=Phase.SEALING, condition=cond.SEALED, reason=cond.REASON_RESULTS_SEALED,
                      message=f"{len(results)} result envelope(s), one per recipient, signed by the attested "
                              "executor key", timeline="sealed")
            self._to_wiping(capsule, "", "")
            return
        # A broker's refusal and an input that does not open are both the input's failure: nothing ran.
        why = {"Timeout": cond.REASON_TIMEOUT, "InputRejected": cond.REASON_INPUT_REJECTED,
               "ReleaseRefused": cond.REASON_INPUT_REJECTED,
               "Stopped": cond.REASON_DELETED}.get(reason, cond.REASON_RUN_FAILED)
        cond_type = cond.INPUTS_RELEASED if why == cond.REASON_INPUT_REJECTED else cond.RAN
        self._set(capsule, condition=cond_type, status="False", reason=why,
                  message=str(rst.get("error") or f"the run ended {reason}"), timeline="ran")
        self._to_wiping(capsule, why, str(rst.get("error") or f"the run ended {reason}"))

    def _during(self, capsule: dict[str, Any], started: float) -> None:
        """Open the "during" rounds at unpredictable times while the run lasts (decided as they come)."""
        task_id = self.task_id(capsule)
        for i in range(1, self.s.during_rounds + 1):
            att = self._round(capsule, "during", i)
            if att is not None:
                self.decide(capsule, att)
                continue
            # An unpredictable moment: a fresh random delay each look, so nobody can tell the round's time.
            if random.random() < 0.5 and _now() > started + 0.5:  # noqa: S311 - timing jitter, not a secret
                pre = self._round(capsule, "pre")
                if pre is not None:
                    self._open_round_like(capsule, task_id, pre, "during", i)
            return

    def _open_round_like(self, capsule: dict[str, Any], task_id: bytes, pre: Mapping[str, Any], phase: str,
                         index: int = 0) -> dict[str, Any]:
        spec = pre["spec"]
        # The node's policy now, not the pre round's: a node that declares another policy mid-run is attested
        # under it (its gateway's committee peers apply it). A node gone since keeps the pre round's.
        node = next((n for n in self._hpcnodes() if n["metadata"]["name"] == spec["node"]), None)
        policy = self._policy_of(node, self.s.policy_digest) if node is not None else spec["policyDigest"]
        body = rounds.new_round(
            name=rounds.round_name(task_id, phase, index), capsule=capsule, task_id=task_id,
            executor=spec["executor"], node=spec["node"], phase=phase, epoch=int(spec["epoch"]),
            committee=spec["committee"]["members"], quorum=int(spec["committee"]["quorum"]),
            policy_digest=policy, timeout_s=self.s.round_timeout_s)
        att: dict[str, Any] = self.kube.create(ATTESTATIONS, self.sys, body)
        self._note_round(capsule, att)
        return att

    def _to_wiping(self, capsule: dict[str, Any], reason: str, message: str) -> None:
        extra = {"failure": {"reason": reason, "message": message[:1000]}} if reason else None
        self._set(capsule, phase=Phase.WIPING, condition=cond.WIPED, status="False", reason=cond.REASON_WIPING,
                  message="the post-run round checks the executor's wipe proof", extra=extra, event=False)

    # Wiping: the post round, chain records, settlement, the reveal -----------------------------------
    def wiping(self, capsule: dict[str, Any]) -> None:
        st = capsule.get("status") or {}
        failure = st.get("failure") or {}
        task_id = self.task_id(capsule)
        pre = self._round(capsule, "pre")
        run = self.kube.get(CAPSULERUNS, self.sys, self._run_name(capsule))
        if pre is None or run is None:
            # Nothing was released (the pre round failed): nothing to wipe but the prepared key.
            self._finish_failed(capsule, failure.get("reason") or cond.REASON_FAILED,
                                failure.get("message") or "failed before the run")
            return
        post = self._round(capsule, "post") or self._open_round_like(capsule, task_id, pre, "post")
        result = self.decide(capsule, post)
        for att in self._rounds(capsule):  # late "during" rounds are decided (or expire) too
            if att["spec"]["phase"] == "during":
                self.decide(capsule, att)
        if result is None:
            return
        if result != rounds.PASSED:
            self._set(capsule, condition=cond.WIPED, status="False", reason=cond.REASON_QUORUM_FAILED,
                      message=f"the post-run round {result.lower()}: the wipe is not proven")
        elif not cond.is_true(st.get("conditions"), cond.WIPED):
            wipe = (run.get("status") or {}).get("wipe") or {}
            self._set(capsule, condition=cond.WIPED, reason=cond.REASON_WIPE_PROVEN,
                      message=f"the committee attested the wipe ({_wipe_summary(wipe)})", timeline="wiped")
        if not self._recorded(capsule):
            return
        if failure.get("reason") or result != rounds.PASSED:
            if result != rounds.PASSED and self.s.escrow is not None:
                self._settle(capsule, task_id, pre, post)  # a failed post quorum slashes, by the chain's count
            else:
                self._cancel(capsule)
            self._finish_failed(capsule, failure.get("reason") or cond.REASON_QUORUM_FAILED,
                                failure.get("message") or "the wipe was not proven")
            return
        outcome = self._settle(capsule, task_id, pre, post) if self.s.escrow is not None else "Unpaid"
        self._set(capsule, condition=cond.RECORDED, reason=cond.REASON_PAID if outcome == "Paid" else outcome,
                  message=f"every round recorded on chain; escrow {outcome.lower()}", timeline="recorded")
        self._reveal(capsule, task_id, pre, run, outcome)

    def _rounds(self, capsule: Mapping[str, Any]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.kube.list(ATTESTATIONS, self.sys,
                                                     f"trustcap.io/task={self.task_id(capsule).hex()[:16]}")
        return found

    def _recorded(self, capsule: dict[str, Any]) -> bool:
        if self.s.escrow is None:
            return True
        pending = [a["metadata"]["name"] for a in self._rounds(capsule)
                   if (a.get("status") or {}).get("result") in (rounds.PASSED, rounds.FAILED)
                   and not ((a.get("status") or {}).get("chain") or {}).get("txHash")]
        undecided = [a for a in self._rounds(capsule) if not (a.get("status") or {}).get("result")]
        if pending or undecided:
            self._set(capsule, condition=cond.RECORDED, status="False", reason=cond.REASON_AWAITING_RECORD,
                      message=f"{len(pending)} decided round(s) waiting for the chain-writer, "
                              f"{len(undecided)} undecided", event=False)
            return False
        return True

    def _settle(self, capsule: dict[str, Any], task_id: bytes, pre: Mapping[str, Any], post: dict[str, Any]) -> str:
        escrow = self.s.escrow
        info = escrow.task(task_id)
        spec = post["spec"]
        if info is not None and info.state == "Funded":
            self._add_tx(capsule, escrow.assign(task_id, bytes.fromhex(spec["nonce"][2:]), spec["executor"],
                                                [m["address"] for m in spec["committee"]["members"]],
                                                self._reveals(task_id)))
            info = escrow.task(task_id)
        if info is not None and info.state == "Assigned":
            signed = rounds.tally(post, escrow.domain()).signed
            self._add_tx(capsule, escrow.settle(task_id, signed))
            info = escrow.task(task_id)
        return str(info.state if info is not None else "Unknown")

    def _reveal(self, capsule: dict[str, Any], task_id: bytes, pre: Mapping[str, Any], run: Mapping[str, Any],
                outcome: str) -> None:
        """Completion: only now does the Capsule name its executor, with every proof a checker needs."""
        rst = run.get("status") or {}
        reveals = [{"gateway": r.node_id, "proof": _hex(r.pi), "salt": _hex(r.salt)} for r in self._reveals(task_id)]
        executor = str(pre["spec"]["executor"]).lower()
        mine = next((r for r in reveals if r["gateway"] == executor), None)
        record = []
        for att in sorted(self._rounds(capsule), key=lambda a: a["metadata"]["creationTimestamp"]):
            ast = att.get("status") or {}
            aspec = att["spec"]
            record.append({"name": att["metadata"]["name"], "phase": aspec["phase"], "nonce": aspec["nonce"],
                           "result": ast.get("result", ""),
                           "committee": [m["address"] for m in aspec["committee"]["members"]],
                           "quorum": aspec["committee"]["quorum"], "chain": ast.get("chain") or {},
                           "verdicts": [{"verifier": v.get("verifier"), "verdict": v.get("verdict"),
                                         **({"quote": v["quote"]} if aspec["phase"] == "pre" and v.get("quote")
                                            else {})}
                                        for v in ast.get("verdicts") or []]})
        results = [{"recipient": r["recipient"], "cid": r["cid"]} for r in rst.get("results") or []]
        self._set(capsule, phase=Phase.COMPLETED, condition=cond.READY, status="True", reason=cond.REASON_COMPLETED,
                  message=f"results sealed to {len(results)} recipient(s); executor wiped; escrow {outcome.lower()}",
                  extra={"vrf": {"executor": executor, **({"proof": mine["proof"]} if mine else {}),
                                 "reveals": reveals},
                         "results": results, "resultSigner": rst.get("resultSigner", ""), "outcome": outcome,
                         "record": record, "wipe": rst.get("wipe") or {}, "store": run["spec"].get("store", ""),
                         "completedAt": _rfc3339(_now())},
                  event=False, timeline="completed")
        self.emit(capsule, "Normal", cond.REASON_COMPLETED,
                  f"completed: results sealed to {len(results)} recipient(s), escrow {outcome.lower()}")

    def _finish_failed(self, capsule: dict[str, Any], reason: str, message: str) -> None:
        self._cancel(capsule)
        self._set(capsule, phase=Phase.FAILED, condition=cond.READY, status="False", reason=reason,
                  message=f"{message} (after the wipe)", event=False, timeline="failed",
                  extra={"outcome": "Cancelled" if self.s.escrow else "Failed", "completedAt": _rfc3339(_now())})


def _wipe_summary(wipe: Mapping[str, Any]) -> str:
    if not wipe:
        return "no wipe report"
    parts = [f"{k}: {v}" for k, v in wipe.items() if isinstance(v, str | int | bool | float)][:4]
    return ", ".join(parts) or "wipe report present"


_ROUND_REASON: Final = {rounds.PASSED: cond.REASON_QUORUM_PASSED, rounds.FAILED: cond.REASON_QUORUM_FAILED,
                         rounds.EXPIRED: cond.REASON_ROUND_EXPIRED}

_FAILURE_REASONS: Final = frozenset({
    cond.REASON_ESCROW_MISMATCH, cond.REASON_NOT_ENOUGH_NODES, cond.REASON_QUORUM_FAILED, cond.REASON_ROUND_EXPIRED,
    cond.REASON_INPUT_REJECTED, cond.REASON_TIMEOUT, cond.REASON_RUN_FAILED, cond.REASON_INVALID,
    cond.REASON_SLASHED, cond.REASON_FAILED,
})


# ------------------------------------------------------------------------------------------------------
# kopf glue
# ------------------------------------------------------------------------------------------------------
@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Name kopf's state after our API group, bound every network wait, and load the controller settings."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration",
    )
    settings.posting.level = logging.WARNING  # events are ours (Normal for progress, Warning for failures)
    settings.networking.request_timeout = 30.0
    settings.networking.connect_timeout = 10.0
    # An int, not 300.0: kopf puts it in the URL as timeoutSeconds and the API server refuses "300.0".
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330.0
    settings.watching.connect_timeout = 10.0
    memo.capsules = Settings.from_env()
    if not memo.capsules.policy_digest:
        logger.warning("capsule controller: TRUSTCAP_POLICY_DIGEST is not set: a capsule whose executor's HPCNode "
                       "declares no spec.policy.digest fails when its rounds open (decision 0116)")
    if memo.capsules.escrow is None:
        logger.warning("capsule controller: no chain configured (TRUSTCAP_CHAIN_DEPLOYMENT): capsules wait in "
                       "Pending for funding")


def _settings(memo: kopf.Memo) -> Settings:
    s: Settings | None = getattr(memo, "capsules", None)
    if s is None:
        s = memo.capsules = Settings.from_env()
    if s.kube is None:
        s.kube = Kube()
        s.kube.ensure_namespace(s.system_namespace)
    return s


def _emitter(body: kopf.Body) -> Any:
    def emit(_capsule: Any, kind: str, reason: str, message: str) -> None:
        kopf.event(body, type=kind, reason=reason, message=message)
    return emit


@kopf.on.resume(GROUP, VERSION, CAPSULES, timeout=ADMIT_TIMEOUT_S, retries=ADMIT_RETRIES, backoff=2)
@kopf.on.create(GROUP, VERSION, CAPSULES, timeout=ADMIT_TIMEOUT_S, retries=ADMIT_RETRIES, backoff=2)
def admit_capsule(body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, logger: kopf.Logger,
                  **_: Any) -> None:
    """Put a new Capsule in Pending; on resume, repair a missing condition and otherwise do nothing."""
    try:
        change = lifecycle.admit(status, generation=int(meta.get("generation") or 0), now=cond.utcnow())
    except OperatorError as exc:
        raise kopf.PermanentError(str(exc)) from exc
    if change is None:
        return
    patch.status["phase"] = str(change.phase)
    patch.status["observedGeneration"] = change.observed_generation
    patch.status["conditions"] = change.conditions
    kopf.event(body, type="Normal", reason=change.ready["reason"], message=change.ready["message"])


def _live(status: Mapping[str, Any], meta: Mapping[str, Any], **_: Any) -> bool:
    return status.get("phase") not in ("Completed", "Failed") and not meta.get("deletionTimestamp")


@kopf.daemon(GROUP, VERSION, CAPSULES, when=_live, cancellation_timeout=10.0, initial_delay=0.5)  # type: ignore[arg-type]
def drive_capsule(body: kopf.Body, name: str, namespace: str, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                  logger: kopf.Logger, **_: Any) -> None:
    """One capsule's steps until it is Completed or Failed (a restart resumes here, from the objects)."""
    s = _settings(memo)
    assert s.kube is not None
    driver = Driver(s, s.kube, emit=_emitter(body))
    while not stopped:
        capsule = s.kube.get(CAPSULES, namespace, name)
        if capsule is None or (capsule.get("status") or {}).get("phase") in ("Completed", "Failed"):
            return
        try:
            delay = driver.step(capsule)
        except (KubeError, TrustcapError) as exc:
            logger.warning("step failed, will retry: %s", exc)  # names no executor: errors come from our checks
            delay = 3.0
        stopped.wait(delay)


@kopf.on.delete(GROUP, VERSION, CAPSULES, timeout=RELEASE_TIMEOUT_S, backoff=RELEASE_POLL_S)  # type: ignore[arg-type]
def release_capsule(status: kopf.Status, meta: kopf.Meta, name: str, namespace: str, memo: kopf.Memo,
                    logger: kopf.Logger, **_: Any) -> None:
    """Keep a Capsule while an executor may still hold its data; the finalizer is its guard.

    Deleting the object must not hide an unfinished run: the run is told to stop, and the object goes
    only when the executor reports its wipe. A capsule deleted before any executor held data has its
    escrow cancelled (the payer's full refund)."""
    phase = _phase_or_none(status)
    if phase in lifecycle.HOLDS_DATA:
        s = _settings(memo)
        assert s.kube is not None
        capsule = {"metadata": {"namespace": namespace, "name": name, "uid": meta.get("uid")}, "status": dict(status)}
        driver = Driver(s, s.kube)
        run = s.kube.get(CAPSULERUNS, s.system_namespace, driver._run_name(capsule))
        if run is not None:
            rst = run.get("status") or {}
            if rst.get("phase") in ("Succeeded", "Failed") and rst.get("wipe"):
                logger.info("capsule released after the executor's wipe")
                return
            if not run["spec"].get("stop"):
                s.kube.patch_spec(CAPSULERUNS, s.system_namespace, run["metadata"]["name"],
                                  {"stop": cond.REASON_DELETED})
        elif phase is Phase.ATTESTING:
            # No run order yet: inputs are released only to a CapsuleRun's executor, so none was; the
            # executor holds a prepared key and nothing else.
            logger.info("capsule released while attesting: no input was released")
            return
        raise kopf.TemporaryError(f"capsule is {phase}: deletion waits until the executor is wiped",
                                  delay=RELEASE_POLL_S)
    if phase is not None and phase not in lifecycle.TERMINAL:
        s = _settings(memo)
        if s.escrow is not None and s.kube is not None:
            capsule = {"metadata": {"namespace": namespace, "name": name, "uid": meta.get("uid")},
                       "status": dict(status)}
            Driver(s, s.kube)._cancel(capsule)
    logger.info("capsule released (phase %s)", phase or "none")


def _phase_or_none(status: Mapping[str, Any]) -> lifecycle.Phase | None:
    try:
        return lifecycle.parse_phase(status.get("phase"))
    except OperatorError:
        return None


__all__: Sequence[str] = ["Driver", "Settings", "StepFailed", "admit_capsule", "configure", "drive_capsule",
                          "release_capsule"]
