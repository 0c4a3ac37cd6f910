"""Agent-sign and countersign are two public steps (issue 10 item 6): the agent signs on the HPC, the
gateway countersigns on the Pi only a signature by the quote's own agent key."""

from __future__ import annotations

import hashlib

import pytest

from trustcap.chain.keys import KeySigner
from trustcap.evidence import (
    NonceRegistry,
    agent_sign_quote,
    appraise_quote,
    countersign_quote,
    new_quote,
    sign_quote,
)
from trustcap.evidence.errors import SignatureError

AGENT = KeySigner(hashlib.sha256(b"agent").digest())
GATEWAY = KeySigner(hashlib.sha256(b"gateway").digest())
MALLORY = KeySigner(hashlib.sha256(b"mallory").digest())


def _quote(nonce: bytes, agent_key: bytes) -> object:
    return new_quote(nonce=nonce, issued_at=1_750_000_000, node_id="hpc-1", gateway=GATEWAY.address,
                     agent_key=agent_key, boot_image_digest=bytes(32), measurements={}, capsule_state={})


def test_the_two_steps_make_the_quote_both_keys_would_and_it_appraises() -> None:
    nonces = NonceRegistry(60)
    nonce = nonces.issue()
    quote = _quote(nonce, AGENT.public_key())
    signed = countersign_quote(quote, agent_sign_quote(quote, AGENT), GATEWAY)  # type: ignore[arg-type]
    assert signed == sign_quote(quote, AGENT, GATEWAY)  # type: ignore[arg-type]
    report = appraise_quote(signed, nonces=nonces, expected_nonce=nonce, node_id="hpc-1",
                            agent_key=AGENT.public_key(), gateway_address=GATEWAY.address, now=1_750_000_001,
                            max_age_seconds=30)
    assert report.ok, report.summary()


@pytest.mark.parametrize("signature", [pytest.param("mallory", id="another-key"),
                                       pytest.param("garbage", id="malformed")])
def test_a_gateway_countersigns_no_signature_but_the_quotes_agents(signature: str) -> None:
    quote = _quote(bytes(32), AGENT.public_key())
    sig = agent_sign_quote(quote, MALLORY) if signature == "mallory" else b"\x01" * 65  # type: ignore[arg-type]
    with pytest.raises(SignatureError, match="agent's quote signature"):
        countersign_quote(quote, sig, GATEWAY)  # type: ignore[arg-type]
