"""P-256 point arithmetic in OpenSSL's libcrypto, called through ctypes (docs/decisions/0101-vrf-on-openssl.md).

Why OpenSSL itself: the VRF (`trustcap.vrf`) needs what no maintained Python package exposes for P-256 at
native speed: multiplying points known only at run time, adding points, and decoding compressed points.
`cryptography` (OpenSSL underneath) offers only keys, signatures and ECDH's x-coordinate. libcrypto's
`EC_POINT_*` functions (not deprecated in OpenSSL 3, unlike `EC_KEY`) do all of it with OpenSSL's P-256
code: constant-time multiplication for every scalar, precomputed tables for multiples of the generator,
and SEC1 decoding that takes the square root of a compressed point and checks the curve equation.

The binding is deliberately small: points are immutable `Point` objects owning one `EC_POINT` (freed
when the object is collected), scalars live as `BIGNUM`s only for the length of one call (cleared
before they are freed, as they may be secret), the EC_POINT calls pass no `BN_CTX`, so OpenSSL makes
one for that call alone (threads share nothing but the read-only group and field), and every return
code is checked: a failed call raises `OpenSSLError` naming the function and OpenSSL's own reason.
Loading happens on first use, so importing this module never fails; a missing libcrypto is then an
error naming the Debian package to install.

    trustcap.vrf  --(ints, 33-byte strings)-->  _p256  --(ctypes)-->  libcrypto.so.3 (EC_POINT_mul, ...)
"""

from __future__ import annotations

import ctypes
import threading
from typing import Final

from trustcap.errors import TrustcapError

__all__ = [
    "A",
    "B",
    "OpenSSLError",
    "P",
    "Point",
    "Q",
    "add",
    "base_mul",
    "base_mul_add",
    "curve_parameters",
    "from_compressed",
    "mul",
]

# SEC 2 v2, section 2.4.2 (secp256r1 = NIST P-256 = prime256v1); tests check them against OpenSSL's group.
P: Final = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
A: Final = P - 3
B: Final = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
Q: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # the group order (n)

_SONAME: Final = "libcrypto.so.3"
_NID_P256: Final = 415  # NID_X9_62_prime256v1, openssl/obj_mac.h
_COMPRESSED: Final = 2  # POINT_CONVERSION_COMPRESSED, openssl/ec.h
_SCALAR_LEN: Final = 32
_POINT_LEN: Final = 33
# openssl/err.h and bnerr.h (3.x): how an error code packs its library and reason, and the one failure
# that is an answer rather than a fault (BN_mod_sqrt of a non-square).
_ERR_SYSTEM_FLAG: Final = 1 << 31
_ERR_LIB_BN: Final = 3
_BN_R_NOT_A_SQUARE: Final = 111


class OpenSSLError(TrustcapError):
    """libcrypto is missing, or one of its calls failed; the message names the function and the cause."""


_VOIDP = ctypes.c_void_p
_SIGNATURES: Final[dict[str, tuple[object, tuple[object, ...]]]] = {
    # name: (restype, argtypes), from the OpenSSL 3 manual pages EC_POINT_new(3), EC_POINT_add(3),
    # EC_GROUP_new(3), BN_bin2bn(3), BN_CTX_new(3), ERR_get_error(3), OpenSSL_version(3).
    "OpenSSL_version_num": (ctypes.c_ulong, ()),
    "EC_GROUP_new_by_curve_name": (_VOIDP, (ctypes.c_int,)),
    "EC_GROUP_get_curve": (ctypes.c_int, (_VOIDP, _VOIDP, _VOIDP, _VOIDP, _VOIDP)),
    "EC_GROUP_get0_order": (_VOIDP, (_VOIDP,)),
    "EC_POINT_new": (_VOIDP, (_VOIDP,)),
    "EC_POINT_free": (None, (_VOIDP,)),
    "EC_POINT_oct2point": (ctypes.c_int, (_VOIDP, _VOIDP, ctypes.c_char_p, ctypes.c_size_t, _VOIDP)),
    "EC_POINT_point2oct": (ctypes.c_size_t, (_VOIDP, _VOIDP, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, _VOIDP)),
    "EC_POINT_mul": (ctypes.c_int, (_VOIDP, _VOIDP, _VOIDP, _VOIDP, _VOIDP, _VOIDP)),
    "EC_POINT_add": (ctypes.c_int, (_VOIDP, _VOIDP, _VOIDP, _VOIDP, _VOIDP)),
    "EC_POINT_is_at_infinity": (ctypes.c_int, (_VOIDP, _VOIDP)),
    "BN_new": (_VOIDP, ()),
    "BN_bin2bn": (_VOIDP, (ctypes.c_char_p, ctypes.c_int, _VOIDP)),
    "BN_bn2binpad": (ctypes.c_int, (_VOIDP, ctypes.c_char_p, ctypes.c_int)),
    "BN_free": (None, (_VOIDP,)),
    "BN_mod_sqrt": (_VOIDP, (_VOIDP, _VOIDP, _VOIDP, _VOIDP)),
    "BN_CTX_new": (_VOIDP, ()),
    "BN_CTX_free": (None, (_VOIDP,)),
    "BN_clear_free": (None, (_VOIDP,)),
        "ERR_get_error": (ctypes.c_ulong, ()),
    "ERR_peek_last_error": (ctypes.c_ulong, ()),
    "ERR_error_string_n": (None, (ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t)),
}


