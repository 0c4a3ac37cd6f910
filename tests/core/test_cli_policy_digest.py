"""`trustcap policy digest FILE` prints what a gateway reports and its members appraise under."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustcap.cli import main
from trustcap.gateway.policy import load_gateway_policy

POLICY = """kind: GatewayPolicy
monitor: {meanIntervalSeconds: 5}
attestation:
  bootImages: ['0x""" + "ab" * 32 + """']
"""


def test_the_digest_is_the_gateways_attestation_digest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text(POLICY)
    assert main(["policy", "digest", str(f)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == "sha256:" + load_gateway_policy(f).attestation_digest[2:]
    (tmp_path / "att.yaml").write_text("bootImages: ['0x" + "ab" * 32 + "']\n")  # the section alone: the same
    assert main(["policy", "digest", str(tmp_path / "att.yaml")]) == 0
    assert capsys.readouterr().out.strip() == printed


@pytest.mark.parametrize(("text", "needle"), [
    pytest.param("kind: GatewayPolicy\nmonitor: {}\n", "needs an attestation section", id="no-attestation"),
    pytest.param("bootImages: ['sha256:ab']\n", "bootImages", id="bad-field"),
    pytest.param("[1, 2]\n", "must be a YAML mapping", id="not-a-mapping"),
    pytest.param("a: [\n", "is not valid YAML", id="bad-yaml"),
])
def test_a_bad_policy_is_one_line_naming_the_cause(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   text: str, needle: str) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text(text)
    assert main(["policy", "digest", str(f)]) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
