"""A gateway's seat on a capsule round's committee: challenge the executor, appraise, sign, write its verdict.

Decision 0090 and docs/lifecycle-interfaces.md sections 2, 8 and 9. The operator never attests: it opens
an Attestation (one round: pre, during or post) naming the executor and the committee, and counts the
signed verdicts the members write (operator/rounds.py `tally`). This module is one member's side.

    CommitteeMember (this gateway, trust root R)     executor's gateway (relay)          agent (HPC)
      | Attestation: me in spec.committee, no result, no verdict of mine, not timed out
      | HPCNode spec.node -> status.agentKey (the enrolled agent key), spec.policy.digest
      | spec.policyDigest (and the node's declared digest, if any) == my policy's digest, else no verdict
      | Capsule (spec.capsuleRef, uid checked) -> binding digest, image digest
      | nonce = challenge_nonce(taskId, round, phase, me)  (trustcap.release; the brokers recompute it)
      |-- POST /v1/challenge {nonce, node, capsule: {taskId, round, phase}} signed by R ->|
      |                                        | committee member? prepare the task    |
      |                                        |-- quote {nonce, capsule} ------------->|
      |<-- SignedQuote (agent sig, gateway countersig) ---------------------------------|
      | appraise: both signatures, my nonce once, age, gateway == spec.executor, policy
      | capsule_state: taskId, round, phase, manifestDigest, imageDigest, executorKey
      |   (during/post: the executorKey my own verdict saw in the task's pre round)
      | Verdict(attestationId = spec.nonce, node = executor, verifier = me, phase, passed, quoteDigest,
      |         policyDigest = spec.policyDigest, epoch, issuedAt), EIP-712 signed by R
      |-- server-side apply status.verdicts[verifier = me] (field manager trustcap-gateway-<me>) -> API

A member signs a verdict only under the policy it appraises with (decision 0116): a round whose
`spec.policyDigest` is not the digest of this gateway's attestation policy, or whose node declares
another policy, gets no verdict from it, passed or failed (the rules it would apply are not the round's,
so its word would say nothing about the round; the node is not at fault either). It is logged once per
round and the round expires or is decided by the members who do apply its policy.

A failed appraisal is a signed `passed: false` verdict naming every failed claim (Keylime's rule: collect
all, then decide). An executor that cannot be reached, a relay that refuses, or an API-server error is
not evidence against the executor: nothing is written and the round is tried again on the next pass,
until its `timeoutSeconds` ends (the operator then expires it). So silence is never a "passed".

Which value `capsule.round` carries: the round's id, `spec.nonce` (decision 0090: "Round id = an
Attestation's spec.nonce"), because the agent binds it as 32 bytes of hex and the owners' brokers compare
it with the round's nonce (trustcap/release/check.py). The relay finds a round by its id or its name.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol, cast

from eth_utils.address import to_checksum_address
from pydantic import ValidationError

from trustcap.api import ATTESTATIONS, CAPSULES, GATEWAYS, GROUP, HPCNODES, VERSION
from trustcap.capsule.errors import ManifestError
from trustcap.capsule.manifest import parse_manifest
from trustcap.evidence import failure as fid
from trustcap.evidence.errors import EvidenceError
from trustcap.evidence.failure import Report, Severity
from trustcap.evidence.freshness import NonceRegistry
from trustcap.evidence.policy import Policy, check_policy, policy_digest
from trustcap.evidence.quote import (
    SignedQuote,
    appraise_quote,
    decode_signed_quote,
    encode_signed_quote,
    quote_digest,
)
from trustcap.evidence.signing import Signer
from trustcap.evidence.verdict import Domain, Phase, SignedVerdict, Verdict, sign_verdict, verdict_id, verify_verdict
from trustcap.forms import hex_bytes, hex_digest, parse_rfc3339
from trustcap.gateway._loop import PollingLoop
from trustcap.gateway.attest_errors import RelayError
from trustcap.gateway.participant import LifecycleError
from trustcap.gateway.relay_client import request_quote
from trustcap.kubeclient import api_call
from trustcap.release.binding import challenge_nonce

__all__ = ["CAPSULE_PHASES", "CommitteeKube", "CommitteeMember", "KubeRounds", "endpoint_from_gateways",
           "field_manager", "verdict_entry"]

log = logging.getLogger("trustcap.gateway")
CAPSULE_PHASES: Final = ("pre", "during", "post")
UNDECIDED: Final = (None, "", "Pending")
MAX_FAILURES: Final = 64  # crds/attestation.yaml: status.verdicts[].failures maxItems / maxLength
MAX_FAILURE_LEN: Final = 512
TIMEOUT_S: Final = 15.0


def field_manager(address: str) -> str:
    """`trustcap-gateway-<addr>`: the one writer of this gateway's verdict entries (lowercase address)."""
    return f"trustcap-gateway-{address.lower()}"


