"""Trust-core costs beside the raw OpenSSL primitive they are built on, measured in the same run.

    python bench/bench_crypto_vrf.py [--quick]

Rows: VRF prove / verify / evaluate (RFC 9381 in Python on fastecdsa's native P-256 arithmetic, decision
0100) against ECDSA P-256 sign / verify from `cryptography` (OpenSSL); quote sign (agent + gateway) and
appraisal against secp256k1 sign / verify from `cryptography`; a 1024-verdict Merkle batch against the raw
keccak calls it needs. Only ratios are meaningful (both sides ran on this machine, now); nothing here is
asserted.

Second baselines, "same work": one ECDSA operation is one scalar multiplication (sign) or one double
multiplication (verify), while a VRF proof needs four multiplications (x*B, k*B fixed-base; x*H, k*H on
a point known only at run time) and its check two double multiplications (U and V). Those rows compare
against OpenSSL doing the same count (ECDH for a multiplication of a run-time point). OpenSSL's
secp256k1 is its generic curve code; libsecp256k1 (what the appraisal now calls) is several times
faster, so the appraisal is also shown against two raw libsecp256k1 recoveries.

The quote signers are software secp256k1 keys (trustcap.chain.keys.KeySigner, on eth_keys), standing in
for the trust root, whose Zymkey backend signs in hardware at a very different speed.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from collections.abc import Callable

import coincurve
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from eth_utils.crypto import keccak
from rich.console import Console
from rich.table import Table

from trustcap import merkle, vrf
from trustcap.chain.keys import KeySigner
from trustcap.evidence import NonceRegistry, appraise_quote, new_quote, sign_quote


def per_op(fn: Callable[[], object], n: int, repeats: int = 5) -> float:
    """Median seconds per call over `repeats` batches of `n` calls."""
    fn()  # warm caches (precomputed tables, imports)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    args = parser.parse_args()
    n = 20 if args.quick else 200

    # Baselines: OpenSSL through `cryptography`.
    p256 = ec.generate_private_key(ec.SECP256R1())
    k1 = ec.generate_private_key(ec.SECP256K1())
    msg = b"x" * 64
    p256_sig = p256.sign(msg, ec.ECDSA(hashes.SHA256()))
    k1_sig = k1.sign(msg, ec.ECDSA(hashes.SHA256()))
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    k1_native = coincurve.PrivateKey(hashlib.sha256(b"k1").digest())
    digest = hashlib.sha256(msg).digest()
    k1_native_sig = k1_native.sign_recoverable(digest, hasher=None)
    base = {
        "p256-ecdh": per_op(lambda: p256.exchange(ec.ECDH(), peer), n * 5),
        "k1-recover-native": per_op(
            lambda: coincurve.PublicKey.from_signature_and_message(k1_native_sig, digest, hasher=None), n * 5),
        "p256-sign": per_op(lambda: p256.sign(msg, ec.ECDSA(hashes.SHA256())), n * 5),
        "p256-verify": per_op(lambda: p256.public_key().verify(p256_sig, msg, ec.ECDSA(hashes.SHA256())), n * 5),
        "k1-sign": per_op(lambda: k1.sign(msg, ec.ECDSA(hashes.SHA256())), n * 5),
        "k1-verify": per_op(lambda: k1.public_key().verify(k1_sig, msg, ec.ECDSA(hashes.SHA256())), n * 5),
    }

    # Ours.
    sk = hashlib.sha256(b"bench-vrf").digest()
    pk = vrf.public_key(sk)
    pi = vrf.prove(sk, b"capsule")
    agent, gateway = (KeySigner(hashlib.sha256(seed).digest()) for seed in (b"agent", b"gateway"))
    nonce = b"\x01" * 32
    quote = new_quote(
        nonce=nonce, issued_at=1000, node_id="hpc-1", gateway=gateway.address, agent_key=agent.public_key(),
        boot_image_digest=b"\x02" * 32, measurements={f"m{i}": "0x" + "ab" * 32 for i in range(16)},
        capsule_state={"phase": "idle", "containers": 0},
    )
    signed = sign_quote(quote, agent, gateway)

    def appraise() -> None:
        registry = NonceRegistry(60, clock=lambda: 1000.0, token=lambda _: nonce)
        registry.issue()
        report = appraise_quote(
            signed, nonces=registry, expected_nonce=nonce, node_id="hpc-1", agent_key=agent.public_key(),
            gateway_address=gateway.address, now=1000.0, max_age_seconds=30,
        )
        assert report.ok

    leaves = [merkle.verdict_leaf(hashlib.sha256(b"%d" % i).digest()) for i in range(1024)]
    nodes = [b"\x00" * 64] * 1023  # a 1024-leaf tree hashes 1023 inner pairs

    t_prove = per_op(lambda: vrf.prove(sk, b"capsule"), n)
    t_verify = per_op(lambda: vrf.verify(pk, pi, b"capsule"), n)
    t_appraise = per_op(appraise, n)
    rows = [
        ("VRF prove", t_prove, "ECDSA P-256 sign", base["p256-sign"]),
        ("VRF prove (same work)", t_prove, "2 x P-256 sign + 2 x P-256 ECDH",
         2 * base["p256-sign"] + 2 * base["p256-ecdh"]),
        ("VRF verify", t_verify, "ECDSA P-256 verify", base["p256-verify"]),
        ("VRF verify (same work)", t_verify, "2 x ECDSA P-256 verify", 2 * base["p256-verify"]),
        ("VRF evaluate (no proof)", per_op(lambda: vrf.evaluate(sk, b"capsule"), n), "ECDSA P-256 sign",
         base["p256-sign"]),
        ("quote sign (agent + gateway)", per_op(lambda: sign_quote(quote, agent, gateway), n),
         "2 x secp256k1 sign", 2 * base["k1-sign"]),
        ("quote appraisal (2 recovers)", t_appraise, "2 x secp256k1 verify", 2 * base["k1-verify"]),
        ("quote appraisal (2 recovers)", t_appraise, "2 x libsecp256k1 recover", 2 * base["k1-recover-native"]),
        ("Merkle root, 1024 verdicts", per_op(lambda: merkle.MerkleTree(leaves).root, max(2, n // 20)),
         "1023 x keccak256(64 B)", per_op(lambda: [keccak(x) for x in nodes], max(2, n // 20))),
    ]

    table = Table(title=f"trust core vs OpenSSL primitives ({n} iterations per batch, median of 5)")
    for col in ("operation", "ours", "baseline", "baseline time", "ratio (ours / baseline)"):
        table.add_column(col, justify="left" if col in ("operation", "baseline") else "right")
    for name, ours, bname, btime in rows:
        table.add_row(name, _fmt(ours), bname, _fmt(btime), f"{ours / btime:,.1f} x")
    Console(width=130).print(table)
    return 0


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:,.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:,.1f} µs"


if __name__ == "__main__":
    raise SystemExit(main())
