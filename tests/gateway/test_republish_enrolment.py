"""The gateway keeps its node's enrolment fresh (issue 12 item 13, decision 0113): it re-publishes a fresh
quote on the operator's fresh challenge every refresh period, with the digest of the policy it applies,
and never writes `status.phase`.

A fake clock drives the schedule (`EnrolmentPublisher.tick`); the agent is a fake server that signs real
quotes with software keys, and the HPCNode store applies the operator's own `decide` and `trust_patch`
to every patch, so the test shows the two halves together: with the refresh an idle node stays Enrolled
for hours, without it the operator takes it back after the maximum age.
"""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from trustcap.agent.identity import BootKey
from trustcap.errors import ConfigError
from trustcap.evidence import SignedQuote, new_quote, sign_quote
from trustcap.gateway.publish import (
    REFRESH_ENV,
    REFRESH_S,
    EnrolmentPublisher,
    KubeHPCNodes,
    PublishError,
    refresh_setting,
)
from trustcap.operator import hpcnode

NODE = "hpc-a"
EPOCH = 1_770_000_000.0
APPROVED = "sha256:" + "ab" * 32
POLICY = "0x" + "5e" * 32
AGENT = BootKey(b"\x01" * 32)
GATEWAY = BootKey(b"\x02" * 32)
MAX_AGE = hpcnode.ENROLMENT_MAX_AGE_S


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def monotonic(self) -> float:
        return self.t

    def wall(self) -> float:
        return EPOCH + self.t

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.wall(), UTC)


class FakeServer:
    """The agent behind the gateway: answers each nonce with a quote dated by the fake wall clock."""

    class root:  # stands in for the trust root (its address)
        address = GATEWAY.address

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.quotes = 0

    def challenge(self, nonce: bytes) -> SignedQuote:
        self.quotes += 1
        quote = new_quote(nonce=nonce, issued_at=int(self.clock.wall()), node_id=NODE, gateway=GATEWAY.address,
                          agent_key=AGENT.public_key(), boot_image_digest=bytes.fromhex(APPROVED[7:]),
                          measurements={"kernel": "0x" + "22" * 32}, capsule_state={"phase": "idle"})
        return sign_quote(quote, AGENT, GATEWAY)


class OperatorStore:
    """The HPCNode as the API server holds it, with the operator deciding each patch at once (its 2 s
    timer, collapsed) and judging trust whenever asked. Counts the gateway's reads and writes."""

    def __init__(self, clock: Clock, *, spec: dict[str, Any] | None = None) -> None:
        self.clock = clock
        self.spec = spec or {}
        self.status: dict[str, Any] = {"phase": "Registered",
                                       "enrolmentChallenge": hpcnode.new_challenge(clock.now())}
        self.version = 1
        self.gets = 0
        self.writes: list[dict[str, Any]] = []

    def get(self, name: str) -> dict[str, Any]:
        self.gets += 1
        return {"metadata": {"resourceVersion": str(self.version)}, "status": dict(self.status)}

    def patch_status(self, name: str, body: dict[str, Any]) -> None:
        assert name == NODE
        self.writes.append(body)
        self.status.update(body["status"])
        self.version += 1
        decision = hpcnode.decide(node_name=NODE, status=self.status, generation=1,
                                  gateway={"address": GATEWAY.address, "signingKey": "0x" + GATEWAY.public_key().hex()},
                                  boot_image={"phase": "Approved", "imageDigest": APPROVED}, now=self.clock.now())
        if decision is not None:
            self.status.update(decision.status)

    def judge(self) -> None:
        patch, _ = hpcnode.trust_patch(status=self.status, spec=self.spec, generation=1, gateway=None,
                                       last_round=None, now=self.clock.now(), max_age_s=MAX_AGE)
        self.status.update(patch)


class FakeSession:
    class enrolment:  # the server's AgentSession.enrolment
        agent_key = "0x" + AGENT.public_key().hex()


