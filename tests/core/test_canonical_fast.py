"""The canonical encoder's C fast path writes exactly what the RFC 8785 reference (`rfc8785`) writes, and
refuses exactly what it refuses (trustcap/canonical.py, decision 0120). A digest that two parties compute
must not depend on which path one of them took."""

from __future__ import annotations

from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from trustcap import canonical
from trustcap.canonical import CanonicalError

_BIG = 2**53

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-_BIG - 3, max_value=_BIG + 3),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec=None, exclude_categories=())),  # surrogates included
    st.binary(max_size=8),
)
keys = st.one_of(st.text(max_size=6), st.text(alphabet="\ue000\uffff\U0001f600\U00010000az_\"\\\n", max_size=3))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.tuples(inner, inner),
                                                       st.dictionaries(keys, inner, max_size=4)),
                      max_leaves=20)


def _reference(value: Any) -> bytes | type[Exception]:
    try:
        return rfc8785.dumps(canonical._prepare(value))
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError):
        return CanonicalError


def _ours(value: Any) -> bytes | type[Exception]:
    try:
        return canonical.encode(value)
    except CanonicalError:
        return CanonicalError


@settings(max_examples=1500, deadline=None)
@given(values)
def test_the_fast_path_agrees_with_the_reference_on_random_values(value: Any) -> None:
    assert _ours(value) == _reference(value)


@pytest.mark.parametrize("value", [
    pytest.param({"s": "".join(map(chr, range(0x20))) + '"\\/\x7f\u2028\u2029é\U0001f600'}, id="escapes"),
    pytest.param({"n": [2**53 - 1, -(2**53 - 1), 0, True, False, None]}, id="int-bounds"),
    pytest.param({"\ue000": 1, "\U0001f600": 2}, id="utf16-order-differs-from-code-points"),
    pytest.param({"b": b"\x00\xff", "t": (1, "x")}, id="bytes-and-tuples"),
    pytest.param({"z": {"b": 1, "a": [{"d": 2, "c": 3}]}}, id="nested-order"),
])
def test_known_edges_agree(value: Any) -> None:
    assert canonical.encode(value) == _reference(value)


@pytest.mark.parametrize("value", [
    pytest.param({"n": 2**53}, id="int-above-i-json"),
    pytest.param({"f": float("nan")}, id="nan"),
    pytest.param({"s": "\ud800"}, id="lone-surrogate"),
    pytest.param({"x": object()}, id="not-json"),
])
def test_what_the_reference_refuses_is_refused(value: Any) -> None:
    with pytest.raises(CanonicalError):
        canonical.encode(value)


def test_a_quote_takes_the_fast_path() -> None:
    """The reason for the fast path: a quote is plain (ASCII keys, strings, small integers)."""
    quote = {"nonce": "0x" + "01" * 32, "issued_at": 1000,
             "measurements": {f"m{i}": "0x" + "ab" * 32 for i in range(4)},
             "capsule_state": {"phase": "idle", "containers": 0}}
    assert canonical._plain(quote) == quote
    with pytest.raises(canonical._NotPlain):
        canonical._plain({"f": 1.5})


@pytest.mark.parametrize("leaf", [1, 1.5, "x"], ids=["int-fast-path", "float-reference-path", "str"])
def test_nesting_is_bounded_alike_on_both_paths(leaf: Any) -> None:
    """Found in review: past ~500 levels the reference's preparation hit RecursionError where the fast
    path still encoded, so acceptance hung on the leaf's type and on the caller's stack depth. Both paths
    now refuse anything nested deeper than MAX_DEPTH, and encode what is within it identically."""
    def nest(depth: int, make: Any) -> Any:
        v = leaf
        for i in range(depth):
            v = make(v, i)
        return v

    for make in (lambda v, _i: {"a": v}, lambda v, _i: [v], lambda v, i: {"a": v} if i % 2 else (v,)):
        deepest = nest(canonical.MAX_DEPTH, make)
        assert canonical.encode(deepest) == _reference(deepest)
        for depth in (canonical.MAX_DEPTH + 1, 600):
            with pytest.raises(CanonicalError, match="nested deeper than"):
                canonical.encode(nest(depth, make))


def test_a_key_whose_str_is_a_str_subclass_takes_the_reference_path() -> None:
    class Odd(str):
        def __lt__(self, other: object) -> bool:
            return not str.__lt__(self, other)  # type: ignore[arg-type]

    class Key:
        def __init__(self, name: str) -> None:
            self.name = name

        def __str__(self) -> str:
            return Odd(self.name)

    value = {Key("a"): 1, Key("b"): 2}
    assert canonical.encode(value) == _reference(value) == b'{"a":1,"b":2}'