class CommitteeKube(Protocol):
    """What a committee member reads and writes in the cluster (a fake in unit tests)."""

    def attestations(self, namespace: str) -> list[dict[str, Any]]: ...

    def capsule(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def gateways(self) -> list[dict[str, Any]]: ...

    def hpcnode(self, name: str) -> dict[str, Any] | None: ...

    def apply_verdict(self, namespace: str, name: str, entry: Mapping[str, Any], manager: str) -> None: ...


class KubeRounds:
    """CommitteeKube through the real API server; every failure is a LifecycleError naming the object.

    Credentials: `kubeconfig` when given, else the in-cluster service account."""

    def __init__(self, kubeconfig: str | None = None, *, timeout_s: float = TIMEOUT_S) -> None:
        from kubernetes import client

        from trustcap.kubeclient import api_client as kube_api_client

        api_client = kube_api_client(kubeconfig)
        self._custom = client.CustomObjectsApi(api_client)
        self._timeout = timeout_s

    @staticmethod
    def _get(what: str, call: Callable[[], Any]) -> dict[str, Any] | None:
        return cast("dict[str, Any] | None", api_call(f"cannot read {what}", call, error=LifecycleError, absent=404))

    @staticmethod
    def _items(what: str, call: Callable[[], Any]) -> list[dict[str, Any]]:
        doc = cast(dict[str, Any], api_call(f"cannot list {what}", call, error=LifecycleError))
        return list(doc.get("items") or [])

    def attestations(self, namespace: str) -> list[dict[str, Any]]:
        return self._items(f"Attestations in {namespace}", lambda: self._custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, ATTESTATIONS, _request_timeout=self._timeout))

    def capsule(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(f"Capsule {namespace}/{name}", lambda: self._custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, CAPSULES, name, _request_timeout=self._timeout))

    def gateways(self) -> list[dict[str, Any]]:
        return self._items("Gateways", lambda: self._custom.list_cluster_custom_object(
            GROUP, VERSION, GATEWAYS, _request_timeout=self._timeout))

    def hpcnode(self, name: str) -> dict[str, Any] | None:
        return self._get(f"HPCNode {name}", lambda: self._custom.get_cluster_custom_object(
            GROUP, VERSION, HPCNODES, name, _request_timeout=self._timeout))

    def apply_verdict(self, namespace: str, name: str, entry: Mapping[str, Any], manager: str) -> None:
        """Server-side apply of this gateway's one `status.verdicts[]` entry (a list-map keyed by
        `verifier`): the API server merges it beside the other members' entries, each owned by its writer."""
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Attestation",
                "metadata": {"name": name, "namespace": namespace}, "status": {"verdicts": [dict(entry)]}}
        api_call(f"cannot apply the verdict of {manager} to Attestation {namespace}/{name}",
                 lambda: self._custom.patch_namespaced_custom_object_status(
                     GROUP, VERSION, namespace, ATTESTATIONS, name, body, field_manager=manager, force=True,
                     _content_type="application/apply-patch+yaml", _request_timeout=self._timeout),
                 error=LifecycleError)


def endpoint_from_gateways(gateways: Callable[[], Iterable[Mapping[str, Any]]]) -> Callable[[str], str | None]:
    """`endpoint_of(address)`: the relay URL `http://<spec.endpoint>` of the Gateway whose `spec.address`
    is `address` (compared lowercase), or None when no Gateway names it."""

    def endpoint_of(address: str) -> str | None:
        for gw in gateways():
            spec = (gw or {}).get("spec") or {}
            if str(spec.get("address", "")).lower() == address.lower() and spec.get("endpoint"):
                return f"http://{spec['endpoint']}"
        return None

    return endpoint_of


class _Retry(Exception):
    """Nothing can be concluded this pass (executor unreachable, an object unreadable): try again later."""


class _Refused(Exception):
    """This member does not sign a verdict for the round (it is under a policy the member does not apply)."""


