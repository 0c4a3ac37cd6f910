"""Attestation evidence: quotes signed and countersigned, appraisal that names every failed claim,
freshness on a frozen clock, YAML policies, EIP-712 verdicts. Every attack the design names is here."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils.crypto import keccak

from trustcap import canonical
from trustcap.chain.keys import KeySigner
from trustcap.evidence import (
    Domain,
    EvidenceFormatError,
    ForgedSignature,
    IdentityMismatch,
    NonceRegistry,
    Phase,
    PolicyViolation,
    ReplayedNonce,
    SignedQuote,
    StaleQuote,
    UnknownNonce,
    Verdict,
    VerdictError,
    address_of,
    appraise_quote,
    check_policy,
    decode_signed_quote,
    decode_signed_verdict,
    encode_signed_quote,
    encode_signed_verdict,
    load_policy,
    new_quote,
    parse_policy,
    policy_digest,
    quote_digest,
    recover_address,
    sign_quote,
    sign_verdict,
    typed_data,
    verdict_id,
    verify_quote,
    verify_verdict,
)
from trustcap.evidence.errors import SignatureError
from trustcap.evidence.quote import Quote
from trustcap.evidence.signing import Signer

SECP_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _signer(seed: bytes) -> KeySigner:
    """A software Signer (the shared interface) over a secp256k1 key derived from `seed`: deterministic,
    so every run signs with the same keys. The chain's in-memory KeySigner, not a copy of it."""
    return KeySigner(hashlib.sha256(seed).digest())


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


AGENT = _signer(b"agent")
GATEWAY = _signer(b"gateway")
MALLORY = _signer(b"mallory")
BOOT = hashlib.sha256(b"boot-image").digest()
KERNEL = "0x" + hashlib.sha256(b"vmlinuz").hexdigest()
CONFIG = "0x" + hashlib.sha256(b"agent.yaml").hexdigest()
T0 = 1_750_000_000

POLICY_YAML = f"""
apiVersion: trustcap.io/v1alpha1
kind: AttestationPolicy
node: hpc-1
bootImages: ["0x{BOOT.hex()}"]
agentKeys: ["0x{AGENT.public_key().hex()}"]
measurements:
  kernel: {{equals: "{KERNEL}"}}
  agent_config: {{oneOf: ["{CONFIG}", "0x{'00' * 32}"]}}
capsuleState:
  phase: {{oneOf: [idle, wiped]}}
  containers: {{equals: 0}}
"""
POLICY = parse_policy(POLICY_YAML)


def test_signer_helper_matches_the_shared_interface() -> None:
    assert isinstance(AGENT, Signer)
    assert address_of(AGENT.public_key()) == AGENT.address


def _quote(nonce: bytes, **over: Any) -> Quote:
    fields: dict[str, Any] = {
        "nonce": nonce,
        "issued_at": T0,
        "node_id": "hpc-1",
        "gateway": GATEWAY.address,
        "agent_key": AGENT.public_key(),
        "boot_image_digest": BOOT,
        "measurements": {"kernel": KERNEL, "agent_config": CONFIG},
        "capsule_state": {"phase": "idle", "containers": 0},
    }
    fields.update(over)
    return new_quote(**fields)


def _setup(window: float = 60.0) -> tuple[Clock, NonceRegistry, bytes]:
    clock = Clock(T0)
    nonces = NonceRegistry(window, clock=clock)
    return clock, nonces, nonces.issue()


def _kwargs(nonces: NonceRegistry, nonce: bytes | None, clock: Clock) -> dict[str, Any]:
    return {
        "nonces": nonces,
        "expected_nonce": nonce,
        "node_id": "hpc-1",
        "agent_key": AGENT.public_key(),
        "gateway_address": GATEWAY.address,
        "now": clock.now,
        "max_age_seconds": 30.0,
    }


def test_genuine_fresh_quote_passes_appraisal_and_policy() -> None:
    clock, nonces, nonce = _setup()
    signed = sign_quote(_quote(nonce), AGENT, GATEWAY)
    report = verify_quote(signed, policy=POLICY, **_kwargs(nonces, nonce, clock))
    assert report.ok and report.summary() == "all claims hold"


def _tamper(signed: SignedQuote, **quote_changes: Any) -> SignedQuote:
    return signed.model_copy(update={"quote": signed.quote.model_copy(update=quote_changes)})


def _flip_sig(sig: str) -> str:
    return sig[:10] + ("0" if sig[10] != "0" else "1") + sig[11:]