class _Libcrypto:
    """The loaded library with typed functions, and the P-256 group (read-only once made, so shared)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        self.c = lib
        version = int(lib.OpenSSL_version_num())
        if version < 0x30000000:  # pragma: no cover - the soname is OpenSSL 3's; a guard for odd builds
            raise OpenSSLError(f"{_SONAME} reports OpenSSL version {version:#x}; OpenSSL 3 is required")
        group = lib.EC_GROUP_new_by_curve_name(_NID_P256)
        if not group:  # pragma: no cover - P-256 is in every OpenSSL build
            raise _error(lib, "EC_GROUP_new_by_curve_name")
        # Both live as long as the process (every Point refers to the group) and are never written again.
        self.group: int = group
        field = lib.BN_bin2bn(P.to_bytes(_SCALAR_LEN, "big"), _SCALAR_LEN, None)
        if not field:  # pragma: no cover - an allocation failure while loading
            raise _error(lib, "BN_bin2bn")
        self.field: int = field


_loaded: _Libcrypto | None = None
_load_lock = threading.Lock()


def _lib() -> _Libcrypto:
    global _loaded  # set once, under the lock: the library and its group are the only globals
    if _loaded is None:
        with _load_lock:
            if _loaded is None:
                try:
                    lib = ctypes.CDLL(_SONAME)
                except OSError as exc:
                    raise OpenSSLError(
                        f"cannot load OpenSSL's {_SONAME} ({exc}); the VRF's P-256 arithmetic runs in it: "
                        "install Debian's libssl3 package (libssl3t64 on Debian 13 and later)"
                    ) from exc
                _loaded = _Libcrypto(lib)
    return _loaded


def _error(lib: ctypes.CDLL, function: str) -> OpenSSLError:
    """OpenSSLError naming `function` and every reason on this thread's OpenSSL error queue (emptied)."""
    reasons = []
    buf = ctypes.create_string_buffer(256)
    while code := lib.ERR_get_error():
        lib.ERR_error_string_n(code, buf, len(buf))
        reasons.append(buf.value.decode(errors="replace"))
    return OpenSSLError(f"OpenSSL {function} failed: {'; '.join(reasons) or 'no reason given'}")


def _check(lib: ctypes.CDLL, ok: int, function: str) -> None:
    if ok != 1:
        raise _error(lib, function)


def _scalar(lib: ctypes.CDLL, k: int) -> int:
    """`k mod Q` as a new BIGNUM; the caller frees it with BN_clear_free (it may be a secret key or nonce).

    Reducing is exact: P-256 has prime order Q and cofactor 1, so k*P == (k mod Q)*P for every point,
    and OpenSSL's constant-time code then always sees a scalar of the group's size."""
    bn: int | None = lib.BN_bin2bn((k % Q).to_bytes(_SCALAR_LEN, "big"), _SCALAR_LEN, None)
    if not bn:
        raise _error(lib, "BN_bin2bn")
    return bn


