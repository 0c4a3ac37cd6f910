"""`trustcap.forms.field_error`, the one reading of pydantic's first error that names the bad field (the
quote, verdict and policy decoders, the chain-writer and the cosign service all answer with it)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from trustcap.evidence import EvidenceFormatError, decode_signed_quote
from trustcap.forms import field_error


class Inner(BaseModel):
    n: int


class Outer(BaseModel):
    inner: Inner
    items: list[Inner]


def _error(doc: object) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        Outer.model_validate(doc)
    return info.value


def test_the_path_is_dotted_with_list_indexes() -> None:
    where, what = field_error(_error({"inner": {"n": 1}, "items": [{"n": 1}, {"n": "x"}]}))
    assert where == "items.1.n" and "integer" in what


def test_the_document_itself_is_named_by_root() -> None:
    assert field_error(_error("not an object"))[0] == "(document)"
    assert field_error(_error("not an object"), "(leaf)")[0] == "(leaf)"


def test_the_input_is_never_in_the_message() -> None:
    marker = "value-that-must-not-be-echoed"
    where, what = field_error(_error({"inner": {"n": marker}, "items": []}))
    assert where == "inner.n" and marker not in what


def test_a_decoder_names_the_field_through_it() -> None:
    with pytest.raises(EvidenceFormatError, match=r"not a signed quote: quote: Field required"):
        decode_signed_quote(b'{"agent_signature": "0x00", "gateway_signature": "0x00"}')