def _case_forged_agent(nonce: bytes) -> SignedQuote:
    return sign_quote(_quote(nonce), MALLORY, GATEWAY)


def _case_forged_gateway(nonce: bytes) -> SignedQuote:
    return sign_quote(_quote(nonce), AGENT, MALLORY)


def _case_measurement_changed_after_signing(nonce: bytes) -> SignedQuote:
    signed = sign_quote(_quote(nonce), AGENT, GATEWAY)
    return _tamper(signed, measurements={"kernel": "0x" + "ab" * 32, "agent_config": CONFIG})


def _case_gateway_sig_corrupted(nonce: bytes) -> SignedQuote:
    signed = sign_quote(_quote(nonce), AGENT, GATEWAY)
    return signed.model_copy(update={"gateway_signature": _flip_sig(signed.gateway_signature)})


def _case_agent_sig_reused_by_other_gateway(nonce: bytes) -> SignedQuote:
    genuine = sign_quote(_quote(nonce), AGENT, GATEWAY)
    other = sign_quote(_quote(nonce), AGENT, MALLORY)
    return genuine.model_copy(update={"gateway_signature": other.gateway_signature})


def _case_nonce_not_sent(nonce: bytes) -> SignedQuote:
    return sign_quote(_quote(b"\x42" * 32), AGENT, GATEWAY)


def _case_wrong_node(nonce: bytes) -> SignedQuote:
    return sign_quote(_quote(nonce, node_id="hpc-2"), AGENT, GATEWAY)


def _case_other_gateway_named(nonce: bytes) -> SignedQuote:
    return sign_quote(_quote(nonce, gateway=MALLORY.address), AGENT, MALLORY)


def _case_other_agent_key(nonce: bytes) -> SignedQuote:
    return sign_quote(_quote(nonce, agent_key=MALLORY.public_key()), MALLORY, GATEWAY)


def _case_expired(nonce: bytes) -> SignedQuote:
    return sign_quote(_quote(nonce, issued_at=T0 - 31), AGENT, GATEWAY)


def _case_future(nonce: bytes) -> SignedQuote:
    return sign_quote(_quote(nonce, issued_at=T0 + 60), AGENT, GATEWAY)


ATTACKS = [
    pytest.param(_case_forged_agent, ForgedSignature, "quote.signature.agent", id="forged-agent-signature"),
    pytest.param(_case_forged_gateway, ForgedSignature, "quote.signature.gateway", id="forged-gateway-signature"),
    pytest.param(_case_measurement_changed_after_signing, ForgedSignature, "quote.signature.agent",
                 id="measurement-changed-after-signing"),
    pytest.param(_case_gateway_sig_corrupted, ForgedSignature, "quote.signature.gateway", id="gateway-sig-corrupted"),
    pytest.param(_case_agent_sig_reused_by_other_gateway, ForgedSignature, "quote.signature.gateway",
                 id="countersignature-from-other-gateway"),
    pytest.param(_case_nonce_not_sent, UnknownNonce, "nonce.unknown", id="nonce-not-sent-by-verifier"),
    pytest.param(_case_wrong_node, IdentityMismatch, "quote.identity.node", id="quote-about-another-node"),
    # signed by keys other than the enrolled ones: forged from the verifier's view, and the report also
    # names the identity claim that failed
    pytest.param(_case_other_gateway_named, ForgedSignature, "quote.identity.gateway", id="quote-via-another-gateway"),
    pytest.param(_case_other_agent_key, ForgedSignature, "quote.identity.agent_key", id="unenrolled-agent-key"),
    pytest.param(_case_expired, StaleQuote, "quote.expired", id="expired-quote"),
    pytest.param(_case_future, StaleQuote, "quote.future", id="future-dated-quote"),
]


@pytest.mark.parametrize(("make", "error", "event_id"), ATTACKS)
def test_attacks_on_quotes_are_refused(make: Any, error: type[Exception], event_id: str) -> None:
    clock, nonces, nonce = _setup()
    with pytest.raises(error) as info:
        verify_quote(make(nonce), policy=POLICY, **_kwargs(nonces, nonce, clock))
    assert event_id in info.value.report.event_ids  # type: ignore[attr-defined]
    assert event_id in str(info.value)


def test_replayed_nonce_is_refused() -> None:
    clock, nonces, nonce = _setup()
    signed = sign_quote(_quote(nonce), AGENT, GATEWAY)
    verify_quote(signed, **_kwargs(nonces, nonce, clock))
    with pytest.raises(ReplayedNonce, match=r"nonce\.replayed"):
        verify_quote(signed, **_kwargs(nonces, nonce, clock))


