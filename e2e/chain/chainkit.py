"""Helpers for the chain e2e tests: verdicts, verifier keys and a deployed, wired set of contracts on anvil.

Verifier keys are anvil's dev accounts 1..5 (funded, so they can register with a deposit); account 0 is the
owner and the chain-writer's sender. Verdict contents are made up but well formed: the chain only ever
sees their hashes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from trustcap import merkle
from trustcap.chain.anvil import Anvil
from trustcap.chain.client import ChainClient, Deployment
from trustcap.chain.errors import ContractReverted
from trustcap.chain.escrow import Escrow, NodeSpec, deploy_network
from trustcap.chain.keys import ANVIL_KEYS, KeySigner
from trustcap.evidence.verdict import Domain, SignedVerdict, Verdict, sign_verdict, verdict_id
from trustcap.sortition import Reveal, commitment, selection_alpha

ETH = 10**18
OWNER = KeySigner(ANVIL_KEYS[0])
VERIFIERS = [KeySigner(k) for k in ANVIL_KEYS[1:6]]
OUTSIDER = KeySigner(ANVIL_KEYS[9])
#: the chain-writer's own account: only the writer sends from it, so its nonces are the writer's alone
WRITER = KeySigner(ANVIL_KEYS[6])
VRF_KEY = b"\x02" + hashlib.sha256(b"vrf").digest()
#: the escrow's cast in the tests: one executor, a committee of three (k = 3), a payer that is no node
EXECUTOR = VERIFIERS[0]
COMMITTEE = VERIFIERS[1:4]
PAYER = VERIFIERS[4]
POST = 3
#: TaskEscrow.commitWindow of the tests' deployments: commits close this long after funding (chain clock)
COMMIT_WINDOW = 60
#: every reveal a test node made, by task id: what `assign` publishes (the chain checks each opens its commitment)
REVEALS: dict[bytes, dict[str, Reveal]] = {}


def new_epoch() -> int:
    """A random epoch, so no test's batch collides with one an earlier test recorded on the shared anvil."""
    return int.from_bytes(os.urandom(6), "big")


def block_time(chain: Chain) -> int:
    """The latest block's timestamp: the contracts' clock. Tests that move anvil's time forward make it run
    ahead of the wall clock, so deadlines are always taken from here, never from time.time()."""
    return int(chain.owner.w3.eth.get_block("latest")["timestamp"])


def task_deadline(chain: Chain, seconds: int = 3600) -> int:
    """A TaskEscrow deadline `seconds` after the latest block (inside the contract's 30-day bound)."""
    return block_time(chain) + seconds


def advance(chain: Chain, seconds: int) -> int:
    """Move anvil's clock `seconds` forward and mine a block there; the new block time. No sleeping."""
    chain.anvil.rpc("evm_increaseTime", [seconds])
    chain.anvil.rpc("evm_mine")
    return block_time(chain)


def reverts(fn: Callable[[], object], error: str) -> ContractReverted:
    """Call `fn`, which must revert with the contract's custom error `error`; the revert, for more checks
    (its error_args). The adversarial tests of every contract assert their refusals through this."""
    with pytest.raises(ContractReverted) as info:
        fn()
    assert info.value.error == error, str(info.value)
    return info.value


@dataclass
class Chain:
    anvil: Anvil
    owner: ChainClient
    d: Deployment

    def client(self, signer: KeySigner) -> ChainClient:
        return ChainClient(self.anvil.url, signer)

    @property
    def domain(self) -> Domain:
        return Domain(chain_id=self.d.chain_id, verifying_contract=self.d.log)


def deploy(anvil: Anvil, *, quorum: int = 3, register: int = 4, slash_amount: int = ETH) -> Chain:
    """Fresh contracts; the first `register` verifiers registered with 2 ETH each."""
    nodes = [NodeSpec(v, VRF_KEY, hashlib.sha256(v.address.encode()).digest()) for v in VERIFIERS[:register]]
    d = deploy_network(anvil.url, OWNER, nodes, deposit=2 * ETH, quorum=quorum, min_deposit=ETH, leave_delay=3600,
                       slash_amount=slash_amount, commit_window=COMMIT_WINDOW)
    return Chain(anvil, ChainClient(anvil.url, OWNER), d)


