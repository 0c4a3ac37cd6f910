"""No task data ever reaches the chain (seed: "only the remote attestation record, nothing related to the
execution task or data"). A capsule with planted secret bytes (its input payload, its sealing key and the
executor's session key) goes through the whole chain path on the session's anvil: verdicts derived from it
are written by the chain-writer, settled through the escrow and counted in reputation. Then every
transaction's calldata and every event of the session's chain, from block 0, is scanned for the secrets,
raw and hex. The file name sorts last so the scan also covers every earlier test on this anvil.
A positive control proves the scanner finds a planted leak."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from chainkit import ETH, VERIFIERS, WRITER, Chain, make_verdict, scan_chain, task_deadline

from trustcap import canonical
from trustcap.chain.anvil import Anvil
from trustcap.chain.journal import Journal
from trustcap.chain.typed import verdict_tuple
from trustcap.chain.writer import Writer
from trustcap.evidence.verdict import verdict_id

SECRET_PAYLOAD = b"TRUSTCAP-SECRET-NAME-LIST:alice,bob,carol," + os.urandom(16)
SECRET_KEY = os.urandom(32)
SESSION_KEY = os.urandom(32)


def test_no_capsule_payload_or_key_on_chain(anvil: Anvil, chain: Chain, tmp_path: Path) -> None:
    capsule = {"inputs": [SECRET_PAYLOAD], "sealingKey": SECRET_KEY, "session": SESSION_KEY}
    state_digest = canonical.digest(capsule)  # what a quote carries about the capsule: a digest
    att = hashlib.sha256(b"post-round" + state_digest).digest()
    epoch = 900_001
    vs = [make_verdict(epoch=epoch, attestation=att, quote=hashlib.sha256(state_digest + bytes([i])).digest(),
                       node=VERIFIERS[0].address) for i in range(3)]
    writer = Writer(chain.client(WRITER), chain.d, Journal(tmp_path / "journal.sqlite"), VERIFIERS[:3])
    for v in vs:
        writer.add(v, source="capsule/psi")
    writer.run(timeout=60)
    vs.sort(key=lambda v: verdict_id(v, chain.domain))
    recs = [writer.record("0x" + verdict_id(v, chain.domain).hex()) for v in vs]
    assert all(r is not None for r in recs)
    args = [[verdict_tuple(v) for v in vs], [bytes.fromhex(r.root[2:]) for r in recs],  # type: ignore[union-attr]
            [[bytes.fromhex(p[2:]) for p in r.proof] for r in recs]]  # type: ignore[union-attr]
    payer = chain.client(VERIFIERS[4])
    task = hashlib.sha256(b"capsule-id" + state_digest).digest()
    payer.transact(payer.contract("TaskEscrow", chain.d.escrow).functions.createTask(task, 2, task_deadline(chain)),
                   value=ETH)
    esc = chain.owner.contract("TaskEscrow", chain.d.escrow)
    chain.owner.transact(esc.functions.assign(task, att, VERIFIERS[0].address, [v.address for v in VERIFIERS[1:4]]))
    chain.owner.transact(esc.functions.settle(task, *args))
    chain.owner.transact(chain.owner.contract("Reputation", chain.d.reputation).functions.record(*args))

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
