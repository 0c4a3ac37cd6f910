"""Session fixtures for the end-to-end suite: the real local stack, never a mock.

`stack` runs `trustcap stack up` (idempotent: seconds when the stack is already up, as after `make test`'s
own start) and returns the endpoints it reports. Everything else is derived from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trustcap.stack import paths


@pytest.fixture(scope="session")
def stack() -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "trustcap.cli", "stack", "up"], capture_output=True, text=True, timeout=3000,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"trustcap stack up failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    info: dict[str, Any] = json.loads((paths.state_dir() / "stack.json").read_text())
    return info


@pytest.fixture(scope="session")
def kubeconfig(stack: dict[str, Any]) -> Path:
    return Path(stack["kubeconfig"])


@pytest.fixture(scope="session")
def kube_env(stack: dict[str, Any]) -> dict[str, str]:
    """Environment for subprocesses (kubectl, helm, the operator) that talk to the stack."""
    env = dict(os.environ)
    env["KUBECONFIG"] = stack["kubeconfig"]
    env["PATH"] = f"{stack['bin_dir']}:{env.get('PATH', '')}"
    env["TRUSTCAP_CHAIN_RPC"] = stack["chain_rpc"]
    return env


@pytest.fixture(scope="session")
def kubectl(stack: dict[str, Any], kube_env: dict[str, str]) -> Any:
    """Run the stack's kubectl: `kubectl("get", "crds", check=True)` returns the CompletedProcess."""

    def run(
        *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(Path(stack["bin_dir"]) / "kubectl"), *args], capture_output=True, text=True, env=kube_env,
            input=input, timeout=timeout, check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    return run


@pytest.fixture(scope="session")
def k8s_api(kubeconfig: Path) -> Iterator[Any]:
    """A `kubernetes.client.ApiClient` bound to the stack's API server."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    try:
        yield api
    finally:
        api.close()
        if isinstance(api, client.ApiClient):
            api.rest_client.pool_manager.clear()


@pytest.fixture(scope="session")
def docker_client(stack: dict[str, Any]) -> Iterator[Any]:
    import docker

    cl = docker.from_env()
    try:
        yield cl
    finally:
        cl.close()


@pytest.fixture(scope="session")
def base_image(stack: dict[str, Any]) -> str:
    return str(stack["base_image"])


@pytest.fixture(scope="session")
def chain_rpc(stack: dict[str, Any]) -> str:
    return str(stack["chain_rpc"])