def escrow(chain: Chain, signer: KeySigner = OWNER) -> Escrow:
    """The escrow as `signer` (default the owner, who is also the coordinator)."""
    return Escrow(chain.client(signer), chain.d)


def seed_of(chain: Chain, task: bytes) -> bytes:
    """The task's selection seed, the hash of the block after its funding block, mining blocks if the
    shared anvil (no block time) has not yet: commits are refused until it exists."""
    e = escrow(chain)
    info = e.task(task)
    assert info is not None
    # A commit runs in a later block than the seed block (blockhash of the current block is 0), and anvil
    # estimates gas in the latest block's context: mine until the seed block has a successor.
    while chain.owner.block_number() < info.funded_block + 2:
        chain.anvil.rpc("evm_mine")
    seed = e.block_hash(info.funded_block + 1)
    assert seed is not None
    return seed


def node_commit(chain: Chain, task: bytes, node: KeySigner) -> Reveal:
    """`node` commits to the task's draw as a gateway does (sortition.commitment over a proof and a salt);
    its reveal is kept in REVEALS. The proof is random bytes: the chain checks the opening, not the VRF."""
    alpha = selection_alpha(task.hex(), seed_of(chain, task))
    r = Reveal(node.address.lower(), os.urandom(81), os.urandom(32))
    escrow(chain, node).commit(task, commitment(alpha, r.node_id, r.pi, r.salt))
    REVEALS.setdefault(task, {})[r.node_id] = r
    return r


def reveals(task: bytes) -> list[Reveal]:
    return list(REVEALS.get(task, {}).values())


def close_commits(chain: Chain, task: bytes) -> int:
    """Move the chain's clock just past the task's commit deadline (assign is refused until then)."""
    deadline, _seed = escrow(chain).selection(task)
    now = block_time(chain)
    while now <= deadline:  # evm_increaseTime counts from anvil's clock, which the latest block may lead
        now = advance(chain, deadline + 1 - now)
    return now


def funded(chain: Chain, *, k: int = 3, value: int = ETH, seconds: int = 3600,
           committers: list[KeySigner] | None = None) -> bytes:
    """A task funded by PAYER with committee size k, committed to by `committers` (default all four nodes)."""
    task = os.urandom(32)
    escrow(chain, PAYER).fund(task, k, task_deadline(chain, seconds), value)
    for node in VERIFIERS[:4] if committers is None else committers:
        node_commit(chain, task, node)
    return task


def assign(chain: Chain, task: bytes, att: bytes, executor: KeySigner | str = EXECUTOR,
           committee: list[KeySigner] | list[str] | None = None, *, signer: KeySigner = OWNER,
           opening: list[Reveal] | None = None) -> dict[str, Any]:
    """`signer` (default the coordinator) calls TaskEscrow.assign directly, with each node's reveal from
    REVEALS (random bytes for a node that has none) or `opening` as given, so the contract's own refusal
    comes back: Escrow.assign would refuse a missing reveal itself before sending anything."""
    members = [m if isinstance(m, str) else m.address for m in (COMMITTEE if committee is None else committee)]
    nodes = [executor if isinstance(executor, str) else executor.address, *members]
    mine = REVEALS.get(task, {})
    if opening is None:
        opening = [mine.get(n.lower()) or Reveal(n.lower(), os.urandom(81), os.urandom(32)) for n in nodes]
    client = chain.client(signer)
    fn = client.contract("TaskEscrow", chain.d.escrow).functions.assign(
        task, att, nodes[0], nodes[1:], [(r.pi, r.salt) for r in opening])
    return client.transact(fn)


def assigned(chain: Chain, **kw: Any) -> tuple[bytes, bytes]:
    """(task id, attestation id) of a funded task assigned to EXECUTOR and COMMITTEE, after its commit window."""
    task = funded(chain, **kw)
    att = os.urandom(32)
    close_commits(chain, task)
    assign(chain, task, att)
    return task, att


