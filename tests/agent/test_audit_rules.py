"""Syscall-exit audit: which kernel records become violations, and the rules' install/remove discipline.

Records below are recorded from this kernel (6.18) during a capsule run (docs/decisions/0045); the
auditctl runner is faked (our own wrapper), so nothing here touches the kernel.
"""

from __future__ import annotations

import struct

import pytest

from trustcap.agent import audit, audit_rules
from trustcap.agent.audit import AuditRules, AuditStream, FileEvent, file_violation, rule_args
from trustcap.agent.executor import run_uid
from trustcap.agent.isolation import IsolationSpec

UID = 1000000123
KEY = "trustcap-0123456789ab"
SYSCALL = ('audit(1795751601.212:{serial}): arch=c000003e syscall={sc} success=no exit={exit} a0=ffffff9c '
           'a1=557cc0d3a5a8 a2=241 a3=1b6 items=1 ppid=12507 pid=12529 auid=4294967295 uid={uid} gid={uid} '
           'euid={uid} suid={uid} fsuid={uid} egid={uid} sgid={uid} fsgid={uid} tty=(none) ses=4294967295 '
           'comm="sh" exe="/usr/bin/dash" key={key}')
CWD = 'audit(1795751601.212:{serial}): cwd="{cwd}"'
PATH = ('audit(1795751601.212:{serial}): item=0 name={name} inode=950431 dev=00:27 mode=040755 ouid=0 ogid=0 '
        'rdev=00:00 nametype={nametype} cap_fp=0 cap_fi=0 cap_fe=0 cap_fver=0 cap_frootid=0')
EOE = "audit(1795751601.212:{serial}): "


def ev(exit: int, name: str, nametype: str = "NORMAL", *, cwd: str = "/", sc: int = 257,
       arch: str = "x86_64", flags: int | None = 0) -> FileEvent:
    paths = ((name, nametype),) if name else ()
    return FileEvent(ts=1.0, pid=7, uid=UID, comm="sh", exe="/usr/bin/dash", arch=arch, syscall=sc, exit=exit,
                     key=KEY, cwd=cwd, paths=paths, flags=flags)


@pytest.mark.parametrize(("event", "expected"), [
    pytest.param(ev(-30, "/etc/passwd"), ("write", "openat /etc/passwd by sh (/usr/bin/dash)"),
                 id="erofs-existing-file-full-path"),
    pytest.param(ev(-30, "/etc/", "PARENT"), ("write", "openat entry in /etc/ by sh (/usr/bin/dash)"),
                 id="erofs-new-file-names-its-directory"),
    pytest.param(ev(-30, "/etc", "PARENT", cwd="/etc"), ("write", "openat entry in /etc/ by sh (/usr/bin/dash)"),
                 id="erofs-relative-create"),
    pytest.param(ev(-30, "/usr/", "PARENT", sc=83), ("write", "mkdir entry in /usr/ by sh (/usr/bin/dash)"),
                 id="erofs-mkdir"),
    pytest.param(ev(-30, "/bin/sh", sc=268), ("write", "fchmodat /bin/sh by sh (/usr/bin/dash)"), id="erofs-chmod"),
    pytest.param(ev(-30, "", sc=77), ("write", "ftruncate on an open file by sh (/usr/bin/dash)"),
                 id="erofs-ftruncate-no-path"),
    pytest.param(ev(-30, "/etc/x", sc=8, arch="i386"), ("write", "creat /etc/x by sh (/usr/bin/dash)"),
                 id="erofs-i386-abi"),
    pytest.param(ev(-30, "/etc/x", sc=999), ("write", "syscall 999 (x86_64) /etc/x by sh (/usr/bin/dash)"),
                 id="erofs-unknown-syscall-still-reported"),
    pytest.param(ev(-2, "/dev/sda", "UNKNOWN"), ("device", "openat /dev/sda by sh (/usr/bin/dash)"),
                 id="enoent-dev"),
    pytest.param(ev(-2, "../dev/vda", "UNKNOWN", cwd="/scratch"), ("device", "openat /dev/vda by sh (/usr/bin/dash)"),
                 id="enoent-dev-relative"),
    pytest.param(ev(-2, "sda", "UNKNOWN", cwd="/dev"), ("device", "openat /dev/sda by sh (/usr/bin/dash)"),
                 id="enoent-dev-from-cwd"),
    pytest.param(ev(-2, "//dev/./nvme0n1", "UNKNOWN"), ("device", "openat /dev/nvme0n1 by sh (/usr/bin/dash)"),
                 id="enoent-dev-doubled-slash"),
    pytest.param(ev(-2, "/proc/self/root/dev/loop0", "UNKNOWN"), ("device", "openat /dev/loop0 by sh (/usr/bin/dash)"),
                 id="enoent-dev-via-proc-root"),
    pytest.param(ev(-13, "/dev/mem", "UNKNOWN", sc=2), ("device", "open /dev/mem by sh (/usr/bin/dash)"),
                 id="eacces-dev"),
    pytest.param(ev(-13, "/etc/passwd", flags=0o2101), ("write", "openat /etc/passwd by sh (/usr/bin/dash)"),
                 id="eacces-append-to-existing-file"),
    pytest.param(ev(-13, "passwd", cwd="/etc", sc=2, flags=0o2), ("write", "open /etc/passwd by sh (/usr/bin/dash)"),
                 id="eacces-rdwr-relative"),
    pytest.param(ev(-13, "/etc/shadow", flags=0), None, id="eacces-read-is-not-a-write"),
    pytest.param(ev(-13, "/etc/shadow", sc=437, flags=None), None, id="eacces-openat2-flags-unknown"),
    pytest.param(ev(-2, "/nodir/x", flags=0o101), None, id="enoent-create-in-missing-dir"),
    pytest.param(ev(-2, "/usr/lib/locale/locale-archive", "UNKNOWN"), None, id="enoent-ordinary-is-noise"),
    pytest.param(ev(-2, "/devices/x", "UNKNOWN"), None, id="enoent-dev-prefix-lookalike"),
    pytest.param(ev(-2, "/dev/sda", "UNKNOWN", sc=4), None, id="enoent-dev-not-an-open"),
])
def test_file_violation(event: FileEvent, expected: tuple[str, str] | None) -> None:
    assert file_violation(event) == expected