class Point:
    """An immutable P-256 point (possibly the identity) owning one OpenSSL EC_POINT.

    Made only by this module's functions. `compressed()` is remembered per object: a point decoded from
    its 33 bytes, or encoded once, is not re-encoded (the challenge hashes Y, H and Gamma again).

    The EC_POINT is freed in `__del__` rather than by weakref.finalize: a verify makes nine points, and
    a finalizer's bookkeeping cost as much as the rest of the binding's Python together."""

    __slots__ = ("_encoded", "_free", "_ptr")

    def __init__(self, lib: _Libcrypto, encoded: bytes | None = None) -> None:
        self._ptr = 0
        ptr: int | None = lib.c.EC_POINT_new(lib.group)
        if not ptr:
            raise _error(lib.c, "EC_POINT_new")
        self._ptr = ptr
        self._free = lib.c.EC_POINT_free
        self._encoded = encoded

    def __del__(self) -> None:
        if self._ptr:
            self._free(self._ptr)

    def is_identity(self) -> bool:
        lib = _lib()
        return bool(lib.c.EC_POINT_is_at_infinity(lib.group, self._ptr))

    def compressed(self) -> bytes:
        """SEC1 2.3.3 with compression: 0x02/0x03 (the parity of y) || x in 32 bytes.

        ValueError for the identity, which SEC1 encodes as one 0x00 byte: callers refuse it first."""
        if self._encoded is None:
            lib = _lib()
            buf = ctypes.create_string_buffer(_POINT_LEN)
            n = lib.c.EC_POINT_point2oct(lib.group, self._ptr, _COMPRESSED, buf, _POINT_LEN, None)
            if n == 1:  # OpenSSL's encoding of the identity, a single 0x00
                raise ValueError("the identity point has no 33-byte compressed encoding")
            if n != _POINT_LEN:
                raise _error(lib.c, "EC_POINT_point2oct")
            self._encoded = buf.raw
        return self._encoded

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Point):
            return NotImplemented
        if self.is_identity() or other.is_identity():
            return self.is_identity() and other.is_identity()
        return self.compressed() == other.compressed()

    def __hash__(self) -> int:
        return hash(b"" if self.is_identity() else self.compressed())

    def __repr__(self) -> str:
        return "Point(identity)" if self.is_identity() else f"Point({self.compressed().hex()})"


def from_compressed(data: bytes) -> Point | None:
    """SEC1 2.3.4 for the 33-byte compressed form only; None unless `data` encodes a point of P-256.

    Any other form (0x00 identity, 0x04 uncompressed, 0x06/0x07 hybrid) or length is refused before
    OpenSSL sees it. Then x < p, y = sqrt(x^3 + ax + b) of the tagged parity, and OpenSSL's check of the
    curve equation as it builds the point from (x, y).

    Not EC_POINT_oct2point on the compressed bytes, which does all of this itself: it took 33 us here
    against 15 us for the same square root by BN_mod_sqrt and 1.4 us for building a point from (x, y),
    and a verify decodes four points or more (Y, Gamma and the try-and-increment candidates)."""
    data = bytes(data)
    if len(data) != _POINT_LEN or data[0] not in (2, 3):
        return None
    x = int.from_bytes(data[1:], "big")
    if x >= P:
        return None
    lib = _lib()
    y = _sqrt_mod_p(lib, (pow(x, 3, P) + A * x + B) % P)  # public data: no secret meets Python's ints here
    if y is None or (y == 0 and data[0] == 3):  # SEC1: no root, or y = 0 tagged odd (no such point on P-256)
        return None
    if (y & 1) != (data[0] & 1):
        y = P - y
    point = Point(lib, encoded=data)
    uncompressed = b"\x04" + data[1:] + y.to_bytes(_SCALAR_LEN, "big")
    # y^2 = x^3 + ax + b holds by construction; OpenSSL checks it again, and a failure here is a fault.
    ok = lib.c.EC_POINT_oct2point(lib.group, point._ptr, uncompressed, len(uncompressed), None)
    _check(lib.c, ok, "EC_POINT_oct2point")
    return point