def post_verdict(chain: Chain, signer: KeySigner, att: bytes, *, passed: bool, node: str | None = None,
                 phase: int = POST, issued_at: int = 1_700_000_000, verifier: str | None = None) -> SignedVerdict:
    """`signer`'s signed verdict of the round `att` about `node` (default EXECUTOR), naming `verifier`
    (default the signer itself)."""
    v = Verdict(attestation_id="0x" + att.hex(), node=node or EXECUTOR.address,
                verifier=verifier or signer.address, phase=phase, passed=passed,
                quote_digest="0x" + os.urandom(32).hex(), policy_digest="0x" + hashlib.sha256(b"policy").hexdigest(),
                epoch=1, issued_at=issued_at)
    return sign_verdict(v, chain.domain, signer)


def deposit_of(chain: Chain, node: str) -> int:
    return int(chain.owner.contract("NodeRegistry", chain.d.registry).functions.nodeOf(node).call()[0])


def make_verdict(*, epoch: int = 1, passed: bool = True, phase: int = 3, node: str | None = None,
                 attestation: bytes | None = None, quote: bytes | None = None, verifier: str | None = None) -> Verdict:
    return Verdict(
        attestation_id="0x" + (attestation or os.urandom(32)).hex(),
        node=node or VERIFIERS[0].address,
        verifier=verifier or VERIFIERS[1].address,
        phase=phase,
        passed=passed,
        quote_digest="0x" + (quote or os.urandom(32)).hex(),
        policy_digest="0x" + hashlib.sha256(b"policy").hexdigest(),
        epoch=epoch,
        issued_at=1_700_000_000,
    )


def leaf_of(v: Verdict, domain: Domain) -> bytes:
    return merkle.verdict_leaf(verdict_id(v, domain))


def record(chain: Chain, verdicts: list[Verdict], *, epoch: int, signers: list[KeySigner] | None = None
           ) -> merkle.MerkleTree:
    """Record `verdicts` as one batch of `epoch`, signed by `signers` (default: the first three verifiers)."""
    from trustcap.chain.typed import sign_batch

    tree = merkle.MerkleTree([leaf_of(v, chain.domain) for v in verdicts])
    sigs = sign_batch(signers or VERIFIERS[:3], epoch, tree.root, len(verdicts), chain.d.chain_id, chain.d.log)
    log = chain.owner.contract("AttestationLog", chain.d.log)
    chain.owner.transact(log.functions.recordBatch(epoch, tree.root, len(verdicts), sigs))
    return tree


def scan_chain(anvil: Anvil, needles: list[bytes]) -> list[str]:
    """Every place a needle (raw, or as hex text) appears in any transaction's calldata or any event's
    topics and data, from block 0 to the head: where task data would show if it ever reached the chain."""
    forms: list[bytes] = []
    for n in needles:
        forms += [n, n.hex().encode()]
    head = int(anvil.rpc("eth_blockNumber"), 16)
    hits: list[str] = []
    for num in range(head + 1):
        block = anvil.rpc("eth_getBlockByNumber", [hex(num), True])
        for tx in block["transactions"]:
            data = bytes.fromhex(tx["input"][2:])
            for f in forms:
                if f in data or f.hex().encode() in data:
                    hits.append(f"calldata of {tx['hash']}")
    logs = anvil.rpc("eth_getLogs", [{"fromBlock": "0x0", "toBlock": "latest"}])
    for lg in logs:
        blob = b"".join(bytes.fromhex(t[2:]) for t in lg["topics"]) + bytes.fromhex(lg["data"][2:])
        for f in forms:
            if f in blob:
                hits.append(f"event in {lg['transactionHash']}")
    return hits


