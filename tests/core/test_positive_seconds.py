"""One reader for a positive number of seconds from the environment (the gateway, netboot and operator
settings), refusing what is not one with the setting's name and its default."""

from __future__ import annotations

import pytest

from trustcap.errors import ConfigError
from trustcap.forms import positive_seconds


@pytest.mark.parametrize(("raw", "want"), [pytest.param("", 30.0, id="unset"), pytest.param("2.5", 2.5, id="set")])
def test_a_positive_number_or_the_default(monkeypatch: pytest.MonkeyPatch, raw: str, want: float) -> None:
    monkeypatch.setenv("TRUSTCAP_X_SECONDS", raw)
    assert positive_seconds("TRUSTCAP_X_SECONDS", 30.0) == want


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "inf", "ten"])
def test_anything_else_names_the_setting_and_the_default(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("TRUSTCAP_X_SECONDS", raw)
    with pytest.raises(ConfigError, match=r"TRUSTCAP_X_SECONDS=.* default of 30 \(keep it short\)"):
        positive_seconds("TRUSTCAP_X_SECONDS", 30.0, hint="keep it short")