def _publisher(clock: Clock, store: OperatorStore, **kw: Any) -> EnrolmentPublisher:
    return EnrolmentPublisher(FakeServer(clock), NODE, store, wall=clock.wall, clock=clock.monotonic,  # type: ignore[arg-type]
                              wait_s=0, **kw)


def _enrol(pub: EnrolmentPublisher) -> None:
    """What on_session does for a new agent key, on this thread: remember it as current, publish."""
    pub._current = FakeSession.enrolment.agent_key
    pub.publish(FakeSession.enrolment.agent_key)


def _run(clock: Clock, store: OperatorStore, pub: EnrolmentPublisher | None, seconds: float, step: float = 5.0) -> None:
    """Let `seconds` of fake time pass: the refresh thread's wake-ups and the operator's trust timer."""
    end = clock.t + seconds
    while clock.t < end:
        clock.t += step
        if pub is not None:
            pub.tick()
        store.judge()


def test_the_refresh_keeps_an_idle_node_enrolled_with_bounded_writes() -> None:
    clock, store = Clock(), OperatorStore(Clock())
    store.clock = clock
    pub = _publisher(clock, store, policy_digest=POLICY, refresh_s=600)
    _enrol(pub)
    assert store.status["phase"] == "Enrolled"
    first_quote = store.status["lastQuote"]["time"]

    _run(clock, store, pub, 3 * 3600)  # three idle hours: six times the operator's maximum age

    assert store.status["phase"] == "Enrolled", store.status.get("conditions")
    assert store.status["lastQuote"]["time"] != first_quote
    # one status patch per period (18 in 3 h, plus the first), each a fresh quote on the new challenge
    assert len(store.writes) == 1 + 3 * 3600 // 600 == pub.refreshes + 1
    nonces = [w["status"]["enrolment"]["quote"] for w in store.writes]
    assert len(set(nonces)) == len(nonces)
    assert store.gets <= 2 * len(store.writes)  # the publisher's read, and the refresh's phase check