def audit(chain: Chain, journal_path: object, added: list[Verdict]) -> dict[str, int]:
    """Zero lost, zero duplicates, no skipped nonce: the invariants every reliability test ends with.

    - every added verdict is in exactly one confirmed batch and provable on chain with its proof;
    - the chain holds exactly one BatchRecorded per journaled batch, and their counts add up to the verdicts;
    - the writer account's mined transactions are exactly one per batch, all successful, nonces 0..n-1.
    """
    from pathlib import Path

    from trustcap.chain.journal import Journal
    from trustcap.chain.writer import Writer

    journal = Journal(Path(str(journal_path)))
    writer = Writer(chain.client(WRITER), chain.d, journal, VERIFIERS[:3])
    ids = {"0x" + verdict_id(v, chain.domain).hex() for v in added}
    assert journal.counts()["verdicts"] == len(ids), "the journal lost or invented a verdict"
    assert journal.counts()["unconfirmed"] == 0 and journal.counts()["pending"] == 0
    by_id = {"0x" + verdict_id(v, chain.domain).hex(): v for v in added}
    for vid in sorted(ids):
        rec = writer.record(vid)
        assert rec is not None, f"verdict {vid} was lost"
        assert chain.owner.is_included(chain.d, by_id[vid], bytes.fromhex(rec.root[2:]),
                                       [bytes.fromhex(p[2:]) for p in rec.proof]), f"{vid} not provable on chain"
    log = chain.owner.contract("AttestationLog", chain.d.log)
    events = log.events.BatchRecorded.get_logs(from_block=0)
    ev_ids = ["0x" + bytes(e["args"]["batchId"]).hex() for e in events]
    assert len(ev_ids) == len(set(ev_ids)), "a batch was recorded twice"
    batches = journal.batches()
    assert sorted(ev_ids) == sorted(b.batch_id for b in batches), "chain and journal disagree on the batches"
    assert sum(int(e["args"]["count"]) for e in events) == len(ids), "a verdict is counted twice or lost"
    head = chain.owner.block_number()
    mined = []
    for num in range(head + 1):
        block = chain.owner.w3.eth.get_block(num, full_transactions=True)
        for tx in block["transactions"]:
            if tx["from"] == WRITER.address:
                receipt = chain.owner.receipt(bytes(tx["hash"]))
                assert receipt is not None and receipt["status"] == 1, f"writer tx {tx['hash'].hex()} reverted"
                mined.append(int(tx["nonce"]))
    assert mined == list(range(len(batches))), f"writer nonces skipped or repeated: {mined}"
    assert chain.owner.w3.eth.get_transaction_count(WRITER.address) == len(batches)
    attempts = journal.txs()
    journal.close()
    return {"verdicts": len(ids), "batches": len(batches), "attempts": len(attempts)}


def decided_round(chain: Chain, *, epoch: int, passed: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(spec, status) of an Attestation round whose committee (VERIFIERS[1:4], quorum 2) has decided:
    each member's signed post-execution verdict, as the gateways write them, for the chain-writer."""
    spec = {"node": "hpc-1", "executor": VERIFIERS[0].address, "phase": "post", "capsule": "psi",
            "nonce": "0x" + os.urandom(32).hex(), "epoch": epoch, "policyDigest": "0x" + os.urandom(32).hex(),
            "committee": {"quorum": 2, "members": [{"address": v.address} for v in VERIFIERS[1:4]]}}
    verdicts = [verdict_entry(chain, spec, signer, passed=passed, issued_at=1_700_000_000 + i)
                for i, signer in enumerate(VERIFIERS[1:4])]
    return spec, {"result": "Passed" if passed else "Failed", "verdicts": verdicts}


def verdict_entry(chain: Chain, spec: dict[str, Any], signer: KeySigner, *, passed: bool,
                  issued_at: int = 1_700_000_000) -> dict[str, Any]:
    """One gateway's status.verdicts[] entry for the round `spec`, with its whole signed verdict."""
    v = Verdict(attestation_id=spec["nonce"], node=spec["executor"], verifier=signer.address, phase=3,
                passed=passed, quote_digest="0x" + os.urandom(32).hex(), policy_digest=spec["policyDigest"],
                epoch=spec["epoch"], issued_at=issued_at)
    signed = sign_verdict(v, chain.domain, signer)
    return {"verifier": signer.address, "passed": passed, "quoteDigest": v.quote_digest,
            "verdictId": "0x" + verdict_id(v, chain.domain).hex(), "signature": signed.signature,
            "issuedAt": v.issued_at, "verdict": signed.model_dump()}