def test_fields_decode_quoted_and_hex_encoded_values() -> None:
    f = audit.fields('name="/etc/passwd" comm=6576696C20736820 cwd="/" key=(null) exit=-30 a0=ffffff9c')
    assert f == {"name": "/etc/passwd", "comm": "evil sh ", "cwd": "/", "key": "(null)", "exit": "-30",
                 "a0": "ffffff9c"}


def _feed(stream: AuditStream, serial: int, *, uid: int = UID, key: str = f'"{KEY}"', exit: int = -30,
          name: str = '"/etc/passwd"', nametype: str = "NORMAL", cwd: str = "/", eoe: bool = True) -> None:
    stream.feed(1300, SYSCALL.format(serial=serial, sc=257, exit=exit, uid=uid, key=key))
    stream.feed(1307, CWD.format(serial=serial, cwd=cwd))
    stream.feed(1302, PATH.format(serial=serial, name=name, nametype=nametype))
    stream.feed(1327, f"audit(1795751601.212:{serial}): proctitle=7368")
    if eoe:
        stream.feed(1320, EOE.format(serial=serial))


def test_stream_keeps_only_this_runs_records() -> None:
    s = AuditStream(UID, KEY)
    _feed(s, 1)                                       # ours: write to /etc/passwd
    _feed(s, 2, key='"trustcap-ffffffffffff"')        # another run's rule
    _feed(s, 3, uid=UID + 1)                          # another uid
    _feed(s, 4, key="(null)")                         # a record no rule of ours made
    _feed(s, 5, exit=-2, name='"/usr/lib/locale/C.UTF-8/LC_CTYPE"', nametype="UNKNOWN")  # ordinary ENOENT
    _feed(s, 9, exit=-13, name='"/etc/shadow"')       # a2=0x241: O_WRONLY|O_CREAT|O_TRUNC, refused by mode
    _feed(s, 6, exit=-2, name='"../dev/sda"', nametype="UNKNOWN", cwd="/scratch", eoe=False)  # EOE never came
    s.feed(1326, f'audit(1.0:7): auid=4294967295 uid={UID} gid={UID} ses=1 pid=9 comm="h" exe="/h" sig=0 '
                 'arch=c000003e syscall=165 compat=0 ip=0x1 code=0x7ffc0000')
    s.feed(1326, 'audit(1.0:8): auid=4294967295 uid=0 gid=0 ses=1 pid=9 comm="h" exe="/h" sig=0 '
                 'arch=c000003e syscall=165 compat=0 ip=0x1 code=0x7ffc0000')
    got = s.drain()
    s.stop()  # finishes event 6, whose EOE never arrived: never dropped
    got += s.drain()
    files = [file_violation(e) for e in got if isinstance(e, FileEvent)]
    assert files == [("write", "openat /etc/passwd by sh (/usr/bin/dash)"),
                     ("write", "openat /etc/shadow by sh (/usr/bin/dash)"),
                     ("device", "openat /dev/sda by sh (/usr/bin/dash)")]
    seccomp = [e for e in got if isinstance(e, audit.SeccompEvent)]
    assert [(e.uid, e.name) for e in seccomp] == [(UID, "mount")]


