"""The one place where Docker SDK errors become our errors (CONVENTIONS: translate upstream errors once).

Every call into the Docker Engine from the agent goes through `translate(action)`, so a caller catches
only `AgentError` subclasses and the message names what we were doing when the engine failed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import docker
import requests
from docker import errors as derr

from trustcap.agent.errors import EngineError, ImageMissing

__all__ = ["connect", "translate"]

# Upstream errors we can meet, most specific first; tests check each one maps to an AgentError.
UPSTREAM_ERRORS: tuple[type[BaseException], ...] = (
    derr.ImageNotFound, derr.NotFound, derr.APIError, derr.ContainerError, derr.BuildError,
    derr.InvalidArgument, derr.DockerException, requests.exceptions.ConnectionError,
    requests.exceptions.Timeout, requests.exceptions.RequestException,
)


@contextmanager
def translate(action: str) -> Iterator[None]:
    """Run a block of Docker calls; any docker/requests error becomes an `EngineError` naming `action`."""
    try:
        yield
    except derr.ImageNotFound as exc:
        raise ImageMissing(f"{action}: image not found in the local Docker Engine ({_short(exc)}); "
                           "build or load it first, nothing is pulled") from exc
    except derr.APIError as exc:
        raise EngineError(f"{action}: Docker Engine refused: {_short(exc)}") from exc
    except (derr.DockerException, requests.exceptions.RequestException) as exc:
        raise EngineError(f"{action}: Docker Engine failed or does not answer: {_short(exc)}") from exc


def connect(timeout: float = 60) -> Any:
    """A Docker client from the environment (DOCKER_HOST or the local socket)."""
    with translate("connecting to the Docker Engine"):
        client = docker.from_env(timeout=int(timeout))
        client.ping()
    return client


def _short(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."
