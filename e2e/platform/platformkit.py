"""Helpers for the platform e2e tests (a module of its own so that test files can import it by name)."""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import clusterkit
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"
PSI = ROOT / "capsules" / "psi" / "capsule.yaml"
NAMESPACE = "trustcap-e2e-platform"
GROUP, VERSION = "trustcap.io", "v1alpha1"


def crd_names() -> list[str]:
    return sorted(yaml.safe_load(p.read_text())["metadata"]["name"] for p in CRD_DIR.glob("*.yaml"))


def psi_capsule(name: str) -> dict[str, Any]:
    """The PSI example under another name (so tests never collide with each other or the demo)."""
    doc: dict[str, Any] = yaml.safe_load(PSI.read_text())
    doc["metadata"]["name"] = name
    doc["metadata"]["namespace"] = NAMESPACE
    return doc


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Tracker:
    """Deletes every Capsule a test created, stripping finalizers first (the operator may be gone)."""

    custom: Any
    names: list[str] = field(default_factory=list)

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        self.names.append(body["metadata"]["name"])
        obj: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "capsules", body, field_validation="Strict")
        return obj

    def get(self, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "capsules", name)
        return obj

    def patch_status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, NAMESPACE, "capsules", name, {"status": status})
        return obj

    def cleanup(self) -> None:
        from kubernetes.client.exceptions import ApiException

        for name in self.names:
            try:
                self.custom.patch_namespaced_custom_object(
                    GROUP, VERSION, NAMESPACE, "capsules", name, {"metadata": {"finalizers": None}})
                self.custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "capsules", name)
            except ApiException as exc:
                if exc.status != 404:
                    raise


#: the e2e's one bounded poll (e2e/clusterkit.py), at this suite's interval
wait_for = functools.partial(clusterkit.wait_for, every=0.3)


@dataclass
class OperatorProcess:
    """`python -m trustcap.operator` as a child process with the stack's KUBECONFIG."""

    env: dict[str, str]
    log_path: Path
    args: tuple[str, ...] = ("--standalone",)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "trustcap.operator", "--namespace", NAMESPACE, *self.args, "--verbose"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.log_path.parent,  # not the repo root
            )

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