def test_quote_for_another_request_of_the_same_verifier_is_refused() -> None:
    clock, nonces, nonce = _setup()
    other = nonces.issue()
    with pytest.raises(UnknownNonce, match=r"nonce\.mismatch"):
        verify_quote(sign_quote(_quote(other), AGENT, GATEWAY), **_kwargs(nonces, nonce, clock))


def test_nonce_older_than_window_is_refused() -> None:
    clock, nonces, nonce = _setup(window=10)
    clock.now += 11
    signed = sign_quote(_quote(nonce, issued_at=int(clock.now)), AGENT, GATEWAY)
    with pytest.raises(StaleQuote, match=r"nonce\.expired"):
        verify_quote(signed, **_kwargs(nonces, nonce, clock))


def test_forged_quote_does_not_burn_the_nonce() -> None:
    clock, nonces, nonce = _setup()
    with pytest.raises(ForgedSignature):
        verify_quote(_case_forged_agent(nonce), **_kwargs(nonces, nonce, clock))
    assert verify_quote(sign_quote(_quote(nonce), AGENT, GATEWAY), **_kwargs(nonces, nonce, clock)).ok


def test_report_names_every_failed_claim_not_only_the_first() -> None:
    clock, nonces, nonce = _setup()
    bad = _quote(
        nonce,
        issued_at=T0 - 100,
        boot_image_digest=b"\x00" * 32,
        measurements={"kernel": "0x" + "ab" * 32, "debugfs": "on"},
        capsule_state={"phase": "running", "containers": 1},
    )
    signed = sign_quote(bad, AGENT, GATEWAY)
    report = appraise_quote(signed, **_kwargs(nonces, nonce, clock)).merge(check_policy(signed.quote, POLICY))
    assert set(report.event_ids) == {
        "quote.expired",
        "policy.boot_image.not_allowed",
        "policy.measurements.kernel.mismatch",
        "policy.measurements.agent_config.missing",
        "policy.measurements.debugfs.unexpected",
        "policy.capsule_state.phase.mismatch",
        "policy.capsule_state.containers.mismatch",
    }
    fresh = nonces.issue()
    again = sign_quote(bad.model_copy(update={"nonce": "0x" + fresh.hex()}), AGENT, GATEWAY)
    with pytest.raises(StaleQuote) as info:  # gravest class first, every failure in the message
        verify_quote(again, policy=POLICY, **_kwargs(nonces, fresh, clock))
    assert "policy.measurements.debugfs.unexpected" in str(info.value)


def test_policy_violation_alone_raises_policy_violation() -> None:
    clock, nonces, nonce = _setup()
    signed = sign_quote(_quote(nonce, capsule_state={"phase": "running", "containers": 0}), AGENT, GATEWAY)
    with pytest.raises(PolicyViolation, match=r"policy\.capsule_state\.phase\.mismatch") as info:
        verify_quote(signed, policy=POLICY, **_kwargs(nonces, nonce, clock))
    failure = info.value.report.failures[0]
    assert failure.component == "policy" and failure.context == {"expected": ["idle", "wiped"], "got": "running"}


# --- freshness -------------------------------------------------------------------------------------------


def test_nonce_registry_accepts_once_within_window() -> None:
    clock = Clock(100.0)
    reg = NonceRegistry(5, clock=clock)
    n = reg.issue()
    assert reg.check(n) is None
    assert reg.consume(n) is None
    replay = reg.consume(n)
    assert replay is not None and replay.event_id == "nonce.replayed"
    late = reg.issue()
    clock.now += 6
    expired = reg.consume(late)
    assert expired is not None and expired.event_id == "nonce.expired"
    unknown = reg.consume(b"\x00" * 32)
    assert unknown is not None and unknown.event_id == "nonce.unknown"


def test_nonce_registry_memory_is_bounded_and_fails_closed() -> None:
    clock = Clock(0.0)
    reg = NonceRegistry(1000, capacity=3, clock=clock)
    issued = [reg.issue() for _ in range(10)]
    assert len(reg) <= 3
    oldest = reg.consume(issued[0])
    assert oldest is not None and oldest.event_id == "nonce.unknown"  # evicted: refused, never accepted
    assert reg.consume(issued[-1]) is None


