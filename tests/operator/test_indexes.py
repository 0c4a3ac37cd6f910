"""The HPCNode timers read kopf's indexes through one typed accessor (issue 10 item 4): the names it admits
are exactly the indexes the operator registers, and a handler run without one fails by name instead of
with a KeyError deep in a timer."""

from __future__ import annotations

import kopf
import pytest

from trustcap.operator import handlers, hpcnode


def test_the_accessor_admits_exactly_the_registered_indexes() -> None:
    assert handlers.hpcnode is hpcnode  # registered by the one entry point
    registered = {h.fn.__name__ for h in kopf.get_default_registry()._indexing.get_all_handlers()}
    assert registered == set(hpcnode.INDEXES)


def test_an_index_that_was_not_injected_is_named() -> None:
    with pytest.raises(kopf.PermanentError, match="'trustcap_gateways' was not injected"):
        hpcnode._index({}, "trustcap_gateways")
    with pytest.raises(kopf.PermanentError, match="'trustcap_typo'"):
        hpcnode._index({"trustcap_typo": {}}, "trustcap_typo")


def test_an_injected_index_is_returned_as_is() -> None:
    index = {"gw-a": [{"address": "0x" + "11" * 20}]}
    assert hpcnode._index({"trustcap_gateways": index}, "trustcap_gateways") is index
