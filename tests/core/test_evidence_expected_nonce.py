"""Issue 12 item 15: `appraise_quote` always checks the quote against the nonce this verifier sent for this
request. There is no value that turns the check off (until decision 0115, `expected_nonce=None` did)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from test_evidence import AGENT, GATEWAY, _kwargs, _quote, _setup

from trustcap.evidence import appraise_quote, sign_quote


@pytest.mark.parametrize("missing", [None, b"", "0x00"], ids=["none", "empty", "text"])
def test_a_quote_answering_another_open_request_cannot_be_appraised_without_its_nonce(missing: Any) -> None:
    """The attack: a verifier with two open requests is fed the answer to the other one. The registry alone
    accepts it (the nonce is issued and unused), so a caller that leaves the expected nonce out takes it.
    Before decision 0115, `expected_nonce=None` returned an ok report here."""
    clock, nonces, nonce = _setup()
    other = nonces.issue()
    signed = sign_quote(_quote(other), AGENT, GATEWAY)
    with pytest.raises(TypeError, match="expected_nonce must be the nonce this verifier sent"):
        appraise_quote(signed, **_kwargs(nonces, missing, clock))
    # nothing was consumed by the refused call: the genuine answer to `other` still counts once
    assert appraise_quote(signed, **_kwargs(nonces, other, clock)).ok
    # and the answer to `other`, appraised as the answer to `nonce`, is named for what it is
    report = appraise_quote(sign_quote(_quote(nonce), AGENT, GATEWAY), **_kwargs(nonces, other, clock))
    assert report.event_ids == ["nonce.mismatch"]


def test_control_the_answer_to_this_request_passes() -> None:
    clock, nonces, nonce = _setup()
    nonces.issue()  # another open request of the same verifier changes nothing
    assert appraise_quote(sign_quote(_quote(nonce), AGENT, GATEWAY), **_kwargs(nonces, nonce, clock)).ok


def test_expected_nonce_is_required_bytes_in_the_signature() -> None:
    param = inspect.signature(appraise_quote).parameters["expected_nonce"]
    assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is inspect.Parameter.empty
    assert param.annotation == "bytes"


def test_without_a_registry_the_expected_nonce_and_not_before_decide_freshness() -> None:
    """A verifier that re-judges stored evidence (the operator, on every pass) holds one challenge, not a
    registry: it names the nonce it sent and when (`not_before`), and needs no fake registry that issues
    its one nonce for ten years (issue 10 item 6). Attack: the answer to an older challenge, or a quote
    made before this challenge and replayed with its nonce field intact, is refused; control: the answer
    to this challenge passes, again and again."""
    clock, _, nonce = _setup()
    kwargs = {**_kwargs(None, nonce, clock), "nonces": None, "not_before": clock.now - 1.0}  # type: ignore[arg-type]
    signed = sign_quote(_quote(nonce), AGENT, GATEWAY)
    assert appraise_quote(signed, **kwargs).ok and appraise_quote(signed, **kwargs).ok  # re-judged, still ok
    assert appraise_quote(signed, **{**kwargs, "expected_nonce": b"\x99" * 32}).event_ids == ["nonce.mismatch"]
    later = {**kwargs, "not_before": clock.now + 60.0, "max_age_seconds": None}  # a challenge issued after it
    assert appraise_quote(signed, **later).event_ids == ["quote.predates_challenge"]
    within_skew = {**kwargs, "not_before": clock.now + 4.0}
    assert appraise_quote(signed, **within_skew).ok  # clocks may differ by max_skew_seconds
