"""The boot container's build context (no Docker needed): what goes in, and a tag that follows content."""

from __future__ import annotations

from pathlib import Path

from trustcap.netboot.container import CAPS, DOCKERFILE, _stage


def test_stage_holds_only_what_serve_needs(tmp_path: Path) -> None:
    tag = _stage(tmp_path / "a")
    site = tmp_path / "a" / "site"
    names = {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()}
    for needed in ("trustcap/__init__.py", "trustcap/errors.py", "trustcap/canonical.py",
                   "trustcap/netboot/serve.py", "trustcap/netboot/tftp.py", "tftpy/__init__.py",
                   "prometheus_client/__init__.py"):
        assert needed in names, needed
    assert not any(n.startswith(("trustcap/cli", "trustcap/stack", "trustcap/agent")) for n in names)
    assert not any("__pycache__" in n for n in names)
    assert tag == _stage(tmp_path / "b")  # same content, same tag
    assert len(tag) == 16


def test_container_is_locked_down() -> None:
    assert set(CAPS) == {"NET_BIND_SERVICE", "NET_RAW", "NET_ADMIN", "SETUID", "SETGID", "KILL"}
    assert "SYS_ADMIN" not in CAPS and "DAC_OVERRIDE" not in CAPS
    assert 'ENTRYPOINT ["python3", "-m", "trustcap.netboot"]' in DOCKERFILE