def test_nonce_registry_forgets_expired_nonces() -> None:
    clock = Clock(0.0)
    reg = NonceRegistry(10, clock=clock)
    for _ in range(50):
        reg.issue()
    clock.now = 100.0
    reg.issue()
    assert len(reg) == 1


# --- policy ----------------------------------------------------------------------------------------------


def test_policy_loads_from_file_and_digest_is_stable(tmp_path: Any) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_YAML)
    assert load_policy(path) == POLICY
    assert policy_digest(load_policy(path)) == policy_digest(POLICY)
    changed = parse_policy(POLICY_YAML.replace("containers: {equals: 0}", "containers: {equals: 1}"))
    assert policy_digest(changed) != policy_digest(POLICY)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param("bootImages: [nothex]", "bootImages.0", id="bad-boot-digest"),
        pytest.param("bootImages: []", "bootImages", id="empty-allow-list"),
        pytest.param(f"bootImages: ['0x{'0' * 64}']\nmeasurments: {{}}", "measurments", id="misspelt-key"),
        pytest.param(
            f"bootImages: ['0x{'0' * 64}']\nmeasurements: {{k: {{equals: a, oneOf: [b]}}}}",
            "exactly one of", id="rule-with-both",
        ),
        pytest.param(f"bootImages: ['0x{'0' * 64}']\nmeasurements: {{k: {{}}}}", "exactly one of", id="empty-rule"),
        pytest.param("- a list", "mapping", id="not-a-mapping"),
        pytest.param("key: [unclosed", "not valid YAML", id="bad-yaml"),
        pytest.param(f"kind: Other\nbootImages: ['0x{'0' * 64}']", "kind", id="wrong-kind"),
    ],
)
def test_bad_policies_name_the_field(text: str, match: str) -> None:
    with pytest.raises(EvidenceFormatError, match=match):
        parse_policy(text)


def test_missing_policy_file_is_a_clear_error(tmp_path: Any) -> None:
    with pytest.raises(EvidenceFormatError, match="cannot read policy"):
        load_policy(tmp_path / "absent.yaml")


def test_policy_does_not_confuse_bool_and_int() -> None:
    policy = parse_policy(
        f"bootImages: ['0x{BOOT.hex()}']\nallowUnlistedMeasurements: true\ncapsuleState: {{containers: {{equals: 0}}}}"
    )
    quote = _quote(b"\x01" * 32, capsule_state={"containers": False})
    assert check_policy(quote, policy).event_ids == ["policy.capsule_state.containers.mismatch"]


def test_policy_for_another_node_fails() -> None:
    quote = _quote(b"\x01" * 32, node_id="hpc-9")
    assert "policy.node.mismatch" in check_policy(quote, POLICY).event_ids


def test_unlisted_measurements_may_be_allowed_explicitly() -> None:
    policy = parse_policy(f"bootImages: ['0x{BOOT.hex()}']\nallowUnlistedMeasurements: true")
    assert check_policy(_quote(b"\x01" * 32), policy).ok


# --- quote encoding ----------------------------------------------------------------------------------------


def test_signed_quote_round_trips_and_digest_is_canonical() -> None:
    signed = sign_quote(_quote(b"\x07" * 32), AGENT, GATEWAY)
    assert decode_signed_quote(encode_signed_quote(signed)) == signed
    body = canonical.encode(signed.quote.model_dump())
    assert quote_digest(signed.quote) == hashlib.sha256(body).digest()
    assert body.startswith(b'{"agent_key":"0x')  # RFC 8785: keys sorted, no whitespace


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param(b"", "not a signed quote", id="empty"),
        pytest.param(b"{}", "quote", id="empty-object"),
        pytest.param(b"\xff\xfe", "not a signed quote", id="not-utf8"),
        pytest.param(b"[1,2]", "not a signed quote", id="array"),
        pytest.param(b"x" * (256 * 1024 + 1), "at most", id="too-large"),
    ],
)
def test_bad_quote_bytes_name_the_cause(data: bytes, match: str) -> None:
    with pytest.raises(EvidenceFormatError, match=match):
        decode_signed_quote(data)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        pytest.param("nonce", b"\x01" * 31, "nonce", id="short-nonce"),
        pytest.param("node_id", "HPC_1", "node_id", id="bad-node-name"),
        pytest.param("gateway", GATEWAY.address.lower(), "gateway", id="address-not-checksummed"),
        pytest.param("measurements", {"a.b": "x"}, "measurements", id="dotted-measurement-name"),
        pytest.param("issued_at", 2**60, "issued_at", id="time-beyond-safe-integer"),
    ],
)
def test_bad_quote_fields_name_the_field(field: str, value: Any, match: str) -> None:
    with pytest.raises(EvidenceFormatError, match=match):
        _quote(**{"nonce": b"\x01" * 32, field: value})