def verdict_entry(signed: SignedVerdict, quote: SignedQuote, *, nonce: bytes, domain: Domain,
                  failures: Iterable[str]) -> dict[str, Any]:
    """One `status.verdicts[]` entry, in crds/attestation.yaml's shape: what `rounds.tally` counts."""
    v = signed.verdict
    names = [f[:MAX_FAILURE_LEN] for f in failures]
    if len(names) > MAX_FAILURES:
        names = [*names[:MAX_FAILURES - 1], f"... and {len(names) - MAX_FAILURES + 1} more"]
    return {
        "verifier": v.verifier.lower(), "passed": v.passed, "nonce": "0x" + bytes(nonce).hex(),
        "quoteDigest": v.quote_digest, "verdictId": "0x" + verdict_id(v, domain).hex(),
        "signature": signed.signature, "issuedAt": v.issued_at, "failures": names,
        "verdict": signed.model_dump(mode="json"), "quote": base64.b64encode(encode_signed_quote(quote)).decode(),
    }


class CommitteeMember(PollingLoop):
    """Writes this gateway's verdict into every open capsule round whose committee it sits on."""

    loop_name = "trustcap-committee"
    step_label = "committee pass"

    def __init__(self, root: Signer, *, kube: CommitteeKube, namespace: str, domain: Domain, policy: Policy,
                 endpoint_of: Callable[[str], str | None], poll_s: float = 1.0, request_timeout_s: float = 10.0,
                 max_quote_age_s: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.me = root.address.lower()
        self.kube = kube
        self.namespace = namespace
        self.domain = domain
        self.policy = policy
        #: The digest of the rules this member appraises under; a verdict names it (Verdict.policyDigest).
        self.policy_digest = "0x" + policy_digest(policy).hex()
        self.endpoint_of = endpoint_of
        self.request_timeout_s = request_timeout_s
        self.max_quote_age_s = max_quote_age_s
        self.clock = clock
        self.nonces = NonceRegistry(window_seconds=max(request_timeout_s, max_quote_age_s) * 2, clock=clock)
        self.written = 0
        self._refused: dict[str, str] = {}  # round name -> why no verdict: logged once per round
        self._init_loop(poll_s)

    # -- one pass ---------------------------------------------------------------------------------------
    def step(self) -> int:
        """One pass over the rounds of the namespace; the number of verdicts written."""
        rounds = self.kube.attestations(self.namespace)
        names = {str((a.get("metadata") or {}).get("name", "?")) for a in rounds}
        self._refused = {k: v for k, v in self._refused.items() if k in names}
        written = 0
        for att in rounds:
            if self._halt.is_set():
                break
            if not self._is_open_for_me(att):
                continue
            name = str((att.get("metadata") or {}).get("name", "?"))
            try:
                self._attest(att, rounds)
            except _Retry as exc:
                log.info("committee: round %s: %s; trying again next pass", name, exc)
                continue
            except _Refused as exc:
                if self._refused.get(name) != str(exc):
                    self._refused[name] = str(exc)
                    log.warning("committee: round %s: no verdict: %s", name, exc)
                continue
            except Exception:  # a bug or an unexpected object in one round must not stop the others
                log.exception("committee: round %s failed", name)
                continue
            written += 1
        self.written += written
        return written

    def _is_open_for_me(self, att: Mapping[str, Any]) -> bool:
        spec = att.get("spec") or {}
        status = att.get("status") or {}
        if spec.get("phase") not in CAPSULE_PHASES or status.get("result") not in UNDECIDED:
            return False
        members = {str(m.get("address", "")).lower() for m in (spec.get("committee") or {}).get("members") or []
                   if isinstance(m, Mapping)}
        if self.me not in members:
            return False
        if any(str(v.get("verifier", "")).lower() == self.me for v in status.get("verdicts") or []
               if isinstance(v, Mapping)):
            return False
        created = parse_rfc3339((att.get("metadata") or {}).get("creationTimestamp"))
        timeout = spec.get("timeoutSeconds", 30)
        return created is None or not isinstance(timeout, int) or self.clock() <= created + timeout

    def _attest(self, att: Mapping[str, Any], rounds: list[dict[str, Any]]) -> None:
        spec = att["spec"]
        name = str(att["metadata"]["name"])
        executor = str(spec["executor"]).lower()
        url = self.endpoint_of(executor)
        if url is None:
            raise _Retry(f"no Gateway object has the executor's address {executor}")
        hpc = self._hpcnode(str(spec["node"]))
        refusal = self._policy_refusal(spec, hpc)
        if refusal:
            raise _Refused(refusal)  # before any challenge: no quote is asked for, no verdict is signed
        report = Report()
        expected = self._expected_state(spec, report)
        agent_key = self._agent_key(str(spec["node"]), hpc, report)
        capsule = {"taskId": str(spec["taskId"]).lower(), "round": str(spec["nonce"]).lower(),
                   "phase": str(spec["phase"])}
        # Derived, not random: an owner's broker recomputes it and so knows a quote answered this member's
        # challenge of this round (decision 0095); the round's random spec.nonce keeps it unpredictable.
        nonce = challenge_nonce(task_id=capsule["taskId"], round_id=capsule["round"], phase=capsule["phase"],
                                verifier=self.me)
        nonces = self._issued(nonce)
        try:
            signed = request_quote(url, nonce, signer=self.root, node=str(spec["node"]),
                                   timeout=self.request_timeout_s, capsule=capsule)
        except RelayError as exc:
            raise _Retry(f"executor {executor} not reachable: {exc}") from None
        self._appraise(signed, report, nonces=nonces, nonce=nonce, node=str(spec["node"]), agent_key=agent_key,
                       executor=executor)
        self._check_state(signed, report, expected, pre_keys=self._pre_round_keys(spec, rounds))
        verdict = Verdict(
            attestation_id=str(spec["nonce"]).lower(), node=to_checksum_address(executor),
            verifier=to_checksum_address(self.me), phase=int(Phase[str(spec["phase"]).upper()]), passed=report.ok,
            quote_digest="0x" + quote_digest(signed.quote).hex(), policy_digest=self.policy_digest,
            epoch=int(spec["epoch"]), issued_at=int(self.clock()))
        signed_verdict = sign_verdict(verdict, self.domain, self.root)
        entry = verdict_entry(signed_verdict, signed, nonce=nonce, domain=self.domain,
                              failures=(str(f) for f in report.failures))
        try:
            self.kube.apply_verdict(self.namespace, name, entry, field_manager(self.me))
        except LifecycleError as exc:
            raise _Retry(str(exc)) from None
        if report.ok:
            log.info("committee: round %s (%s): verdict passed", name, spec["phase"])
        else:
            log.warning("committee: round %s (%s): verdict failed: %s", name, spec["phase"], report.summary())

    # -- what the quote must say ------------------------------------------------------------------------
    def _expected_state(self, spec: Mapping[str, Any], report: Report) -> dict[str, str | None]:
        """taskId, round, phase from the round; manifestDigest and imageDigest from its Capsule (by uid)."""
        expected: dict[str, str | None] = {"taskId": str(spec["taskId"]).lower(), "round": str(spec["nonce"]).lower(),
                                           "phase": str(spec["phase"]), "manifestDigest": None, "imageDigest": None}
        ref = spec.get("capsuleRef") or {}
        try:
            capsule = self.kube.capsule(str(ref.get("namespace", "")), str(ref.get("name", "")))
        except LifecycleError as exc:
            raise _Retry(str(exc)) from None
        where = f"{ref.get('namespace')}/{ref.get('name')}"
        if capsule is None:
            report.add("capsule", "capsule.missing", Severity.CRITICAL, f"the round's Capsule {where} does not exist")
            return expected
        uid = (capsule.get("metadata") or {}).get("uid")
        if uid != ref.get("uid"):
            report.add("capsule", "capsule.uid.mismatch", Severity.CRITICAL,
                       f"Capsule {where} is another object than the round's (uid {uid}, not {ref.get('uid')})")
            return expected
        try:
            manifest = parse_manifest(capsule.get("spec"))
        except ManifestError as exc:
            report.add("capsule", "capsule.manifest.invalid", Severity.CRITICAL, str(exc)[:400])
            return expected
        expected["manifestDigest"] = "0x" + manifest.binding_digest().hex()
        expected["imageDigest"] = manifest.function.digest
        return expected

    def _hpcnode(self, node: str) -> dict[str, Any] | None:
        try:
            return self.kube.hpcnode(node)
        except LifecycleError as exc:
            raise _Retry(str(exc)) from None

    def _policy_refusal(self, spec: Mapping[str, Any], hpc: Mapping[str, Any] | None) -> str:
        """Why this member must not sign a verdict for the round under its policy, or "" when it may."""
        mine = self.policy_digest
        raw = spec.get("policyDigest")
        if hex_digest(raw) != mine:
            return (f"the round is under policy {str(raw)[:80]!r}, but this gateway appraises under {mine}; "
                    "give this gateway the policy the node declares (--policy), or open the round under this one")
        declared = (((hpc or {}).get("spec") or {}).get("policy") or {}).get("digest")
        if declared is not None and hex_digest(declared) != mine:
            return (f"HPCNode {spec.get('node')} declares policy {str(declared)[:80]!r} (spec.policy.digest), but this "
                    f"gateway appraises under {mine}; give this gateway the declared policy (--policy)")
        return ""

    def _agent_key(self, node: str, hpc: Mapping[str, Any] | None, report: Report) -> bytes | None:
        key = ((hpc or {}).get("status") or {}).get("agentKey")
        agent_key = hex_bytes(key, 33)
        if agent_key is not None:
            return agent_key
        report.add("enrolment", "enrolment.agent_key.missing", Severity.CRITICAL,
                   f"HPCNode {node} has no enrolled agent key (status.agentKey), so no quote of it can be checked")
        return None

    def _issued(self, nonce: bytes) -> NonceRegistry:
        """A registry that issued exactly `nonce`, now: appraise_quote accepts one answer to it within the
        window. One per challenge, because the nonce is one per member and round (the registry API issues
        only nonces it draws itself)."""
        registry = NonceRegistry(self.nonces.window, capacity=1, clock=self.clock, token=lambda _n: nonce)
        registry.issue()
        return registry

    def _appraise(self, signed: SignedQuote, report: Report, *, nonces: NonceRegistry, nonce: bytes, node: str,
                  agent_key: bytes | None, executor: str) -> None:
        found = appraise_quote(signed, nonces=nonces, expected_nonce=nonce, node_id=node,
                               agent_key=agent_key or b"", gateway_address=to_checksum_address(executor),
                               now=self.clock(), max_age_seconds=self.max_quote_age_s)
        for failure in found.failures:
            if agent_key is None and failure.event_id in (fid.QUOTE_SIGNATURE_AGENT, fid.QUOTE_IDENTITY_AGENT_KEY):
                continue  # already named as the missing enrolment
            report.failures.append(failure)
        report.merge(check_policy(signed.quote, self.policy))

    def _check_state(self, signed: SignedQuote, report: Report, expected: Mapping[str, str | None],
                     *, pre_keys: set[str]) -> None:
        state = signed.quote.capsule_state
        for key, want in expected.items():
            if want is None:
                continue  # the expectation itself failed, and is named already
            got = state.get(key)
            if not isinstance(got, str) or got.lower() != want.lower():
                report.add("capsule", f"capsule_state.{key}.mismatch", Severity.CRITICAL,
                           f"the quote's capsule_state.{key} is not this round's", expected=want, got=got)
        executor_key = state.get("executorKey")
        if not _is_pubkey(executor_key):
            report.add("capsule", "capsule_state.executorKey.missing", Severity.CRITICAL,
                       "the quote names no executor key (33-byte compressed secp256k1, 0x-hex)")
        elif pre_keys and str(executor_key).lower() not in pre_keys:
            report.add("capsule", "capsule_state.executorKey.changed", Severity.CRITICAL,
                       "the executor key is not the one this gateway attested in the task's pre round",
                       expected=sorted(pre_keys), got=executor_key)

    def _pre_round_keys(self, spec: Mapping[str, Any], rounds: Iterable[Mapping[str, Any]]) -> set[str]:
        """For a during/post round: the executorKey of this gateway's own passed verdicts in the task's pre
        round(s), from rounds that passed if any did. Only an entry whose verdict verifies as mine and whose
        quote hashes to its quoteDigest counts (the stored entry is evidence, not a note to self)."""
        if spec.get("phase") == "pre":
            return set()
        task = str(spec.get("taskId", "")).lower()
        by_result: dict[bool, set[str]] = {True: set(), False: set()}
        for att in rounds:
            other = att.get("spec") or {}
            if other.get("phase") != "pre" or str(other.get("taskId", "")).lower() != task:
                continue
            passed_round = (att.get("status") or {}).get("result") == "Passed"
            for item in (att.get("status") or {}).get("verdicts") or []:
                if isinstance(item, Mapping) and str(item.get("verifier", "")).lower() == self.me:
                    key = self._my_attested_key(item)
                    if key is not None:
                        by_result[passed_round].add(key)
        return by_result[True] or by_result[False]

    def _my_attested_key(self, item: Mapping[str, Any]) -> str | None:
        try:
            signed = SignedVerdict.model_validate(item.get("verdict"))
            if verify_verdict(signed, domain=self.domain).lower() != self.me or not signed.verdict.passed:
                return None
            quote = decode_signed_quote(base64.b64decode(str(item.get("quote", "")), validate=True))
        except (ValidationError, EvidenceError, binascii.Error, ValueError, TypeError):
            return None
        if "0x" + quote_digest(quote.quote).hex() != signed.verdict.quote_digest:
            return None
        key = quote.quote.capsule_state.get("executorKey")
        return str(key).lower() if _is_pubkey(key) else None


def _is_pubkey(value: Any) -> bool:
    key = hex_bytes(value, 33)
    return key is not None and key[0] in (2, 3)
