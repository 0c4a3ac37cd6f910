"""No task data ever reaches the chain (seed: "only the remote attestation record, nothing related to the
execution task or data"). A capsule with planted secret bytes (its input payload, its sealing key and the
executor's session key) goes through the whole chain path on the session's anvil: the escrow is funded
under its task id, the nodes commit to their draws, the coordinator assigns, verdicts derived from it are
written by the chain-writer and settle the escrow with their signatures (which also moves reputation),
and the payout is withdrawn. Each of those calls is checked to be on chain, then every
transaction's calldata and every event of the session's chain, from block 0, is scanned for the secrets,
raw and hex. The file name sorts last so the scan also covers every earlier test on this anvil.
A positive control proves the scanner finds a planted leak."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from chainkit import (
    COMMITTEE,
    ETH,
    EXECUTOR,
    PAYER,
    VERIFIERS,
    WRITER,
    Chain,
    close_commits,
    escrow,
    scan_chain,
    seed_of,
    task_deadline,
)

from trustcap import canonical, sortition
from trustcap.chain.anvil import Anvil
from trustcap.chain.journal import Journal
from trustcap.chain.writer import Writer
from trustcap.evidence.verdict import Verdict, sign_verdict, verdict_id

SECRET_PAYLOAD = b"TRUSTCAP-SECRET-NAME-LIST:alice,bob,carol," + os.urandom(16)
SECRET_KEY = os.urandom(32)
SESSION_KEY = os.urandom(32)


def test_no_capsule_payload_or_key_on_chain(anvil: Anvil, chain: Chain, tmp_path: Path) -> None:
    capsule = {"inputs": [SECRET_PAYLOAD], "sealingKey": SECRET_KEY, "session": SESSION_KEY}
    state_digest = canonical.digest(capsule)  # what a quote carries about the capsule: a digest
    att = hashlib.sha256(b"post-round" + state_digest).digest()
    epoch = 900_001
    task = hashlib.sha256(b"capsule-id" + state_digest).digest()
    esc = escrow(chain)
    sent = [escrow(chain, PAYER).fund(task, 3, task_deadline(chain), ETH)]
    alpha = sortition.selection_alpha(task.hex(), seed_of(chain, task))
    reveals = []
    for node in VERIFIERS[:4]:
        r = sortition.Reveal(node.address.lower(), hashlib.sha256(SESSION_KEY + node.address.encode()).digest(),
                             os.urandom(16))
        reveals.append(r)
        sent.append(escrow(chain, node).commit(task, sortition.commitment(alpha, r.node_id, r.pi, r.salt)))
    close_commits(chain, task)
    sent.append(esc.assign(task, att, EXECUTOR.address, [v.address for v in COMMITTEE], reveals))
    signed = [sign_verdict(Verdict(attestation_id="0x" + att.hex(), node=EXECUTOR.address, verifier=v.address,
                                   phase=3, passed=True,
                                   quote_digest="0x" + hashlib.sha256(state_digest + bytes([i])).hexdigest(),
                                   policy_digest="0x" + hashlib.sha256(b"policy").hexdigest(), epoch=epoch,
                                   issued_at=1_700_000_000 + i), chain.domain, v)
              for i, v in enumerate(COMMITTEE)]
    writer = Writer(chain.client(WRITER), chain.d, Journal(tmp_path / "journal.sqlite"), VERIFIERS[:3])
    for s in signed:
        writer.add(s.verdict, source="capsule/psi")
    writer.run(timeout=60)
    assert all(writer.record("0x" + verdict_id(s.verdict, chain.domain).hex()) for s in signed)
    sent.append(esc.settle(task, signed))
    ex = chain.client(EXECUTOR)
    sent.append(ex.transact(ex.contract("TaskEscrow", chain.d.escrow).functions.withdraw()))
    info = esc.task(task)
    assert info is not None and info.state == "Paid"
    assert all(r["status"] == 1 for r in sent) and len(sent) == 8  # fund, 4 commits, assign, settle, withdraw

    needles = [SECRET_PAYLOAD, SECRET_KEY, SESSION_KEY, SECRET_PAYLOAD[:24]]
    assert scan_chain(anvil, needles) == [], "task data reached the chain"

    # positive control: a transaction that does leak is found, then the chain is put back
    snap = anvil.rpc("evm_snapshot")
    try:
        leak = chain.owner.w3.eth.send_transaction(  # type: ignore[arg-type]
            {"from": chain.owner.signer.address, "to": VERIFIERS[1].address, "data": SECRET_KEY, "value": 0})
        chain.owner.wait(bytes(leak))
        hits = scan_chain(anvil, needles)
        assert hits and "calldata" in hits[0]
    finally:
        anvil.rpc("evm_revert", [snap])
