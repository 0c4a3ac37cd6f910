"""The stack's own parts without services: PKI, daemon supervision, build stamps, env lines."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trustcap.errors import StackError
from trustcap.stack import build, pki, procs, versions
from trustcap.stack.stack import Stack, _wait


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_pki_chain_names_and_permissions(tmp_path: Path) -> None:
    p = pki.ensure_pki(tmp_path / "pki")
    ca, server, admin = _load(p.ca_crt), _load(p.server_crt), _load(p.admin_crt)
    for leaf in (server, admin):
        leaf.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "kubernetes.default.svc" in sans.get_values_for_type(x509.DNSName)
    eku = admin.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    # system:masters is what makes the admin certificate an administrator under RBAC
    assert admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:masters"
    for key in (p.server_key, p.admin_key, p.sa_key):
        assert os.stat(key).st_mode & 0o077 == 0, f"{key} is readable by others"
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)


def test_pki_is_reused_not_regenerated(tmp_path: Path) -> None:
    first = pki.ensure_pki(tmp_path).ca_crt.read_bytes()
    assert pki.ensure_pki(tmp_path).ca_crt.read_bytes() == first


def test_daemon_start_find_stop(tmp_path: Path) -> None:
    d = procs.Daemon("sleeper", ["/bin/sleep", "30"], tmp_path)
    assert d.pid() is None
    pid = d.start()
    try:
        assert d.pid() == pid
    finally:
        assert d.stop(timeout=5)
    assert d.pid() is None
    assert not d.pidfile.exists()


def test_a_reused_pid_is_not_taken_for_our_daemon(tmp_path: Path) -> None:
    d = procs.Daemon("sleeper", ["/bin/sleep", "30"], tmp_path)
    d.pidfile.parent.mkdir(parents=True)
    d.pidfile.write_text(str(os.getpid()))  # a live pid running another program (this test)
    assert d.pid() is None
    assert not d.pidfile.exists(), "a stale pid file must be removed"


def test_daemon_that_dies_during_start_up_reports_its_log(tmp_path: Path) -> None:
    d = procs.Daemon("failing", ["/bin/sh", "-c", "echo 'boom: bad flag'; exit 3"], tmp_path)
    with pytest.raises(StackError, match="boom: bad flag"):
        d.start()
        _wait("failing", lambda: False, timeout=10, daemon=d)


def test_build_fingerprint_changes_with_pin() -> None:
    tool = build.TOOLS[0]
    other = build.Tool(tool.name, "v9.9.9", tool.args, tool.module_dir)
    assert tool.fingerprint != other.fingerprint
    flags = build.Tool(tool.name, tool.version, (*tool.args, "-x"), tool.module_dir)
    assert tool.fingerprint != flags.fingerprint


def test_kubernetes_binaries_carry_their_version() -> None:
    for tool in build.TOOLS:
        if tool.module_dir == "tools/kube":
            ldflags = next(a for a in tool.args if a.startswith("-ldflags="))
            assert f"gitVersion={tool.version}" in ldflags


@pytest.mark.parametrize(
    ("module_dir", "requirement"),
    [
        pytest.param("tools/kube", f"k8s.io/kubernetes {versions.KUBERNETES}", id="kubernetes"),
        pytest.param("tools/kubo", f"github.com/ipfs/kubo {versions.KUBO}", id="kubo"),
    ],
)
def test_wrapper_modules_require_the_pinned_release(module_dir: str, requirement: str) -> None:
    # the stamp records versions.*, so a wrapper go.mod left at another release would build one thing and
    # stamp another
    gomod = (Path(__file__).parents[2] / module_dir / "go.mod").read_text()
    assert f"require {requirement}\n" in gomod or f"\t{requirement}\n" in gomod
    assert (Path(__file__).parents[2] / module_dir / "go.sum").is_file()
    assert any(t.module_dir == module_dir for t in build.TOOLS)


def test_env_lines_point_at_the_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRUSTCAP_KUBECONFIG", raising=False)
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    lines = Stack(state=tmp_path).env_lines()
    assert f"export KUBECONFIG={tmp_path / 'kubeconfig'}" in lines
    assert any(line.startswith("export TRUSTCAP_CHAIN_RPC=http://127.0.0.1:") for line in lines)
    assert any(line.startswith('export PATH="') for line in lines)


def test_external_kubeconfig_is_used_instead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kc = tmp_path / "k3s.yaml"
    kc.write_text("clusters: [{name: k3s, cluster: {server: 'https://127.0.0.1:6443'}}]\n")
    monkeypatch.setenv("TRUSTCAP_KUBECONFIG", str(kc))
    s = Stack(state=tmp_path / "state")
    assert s.kubeconfig == kc
    assert s.apiserver_url == "https://127.0.0.1:6443"
    assert s.endpoints().external_kubernetes
