"""trustcap._p256 (P-256 in OpenSSL's libcrypto through ctypes) against python-ecdsa's pure-Python
arithmetic, and the binding's own promises: every failed call raises naming the function, every object
it allocates is freed (scalars cleared), threads share nothing that races, a missing libcrypto names
the package to install."""

from __future__ import annotations

import ctypes
import gc
import random
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from ecdsa.curves import NIST256p
from ecdsa.ellipticcurve import INFINITY, PointJacobi
from ecdsa.errors import MalformedPointError

from trustcap import _p256, vrf
from trustcap._p256 import OpenSSLError, Point

G = NIST256p.generator
RNG_SEEDS = range(40)
EDGE_SCALARS = [0, 1, 2, 3, _p256.Q - 1, _p256.Q, _p256.Q + 1, 2 * _p256.Q, 2**255, 2**256 - 1]


def _enc(point: Any) -> bytes | None:
    """python-ecdsa's point as SEC1 compressed bytes, None for the identity."""
    if point == INFINITY:
        return None
    x, y = point.x(), point.y()
    return bytes([2 + (y & 1)]) + x.to_bytes(32, "big")


def _ours(point: Point) -> bytes | None:
    return None if point.is_identity() else point.compressed()


def _pure_point(rng: random.Random) -> tuple[Point, PointJacobi]:
    k = rng.randrange(1, _p256.Q)
    pure = G * k
    ours = _p256.from_compressed(_enc(pure) or b"")
    assert ours is not None
    return ours, pure


def test_constants_are_openssls_and_ecdsas_p256() -> None:
    assert _p256.curve_parameters() == (_p256.P, _p256.A, _p256.B, _p256.Q)
    curve = NIST256p.curve
    assert (curve.p(), curve.a() % curve.p(), curve.b(), NIST256p.order) == (_p256.P, _p256.A, _p256.B, _p256.Q)


@pytest.mark.parametrize("k", EDGE_SCALARS, ids=str)
def test_base_mul_at_the_edges(k: int) -> None:
    """Scalars of 0, q and its multiples give the identity; beyond q they reduce, as k*B = (k mod q)*B."""
    assert _ours(_p256.base_mul(k)) == _enc(G * (k % _p256.Q))


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_arithmetic_matches_pure_python(seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311 - reproducible test inputs
    (a, a_pure), (b, b_pure) = _pure_point(rng), _pure_point(rng)
    n, m = rng.randrange(_p256.Q), rng.randrange(_p256.Q)
    assert _ours(_p256.base_mul(n)) == _enc(G * n)
    assert _ours(_p256.mul(a, m)) == _enc(a_pure * m)
    assert _ours(_p256.add(a, b)) == _enc(a_pure + b_pure)
    assert _ours(_p256.add(a, a)) == _enc(a_pure.double())
    assert _ours(_p256.base_mul_add(n, a, m)) == _enc(G * n + a_pure * m)


def test_identity_behaves_as_the_neutral_element() -> None:
    rng = random.Random(7)  # noqa: S311 - reproducible test inputs
    a, a_pure = _pure_point(rng)
    zero = _p256.base_mul(0)
    assert zero.is_identity() and not a.is_identity()
    assert _p256.add(a, zero) == a == _p256.add(zero, a)
    assert _p256.add(a, _p256.mul(a, _p256.Q - 1)).is_identity()  # a + (-a)
    assert _p256.mul(a, 0).is_identity() and _p256.mul(zero, 12345).is_identity()
    assert _p256.base_mul_add(0, a, 0).is_identity()
    with pytest.raises(ValueError, match="identity"):
        zero.compressed()
    assert repr(zero) == "Point(identity)" and a_pure != INFINITY


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_decoding_matches_the_pure_sec1_decoding(seed: int) -> None:
    """Random x, both tags: valid exactly when the pure implementation finds a point, and the same point."""
    rng = random.Random(1000 + seed)  # noqa: S311 - reproducible test inputs
    for _ in range(8):
        data = bytes([rng.choice([2, 3])]) + rng.randrange(_p256.P).to_bytes(32, "big")
        pure = _pure_decode(data)
        ours = _p256.from_compressed(data)
        assert (ours is None) == (pure is None), data.hex()
        if ours is not None:
            assert ours.compressed() == data == _enc(pure)
            assert _ours(_p256.mul(ours, 1)) == data  # re-encoded by OpenSSL from the decoded point


def _pure_decode(data: bytes) -> Any:
    """python-ecdsa's own SEC1 decoding, which checks the curve equation; None where it refuses."""
    try:
        return PointJacobi.from_bytes(NIST256p.curve, data, valid_encodings=("compressed",))
    except MalformedPointError:
        return None


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00", id="identity-one-byte"),
        pytest.param(bytes(33), id="identity-tag-33-bytes"),
        pytest.param(b"\x04" + bytes(32), id="uncompressed-tag-33-bytes"),
        pytest.param(b"\x04" + G.x().to_bytes(32, "big") + G.y().to_bytes(32, "big"), id="uncompressed-generator"),
        pytest.param(b"\x06" + G.x().to_bytes(32, "big"), id="hybrid-tag"),
        pytest.param(b"\x02" + _p256.P.to_bytes(32, "big"), id="x-equals-p"),
        pytest.param(b"\x03" + (2**256 - 1).to_bytes(32, "big"), id="x-all-ones"),
        pytest.param(b"\x02" + G.x().to_bytes(32, "big")[:-1], id="truncated"),
        pytest.param(b"\x02" + G.x().to_bytes(32, "big") + b"\x00", id="one-byte-too-long"),
    ],
)
def test_decoding_refuses_every_other_form(data: bytes) -> None:
    assert _p256.from_compressed(data) is None
    assert _p256.from_compressed(b"\x02" + G.x().to_bytes(32, "big")) is not None  # positive control


