"""The agent's own Prometheus metrics (`trustcap_agent_*`), served to its gateway over the channel.

Nobody scrapes the HPC: on a real network only the agent channel crosses the Pi-HPC link (the link
guard drops everything else), so the agent has no /metrics port. It keeps its own registry, and its
`metrics` channel operation answers that registry's text exposition; the gateway takes it in, bounds
it and re-exports it from its relay's /metrics with a `node` label (trustcap.gateway.agent_metrics,
decision 0117).

    Prometheus -- GET /metrics --> gateway relay (last snapshot, node="hpc-1")
                                   gateway AgentMetricsPoller -- REQ metrics {} ==> agent
                                                              <== {exposition} =====  REGISTRY below

A registry of its own, not prometheus_client's default one: the default carries the process and
platform collectors, which would only fill the gateway's series budget for this node. Every label has
a fixed set of values (a run's reason, a violation's kind, a wipe's outcome), all made at import, so
every series exists from the first scrape and a run can add no new one.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

__all__ = ["REGISTRY", "exposition", "observe_run", "observe_violation", "observe_wipe"]

REGISTRY: Final = CollectorRegistry(auto_describe=True)

# trustcap.agent.run.REASONS (kept here, not imported: run imports this module to observe its runs).
REASONS: Final = ("Completed", "Timeout", "Failed", "InputRejected", "Stopped")
# The kinds the executor reports (agent/executor.py, agent/audit_netlink.py, audit_rules.SYSCALL_KIND_*,
# the egress attacher); anything else is counted as "other", so a new kind cannot add series unbounded.
KINDS: Final = ("write", "device", "egress", "memory", "pids", "kernel", "kexec", "module", "mount",
                "namespace", "privilege", "ptrace", "socket", "syscall", "other")

RUNS: Final = Counter("trustcap_agent_runs", "Capsule runs on this HPC that ended, by the run's reason.",
                      ["reason"], registry=REGISTRY)
RUN_SECONDS: Final = Histogram("trustcap_agent_run_duration_seconds",
                               "A capsule run on this HPC from its order to its result (inputs opened, run, "
                               "wipe, results sealed).", registry=REGISTRY,
                               buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
WIPE_SECONDS: Final = Histogram("trustcap_agent_wipe_duration_seconds",
                                "The executor's teardown after a run (audit rules, containers, scratch overwrite "
                                "and read-back, post-state), by whether the wipe verified.", ["verified"],
                                registry=REGISTRY, buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
VIOLATIONS: Final = Counter("trustcap_agent_audit_violations",
                            "Isolation violations the executor saw in capsule runs (kernel audit, seccomp, "
                            "cgroup limits, egress), by kind.", ["kind"], registry=REGISTRY)

for _reason in REASONS:
    RUNS.labels(_reason)
for _kind in KINDS:
    VIOLATIONS.labels(_kind)
for _verified in ("true", "false"):
    WIPE_SECONDS.labels(_verified)


def observe_run(reason: str, seconds: float) -> None:
    RUNS.labels(reason if reason in REASONS else "Failed").inc()
    RUN_SECONDS.observe(max(0.0, seconds))


def observe_violation(kind: str, count: int = 1) -> None:
    VIOLATIONS.labels(kind if kind in KINDS else "other").inc(max(0, count))


def observe_wipe(seconds: float, *, verified: bool) -> None:
    WIPE_SECONDS.labels("true" if verified else "false").observe(max(0.0, seconds))


def exposition() -> str:
    """The registry in Prometheus's text format: the `metrics` channel operation's answer."""
    return generate_latest(REGISTRY).decode()
