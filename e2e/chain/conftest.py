"""A real anvil per test session on a free loopback port (the npm package's binary), and fresh contracts.

Tests that kill or restart the chain start their own Anvil; the rest share this one and use unique
epochs and ids, so they do not see each other's records.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from chainkit import Chain, deploy

from trustcap.chain.anvil import Anvil


@pytest.fixture(scope="session")
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Anvil]:
    logf: Path = tmp_path_factory.mktemp("anvil") / "anvil.log"
    a = Anvil(log_file=logf).start()
    yield a
    a.stop()


@pytest.fixture
def chain(anvil: Anvil) -> Chain:
    return deploy(anvil)