def test_a_refused_decoding_leaves_no_openssl_error_behind() -> None:
    """A non-square is an answer, not a fault: the thread's error queue must be empty afterwards, or the
    next failing call would report a stale reason."""
    lib = _p256._lib()
    off = bytes([2]) + _off_curve_x()
    assert _p256.from_compressed(off) is None
    assert lib.c.ERR_peek_last_error() == 0


def _off_curve_x() -> bytes:
    for x in range(1, 100):
        rhs = (pow(x, 3, _p256.P) + _p256.A * x + _p256.B) % _p256.P
        if pow(rhs, (_p256.P - 1) // 2, _p256.P) != 1:
            return x.to_bytes(32, "big")
    raise AssertionError("no off-curve x below 100")  # pragma: no cover


def test_a_failed_call_raises_with_the_function_and_openssls_reason() -> None:
    """A point of another curve (P-384) handed to EC_POINT_add: OpenSSL refuses it, and the error says so."""
    lib = _p256._lib()
    new_group = lib.c.EC_GROUP_new_by_curve_name
    free_group = lib.c.EC_GROUP_free
    free_group.argtypes, free_group.restype = [ctypes.c_void_p], None
    group384 = new_group(715)  # NID_secp384r1
    assert group384
    try:
        alien = object.__new__(Point)
        alien._ptr, alien._free, alien._encoded = lib.c.EC_POINT_new(group384), lib.c.EC_POINT_free, None
        ours = _p256.base_mul(5)
        assert _p256.add(ours, ours) == _p256.base_mul(10)  # positive control: the same call on P-256 works
        with pytest.raises(OpenSSLError, match=r"EC_POINT_add failed: .*incompatible objects"):
            _p256.add(ours, alien)
        assert lib.c.ERR_peek_last_error() == 0  # the reasons were taken off the queue into the message
        del alien
        gc.collect()
    finally:
        free_group(group384)


def test_missing_libcrypto_is_an_error_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_p256, "_loaded", None)
    monkeypatch.setattr(_p256, "_SONAME", "libcrypto-not-installed.so.3")
    with pytest.raises(OpenSSLError, match=r"libcrypto-not-installed\.so\.3.*install Debian's libssl3"):
        _p256.base_mul(1)