def test_netlink_datagram_split() -> None:
    def msg(t: int, text: bytes) -> bytes:
        body = struct.pack("=IHHII", 16 + len(text), t, 0, 0, 0) + text
        return body + b"\0" * (-len(body) % 4)
    data = msg(1300, b"audit(1.0:1): x=1") + msg(1320, b"audit(1.0:1): ")
    assert audit.parse_netlink(data) == [(1300, "audit(1.0:1): x=1"), (1320, "audit(1.0:1): ")]
    assert audit.parse_netlink(b"\x01\x02") == []


def test_rules_cover_both_abis_and_name_the_run() -> None:
    rules = rule_args(UID, KEY)
    assert all(["-F", f"uid={UID}"] == r[4:6] and r[-2:] == ["-k", KEY] for r in rules)
    for arch in ("arch=b64", "arch=b32"):
        mine = [r for r in rules if arch in r]
        assert ["-S", "all", "-F", "exit=-30"] == mine[0][6:10]  # every syscall that hits the read-only root
        assert {r[9] for r in mine[1:]} == {"exit=-2", "exit=-13", "exit=-1"}
        assert all(r[7] == "open,openat,openat2" for r in mine[1:])


class FakeAuditctl:
    """Stands in for our `_auditctl` wrapper: keeps rules and settings like the kernel would. `-R FILE`
    reads the file the code wrote and applies it line by line, stopping at the first refused line with
    an error, as auditctl does (tests/agent/test_audit_rules_auditctl.py checks that on the real one)."""

    def __init__(self, enabled: int = 0, backlog: int = 64, fail_on: str = "") -> None:
        self.enabled, self.backlog, self.lost, self.fail_on = enabled, backlog, 0, fail_on
        self.rules: list[list[str]] = []
        self.calls: list[list[str]] = []
        self.files: list[list[str]] = []  # the lines of each rules file given with -R

    def __call__(self, args: list[str]) -> str:
        self.calls.append(args)
        if args[0] == "-R":
            with open(args[1]) as f:
                lines = f.read().splitlines()
            self.files.append(lines)
            for n, line in enumerate(lines, 1):
                try:
                    self._apply(line.split(" "))
                except OSError as exc:
                    raise OSError(f"auditctl -R {args[1]}: {exc}; There was an error in line {n}") from exc
            return ""
        return self._apply(args)

    def _apply(self, args: list[str]) -> str:
        if self.fail_on and self.fail_on in args:
            raise OSError(f"auditctl {' '.join(args)}: Operation not supported")
        if args == ["-s"]:
            return f"enabled {self.enabled}\nfailure 1\npid 0\nbacklog_limit {self.backlog}\nlost {self.lost}\n" \
                   "loginuid_immutable 0 unlocked\n"
        if args == ["-l"]:
            return "\n".join(f"-a always,exit -F key={r[-1]}" for r in self.rules) or "No rules"
        if args[0] == "-e":
            self.enabled = int(args[1])
        elif args[0] == "-b":
            self.backlog = int(args[1])
        elif args[0] == "-a":
            self.rules.append(args)
        elif args[:2] == ["-D", "-k"]:
            self.rules = [r for r in self.rules if r[-1] != args[2]]
        return ""


def test_install_then_remove_leaves_audit_as_found() -> None:
    fake = FakeAuditctl(enabled=0, backlog=64)
    rules = AuditRules(UID, KEY, run=fake)
    assert rules.install() == ""
    assert fake.enabled == 1 and fake.backlog == AuditRules.BACKLOG and len(fake.rules) == 8
    assert audit.rule_keys(fake) == {KEY}
    fake.lost = 3
    assert rules.lost_since_install() == 3
    assert rules.remove() == []
    assert fake.rules == [] and fake.enabled == 0 and fake.backlog == 64