# --- signatures ----------------------------------------------------------------------------------------------


def test_recover_refuses_high_s_and_bad_v() -> None:
    digest = b"\x09" * 32
    sig = AGENT.sign_digest(digest)
    assert recover_address(digest, sig) == AGENT.address
    s = int.from_bytes(sig[32:64], "big")
    high = sig[:32] + (SECP_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    with pytest.raises(SignatureError, match="high s"):
        recover_address(digest, high)
    with pytest.raises(SignatureError, match="v must be 27 or 28"):
        recover_address(digest, sig[:64] + b"\x01")
    with pytest.raises(SignatureError, match="65 bytes"):
        recover_address(digest, sig[:64])


# --- verdicts ----------------------------------------------------------------------------------------------

DOMAIN = Domain(chain_id=31337, verifying_contract="0x5FbDB2315678afecb367f032d93F642f64180aa3")
VERIFIER = _signer(b"verifier-1")


def _verdict(**over: Any) -> Verdict:
    fields: dict[str, Any] = {
        "attestation_id": "0x" + "11" * 32,
        "node": GATEWAY.address,
        "verifier": VERIFIER.address,
        "phase": int(Phase.PRE),
        "passed": True,
        "quote_digest": "0x" + "22" * 32,
        "policy_digest": "0x" + policy_digest(POLICY).hex(),
        "epoch": 7,
        "issued_at": T0,
    }
    fields.update(over)
    return Verdict(**fields)


def test_verdict_signature_recovers_the_verifier() -> None:
    signed = sign_verdict(_verdict(), DOMAIN, VERIFIER)
    assert verify_verdict(signed, domain=DOMAIN) == VERIFIER.address
    assert decode_signed_verdict(encode_signed_verdict(signed)) == signed


def test_verdict_id_is_the_eip712_hash_struct_computed_by_hand() -> None:
    v = _verdict()
    type_hash = keccak(
        b"Verdict(bytes32 attestationId,address node,address verifier,uint8 phase,bool passed,bytes32 quoteDigest,"
        b"bytes32 policyDigest,uint64 epoch,uint64 issuedAt)"
    )
    encoded = abi_encode(
        ["bytes32", "bytes32", "address", "address", "uint8", "bool", "bytes32", "bytes32", "uint64", "uint64"],
        [type_hash, bytes.fromhex(v.attestation_id[2:]), v.node, v.verifier, v.phase, v.passed,
         bytes.fromhex(v.quote_digest[2:]), bytes.fromhex(v.policy_digest[2:]), v.epoch, v.issued_at],
    )
    assert verdict_id(v, DOMAIN) == keccak(encoded)


def test_verdict_signature_is_what_eth_account_would_recover() -> None:
    signed = sign_verdict(_verdict(), DOMAIN, VERIFIER)
    signable = encode_typed_data(full_message=typed_data(signed.verdict, DOMAIN))
    assert Account.recover_message(signable, signature=bytes.fromhex(signed.signature[2:])) == VERIFIER.address


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"passed": False}, id="passed-flipped"),
        pytest.param({"phase": int(Phase.POST)}, id="phase-changed"),
        pytest.param({"epoch": 8}, id="epoch-changed"),
        pytest.param({"node": MALLORY.address}, id="node-changed"),
        pytest.param({"verifier": MALLORY.address}, id="verifier-changed"),
    ],
)
def test_tampered_verdict_does_not_recover_the_verifier(change: dict[str, Any]) -> None:
    signed = sign_verdict(_verdict(), DOMAIN, VERIFIER)
    assert verify_verdict(signed, domain=DOMAIN) == VERIFIER.address  # positive control: untouched, it verifies
    tampered = signed.model_copy(update={"verdict": signed.verdict.model_copy(update=change)})
    with pytest.raises(VerdictError, match="but was signed by") as info:
        verify_verdict(tampered, domain=DOMAIN)
    assert f"signed by {VERIFIER.address}" not in str(info.value)  # the changed fields recover some other key


