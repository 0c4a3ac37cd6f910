"""Prometheus metrics of the chain-writer (served by whichever process runs it, e.g. the operator).

Label values are bounded: `event` is one of the writer's fixed event names.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

__all__ = ["BATCH_VERDICTS", "EVENTS", "UNCONFIRMED"]

EVENTS = Counter(
    "trustcap_chain_writer_events",
    "Chain-writer events: sent, resent, replaced, underpriced, rpc_unavailable, confirmed.",
    ["event"],
)
UNCONFIRMED = Gauge("trustcap_chain_writer_unconfirmed_batches", "Sealed batches not yet confirmed on chain.")
BATCH_VERDICTS = Gauge("trustcap_chain_writer_last_batch_verdicts", "Verdicts in the last sealed batch.")