def _sqrt_mod_p(lib: _Libcrypto, value: int) -> int | None:
    """A square root of `value` mod P by OpenSSL's BN_mod_sqrt, or None if `value` is no square."""
    c = lib.c
    a: int | None = c.BN_bin2bn(value.to_bytes(_SCALAR_LEN, "big"), _SCALAR_LEN, None)
    if not a:
        raise _error(c, "BN_bin2bn")
    try:
        ctx: int | None = c.BN_CTX_new()  # BN_mod_sqrt, unlike the EC_POINT calls, needs one passed
        if not ctx:
            raise _error(c, "BN_CTX_new")
        try:
            root: int | None = c.BN_mod_sqrt(None, a, lib.field, ctx)
            if not root:
                code = c.ERR_peek_last_error()
                if not code & _ERR_SYSTEM_FLAG and (code >> 23) & 0xFF == _ERR_LIB_BN \
                        and code & 0x7FFFFF == _BN_R_NOT_A_SQUARE:
                    while c.ERR_get_error():  # the expected answer: leave the thread's error queue empty
                        pass
                    return None
                raise _error(c, "BN_mod_sqrt")  # anything else (e.g. out of memory) is no verdict on x
            try:
                buf = ctypes.create_string_buffer(_SCALAR_LEN)
                if c.BN_bn2binpad(root, buf, _SCALAR_LEN) != _SCALAR_LEN:
                    raise _error(c, "BN_bn2binpad")
                return int.from_bytes(buf.raw, "big")
            finally:
                c.BN_free(root)
        finally:
            c.BN_CTX_free(ctx)
    finally:
        c.BN_free(a)


def _mul(n: int | None, point: Point | None, m: int | None) -> Point:
    """n*B + m*point, either term left out when None: one EC_POINT_mul, every BIGNUM cleared after."""
    lib = _lib()
    out = Point(lib)
    made: list[int] = []
    try:
        bn_n = None if n is None else _scalar(lib.c, n)
        if bn_n is not None:
            made.append(bn_n)
        bn_m = None if m is None else _scalar(lib.c, m)
        if bn_m is not None:
            made.append(bn_m)
        _check(lib.c, lib.c.EC_POINT_mul(lib.group, out._ptr, bn_n, None if point is None else point._ptr,
                                         bn_m, None), "EC_POINT_mul")
    finally:
        for bn in made:
            lib.c.BN_clear_free(bn)
    return out


def base_mul(k: int) -> Point:
    """k*B for the generator B: OpenSSL's precomputed tables, constant time (k may be a secret)."""
    return _mul(k, None, None)


def mul(point: Point, k: int) -> Point:
    """k*point for a point known only at run time, constant time in k (k may be a secret)."""
    return _mul(None, point, k)


def base_mul_add(n: int, point: Point, m: int) -> Point:
    """n*B + m*point in one call (what an ECDSA verify computes); for public scalars and points."""
    return _mul(n, point, m)


def add(a: Point, b: Point) -> Point:
    """a + b (the identity is the neutral element, and a + (-a) is the identity)."""
    lib = _lib()
    out = Point(lib)
    _check(lib.c, lib.c.EC_POINT_add(lib.group, out._ptr, a._ptr, b._ptr, None), "EC_POINT_add")
    return out


def curve_parameters() -> tuple[int, int, int, int]:
    """(p, a, b, q) as OpenSSL's group holds them: for tests that P, A, B and Q above are P-256's."""
    lib = _lib()
    bns = [lib.c.BN_new() for _ in range(3)]
    try:
        if not all(bns):
            raise _error(lib.c, "BN_new")
        _check(lib.c, lib.c.EC_GROUP_get_curve(lib.group, *bns, None), "EC_GROUP_get_curve")
        order = lib.c.EC_GROUP_get0_order(lib.group)
        if not order:
            raise _error(lib.c, "EC_GROUP_get0_order")
        values = []
        for bn in (*bns, order):
            buf = ctypes.create_string_buffer(_SCALAR_LEN)
            if lib.c.BN_bn2binpad(bn, buf, _SCALAR_LEN) != _SCALAR_LEN:
                raise _error(lib.c, "BN_bn2binpad")
            values.append(int.from_bytes(buf.raw, "big"))
        return values[0], values[1], values[2], values[3]
    finally:
        for bn in bns:
            lib.c.BN_free(bn)