def test_verdict_naming_another_verifier_than_its_signer_is_refused() -> None:
    """A verifier signing a verdict in another's name (a committee seat it does not hold) is refused,
    though its own signature over the verdict is genuine."""
    impersonated = sign_verdict(_verdict(verifier=MALLORY.address), DOMAIN, VERIFIER)
    with pytest.raises(VerdictError, match=f"names verifier {MALLORY.address} but was signed by {VERIFIER.address}"):
        verify_verdict(impersonated, domain=DOMAIN)
    own = sign_verdict(_verdict(verifier=MALLORY.address), DOMAIN, MALLORY)  # positive control: signed by its seat
    assert verify_verdict(own, domain=DOMAIN) == MALLORY.address


OTHER_DOMAINS = [
    pytest.param(Domain(chain_id=1, verifying_contract=DOMAIN.verifying_contract), id="other-chain"),
    pytest.param(Domain(chain_id=DOMAIN.chain_id, verifying_contract=MALLORY.address), id="other-contract"),
]


@pytest.mark.parametrize("other", OTHER_DOMAINS)
def test_verdict_for_another_chain_or_contract_is_refused(other: Domain) -> None:
    assert verify_verdict(sign_verdict(_verdict(), DOMAIN, VERIFIER), domain=DOMAIN) == VERIFIER.address  # control
    made_elsewhere = sign_verdict(_verdict(), other, VERIFIER)  # genuine, but for another deployment
    assert verify_verdict(made_elsewhere, domain=other) == VERIFIER.address
    with pytest.raises(VerdictError, match="not for the expected chain"):
        verify_verdict(made_elsewhere, domain=DOMAIN)


@pytest.mark.parametrize("other", OTHER_DOMAINS)
def test_verdict_relabelled_for_another_domain_does_not_recover_the_verifier(other: Domain) -> None:
    signed = sign_verdict(_verdict(), DOMAIN, VERIFIER)
    relabelled = signed.model_copy(update={"domain": other})
    with pytest.raises(VerdictError, match="not for the expected chain"):
        verify_verdict(relabelled, domain=DOMAIN)
    with pytest.raises(VerdictError, match="but was signed by"):  # the signature does not carry over either
        verify_verdict(relabelled, domain=other)


def test_verdict_ids_differ_per_verdict() -> None:
    assert verdict_id(_verdict(), DOMAIN) != verdict_id(_verdict(attestation_id="0x" + "12" * 32), DOMAIN)


def test_identical_verdicts_of_two_verifiers_are_two_leaves() -> None:
    assert verdict_id(_verdict(), DOMAIN) != verdict_id(_verdict(verifier=MALLORY.address), DOMAIN)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param(b"{}", "verdict", id="empty-object"),
        pytest.param(b"not json", "not a signed verdict", id="not-json"),
    ],
)
def test_bad_verdict_bytes(data: bytes, match: str) -> None:
    with pytest.raises(EvidenceFormatError, match=match):
        decode_signed_verdict(data)


def test_malformed_verdict_signature_is_a_verdict_error() -> None:
    signed = sign_verdict(_verdict(), DOMAIN, VERIFIER)
    bad = signed.model_copy(update={"signature": "0x" + "00" * 65})
    with pytest.raises(VerdictError, match="signature is not valid"):
        verify_verdict(bad, domain=DOMAIN)


# --- with the real trust root (software backend) as Signer ---------------------------------------------------


def test_quote_and_verdict_signed_by_the_software_trust_root_verify(tmp_path: Any) -> None:
    """The shared Signer interface, end to end: trustcap.trustroot signs, trustcap.evidence recovers."""
    from trustcap.trustroot import SoftwareTrustRoot

    (tmp_path / "gw").mkdir()
    (tmp_path / "agent").mkdir()
    gateway_root = SoftwareTrustRoot.create(tmp_path / "gw", b"\x01" * 32)
    agent_root = SoftwareTrustRoot.create(tmp_path / "agent", b"\x02" * 32)
    assert isinstance(gateway_root, Signer) and address_of(gateway_root.public_key()) == gateway_root.address

    clock, nonces, nonce = _setup()
    quote = _quote(nonce, gateway=gateway_root.address, agent_key=agent_root.public_key())
    signed = sign_quote(quote, agent_root, gateway_root)
    kwargs = {**_kwargs(nonces, nonce, clock), "agent_key": agent_root.public_key(),
              "gateway_address": gateway_root.address}
    assert verify_quote(signed, **kwargs).ok

    verdict = sign_verdict(_verdict(node=gateway_root.address, verifier=gateway_root.address), DOMAIN, gateway_root)
    assert verify_verdict(verdict, domain=DOMAIN) == gateway_root.address