class _Counting:
    """Wraps libcrypto's allocating and freeing functions to count what each call made and released."""

    ALLOC = ("EC_POINT_new", "BN_bin2bn", "BN_mod_sqrt", "BN_new", "BN_CTX_new")
    FREE = ("EC_POINT_free", "BN_free", "BN_clear_free", "BN_CTX_free")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.live: dict[int, str] = {}
        self.calls: Counter[str] = Counter()
        self.cleared: list[int] = []
        lib = _p256._lib().c
        for name in (*self.ALLOC, *self.FREE):
            monkeypatch.setattr(lib, name, self._wrap(name, getattr(lib, name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any) -> Any:
            self.calls[name] += 1
            if name in self.FREE:
                if args[0]:
                    assert self.live.pop(args[0], None) is not None, f"{name} of a pointer not allocated"
                if name == "BN_clear_free":
                    self.cleared.append(args[0])
                return fn(*args)
            out = fn(*args)
            if out:
                self.live[out] = name
            return out

        return counted


def test_every_object_allocated_is_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prove, verify, a refused key and a refused proof: nothing stays allocated once the results are
    gone. Positive control: a point kept alive is counted as live."""
    sk = (424242).to_bytes(32, "big")
    pk = vrf.public_key(sk)
    pi = vrf.prove(sk, b"x")
    counting = _Counting(monkeypatch)
    beta = vrf.verify(vrf.public_key(sk), vrf.prove(sk, b"x"), b"x")
    refused = [(b"\x02" + _off_curve_x(), pi), (pk, pi[:33] + bytes(48)), (pk, b"\x02" + _off_curve_x() + pi[33:])]
    for bad_pk, bad_pi in refused:
        with pytest.raises(vrf.InvalidProof):
            vrf.verify(bad_pk, bad_pi, b"x")
    gc.collect()
    assert len(beta) == 32 and counting.calls["EC_POINT_new"] > 10 and counting.calls["BN_mod_sqrt"] >= 3
    assert counting.live == {}
    kept = _p256.base_mul(3)
    gc.collect()
    assert list(counting.live.values()) == ["EC_POINT_new"]  # the kept point: the count does see leaks
    del kept


def test_scalars_are_cleared_when_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scalar may be the secret key or the nonce: its BIGNUM is freed with BN_clear_free, never BN_free."""
    counting = _Counting(monkeypatch)
    point = _p256.base_mul(0xC0FFEE)
    _p256.mul(point, 0xBEEF)
    _p256.base_mul_add(1, point, 2)
    assert counting.calls["BN_bin2bn"] == 4 == len(counting.cleared) == counting.calls["BN_clear_free"]
    assert counting.calls["BN_free"] == 0


def test_threads_get_the_same_results_as_one_thread() -> None:
    """Eight threads proving and verifying at once (ctypes lets go of the GIL inside OpenSSL): the same
    bytes as computed one at a time, so the shared group and the per-call BN_CTXs do not race."""
    keys = [(i + 1).to_bytes(32, "big") for i in range(8)]
    serial = {sk: [(vrf.prove(sk, b"%d" % j), vrf.evaluate(sk, b"%d" % j)) for j in range(15)] for sk in keys}
    results: dict[bytes, list[tuple[bytes, bytes]]] = {}
    errors: list[BaseException] = []

    def work(sk: bytes) -> None:
        try:
            out = []
            for j in range(15):
                pi = vrf.prove(sk, b"%d" % j)
                assert vrf.verify(vrf.public_key(sk), pi, b"%d" % j) == vrf.proof_to_hash(pi)
                out.append((pi, vrf.evaluate(sk, b"%d" % j)))
            results[sk] = out
        except BaseException as exc:  # handed to the main thread, which fails on it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(sk,)) for sk in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and results == serial