def test_without_the_refresh_the_operator_takes_the_enrolment_back() -> None:
    """Control: the same node with no refresh (today's publish-once) drops to Registered at the maximum age."""
    clock = Clock()
    store = OperatorStore(clock)
    pub = _publisher(clock, store, policy_digest=POLICY, refresh_s=600)
    pub.publish(FakeSession.enrolment.agent_key)
    assert store.status["phase"] == "Enrolled"
    _run(clock, store, None, MAX_AGE + 60)
    assert store.status["phase"] == "Registered"
    ready = next(c for c in store.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == hpcnode.REASON_ENROLMENT_EXPIRED


def test_every_enrolment_carries_the_policy_digest_and_no_phase() -> None:
    clock = Clock()
    store = OperatorStore(clock, spec={"policy": {"digest": "sha256:" + POLICY[2:]}})
    pub = _publisher(clock, store, policy_digest=POLICY, refresh_s=600)
    _enrol(pub)
    _run(clock, store, pub, 1300)
    assert len(store.writes) == 3
    for body in store.writes:
        assert set(body["status"]) == {"enrolment"}  # the gateway writes its evidence, never the phase
        assert body["status"]["enrolment"]["policyDigest"] == "sha256:" + POLICY[2:]
    store.judge()
    ready = next(c for c in store.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] != hpcnode.REASON_POLICY_MISMATCH, ready


def test_a_gateway_reporting_no_policy_digest_is_a_mismatch() -> None:
    """Control for the test above: the operator's policy check sees the digest the publisher writes."""
    clock = Clock()
    store = OperatorStore(clock, spec={"policy": {"digest": "sha256:" + POLICY[2:]}})
    _publisher(clock, store, refresh_s=600).publish(FakeSession.enrolment.agent_key)
    store.judge()
    ready = next(c for c in store.status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == hpcnode.REASON_POLICY_MISMATCH


def test_a_failed_refresh_is_retried_after_the_retry_delay_not_in_a_loop() -> None:
    clock = Clock()
    store = OperatorStore(clock)
    pub = _publisher(clock, store, refresh_s=600, retry_s=60)
    _enrol(pub)
    writes = len(store.writes)

    def down(name: str, body: dict[str, Any]) -> None:
        raise PublishError("API down")

    store.patch_status = down  # type: ignore[method-assign]
    clock.t = 600
    assert pub.tick() == "failed"
    assert [pub.tick() for _ in range(10)] == [None] * 10  # no retry before the delay
    clock.t = 659
    assert pub.tick() is None
    clock.t = 660
    assert pub.tick() == "failed"
    assert len(store.writes) == writes and len(pub.errors) == 2


def test_an_unreachable_api_server_is_a_publish_error_not_a_dead_thread(tmp_path: Path) -> None:
    """The kubernetes client raises urllib3's MaxRetryError (not an OSError) once its retries on a refused
    connection are spent; the real store must turn it into PublishError, which tick() retries."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: every connection is refused
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "dead", "cluster": {"server": f"https://127.0.0.1:{port}",
                                                  "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "x"}}],
        "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "u"}}]}))
    store = KubeHPCNodes(str(kubeconfig), timeout_s=2)
    with pytest.raises(PublishError, match="cannot read HPCNode 'hpc-a'"):
        store.get(NODE)
    with pytest.raises(PublishError, match="cannot patch HPCNode 'hpc-a' status"):
        store.patch_status(NODE, {"status": {}})


def test_the_refresh_thread_outlives_an_unexpected_error() -> None:
    """A bug in one tick is logged and retried after retry_s; the thread keeps refreshing."""
    clock = Clock()
    store = OperatorStore(clock)
    pub = _publisher(clock, store, refresh_s=600, retry_s=0.05)
    _enrol(pub)
    real_get, calls = store.get, []

    def flaky(name: str) -> dict[str, Any]:
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("a bug, not an API error")
        return real_get(name)

    store.get = flaky  # type: ignore[method-assign]
    clock.t = 600  # the refresh is due; the thread's first tick meets the bug, a later one refreshes
    pub.start()
    try:
        deadline = time.monotonic() + 10
        while pub.refreshes == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
            clock.t += 1  # fake time passes the retry delay
    finally:
        pub.stop()
    assert pub._loop is not None and not pub._loop.is_alive()  # stopped by stop(), not by the bug
    assert pub.refreshes == 1 and any("RuntimeError: a bug" in e for e in pub.errors)


def test_a_quarantined_node_is_not_refreshed() -> None:
    clock = Clock()
    store = OperatorStore(clock)
    pub = _publisher(clock, store, refresh_s=600)
    _enrol(pub)
    store.status["phase"] = "Quarantined"
    clock.t = 600
    assert pub.tick() == "quarantined"
    assert len(store.writes) == 1


def test_the_first_publish_failing_is_retried_by_the_refresh() -> None:
    """An agent that stays connected gets no second on_session; the refresh loop must try again."""
    clock = Clock()
    store = OperatorStore(clock)
    store.status.pop("enrolmentChallenge")  # no operator yet
    pub = _publisher(clock, store, refresh_s=600, retry_s=30)
    pub.on_session(FakeSession())  # type: ignore[arg-type]
    pub.join(5)
    pub.stop()
    assert not store.writes and pub.errors
    store.status["enrolmentChallenge"] = hpcnode.new_challenge(clock.now())
    clock.t = 30
    assert pub.tick() == "refreshed"
    assert store.status["phase"] == "Enrolled"


@pytest.mark.parametrize("raw", ["0", "-5", "soon", "inf"])
def test_a_bad_refresh_setting_is_refused_naming_it(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REFRESH_ENV, raw)
    with pytest.raises(ConfigError, match=REFRESH_ENV):
        refresh_setting()


def test_the_default_period_is_well_inside_the_operators_maximum_age(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REFRESH_ENV, raising=False)
    assert refresh_setting() == REFRESH_S <= hpcnode.ENROLMENT_MAX_AGE_S / 3
    monkeypatch.setenv(REFRESH_ENV, "120")
    assert refresh_setting() == 120.0
