"""The operator's own Kubernetes reads and writes outside kopf's handler patches.

The capsule driver (operator/capsule.py) runs in a kopf daemon and writes several objects per step (the
Capsule's status, Attestations and CapsuleRuns in the system namespace), so it talks to the API server
directly. Credentials: KUBECONFIG when set (the local stack, `trustcap stack env`), else the in-cluster
service account, the same order as kopf's own login.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Mapping
from typing import Any, Final, cast

from trustcap.api import GROUP, VERSION
from trustcap.errors import ConfigError
from trustcap.forms import positive_seconds
from trustcap.operator.errors import OperatorError


def seconds_setting(name: str, default: float) -> float:
    """The operator setting `name` from the environment: a positive number of seconds, or `default` unset.
    Anything else is a kopf.PermanentError that names the setting and the default."""
    import kopf

    try:
        return positive_seconds(name, default)
    except ConfigError as exc:
        raise kopf.PermanentError(str(exc)) from None


TIMEOUT_S: Final = 15.0


class KubeError(OperatorError):
    """An API call failed; the message names the object and the status."""


class Kube:
    def __init__(self, kubeconfig: str | None = None) -> None:
        from kubernetes import client

        path = kubeconfig or os.environ.get("KUBECONFIG")
        from trustcap.kubeclient import api_client as kube_api_client

        api_client = kube_api_client(path)
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    @staticmethod
    def _fail(what: str, exc: Exception) -> KubeError:
        status = getattr(exc, "status", None)
        return KubeError(f"{what}: {status or ''} {getattr(exc, 'reason', exc)}".strip())

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return cast(dict[str, Any], self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, _request_timeout=TIMEOUT_S))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise self._fail(f"cannot read {plural} {namespace}/{name}", exc) from exc

    def create(self, plural: str, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create, or return the existing object of that name (a resumed step creates nothing twice)."""
        from kubernetes.client.exceptions import ApiException

        name = str(body["metadata"]["name"])
        try:
            return cast(dict[str, Any], self.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, dict(body), _request_timeout=TIMEOUT_S))
        except ApiException as exc:
            if exc.status == 409:
                existing = self.get(plural, namespace, name)
                if existing is not None:
                    return existing
            raise self._fail(f"cannot create {plural} {namespace}/{name}", exc) from exc

    def patch_status(self, plural: str, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            return cast(dict[str, Any], self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, plural, name, {"status": dict(status)}, _request_timeout=TIMEOUT_S))
        except ApiException as exc:
            raise self._fail(f"cannot patch {plural} {namespace}/{name} status", exc) from exc

    def patch_spec(self, plural: str, namespace: str, name: str, spec: Mapping[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, {"spec": dict(spec)}, _request_timeout=TIMEOUT_S)
        except ApiException as exc:
            if exc.status != 404:
                raise self._fail(f"cannot patch {plural} {namespace}/{name}", exc) from exc

    def list(self, plural: str, namespace: str, label_selector: str = "") -> builtins.list[dict[str, Any]]:
        from kubernetes.client.exceptions import ApiException

        try:
            doc = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, label_selector=label_selector, _request_timeout=TIMEOUT_S)
        except ApiException as exc:
            raise self._fail(f"cannot list {plural} in {namespace}", exc) from exc
        return builtins.list(cast(dict[str, Any], doc).get("items") or [])

    def secrets(self, namespace: str, label_selector: str) -> builtins.list[dict[str, str]]:
        """Each matching Secret's decoded data."""
        import base64

        from kubernetes.client.exceptions import ApiException

        try:
            items = self.core.list_namespaced_secret(namespace, label_selector=label_selector,
                                                     _request_timeout=TIMEOUT_S).items
        except ApiException as exc:
            raise self._fail(f"cannot list Secrets in {namespace}", exc) from exc
        out: builtins.list[dict[str, str]] = []
        for item in items:
            data = item.data or {}
            out.append({k: base64.b64decode(v).decode("utf-8", "replace") for k, v in data.items()})
        return out

    def ensure_namespace(self, name: str) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)),
                                       _request_timeout=TIMEOUT_S)
        except ApiException as exc:
            if exc.status != 409:
                raise self._fail(f"cannot create namespace {name}", exc) from exc
