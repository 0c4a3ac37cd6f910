"""Issue 12 items 1 and 2, the rest (decision 0115), on a real anvil.

- AttestationLog has no outcome view any more. `proveOutcome(verdicts, roots, proofs, minVerdicts)` took the
  count from its caller and no committee, so one included verdict, or an anonymous minority, "proved" an
  outcome to whoever read it. A task's outcome is TaskEscrow's state, settled from ceil(2k/3) of the
  committee's own signatures.
- The batch quorum has no owner: `setQuorum` is gone, the deployment's minimum (at least 2) is immutable, and
  `quorum()` rises to a third of the registry's active nodes, rounded up, as nodes join.

Each attack calls the removed functions by their old selectors, as a reader or an owner of the old contract
would: before 0115 both calls succeeded.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from chainkit import ETH, OWNER, VERIFIERS, Chain, make_verdict, new_epoch, record, reverts
from web3 import Web3

from trustcap.chain.anvil import Anvil
from trustcap.chain.client import ChainClient
from trustcap.chain.errors import ContractReverted
from trustcap.chain.escrow import deploy_network
from trustcap.chain.keys import KeySigner
from trustcap.chain.typed import sign_batch, verdict_tuple

_VERDICT = {"name": "v", "type": "tuple", "components": [
    {"name": n, "type": t} for n, t in (
        ("attestationId", "bytes32"), ("node", "address"), ("verifier", "address"), ("phase", "uint8"),
        ("passed", "bool"), ("quoteDigest", "bytes32"), ("policyDigest", "bytes32"), ("epoch", "uint64"),
        ("issuedAt", "uint64"))]}
#: the two functions as the contract before decision 0115 declared them
_OLD_ABI: list[dict[str, Any]] = [
    {"type": "function", "name": "proveOutcome", "stateMutability": "view",
     "inputs": [{**_VERDICT, "name": "vs", "type": "tuple[]"}, {"name": "roots", "type": "bytes32[]"},
                {"name": "proofs", "type": "bytes32[][]"}, {"name": "minVerdicts", "type": "uint256"}],
     "outputs": [{**_VERDICT, "name": "outcome"}]},
    {"type": "function", "name": "setQuorum", "stateMutability": "nonpayable",
     "inputs": [{"name": "quorum_", "type": "uint256"}], "outputs": []},
]


def _old(chain: Chain) -> Any:
    return chain.owner.w3.eth.contract(address=Web3.to_checksum_address(chain.d.log), abi=_OLD_ABI)


def _abi_names(chain: Chain) -> set[str]:
    return {str(i.get("name")) for i in chain.owner.contract("AttestationLog", chain.d.log).abi}


def test_one_included_verdict_is_no_outcome_anyone_can_prove_from_the_log(chain: Chain) -> None:
    """The attack: a minority verifier's single verdict is in a recorded batch; a reader asks the log for the
    round's outcome with minVerdicts 1. Before 0115 the log answered with that verdict as the outcome."""
    epoch = new_epoch()
    v = make_verdict(epoch=epoch, passed=False)
    tree = record(chain, [v, make_verdict(epoch=epoch)], epoch=epoch)
    assert chain.owner.is_included(chain.d, v, tree.root, tree.proof(0))  # control: it is in the log
    call = _old(chain).functions.proveOutcome([verdict_tuple(v)], [tree.root], [tree.proof(0)], 1)
    with pytest.raises(ContractReverted):
        chain.owner.call_fn(call)
    assert "proveOutcome" not in _abi_names(chain)


def test_the_owner_cannot_lower_the_batch_quorum_and_record_with_one_key(chain: Chain) -> None:
    """The attack: the owner sets the quorum to 1 and records a root under one registered key of its own.
    Before 0115 `setQuorum(1)` succeeded and so did the one-signature batch."""
    log = chain.owner.contract("AttestationLog", chain.d.log)
    with pytest.raises(ContractReverted):
        chain.owner.transact(_old(chain).functions.setQuorum(1))
    assert "setQuorum" not in _abi_names(chain) and "owner" not in _abi_names(chain)
    epoch, root = new_epoch(), os.urandom(32)
    one = sign_batch(VERIFIERS[:1], epoch, root, 1, chain.d.chain_id, chain.d.log)
    refusal = reverts(lambda: chain.owner.transact(log.functions.recordBatch(epoch, root, 1, one)),
                      "InsufficientSignatures")
    assert refusal.error_args == (1, 3)
    # control: the deployment's quorum of three registered nodes records it
    three = sign_batch(VERIFIERS[:3], epoch, root, 1, chain.d.chain_id, chain.d.log)
    chain.owner.transact(log.functions.recordBatch(epoch, root, 1, three))
    assert chain.owner.find_root(chain.d, root, epoch) is not None


def test_a_minimum_quorum_below_two_is_refused_at_deployment(anvil: Anvil) -> None:
    with pytest.raises(ContractReverted) as info:
        deploy_network(anvil.url, OWNER, [], quorum=1)
    assert "InvalidQuorum" in str(info.value) or info.value.error == "InvalidQuorum"
    d = deploy_network(anvil.url, OWNER, [], quorum=2)  # control
    assert ChainClient(anvil.url, OWNER).call_fn(
        ChainClient(anvil.url, OWNER).contract("AttestationLog", d.log).functions.minQuorum()) == 2


def test_the_quorum_rises_to_a_third_of_the_active_nodes(anvil: Anvil) -> None:
    """The attack on a fixed quorum: with seven active nodes, two colluding of them (the deployment's
    minimum) would record any root. Now a batch needs ceil(7/3) = 3 of them."""
    owner = ChainClient(anvil.url, OWNER)
    d = deploy_network(anvil.url, OWNER, [], quorum=2)
    log = owner.contract("AttestationLog", d.log)
    nodes = [KeySigner(hashlib.sha256(os.urandom(32)).digest()) for _ in range(7)]
    for i, n in enumerate(nodes):
        anvil.rpc("anvil_setBalance", [n.address, hex(10 * ETH)])
        ChainClient(anvil.url, n).register_node(d, b"\x02" + os.urandom(32), os.urandom(32), ETH)
        assert int(owner.call_fn(log.functions.quorum())) == max(2, -(-(i + 1) // 3))
    signers = sorted(nodes, key=lambda s: int(s.address, 16))
    epoch, root = new_epoch(), os.urandom(32)
    two = sign_batch(signers[:2], epoch, root, 1, d.chain_id, d.log)
    with pytest.raises(ContractReverted) as info:
        owner.transact(log.functions.recordBatch(epoch, root, 1, two))
    assert info.value.error == "InsufficientSignatures" and info.value.error_args == (2, 3)
    three = sign_batch(signers[:3], epoch, root, 1, d.chain_id, d.log)  # control
    owner.transact(log.functions.recordBatch(epoch, root, 1, three))
    assert owner.find_root(d, root, epoch) is not None
