"""The isolation spec, endpoint parsing, the seccomp profile, audit parsing and docker-error mapping."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from docker import errors as derr

from trustcap.agent import audit, engine
from trustcap.agent.errors import AgentError, EngineError, ImageMissing, IsolationError
from trustcap.agent.isolation import IsolationSpec, parse_endpoint, seccomp_profile


@pytest.mark.parametrize(("text", "host", "port"), [
    pytest.param("198.18.1.1:8080", "198.18.1.1", 8080, id="v4"),
    pytest.param("[2001:db8::1]:443", "2001:db8::1", 443, id="v6"),
])
def test_endpoints_parse(text: str, host: str, port: int) -> None:
    e = parse_endpoint(text)
    assert (e.host, e.port) == (host, port)


@pytest.mark.parametrize(("text", "why"), [
    pytest.param("example.com:443", "must be an IP address", id="name-not-ip"),
    pytest.param("198.18.1.1:0", "outside 1..65535", id="port-zero"),
    pytest.param("198.18.1.1:70000", "outside 1..65535", id="port-too-big"),
    pytest.param("198.18.1.1", "expected HOST:PORT", id="no-port"),
    pytest.param("", "expected HOST:PORT", id="empty"),
])
def test_bad_endpoints_name_the_cause(text: str, why: str) -> None:
    with pytest.raises(IsolationError, match=why):
        parse_endpoint(text)


@pytest.mark.parametrize(("field", "value"), [
    pytest.param("timeout_s", 0, id="zero-timeout"),
    pytest.param("memory_bytes", 1024, id="tiny-memory"),
    pytest.param("pids_limit", 0, id="no-pids"),
    pytest.param("user", "root", id="root-user"),
    pytest.param("user", "0:0", id="uid-0"),
    pytest.param("on_violation", "ignore", id="bad-policy"),
    pytest.param("command", (), id="empty-command"),
])
def test_bad_spec_names_the_field(field: str, value: Any) -> None:
    kw: dict[str, Any] = {"image": "img", "command": ("true",), field: value}
    with pytest.raises(IsolationError, match=field):
        IsolationSpec(**kw)


def test_container_settings_carry_every_isolation_control() -> None:
    s = IsolationSpec(image="img", command=("true",), memory_bytes=64 << 20).container_settings()
    assert s["read_only"] is True and s["cap_drop"] == ["ALL"] and s["privileged"] is False
    assert "no-new-privileges:true" in s["security_opt"] and s["devices"] == []
    assert s["memswap_limit"] == s["mem_limit"] == 64 << 20  # no swap
    assert s["user"] == "65534:65534" and s["pids_limit"] == 64
    assert s["log_config"]["config"]["max-size"]


@pytest.mark.parametrize(("allow_inet", "inet_logged", "inet_allowed"), [
    pytest.param(False, 2, 0, id="no-egress-inet-logged"),
    pytest.param(True, 0, 4, id="egress-inet-allowed"),
])
def test_seccomp_profile(allow_inet: bool, inet_logged: int, inet_allowed: int) -> None:
    prof = json.loads(seccomp_profile(allow_inet=allow_inet))
    by_name: dict[str, set[str]] = {}
    for r in prof["syscalls"]:
        for n in r["names"]:
            by_name.setdefault(n, set()).add(r["action"])
    for call in ("mount", "init_module", "finit_module", "kexec_load", "setuid", "mknodat"):
        assert by_name[call] == {"SCMP_ACT_LOG"}, call  # refused by dropped caps, logged by seccomp
    for call in ("ptrace", "unshare", "setns", "bpf", "userfaultfd", "keyctl"):
        assert by_name[call] == {"SCMP_ACT_KILL_PROCESS"}, call
    assert by_name["clone3"] == {"SCMP_ACT_ERRNO"}
    inet = [r for r in prof["syscalls"] if r["names"] == ["socket"] and r["args"][0]["index"] == 0
            and r["args"][0]["value"] in (2, 10)]
    assert sum(r["action"] == "SCMP_ACT_LOG" for r in inet) == inet_logged
    assert sum(r["action"] == "SCMP_ACT_ALLOW" for r in inet) == inet_allowed
    assert "comment" not in prof


def test_seccomp_profile_is_an_allowlist() -> None:
    """Issue 12 item 20: what the profile does not name fails (EPERM, as Docker's default), and no call is
    both allowed outright and caught by an attempt rule (libseccomp would keep only one of them)."""
    prof = json.loads(seccomp_profile(allow_inet=False))
    assert prof["defaultAction"] == "SCMP_ACT_ERRNO" and prof["defaultErrnoRet"] == 1
    unconditional: dict[str, list[str]] = {}
    for r in prof["syscalls"]:
        if not r.get("args"):
            for n in r["names"]:
                unconditional.setdefault(n, []).append(r["action"])
    assert all(len(actions) == 1 for actions in unconditional.values()), \
        {n: a for n, a in unconditional.items() if len(a) > 1}
    allowed = {n for n, a in unconditional.items() if a == ["SCMP_ACT_ALLOW"]}
    assert {"read", "write", "execve", "mmap", "futex", "exit_group"} <= allowed  # positive control
    for never in ("personality", "socket", "clone", "ptrace", "io_uring_setup", "kexec_load", "mount",
                  "process_madvise", "pidfd_getfd", "add_key", "quotactl", "settimeofday"):
        assert never not in allowed, never
    persona = [r["args"][0]["value"] for r in prof["syscalls"] if r["names"] == ["personality"]]
    assert 0x0040000 not in persona and 0xFFFFFFFF in persona  # ADDR_NO_RANDOMIZE refused, the query allowed


@pytest.mark.parametrize(("line", "kind", "name"), [
    pytest.param('audit: type=1326 audit(1795749305.952:2): auid=4294967295 uid=65534 gid=65534 ses=4294967295 '
                 'pid=19478 comm="hostile" exe="/usr/local/bin/hostile" sig=0 arch=c000003e syscall=165 compat=0 '
                 'ip=0x7f56b7e40e5a code=0x7ffc0000', "mount", "mount", id="mount-logged"),
    pytest.param('audit: type=1326 audit(1795749305.952:3): auid=4294967295 uid=65534 gid=65534 ses=4294967295 '
                 'pid=1 comm="hostile" exe="/x" sig=31 arch=c000003e syscall=101 compat=0 ip=0x1 code=0x80000000',
                 "ptrace", "ptrace", id="ptrace-killed"),
])
def test_audit_records_parse(line: str, kind: str, name: str) -> None:
    ev = audit.parse(line)
    assert ev is not None and (ev.kind, ev.name) == (kind, name)


def test_audit_ignores_clone3_fallback_and_other_lines() -> None:
    assert audit.parse('type=1326 audit(1.0:1): pid=1 comm="x" exe="/x" sig=0 syscall=435 compat=0 '
                       'code=0x50026') is None
    assert audit.parse("EXT4-fs (loop0): mounted filesystem") is None
    pe = audit.parse_pids("cgroup: fork rejected by pids controller in /trustcap-abc/123")
    assert pe is not None and pe.cgroup == "/trustcap-abc/123"


@pytest.mark.parametrize("exc", [
    pytest.param(derr.ImageNotFound("no such image"), id="ImageNotFound"),
    pytest.param(derr.NotFound("gone"), id="NotFound"),
    pytest.param(derr.APIError("500"), id="APIError"),
    pytest.param(derr.DockerException("boom"), id="DockerException"),
    pytest.param(derr.InvalidArgument("bad"), id="InvalidArgument"),
    pytest.param(requests.exceptions.ConnectionError("refused"), id="ConnectionError"),
    pytest.param(requests.exceptions.ReadTimeout("slow"), id="ReadTimeout"),
])
def test_every_docker_error_is_translated(exc: Exception) -> None:
    with pytest.raises(AgentError) as info, engine.translate("doing a thing"):
        raise exc
    assert isinstance(info.value, EngineError) and "doing a thing" in str(info.value)
    assert info.value.__cause__ is exc
    if isinstance(exc, derr.ImageNotFound):
        assert isinstance(info.value, ImageMissing)


def _make(cls: type[BaseException]) -> BaseException:
    if cls is derr.ContainerError:
        return derr.ContainerError("c", 1, "cmd", "img", b"err")
    if cls is derr.BuildError:
        return derr.BuildError("failed", [])
    return cls("x")


def test_upstream_error_list_is_covered() -> None:
    for cls in engine.UPSTREAM_ERRORS:
        with pytest.raises(EngineError), engine.translate("x"):
            raise _make(cls)
