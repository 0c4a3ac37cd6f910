"""AuditRules against the real auditctl and the kernel's audit rule list (root, auditd's auditctl).

The unit tests in test_audit_rules.py fake the runner; these check what the fake assumes: that one
`auditctl -R` file loads the settings and every rule, that auditctl stops at a refused line with the
lines before it in effect and exits non-zero, and that removal by key leaves the kernel as found.
Each test uses its own key and a uid no account has, so it cannot touch a live run's rules.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

import pytest

from trustcap.agent import audit_rules
from trustcap.agent.audit_rules import KEY_PREFIX, AuditRules, rule_args, rule_keys, status


def _usable() -> str:
    if os.geteuid() != 0:
        return "needs root (auditctl talks to the kernel's audit netlink socket)"
    if shutil.which("auditctl") is None:
        return "auditctl is not installed (Debian package auditd)"
    done = subprocess.run(["auditctl", "-s"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"kernel audit unavailable: {done.stderr.strip()[:200]}"
    if "enabled 2" in done.stdout:
        return "kernel audit configuration is locked (enabled 2)"
    return ""


pytestmark = pytest.mark.skipif(bool(_usable()), reason=_usable() or "usable")


def _fresh() -> tuple[int, str]:
    return 1_999_000_000 + secrets.randbelow(900_000), KEY_PREFIX + secrets.token_hex(6)


def _ours(key: str) -> list[str]:
    listing = subprocess.run(["auditctl", "-l"], capture_output=True, text=True, check=True).stdout
    return [line for line in listing.splitlines() if f"key={key}" in line]


def _settings() -> tuple[int, int]:
    st = status()
    return st["enabled"], st["backlog_limit"]


def test_one_rules_file_loads_every_rule_and_removal_leaves_the_kernel_as_found() -> None:
    uid, key = _fresh()
    before = _settings()
    rules = AuditRules(uid, key)
    assert rules.install() == ""
    try:
        loaded = _ours(key)
        assert len(loaded) == len(rule_args(uid, key)) == 8
        assert all(f"uid={uid}" in line for line in loaded)
        assert {"arch=b64" in line for line in loaded} == {True, False}  # both ABIs
        assert sum("exit=-EROFS" in line or "exit=-30" in line for line in loaded) == 2
        enabled, backlog = _settings()
        assert enabled == 1 and backlog >= AuditRules.BACKLOG
        assert key in rule_keys()
    finally:
        problems = rules.remove()
    assert problems == []
    assert _ours(key) == []
    after = _settings()
    # audit stays on if another run's rules are live (rules.remove leaves it for them)
    assert after[1] == before[1] and (after[0] == before[0] or rule_keys())


def test_a_line_auditctl_refuses_midway_leaves_no_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the fake's -R assumes, on the real auditctl: the lines before the refused one (the settings
    and two rules) are in effect, auditctl exits non-zero; install states why and removes what came in."""
    uid, key = _fresh()
    real = audit_rules.rule_args

    def with_a_bad_rule(u: int, k: str) -> list[list[str]]:
        good = real(u, k)
        bad = ["-a", "always,exit", "-F", "arch=b64", "-F", f"uid={u}", "-S", "no_such_syscall", "-k", k]
        return [*good[:2], bad, *good[2:]]

    seen: list[list[str]] = []

    def watching(args: list[str]) -> str:
        if args[:1] == ["-R"]:
            seen.append(_ours(key))  # before: nothing of ours
            try:
                return audit_rules._auditctl(args)
            finally:
                seen.append(_ours(key))  # after the refused line: the lines before it are in
        return audit_rules._auditctl(args)

    monkeypatch.setattr(audit_rules, "rule_args", with_a_bad_rule)
    before = _settings()
    why = AuditRules(uid, key, run=watching).install()
    assert why.startswith("kernel audit unavailable: auditctl -R") and "no_such_syscall" in why
    assert len(seen) == 2 and seen[0] == [] and len(seen[1]) == 2
    assert _ours(key) == []
    after = _settings()
    assert after[1] == before[1] and (after[0] == before[0] or rule_keys())
