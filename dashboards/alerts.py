"""Prometheus alert rules of trustcap, as code: the one home of every rule expression.

`dashboards/build.py` writes them to `dashboards/out/alerts.yaml`, a Prometheus rule file (`groups:`),
which serves three readers without a copy:

- `promtool check rules dashboards/out/alerts.yaml` (tests/test_chart.py runs it);
- the chart's PrometheusRule (templates/prometheusrule.yaml reads the file with `.Files.Get`);
- e2e/observe, which loads the file into a real Prometheus and checks every rule is evaluated healthy.

Each rule is written as a *signal* (a PromQL value the world exports all the time) and a *condition*
appended to it (`> 0`): the e2e checks the signal returns data, so an alert never silently watches a
metric nobody serves. Names come from operator/metrics.py, gateway/relay.py, gateway/monitor.py,
gateway/agent_metrics.py, agent/metrics.py (through the gateways), trustcap/chain/metrics.py and
netboot/store.py; tests/test_dashboards.py checks each against the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

# Where each alert is explained, relative to the repository (the chart carries no outside address).
RUNBOOK: Final = "docs/observability.md"


@dataclass(frozen=True)
class Alert:
    name: str
    signal: str               # a PromQL value that has series whenever the component runs
    condition: str            # appended to the signal: the alert fires for the series it keeps
    summary: str
    description: str          # may use {{ $labels.x }} and {{ $value }} (Prometheus templating)
    severity: str = "warning"
    for_: str = "0m"
    exported_by: str = "operator"  # which component serves the signal's metrics: operator, gateway (also
    # the agents' trustcap_agent_*, which reach Prometheus through their gateways) or netboot
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def expr(self) -> str:
        return f"{self.signal} {self.condition}"

    def rule(self) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": self.for_,
            "labels": {"severity": self.severity, **self.labels},
            "annotations": {"summary": self.summary, "description": self.description,
                            "runbook": f"{RUNBOOK}#{self.name.lower()}"},
        }


TRUST: Final = (
    Alert("TrustcapNodeQuarantined",
          'max by (node) (trustcap_hpcnode_phase{phase="Quarantined"})', "> 0",
          "HPCNode {{ $labels.node }} is quarantined",
          "The operator put HPCNode {{ $labels.node }} in Quarantined (a failed enrolment or monitoring "
          "check). Quarantine is sticky: read `kubectl get hpcnode {{ $labels.node }} -o "
          "jsonpath='{.status.quarantineReason}'`, fix the node, then clear the phase by hand.",
          severity="critical"),
    Alert("TrustcapNodeUntrusted",
          "min by (node) (trustcap_gateway_node_trusted)", "== 0",
          "The gateway of {{ $labels.node }} no longer trusts it",
          "The last monitoring check of {{ $labels.node }} by its gateway failed or is stale; committees "
          "will not pick the node. See the gateway's journal and `kubectl describe hpcnode {{ $labels.node }}`.",
          for_="5m", exported_by="gateway"),
    Alert("TrustcapBootRefused",
          "sum by (reason) (increase(trustcap_netboot_refused_total[10m]))", "> 0",
          "netboot refused boot files ({{ $labels.reason }})",
          "netboot refused {{ $value }} boot file requests in 10 minutes because of {{ $labels.reason }}: a "
          "file whose digest no approved BootImage lists, or a path outside the boot root.",
          exported_by="netboot"),
)

ATTESTATION: Final = (
    Alert("TrustcapQuorumFailures",
          'sum by (phase) (increase(trustcap_attestation_rounds_decided_total{result=~"Failed|Expired"}[15m]))',
          "> 0",
          "Attestation rounds ({{ $labels.phase }}) fail to reach a passing quorum",
          "{{ $value }} {{ $labels.phase }} rounds were decided Failed or Expired in 15 minutes: a committee "
          "could not reach its quorum of passing verdicts. `kubectl get attestations -A` shows which.",
          severity="critical"),
)

CHAIN: Final = (
    Alert("TrustcapChainWriterLagging",
          "sum(trustcap_chain_records_pending)", "> 0",
          "The chain-writer has not recorded {{ $value }} decided rounds for 10 minutes",
          "Decided Attestations are waiting for their chain record. Check the RPC endpoint and the "
          "operator's log (chain-writer events), and that a quorum of gateways co-signs batches.",
          for_="10m"),
    Alert("TrustcapChainBatchesUnconfirmed",
          "sum(trustcap_chain_writer_unconfirmed_batches)", "> 0",
          "{{ $value }} sealed batches are not confirmed on chain",
          "The chain-writer sent batches the chain has not confirmed for 10 minutes (gas price, RPC down, "
          "nonce gap). `trustcap_chain_writer_events_total` says which.",
          for_="10m"),
)

AGENT: Final = (
    Alert("TrustcapAgentWipeUnverified",
          'sum by (node) (increase(trustcap_agent_wipe_duration_seconds_count{verified="false"}[15m]))', "> 0",
          "A capsule run's wipe on {{ $labels.node }} did not verify",
          "The executor on {{ $labels.node }} could not prove the wipe after {{ $value }} runs in 15 minutes "
          "(scratch read-back, containers, or the engine's state differing from before the run); those runs' "
          "results are withheld. Read the CapsuleRun's status.wipe, and reboot the HPC (the reboot wipe) before "
          "it takes another capsule.",
          severity="critical", exported_by="gateway"),
    Alert("TrustcapAgentIsolationViolations",
          "sum by (node, kind) (increase(trustcap_agent_audit_violations_total[15m]))", "> 0",
          "A capsule on {{ $labels.node }} attempted {{ $labels.kind }} violations",
          "The executor on {{ $labels.node }} saw {{ $value }} isolation violations of kind {{ $labels.kind }} in "
          "15 minutes (kernel audit, seccomp, cgroup limits, egress). The run was stopped; its CapsuleRun names the "
          "capsule. Look at who submitted it.",
          exported_by="gateway"),
    Alert("TrustcapAgentMetricsStale",
          "time() - max by (node) (trustcap_gateway_agent_metrics_last_success_timestamp_seconds)", "> 300",
          "The gateway of {{ $labels.node }} has no metrics from its agent for {{ $value | humanizeDuration }}",
          "The agent did not answer the gateway's metrics request, or its answer broke a bound and was refused "
          "(trustcap_gateway_agent_metrics_refused_total says which). A rebooting HPC is expected to; one that "
          "stays silent is not.",
          exported_by="gateway"),
)

OPERATOR: Final = (
    Alert("TrustcapOperatorMetricsStale",
          "time() - max(trustcap_operator_metrics_last_refresh_timestamp_seconds)", "> 300",
          "The operator has not listed the cluster for {{ $value | humanizeDuration }}",
          "Every metric above is read from a list of the cluster's objects; the operator could not list "
          "them (RBAC, API server down). See trustcap_operator_metrics_refresh_errors_total and its log."),
)

GROUPS: Final = {"trustcap.trust": TRUST, "trustcap.attestation": ATTESTATION, "trustcap.chain": CHAIN,
                 "trustcap.agent": AGENT, "trustcap.operator": OPERATOR}


def alerts() -> list[Alert]:
    return [a for group in GROUPS.values() for a in group]


def rule_file() -> dict[str, Any]:
    """The Prometheus rule file: the same `groups` a PrometheusRule's spec carries."""
    return {"groups": [{"name": name, "rules": [a.rule() for a in group]} for name, group in GROUPS.items()]}
