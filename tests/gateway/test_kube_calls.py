"""The gateway's API calls (trustcap.kubeclient.api_call): an absent object is an answer, every other
failure names the object, the status and the reason."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from trustcap.gateway.participant import LifecycleError
from trustcap.kubeclient import api_call


def _raise(exc: Exception) -> Any:
    def call() -> Any:
        raise exc

    return call


def test_the_call_answers_through() -> None:
    assert api_call("cannot read HPCNode n", lambda: {"kind": "HPCNode"}, error=LifecycleError) == {"kind": "HPCNode"}


@pytest.mark.parametrize("status", [pytest.param(404, id="read-not-found"), pytest.param(409, id="create-exists")])
def test_the_absent_answer_is_none(status: int) -> None:
    assert api_call("x", _raise(ApiException(status=status, reason="r")), error=LifecycleError, absent=status) is None


@pytest.mark.parametrize(("exc", "absent", "message"), [
    pytest.param(ApiException(status=403, reason="Forbidden"), 404, "cannot read Secret ns/s: 403 Forbidden",
                 id="forbidden"),
    pytest.param(ApiException(status=404, reason="Not Found"), None, "cannot read Secret ns/s: 404 Not Found",
                 id="not-found-without-absent"),
    pytest.param(ConnectionRefusedError(111, "Connection refused"), 404,
                 "cannot read Secret ns/s: [Errno 111] Connection refused", id="api-server-down"),
])
def test_a_failure_names_the_object_and_the_cause(exc: Exception, absent: int | None, message: str) -> None:
    with pytest.raises(LifecycleError) as info:
        api_call("cannot read Secret ns/s", _raise(exc), error=LifecycleError, absent=absent)
    assert str(info.value) == message
