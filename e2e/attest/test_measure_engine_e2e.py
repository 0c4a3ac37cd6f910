"""The agent's container measurement on the real Docker Engine (issue 4, defect 5).

Before, the agent's default quote digested an empty list for the containers and the scratch area, so a
capsule left running (or a volume left behind) was invisible to every verifier. Here a real container
and a real volume appear in the reading the agent's default measurement digests, and are gone from it
once removed. Other suites may use the same engine at the same time, so the test asserts on its own
objects' presence, not on the whole engine's digest.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trustcap.agent import engine, measure
from trustcap.agent.errors import AgentError
from trustcap.agent.identity import BootConfig, BootKey
from trustcap.agent.service import Agent

IMAGE = "trustcap/base:bookworm"


@pytest.fixture
def client() -> Iterator[Any]:
    try:
        c = engine.connect(timeout=10)
    except AgentError as exc:
        pytest.skip(f"no Docker Engine answers here ({exc}); `trustcap stack up` starts one")
    try:
        c.images.get(IMAGE)
    except Exception as exc:  # the SDK's NotFound: the stack builds this image
        pytest.skip(f"{IMAGE} is not built here ({type(exc).__name__}); `trustcap stack up` builds it")
    yield c
    c.close()


def test_a_running_container_and_a_volume_enter_the_agents_measurement(client: Any, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:10]
    seen: dict[str, Any] = {}

    def reading() -> dict[str, list[str]]:
        state = measure.docker_state(client)
        seen["last"] = state
        return state

    config = BootConfig("127.0.0.1", 1, "token-0123456789", "0x" + "ab" * 32, "0x" + "11" * 20, "hpc-1")
    agent = Agent(config, key=BootKey(), docker_client=lambda: client, scratch_root=tmp_path)
    agent._containers_reading()
    image_id = client.images.get(IMAGE).id
    assert image_id in measure.docker_state(client)["images"]

    container = client.containers.run(IMAGE, ["sleep", "60"], detach=True, name=f"tc-measure-{tag}",
                                      labels={"io.trustcap.test": tag}, network_mode="none")
    volume = client.volumes.create(name=f"tc-measure-{tag}", labels={"io.trustcap.test": tag})
    try:
        during = agent.measure()
        state = reading()
        assert f"{container.id} {image_id}" in state["running"]
        assert volume.name in state["volumes"]
        assert during["containers"] != measure._digest(measure.UNMEASURED)
    finally:
        container.remove(force=True, v=True)
        volume.remove(force=True)
    after = reading()
    assert not any(r.startswith(container.id) for r in after["running"])
    assert volume.name not in after["volumes"]
