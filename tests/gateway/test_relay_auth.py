"""Attacks on the relay's challenge authentication, over real loopback HTTP to a real agent.

Each attack is refused with the status, field and cause named, counted under its bounded label, and
never reaches the agent (the server's `relay` is wrapped to count calls: the tripwire). Each has a
positive control: the same relay then serves a well-signed challenge from a directory member, so a
refusal is proven to come from the check under attack and not from a broken fixture.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from trustcap.chain.keys import KeySigner
from trustcap.evidence import (
    NonceRegistry,
    SignedQuote,
    appraise_quote,
    decode_signed_quote,
    new_quote,
    sign_challenge,
    sign_quote,
    verify_challenge,
)
from trustcap.gateway.attest_errors import RelayError
from trustcap.gateway.relay import MetricsService, RelayService, RoundDirectory
from trustcap.gateway.relay_client import request_quote
from trustcap.gateway.verifiers import StaticDirectory

NODE = "hpc-1"
SKEW = 60.0
MEMBER = KeySigner("0x" + "4b" * 32)
OTHER_MEMBER = KeySigner("0x" + "5c" * 32)
OUTSIDER = KeySigner("0x" + "6d" * 32)  # a valid secp256k1 key, but no Gateway of this cluster
_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


class Lab:
    """A relay with a frozen clock, a member directory, and a tripwire on the agent path."""

    def __init__(self, pair: Any, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> None:
        self.pair = pair
        self.now = [float(int(time.time()))]
        self.agent_calls: list[bytes] = []
        real = pair.server.relay

        def counted(nonce: bytes) -> Any:
            self.agent_calls.append(nonce)
            return real(nonce)

        monkeypatch.setattr(pair.server, "relay", counted)
        directory = kw.pop("verifiers", StaticDirectory([MEMBER.address, OTHER_MEMBER.address]))
        self.relay = RelayService(pair.server, verifiers=directory, max_skew_s=SKEW, clock=lambda: self.now[0], **kw)

    def body(self, signer: KeySigner = MEMBER, *, node: str = NODE, issued_at: float | None = None,
             nonce: bytes | None = None, **override: Any) -> dict[str, Any]:
        doc = sign_challenge(nonce or os.urandom(32), node, signer,
                             issued_at=int(self.now[0] if issued_at is None else issued_at))
        doc.update(override)
        return doc

    def post(self, doc: Any) -> tuple[int, dict[str, Any]]:
        raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        host, port = self.relay.address
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("POST", "/v1/challenge", body=raw, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        return resp.status, (json.loads(data) if resp.status != 200 else {"quote": data})

    def served(self, signer: KeySigner = MEMBER) -> None:
        """The positive control: a member's fresh, well-signed challenge is served and appraises."""
        verifier = NonceRegistry(60)
        nonce = verifier.issue()
        before = len(self.agent_calls)
        status, doc = self.post(self.body(signer, nonce=nonce))
        assert status == 200, doc
        signed = decode_signed_quote(doc["quote"])
        report = appraise_quote(signed, nonces=verifier, expected_nonce=nonce, node_id=NODE,
                                agent_key=self.pair.agent.key.public_key(),
                                gateway_address=self.pair.server.root.address, now=time.time(), max_age_seconds=30)
        assert report.ok, report.summary()
        assert len(self.agent_calls) == before + 1


