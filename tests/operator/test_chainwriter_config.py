"""The chain-writer controller's configuration: off unless configured, and a missing setting is named."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import kopf
import pytest

from trustcap.chain.keys import ANVIL_KEYS
from trustcap.operator import chainwriter


def test_without_chain_settings_the_writer_stays_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRUSTCAP_CHAIN_DEPLOYMENT", raising=False)
    memo = kopf.Memo()
    chainwriter.start_chainwriter(logger=logging.getLogger("test"), memo=memo)
    assert chainwriter.controller(memo) is None and chainwriter.MEMO_KEY not in memo
    assert not chainwriter._decided({"result": "Passed", "verdicts": []}, memo=memo)


@pytest.mark.parametrize("missing", [pytest.param("TRUSTCAP_CHAIN_RPC", id="rpc"),
                                     pytest.param("TRUSTCAP_CHAIN_JOURNAL", id="journal"),
                                     pytest.param("TRUSTCAP_CHAIN_KEYS", id="keys")])
def test_a_missing_setting_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, missing: str) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"sender": ANVIL_KEYS[0], "batchSigners": list(ANVIL_KEYS[1:4])}))
    dep = tmp_path / "dep.json"
    dep.write_text(json.dumps({"chain_id": 31337, "registry": "0x" + "11" * 20, "log": "0x" + "22" * 20,
                               "reputation": "0x" + "33" * 20, "escrow": "0x" + "44" * 20}))
    env = {"TRUSTCAP_CHAIN_RPC": "http://127.0.0.1:1", "TRUSTCAP_CHAIN_JOURNAL": str(tmp_path / "j.sqlite"),
           "TRUSTCAP_CHAIN_KEYS": str(keys), "TRUSTCAP_CHAIN_DEPLOYMENT": str(dep)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(missing)
    with pytest.raises(kopf.PermanentError, match=missing):
        chainwriter._from_env()
