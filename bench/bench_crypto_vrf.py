"""Trust-core costs beside the raw OpenSSL primitive they are built on, measured in the same run.

    python bench/bench_crypto_vrf.py [--quick]

Rows: VRF prove / verify / evaluate (RFC 9381 in Python on OpenSSL's P-256 arithmetic through
trustcap._p256, decision 0101) against ECDSA P-256 sign / verify from `cryptography` (OpenSSL); quote
sign (agent + gateway) and appraisal against secp256k1 sign / verify from `cryptography`; a
1024-verdict Merkle batch against the raw keccak calls it needs. Only ratios are meaningful (both sides
ran on this machine, now); nothing here is asserted.

Second baselines, "same work": one ECDSA operation is one scalar multiplication (sign) or one double
multiplication (verify), while a VRF proof needs four multiplications (x*B, k*B fixed-base; x*H, k*H on
a point known only at run time) and its check two double multiplications (U and V). Those rows compare
against OpenSSL doing the same count (ECDH for a multiplication of a run-time point). The VRF rows use
one fixed (key, alpha) whose encode_to_curve needs three candidates (ctr = 2), one more than the
average of two: each extra candidate is a square root, about a fifth of one ECDSA verify. OpenSSL's
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


def batch(fn: Callable[[], object], n: int) -> float:
    """Seconds per call over one batch of `n` calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def paired(ours: Callable[[], object], base: Callable[[], object], n: int, n_base: int,
           repeats: int = 7) -> tuple[float, float, float]:
    """Median seconds per call of each side and the median of the per-repeat ratios.

    The two sides alternate batch by batch: this machine is shared, and its load swings by 2-3x within
    a minute, so timing all baselines first and our code later (the first version of this bench) let
    the ratio move with the load instead of with the code."""
    ours()  # warm caches (precomputed tables, imports)
    base()
    mine, theirs = [], []
    for _ in range(repeats):
        mine.append(batch(ours, n))
        theirs.append(batch(base, n_base))
    ratio = statistics.median(m / t for m, t in zip(mine, theirs, strict=True))
    return statistics.median(mine), statistics.median(theirs), ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    args = parser.parse_args()
    n = 20 if args.quick else 100

    # Baselines: OpenSSL through `cryptography`, and libsecp256k1 through `coincurve`.
    p256 = ec.generate_private_key(ec.SECP256R1())
    k1 = ec.generate_private_key(ec.SECP256K1())
    msg = b"x" * 64
    p256_sig = p256.sign(msg, ec.ECDSA(hashes.SHA256()))
    k1_sig = k1.sign(msg, ec.ECDSA(hashes.SHA256()))
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    k1_native = coincurve.PrivateKey(hashlib.sha256(b"k1").digest())
    digest = hashlib.sha256(msg).digest()
    k1_native_sig = k1_native.sign_recoverable(digest, hasher=None)

    def p256_sign() -> object:
        return p256.sign(msg, ec.ECDSA(hashes.SHA256()))

    def p256_verify() -> None:
        p256.public_key().verify(p256_sig, msg, ec.ECDSA(hashes.SHA256()))

    def p256_ecdh() -> object:
        return p256.exchange(ec.ECDH(), peer)

    def k1_sign() -> object:
        return k1.sign(msg, ec.ECDSA(hashes.SHA256()))

    def k1_verify() -> None:
        k1.public_key().verify(k1_sig, msg, ec.ECDSA(hashes.SHA256()))

    def k1_recover_native() -> object:
        return coincurve.PublicKey.from_signature_and_message(k1_native_sig, digest, hasher=None)

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

    def prove() -> object:
        return vrf.prove(sk, b"capsule")

    def verify() -> object:
        return vrf.verify(pk, pi, b"capsule")

    small = max(2, n // 20)
    rows = [  # (operation, ours, baseline name, baseline, calls per batch of ours, of the baseline)
        ("VRF prove", prove, "ECDSA P-256 sign", p256_sign, n, n * 10),
        ("VRF prove (same work)", prove, "2 x P-256 sign + 2 x P-256 ECDH",
         lambda: (p256_sign(), p256_sign(), p256_ecdh(), p256_ecdh()), n, n * 3),
        ("VRF verify", verify, "ECDSA P-256 verify", p256_verify, n, n * 10),
        ("VRF verify (same work)", verify, "2 x ECDSA P-256 verify", lambda: (p256_verify(), p256_verify()),
         n, n * 5),
        ("VRF evaluate (no proof)", lambda: vrf.evaluate(sk, b"capsule"), "ECDSA P-256 sign", p256_sign, n, n * 10),
        ("quote sign (agent + gateway)", lambda: sign_quote(quote, agent, gateway), "2 x secp256k1 sign",
         lambda: (k1_sign(), k1_sign()), n, n),
        ("quote appraisal (2 recovers)", appraise, "2 x secp256k1 verify", lambda: (k1_verify(), k1_verify()),
         n, n),
        ("quote appraisal (2 recovers)", appraise, "2 x libsecp256k1 recover",
         lambda: (k1_recover_native(), k1_recover_native()), n, n * 5),
        ("Merkle root, 1024 verdicts", lambda: merkle.MerkleTree(leaves).root, "1023 x keccak256(64 B)",
         lambda: [keccak(x) for x in nodes], small, small),
    ]

    table = Table(title=f"trust core vs native primitives (batches of ours and the baseline alternate, median of 7; "
                        f"{n} calls of ours per batch)")
    for col in ("operation", "ours", "baseline", "baseline time", "ratio (ours / baseline)"):
        table.add_column(col, justify="left" if col in ("operation", "baseline") else "right")
    for name, fn, bname, bfn, n_ours, n_base in rows:
        ours, btime, ratio = paired(fn, bfn, n_ours, n_base)
        table.add_row(name, _fmt(ours), bname, _fmt(btime), f"{ratio:,.1f} x")
    Console(width=140).print(table)
    return 0


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:,.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:,.1f} µs"


if __name__ == "__main__":
    raise SystemExit(main())