@pytest.fixture
def lab(pair: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    it = Lab(pair, monkeypatch)
    yield it
    it.relay.close()


def _flip(sig: str) -> str:
    raw = bytearray(bytes.fromhex(sig[2:]))
    raw[5] ^= 0x01  # a bit of r
    return "0x" + raw.hex()


def _high_s(sig: str) -> str:
    """The malleated twin of a valid signature (n - s, v flipped): valid maths, refused as malleable."""
    raw = bytes.fromhex(sig[2:])
    s = int.from_bytes(raw[32:64], "big")
    return "0x" + (raw[:32] + (_N - s).to_bytes(32, "big") + bytes([55 - raw[64]])).hex()  # v: 27 <-> 28


def _relabel(lab: Lab) -> dict[str, Any]:
    """A member's signature, with `verifier` claiming another member."""
    return lab.body(MEMBER, verifier=OTHER_MEMBER.address)


def _foreign(lab: Lab) -> dict[str, Any]:
    """An outsider's signature under a member's name."""
    return lab.body(OUTSIDER, verifier=MEMBER.address)


Attack = Callable[[Lab], Any]

ATTACKS = [
    pytest.param(lambda lab: b"{not json", 400, "body", "not JSON", "bad_request", id="not-json"),
    pytest.param(lambda lab: {"nonce": "0x" + "ab" * 32}, 400, "node", "missing", "bad_request", id="unsigned"),
    pytest.param(lambda lab: {k: v for k, v in lab.body().items() if k != "signature"}, 400, "signature", "missing",
                 "bad_request", id="signature-missing"),
    pytest.param(lambda lab: lab.body(extra=1), 400, "extra", "unknown field", "bad_request", id="unknown-field"),
    pytest.param(lambda lab: lab.body(verifier=MEMBER.address.lower()), 400, "verifier", "EIP-55", "bad_request",
                 id="verifier-not-checksummed"),
    pytest.param(lambda lab: lab.body(issuedAt=str(int(lab.now[0]))), 400, "issuedAt", "integer", "bad_request",
                 id="issued-at-string"),
    pytest.param(lambda lab: lab.body(issuedAt=True), 400, "issuedAt", "integer", "bad_request",
                 id="issued-at-bool"),
    pytest.param(lambda lab: {**lab.body(), "node": ""}, 400, "node", "node id", "bad_request", id="node-empty"),
    pytest.param(lambda lab: lab.body(signature="0x" + "ab" * 64), 400, "signature", "65 bytes", "bad_request",
                 id="signature-short"),
    pytest.param(lambda lab: {**(d := lab.body()), "signature": _flip(d["signature"])}, 401, "signature", "",
                 "bad_signature", id="signature-bit-flipped"),
    pytest.param(lambda lab: {**(d := lab.body()), "signature": _high_s(d["signature"])}, 401, "signature",
                 "malleable", "bad_signature", id="signature-high-s"),
    pytest.param(_foreign, 401, "signature", "not by verifier", "bad_signature", id="outsider-signs-as-member"),
    pytest.param(_relabel, 401, "signature", "not by verifier", "bad_signature", id="member-relabelled"),
    pytest.param(lambda lab: {**lab.body(), "nonce": "0x" + "00" * 32}, 401, "signature", "not by verifier",
                 "bad_signature", id="nonce-swapped-after-signing"),
    pytest.param(lambda lab: lab.body(OUTSIDER), 403, "verifier", "not in this gateway's verifier directory",
                 "unknown_verifier", id="outsider-honestly-signed"),
    pytest.param(lambda lab: lab.body(node="hpc-2"), 403, "node", "serves node 'hpc-1', not 'hpc-2'", "wrong_node",
                 id="request-for-another-executor"),
    pytest.param(lambda lab: lab.body(issued_at=lab.now[0] - SKEW - 1), 401, "issuedAt", "stale", "stale",
                 id="stale"),
    pytest.param(lambda lab: lab.body(issued_at=lab.now[0] + SKEW + 1), 401, "issuedAt", "future", "stale",
                 id="from-the-future"),
]


@pytest.mark.parametrize(("attack", "status", "field", "cause", "label"), ATTACKS)
def test_attack_is_refused_by_name_counted_and_never_reaches_the_agent(
        lab: Lab, attack: Attack, status: int, field: str, cause: str, label: str) -> None:
    got, doc = lab.post(attack(lab))
    assert got == status, doc
    assert doc["field"] == field and f"field {field!r}" in doc["error"] and cause in doc["error"], doc
    assert lab.agent_calls == []  # the tripwire: nothing reached the agent
    assert lab.relay.stats[f"refused_{label}"] == 1
    assert lab.relay.stats["challenges"] == 0
    lab.served()  # positive control: the same relay serves a member


def test_issued_at_at_the_edges_of_the_window_is_served(lab: Lab) -> None:
    for issued_at in (lab.now[0] - SKEW, lab.now[0] + SKEW):
        status, doc = lab.post(lab.body(issued_at=issued_at))
        assert status == 200, doc
    assert len(lab.agent_calls) == 2


def test_a_replayed_signed_challenge_gets_409_until_it_is_stale(lab: Lab) -> None:
    captured = lab.body()
    assert lab.post(captured)[0] == 200
    for advance in (0.0, SKEW):  # at once, and at the very edge of its freshness
        lab.now[0] += advance
        status, doc = lab.post(captured)
        assert status == 409 and doc["field"] == "signature" and "replay" in doc["error"], doc
    assert len(lab.agent_calls) == 1 and lab.relay.stats["refused_replay"] == 2
    lab.now[0] += 1  # past the window: memory may forget it, because `issuedAt` now refuses it
    status, doc = lab.post(captured)
    assert status == 401 and doc["field"] == "issuedAt", doc
    lab.now[0] += SKEW + 1
    lab.served()  # positive control; and the old digest was dropped from the bounded memory
    assert verify_challenge(captured).digest not in lab.relay._recent
    assert len(lab.relay._recent) == 1


def test_the_same_nonce_signed_again_later_is_a_new_request(lab: Lab) -> None:
    nonce = os.urandom(32)
    assert lab.post(lab.body(nonce=nonce))[0] == 200
    lab.now[0] += 1  # a verifier's retry: same nonce, new issuedAt, new signature
    assert lab.post(lab.body(nonce=nonce))[0] == 200
    assert len(lab.agent_calls) == 2


def test_replay_memory_full_refuses_rather_than_forgets(pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    small = Lab(pair, monkeypatch, max_recent=2)
    try:
        first = small.body()
        assert small.post(first)[0] == 200 and small.post(small.body())[0] == 200
        status, doc = small.post(small.body())
        assert status == 503 and "replay memory full" in doc["error"], doc
        assert small.post(first)[0] == 409  # the first is still remembered: nothing was evicted
        assert len(small.agent_calls) == 2
        small.now[0] += 2 * SKEW  # both entries expire
        small.served()
    finally:
        small.relay.close()


def test_the_gateways_own_address_may_be_a_verifier(pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    own = pair.server.root
    it = Lab(pair, monkeypatch, verifiers=StaticDirectory([own.address]))
    try:
        status, doc = it.post(it.body(MEMBER))
        assert status == 403 and doc["field"] == "verifier", doc
        doc = sign_challenge(os.urandom(32), NODE, own, issued_at=int(it.now[0]))
        assert it.post(doc)[0] == 200
        assert len(it.agent_calls) == 1
    finally:
        it.relay.close()


def test_refusals_are_counted_under_bounded_prometheus_labels(lab: Lab) -> None:
    import urllib.request

    lab.post(lab.body(OUTSIDER))
    lab.post(lab.body(node="hpc-2"))
    lab.post(_foreign(lab))
    metrics = MetricsService(lab.relay.status)
    try:
        with urllib.request.urlopen(metrics.url + "/metrics", timeout=10) as resp:  # noqa: S310 - our loopback URL
            text = resp.read().decode()
    finally:
        metrics.close()
    for label in ("unknown_verifier", "wrong_node", "bad_signature"):
        assert f'trustcap_gateway_relay_challenges_total{{result="{label}"}}' in text
    assert OUTSIDER.address not in text and "hpc-2" not in text  # no request-chosen label values


# --- capsule rounds: only the round's committee is served (decision 0090) -----------------------------------
class FakeExecutorServer:
    """The AttestationServer's relay surface over a software agent key: records what reached the agent."""

    node_id = NODE

    def __init__(self) -> None:
        self.root = KeySigner("0x" + "7e" * 32)
        self.agent = KeySigner("0x" + "8f" * 32)
        self.calls: list[tuple[bytes, dict[str, Any] | None]] = []

    def relay(self, nonce: bytes) -> SignedQuote:
        return self.challenge(nonce)

    def challenge(self, nonce: bytes, capsule_state: dict[str, Any] | None = None) -> SignedQuote:
        self.calls.append((nonce, capsule_state))
        state: dict[str, Any] = {"phase": "idle"} if capsule_state is None else {**capsule_state,
                                                                                "executorKey": "0x02" + "11" * 32}
        quote = new_quote(nonce=nonce, issued_at=int(time.time()), node_id=NODE, gateway=self.root.address,
                          agent_key=self.agent.public_key(), boot_image_digest=bytes(32), measurements={},
                          capsule_state=state)
        return sign_quote(quote, self.agent, self.root)


ROUND = "0x" + "3c" * 32
CAPSULE = {"taskId": "0x" + "7a" * 32, "round": ROUND, "phase": "pre"}


class CapsuleLab:
    def __init__(self, **kw: Any) -> None:
        self.server = FakeExecutorServer()
        self.prepared: list[dict[str, str]] = []
        self.rounds: dict[str, set[str]] = {ROUND: {MEMBER.address.lower()}}
        self.relay = RelayService(self.server, verifiers=StaticDirectory([MEMBER.address, OTHER_MEMBER.address]),
                                  round_members=kw.pop("round_members", self.rounds.get),
                                  before_capsule_quote=kw.pop("before_capsule_quote", self.prepared.append), **kw)

    def ask(self, signer: KeySigner, capsule: dict[str, str] | None = None) -> SignedQuote:
        signed: SignedQuote = request_quote(self.relay.url, os.urandom(32), signer=signer, node=NODE, timeout=10,
                                            capsule=capsule)
        return signed


@pytest.fixture
def capsule_lab() -> Iterator[CapsuleLab]:
    it = CapsuleLab()
    yield it
    it.relay.close()


def test_a_committee_member_gets_a_quote_bound_to_its_capsule_round(capsule_lab: CapsuleLab) -> None:
    signed = capsule_lab.ask(MEMBER, CAPSULE)
    state = signed.quote.capsule_state
    assert {k: state[k] for k in CAPSULE} == CAPSULE
    assert capsule_lab.server.calls[-1][1] == CAPSULE  # forwarded to the agent's quote as the capsule
    assert capsule_lab.prepared == [CAPSULE]  # the task was prepared before the quote
    assert capsule_lab.relay.stats["challenges"] == 1


def test_a_directory_member_outside_the_rounds_committee_is_refused(capsule_lab: CapsuleLab) -> None:
    with pytest.raises(RelayError, match=r"HTTP 403 .*not in the committee of round"):
        capsule_lab.ask(OTHER_MEMBER, CAPSULE)
    assert capsule_lab.server.calls == [] and capsule_lab.prepared == []  # the tripwire
    assert capsule_lab.relay.stats["refused_not_member"] == 1
    capsule_lab.ask(OTHER_MEMBER)  # positive controls: it may still ask for the idle state,
    capsule_lab.ask(MEMBER, CAPSULE)  # and the member is served the capsule round
    assert [c[1] for c in capsule_lab.server.calls] == [None, CAPSULE]


def test_an_unknown_round_is_refused(capsule_lab: CapsuleLab) -> None:
    with pytest.raises(RelayError, match=r"HTTP 404 .*no attestation round"):
        capsule_lab.ask(MEMBER, {**CAPSULE, "round": "0x" + "3d" * 32})
    assert capsule_lab.server.calls == [] and capsule_lab.relay.stats["refused_unknown_round"] == 1
    capsule_lab.ask(MEMBER, CAPSULE)


def test_a_relay_without_a_round_directory_serves_no_capsule_challenge() -> None:
    lab = CapsuleLab(round_members=None)
    try:
        with pytest.raises(RelayError, match=r"HTTP 404 .*no round directory"):
            lab.ask(MEMBER, CAPSULE)
        assert lab.server.calls == []
        lab.ask(MEMBER)  # positive control: plain challenges as before
    finally:
        lab.relay.close()


def test_a_failing_round_directory_is_503_and_nothing_reaches_the_agent() -> None:
    def down(_round: str) -> set[str] | None:
        raise ConnectionError("api server down")

    lab = CapsuleLab(round_members=down)
    try:
        with pytest.raises(RelayError, match=r"HTTP 503 .*round directory unavailable"):
            lab.ask(MEMBER, CAPSULE)
        assert lab.server.calls == [] and lab.relay.stats["refused_round_unavailable"] == 1
    finally:
        lab.relay.close()


def test_a_task_that_cannot_be_prepared_is_409_naming_the_cause() -> None:
    def refuse(capsule: dict[str, str]) -> None:
        raise RuntimeError("agent refused 'prepare': no such task")

    lab = CapsuleLab(before_capsule_quote=refuse)
    try:
        with pytest.raises(RelayError, match=r"HTTP 409 .*not prepared.*no such task"):
            lab.ask(MEMBER, CAPSULE)
        assert lab.server.calls == [] and lab.relay.stats["refused_not_prepared"] == 1
    finally:
        lab.relay.close()


def test_round_directory_finds_a_round_by_name_or_id_and_caches_it() -> None:
    items = [{"metadata": {"name": "r-7a7a-pre"},
              "spec": {"nonce": ROUND, "committee": {"members": [{"address": MEMBER.address}]}}}]
    lists: list[int] = []
    now = [0.0]

    def lister() -> list[dict[str, Any]]:
        lists.append(1)
        return items

    rounds = RoundDirectory(lister, ttl_s=10, miss_s=1, clock=lambda: now[0])
    assert rounds("r-7a7a-pre") == rounds(ROUND) == {MEMBER.address.lower()}
    assert len(lists) == 1  # the second lookup came from the cache
    assert rounds("r-other") is None and len(lists) == 1  # a miss lists again only after miss_s
    now[0] += 1
    assert rounds("r-other") is None and len(lists) == 2
