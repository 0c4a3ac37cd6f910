"""The vocabulary in trustcap/api.py is the CRDs' own: every phase enum lists exactly its CRD's enum, and
no module outside it spells the API group (issue 10 item 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trustcap import api

ROOT = Path(__file__).resolve().parents[1]


def _phase_enum(crd: str) -> list[str]:
    doc = yaml.safe_load((ROOT / "crds" / f"{crd}.yaml").read_text())
    status = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    return list(status["properties"]["phase"]["enum"])


@pytest.mark.parametrize(("crd", "enum"), [("capsule", api.CapsulePhase), ("hpcnode", api.HPCNodePhase),
                                           ("gateway", api.GatewayPhase), ("bootimage", api.BootImagePhase)])
def test_each_phase_enum_is_its_crds(crd: str, enum: type) -> None:
    assert [str(p) for p in enum] == _phase_enum(crd)


def test_the_group_is_spelled_once() -> None:
    offenders = []
    for folder in ("trustcap", "operator", "gateway", "agent", "netboot"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "trustcap" / "api.py" or "__pycache__" in path.parts:
                continue
            if '"trustcap.io"' in path.read_text():
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"import GROUP from trustcap.api instead: {offenders}"


PLURALS = ("capsules", "capsuleruns", "attestations", "hpcnodes", "gateways", "bootimages")


def test_the_plurals_are_spelled_once_in_api_calls() -> None:
    """A resource plural passed to the API (after GROUP, VERSION[, namespace], or first to the operator's
    and the runner's kube helpers) is one of trustcap/api.py's names, so a renamed CRD is one edit."""
    import re

    alt = "|".join(PLURALS)
    call = re.compile(r'(\bVERSION,\s*([\w.\[\]"]+,\s*)?|\bkube\.\w+\(\s*)"(' + alt + r')"')
    offenders = []
    for folder in ("trustcap", "operator", "gateway", "agent", "netboot"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "trustcap" / "api.py" or "__pycache__" in path.parts:
                continue
            offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in call.finditer(path.read_text())]
    assert not offenders, f"import the plural from trustcap.api instead: {offenders}"
    assert {api.CAPSULES, api.CAPSULERUNS, api.ATTESTATIONS, api.HPCNODES, api.GATEWAYS, api.BOOTIMAGES} == set(PLURALS)
