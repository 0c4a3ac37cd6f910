"""The chain-writer as a separate process, so the reliability tests can really kill it (SIGKILL).

    python writer_child.py RPC DEPLOYMENT.json JOURNAL.sqlite VERDICTS.json CONFIRMATIONS

Adds every verdict of the file (idempotent), seals and runs until all batches are confirmed. With
TRUSTCAP_CHAIN_KILLPOINT set, the writer kills itself at that point (trustcap.chain.writer).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from chainkit import VERIFIERS, WRITER

from trustcap.chain.client import ChainClient, Deployment
from trustcap.chain.journal import Journal
from trustcap.chain.writer import Writer
from trustcap.evidence.verdict import Verdict


def main() -> int:
    rpc, dep, jpath, vpath, confs = sys.argv[1:6]
    journal = Journal(Path(jpath))
    writer = Writer(ChainClient(rpc, WRITER), Deployment.load(Path(dep)), journal, VERIFIERS[:3],
                    confirmations=int(confs), resend_every=0.2)
    for item in json.loads(Path(vpath).read_text()):
        writer.add(Verdict.model_validate(item), source="e2e")
    writer.run(timeout=60)
    journal.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
