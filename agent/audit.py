"""Kernel audit records: how the executor learns that a capsule attempted something the isolation stopped.

Two sources, and the rules that feed one of them, each in its own module:

    audit_netlink  AuditStream: seccomp denials and the records of our syscall-exit rules, read from the
                   audit netlink multicast group and filtered to the run's own uid
    audit_rules    AuditRules: installs a run's rules (writes that fail with EROFS, failed opens of /dev/
                   paths; decision 0045) through auditctl and removes them, restoring the audit settings
    audit_kmsg     AuditReader: the kernel log, for the pids controller's fork-rejected line, and for
                   seccomp records when the multicast group is unavailable

This module is the one the executor imports: it names the public parts of all three.
"""

from __future__ import annotations

from trustcap.agent.audit_kmsg import AuditReader, PidsEvent, SeccompEvent, parse, parse_pids
from trustcap.agent.audit_netlink import AuditStream, FileEvent, fields, file_violation, normalize, parse_netlink
from trustcap.agent.audit_rules import KEY_PREFIX, AuditRules, rule_args, rule_keys, status

__all__ = ["KEY_PREFIX", "AuditReader", "AuditRules", "AuditStream", "FileEvent", "PidsEvent", "SeccompEvent",
           "fields", "file_violation", "normalize", "parse", "parse_netlink", "parse_pids", "rule_args", "rule_keys",
           "status"]
