"""Gas per recorded verdict: epoch batches (one Merkle root, a quorum of signatures) against a naive log
that stores each verdict in its own slot with its own transaction, both measured in the same run on a
fresh anvil; and the gas of one on-chain inclusion check.

    python bench/bench_chain_gas.py            print the table and write bench/results/chain.json
    python bench/bench_chain_gas.py --check    measure again and exit 1 if it differs from the file

Gas is deterministic (fresh chain, fixed inputs, RFC 6979 signatures), so the results file is committed
and e2e/chain/test_chain_bench_e2e.py checks that a fresh run reproduces it exactly. Every figure is the
receipt's gasUsed, intrinsic 21000 and calldata included: what a sender pays.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from eth_utils.crypto import keccak
from rich.console import Console
from rich.table import Table

from trustcap import merkle
from trustcap.chain.anvil import Anvil
from trustcap.chain.client import ChainClient
from trustcap.chain.keys import ANVIL_KEYS, KeySigner
from trustcap.chain.typed import sign_batch, verdict_tuple
from trustcap.evidence.verdict import Domain, Verdict, verdict_id

RESULTS = Path(__file__).parent / "results" / "chain.json"
BATCH_SIZES = (1, 10, 100, 1000)
NAIVE_TXS = 50
QUORUM = 3


def _verdicts(n: int, epoch: int, node: str) -> list[Verdict]:
    return [Verdict(attestation_id="0x" + keccak(epoch.to_bytes(8, "big") + i.to_bytes(8, "big")).hex(), node=node,
                    verifier=node, phase=3, passed=True,
                    quote_digest="0x" + keccak(b"q" + i.to_bytes(8, "big")).hex(),
                    policy_digest="0x" + keccak(b"policy").hex(), epoch=epoch, issued_at=1_700_000_000 + i)
            for i in range(n)]


def measure() -> dict[str, Any]:
    with Anvil() as anvil:
        owner = ChainClient(anvil.url, KeySigner(ANVIL_KEYS[0]))
        d = owner.deploy_all(quorum=QUORUM)
        verifiers = [KeySigner(k) for k in ANVIL_KEYS[1:1 + QUORUM]]
        for i, v in enumerate(verifiers):
            ChainClient(anvil.url, v).register_node(d, b"\x02" + bytes([i]) * 32, keccak(bytes([i])), 10**18)
        log = owner.contract("AttestationLog", d.log)
        batches: dict[str, dict[str, float]] = {}
        domain = Domain(chain_id=d.chain_id, verifying_contract=d.log)
        big: tuple[merkle.MerkleTree, Verdict] | None = None
        for epoch, n in enumerate(BATCH_SIZES, start=1):
            vs = _verdicts(n, epoch, verifiers[0].address)
            tree = merkle.MerkleTree([merkle.verdict_leaf(verdict_id(v, domain)) for v in vs])
            sigs = sign_batch(verifiers, epoch, tree.root, n, d.chain_id, d.log)
            gas = int(owner.transact(log.functions.recordBatch(epoch, tree.root, n, sigs))["gasUsed"])
            batches[str(n)] = {"gas_per_batch": gas, "gas_per_verdict": round(gas / n, 2)}
            big = (tree, vs[0])
        assert big is not None
        naive_addr = owner.deploy("NaiveLog")
        naive = owner.contract("NaiveLog", naive_addr)
        total = 0
        for i in range(NAIVE_TXS):
            vid = keccak(b"naive" + i.to_bytes(8, "big"))
            sig = verifiers[0].sign_digest(vid)
            fn = naive.functions.record(vid, sig[64], sig[:32], sig[32:64])
            total += int(owner.transact(fn)["gasUsed"])
        naive_per = round(total / NAIVE_TXS, 2)
        # one inclusion check: a transaction calling isIncluded for verdict 0 of the 1000-verdict batch
        tree, v0 = big
        proof = tree.proof(0)
        check = log.functions.isIncluded(verdict_tuple(v0), tree.root, proof)
        if check.call() is not True:
            raise SystemExit("bench: the inclusion check did not prove an included verdict")
        inclusion = int(owner.transact(check)["gasUsed"])
        commits = _commit_gas(anvil, owner, d, verifiers)
    return {
        "what": "gas per recorded verdict: AttestationLog epoch batch (quorum signatures) vs NaiveLog (one tx each)",
        "quorum_signatures": QUORUM,
        "batch": batches,
        "naive_gas_per_verdict": naive_per,
        "ratio_batch_1000_vs_naive": round(batches["1000"]["gas_per_verdict"] / naive_per, 5),
        "inclusion_check_gas": inclusion,
        "inclusion_proof_length": len(proof),
        "commit_gas": commits,
        "note": "gasUsed from receipts incl. 21000 intrinsic and calldata; naive = one tx, one slot, one "
                "ecrecover per verdict; batch = one tx, one root, quorum ecrecovers per batch; inclusion check = "
                "a transaction calling isIncluded(verdict, root, proof) for a verdict of the 1000 batch; commit = "
                "TaskEscrow.commit (registered before the funding block, weight kept with the commitment), the "
                "first of a task also keeps its seed",
    }


def _commit_gas(anvil: Anvil, owner: ChainClient, d: Any, nodes: list[KeySigner]) -> dict[str, int]:
    """Gas of the first and of a later TaskEscrow.commit to one task (fixed task id and commitments)."""
    escrow = owner.contract("TaskEscrow", d.escrow)
    task = keccak(b"bench task")
    deadline = int(owner.w3.eth.get_block("latest")["timestamp"]) + 3600
    owner.transact(escrow.functions.fund(task, 3, deadline), value=10**18)
    anvil.rpc("evm_mine")  # the seed block: commits are accepted from its successor on
    anvil.rpc("evm_mine")
    gas = []
    for i, n in enumerate(nodes[:2]):
        me = ChainClient(anvil.url, n)
        fn = me.contract("TaskEscrow", d.escrow).functions.commit(task, keccak(b"commitment" + bytes([i])))
        gas.append(int(me.transact(fn)["gasUsed"]))
    return {"first": gas[0], "later": gas[1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed results, write nothing")
    args = ap.parse_args()
    res = measure()
    table = Table(title="trustcap chain gas (same run, fresh anvil)")
    table.add_column("what")
    table.add_column("gas per verdict", justify="right")
    table.add_column("vs naive", justify="right")
    for n, row in res["batch"].items():
        table.add_row(f"batch of {n}", f"{row['gas_per_verdict']:,}",
                      f"{row['gas_per_verdict'] / res['naive_gas_per_verdict']:.4f}x")
    table.add_row("naive: own slot, own tx", f"{res['naive_gas_per_verdict']:,}", "1x")
    table.add_row("one inclusion check (tx)", f"{res['inclusion_check_gas']:,}", "")
    Console().print(table)
    text = json.dumps(res, indent=2, sort_keys=True) + "\n"
    if args.check:
        if not RESULTS.exists() or RESULTS.read_text() != text:
            print(f"{RESULTS} differs from a fresh run:\n{text}", file=sys.stderr)
            return 1
        print(f"{RESULTS} reproduced")
        return 0
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