def test_install_is_one_status_and_one_rules_file() -> None:
    """The settings and all rules go in one auditctl process (a rules file), settings first: the rules
    must not be loaded while audit is still off."""
    fake = FakeAuditctl(enabled=0, backlog=64)
    assert AuditRules(UID, KEY, run=fake).install() == ""
    assert [c[0] for c in fake.calls] == ["-s", "-R"]
    (lines,) = fake.files
    assert lines[:2] == ["-e 1", f"-b {AuditRules.BACKLOG}"]
    assert lines[2:] == [" ".join(r) for r in rule_args(UID, KEY)]


def test_settings_already_right_are_not_touched() -> None:
    fake = FakeAuditctl(enabled=1, backlog=AuditRules.BACKLOG * 2)
    rules = AuditRules(UID, KEY, run=fake)
    assert rules.install() == ""
    assert fake.files[0] == [" ".join(r) for r in rule_args(UID, KEY)]
    assert rules.remove() == []
    assert fake.enabled == 1 and fake.backlog == AuditRules.BACKLOG * 2 and fake.rules == []


def test_a_line_refused_midway_leaves_no_rule_and_restores_settings() -> None:
    """auditctl -R stops at the refused line with the lines before it in effect: settings changed and
    some rules loaded. The reason is stated and all of it is undone."""
    fake = FakeAuditctl(enabled=0, backlog=64, fail_on=f"exit=-{audit_rules.EACCES}")
    assert "kernel audit unavailable" in AuditRules(UID, KEY, run=fake).install()
    assert fake.rules == [] and fake.enabled == 0 and fake.backlog == 64
    assert ["-D", "-k", KEY] in fake.calls


def test_a_blank_in_an_argument_is_refused_before_auditctl_runs() -> None:
    fake = FakeAuditctl()
    with pytest.raises(ValueError, match="blank"):
        audit_rules.load([["-a", "always,exit", "-k", "a b"]], fake)
    with pytest.raises(ValueError, match="blank"):
        audit_rules.load([["-a", "always,exit\n-D"]], fake)
    assert fake.calls == []


def test_audit_left_on_while_another_runs_rules_are_live() -> None:
    fake = FakeAuditctl(enabled=0)
    fake.rules.append(["-a", "always,exit", "-k", "trustcap-aaaaaaaaaaaa"])
    rules = AuditRules(UID, KEY, run=fake)
    assert rules.install() == ""
    assert rules.remove() == []
    assert fake.enabled == 1 and audit.rule_keys(fake) == {"trustcap-aaaaaaaaaaaa"}


@pytest.mark.parametrize(("fake", "why"), [
    pytest.param(FakeAuditctl(enabled=2), "locked (enabled 2)", id="locked"),
    pytest.param(FakeAuditctl(fail_on="-a"), "kernel audit unavailable: auditctl -R", id="rule-refused"),
    pytest.param(FakeAuditctl(fail_on="-s"), "kernel audit unavailable", id="status-unreadable"),
])
def test_install_failure_is_a_stated_reason_and_leaves_nothing(fake: FakeAuditctl, why: str) -> None:
    before = fake.enabled
    assert why in AuditRules(UID, KEY, run=fake).install()
    assert fake.rules == [] and fake.enabled == before


def test_remove_reports_rules_that_stay() -> None:
    fake = FakeAuditctl()
    rules = AuditRules(UID, KEY, run=fake)
    assert rules.install() == ""
    fake.fail_on = "-D"
    assert rules.remove() == [f"audit rules {KEY} could not be removed"]


def test_run_uid_is_unique_per_run_and_never_root() -> None:
    spec = IsolationSpec(image="img", command=("true",))
    uids = {run_uid(spec, f"{i:012x}") for i in range(0, 1 << 40, (1 << 40) // 997)}
    assert len(uids) == 998 and all(1_000_000_000 <= u < 2_000_000_000 for u in uids if u is not None)
    assert run_uid(IsolationSpec(image="img", command=("true",), user="4242:4242"), "ab") == 4242
    assert run_uid(IsolationSpec(image="img", command=("true",), user="builder"), "ab") is None
