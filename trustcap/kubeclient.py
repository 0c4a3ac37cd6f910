"""One way to reach the API server, for every component that talks to it (operator, gateway, netboot, CLI).

A kubeconfig path when one is given (the local stack, a person's machine), else the pod's service account
(`in-cluster`, as the chart runs the operator and the gateways): `api_client`. A person's command and
netboot on a Pi have no service account, so without a path they look where kubectl does ($KUBECONFIG,
then ~/.kube/config): `local_api_client`. Errors are the kubernetes library's own
(ConfigException, OSError, ValueError, yaml.YAMLError): each caller names them in its own terms. A call
that cannot reach the server raises urllib3's errors (MaxRetryError once its retries are spent), which are
not OSError: `TRANSPORT_ERRORS` names both, for every caller's `except`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

T = TypeVar("T")

__all__ = ["TRANSPORT_ERRORS", "api_call", "api_client", "local_api_client"]


def _transport_errors() -> tuple[type[Exception], ...]:
    """The socket's errors and urllib3's own. Where the kubernetes client (and so urllib3) is not installed,
    as in the netboot container, which talks to no API server, nothing can raise urllib3's."""
    try:
        import urllib3.exceptions
    except ImportError:
        return (OSError,)
    return (OSError, urllib3.exceptions.HTTPError)


# the API server is down, refused, reset or timed out
TRANSPORT_ERRORS: Final[tuple[type[Exception], ...]] = _transport_errors()


def api_client(kubeconfig: str | Path | None = None, *, error: Callable[[str], Exception] | None = None) -> Any:
    """A kubernetes ApiClient from `kubeconfig`, or from the in-cluster service account when it is None.
    With `error`, a configuration that cannot be loaded is raised as `error("cannot load kubeconfig ...")`."""
    import yaml
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        if kubeconfig:
            return config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except (ConfigException, OSError, ValueError, yaml.YAMLError) as exc:
        if error is None:
            raise
        raise error(f"cannot load kubeconfig {str(kubeconfig) if kubeconfig else 'in-cluster'!r}: {exc}") from exc
    return client.ApiClient()


def local_api_client(kubeconfig: str | Path | None = None) -> Any:
    """A kubernetes ApiClient from `kubeconfig`, or as kubectl finds one: $KUBECONFIG, ~/.kube/config, and
    in a pod with neither, the pod's service account (netboot run by the chart has no kubeconfig at all)."""
    import os

    from kubernetes import config

    if not kubeconfig and not os.environ.get("KUBECONFIG") and not Path("~/.kube/config").expanduser().exists() \
            and os.environ.get("KUBERNETES_SERVICE_HOST"):
        return api_client(None)
    return config.new_client_from_config(config_file=str(kubeconfig) if kubeconfig else None)  # type: ignore[no-untyped-call]


def api_call(what: str, call: Callable[[], T], *, error: Callable[[str], Exception],
             absent: int | None = None) -> T | None:
    """`call()` on the API server, a failure raised as `error("<what>: <status> <reason>")`. With `absent`
    (404 for a read, 409 for a create), that one answer returns None: the caller's "not there" / "there
    already", which is not a failure."""
    from kubernetes.client.exceptions import ApiException

    try:
        return call()
    except ApiException as exc:
        if absent is not None and exc.status == absent:
            return None
        raise error(f"{what}: {exc.status or ''} {exc.reason or exc}".strip()) from exc
    except TRANSPORT_ERRORS as exc:
        raise error(f"{what}: {exc}") from exc
