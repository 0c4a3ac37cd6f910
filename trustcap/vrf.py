"""ECVRF-P256-SHA256-TAI, exactly as RFC 9381 (section 5, suite of section 5.5) specifies it.

Why a VRF: the executor and committee of a capsule are drawn by sortition (`trustcap.sortition`). Each
gateway's draw must be unpredictable to everyone else before it reveals it, yet checkable by anyone
afterwards, and the gateway must not be able to pick among several outputs. A VRF gives exactly that:
one output per (key, input), with a proof that binds it to the public key.

Why this suite: P-256 is what the RFC's vectors cover for the NIST curves. The curve arithmetic is native
code, because every committee member verifies every other member's draw and pure-Python arithmetic made
that the slowest step of a round (docs/decisions/0100-native-crypto.md). All of it, square roots
included, is OpenSSL's libcrypto through the small binding `trustcap._p256`
(docs/decisions/0101-vrf-on-openssl.md), so every multiplication by the secret key or the nonce is
OpenSSL's constant-time P-256 code; the RFC 6979 nonce comes from `ecdsa`. Everything the RFC defines on
top of the arithmetic (hash_to_curve by try-and-increment, the challenge, encodings and every check) is
written here step by step, with the RFC's step numbers in comments, so that a reader can hold this file
against the RFC.

Interface (other components rely on it):
    prove(secret_key, alpha) -> pi (81 bytes)
    verify(public_key, pi, alpha) -> beta (32 bytes); raises InvalidProof on any failure
    proof_to_hash(pi) -> beta
    public_key(secret_key) -> 33-byte SEC1 compressed point
    evaluate(secret_key, alpha) -> beta without building a proof (fast path; same beta as prove)

Keys follow the RFC's vectors: the secret key is the 32-byte big-endian scalar x (1 <= x < q), the public
key is point_to_string(x*B), SEC1 compressed. Verification always validates the public key (the RFC's
validate_key option is on): an identity or off-curve key is refused.

    prover (gateway)                                       anyone (verifier)
        |  H = encode_to_curve(PK, alpha)                       |
        |  Gamma = x*H; k = nonce(x, H)                         |
        |  c = challenge(Y, H, Gamma, k*B, k*H)                 |
        |  s = k + c*x mod q                                    |
        |---- pi = Gamma || c || s  ----------------------------> U = s*B - c*Y, V = s*H - c*Gamma
        |                                                       |  c == challenge(Y, H, Gamma, U, V) ?
        |  beta = SHA256(0x01||0x03||Gamma||0x00)              |  beta = proof_to_hash(pi)
"""

from __future__ import annotations

import hashlib
import hmac

from ecdsa.rfc6979 import generate_k

from trustcap import _p256
from trustcap._p256 import Point
from trustcap.errors import InvalidKey, InvalidProof

__all__ = [
    "BETA_LEN",
    "PI_LEN",
    "PK_LEN",
    "SK_LEN",
    "SUITE_STRING",
    "evaluate",
    "proof_to_hash",
    "prove",
    "public_key",
    "verify",
]

# Section 5.5, ECVRF-P256-SHA256-TAI.
SUITE_STRING = b"\x01"
_P: int = _p256.P
_Q: int = _p256.Q
_A: int = _p256.A
_BCOEF: int = _p256.B
C_LEN = 16  # cLen: the challenge is truncated to 128 bits
Q_LEN = 32  # qLen
PT_LEN = 33  # ptLen: SEC1 compressed point
SK_LEN = 32
PK_LEN = PT_LEN
PI_LEN = PT_LEN + C_LEN + Q_LEN  # 81
BETA_LEN = 32

# Domain separators (section 5.4.1.1, 5.4.3, 5.2).
_E2C_FRONT = b"\x01"
_CHALLENGE_FRONT = b"\x02"
_P2H_FRONT = b"\x03"
_BACK = b"\x00"


def _int_to_string(value: int, length: int) -> bytes:
    """I2OSP (RFC 8017 4.1): big-endian, fixed length."""
    return value.to_bytes(length, "big")


def _string_to_int(data: bytes) -> int:
    """OS2IP (RFC 8017 4.2)."""
    return int.from_bytes(data, "big")


def _is_identity(point: Point) -> bool:
    return point.is_identity()


def _point_to_string(point: Point) -> bytes:
    """SEC1 2.3.3 with point compression: 0x02/0x03 by the parity of y, then x in 32 bytes."""
    try:
        return point.compressed()
    except ValueError:  # the identity has none; callers check before, this is the backstop
        raise InvalidProof("the identity point has no compressed encoding") from None


def _string_to_point(data: bytes) -> Point | None:
    """SEC1 2.3.4 for compressed points; None (the RFC's INVALID) unless `data` encodes a curve point.

    Only the compressed form is accepted: the suite encodes points compressed, so any other form
    (identity 0x00, uncompressed 0x04, hybrid 0x06/0x07) cannot be a valid encoding here.
    """
    if len(data) != PT_LEN or data[0] not in (2, 3):
        return None
    # x < p, y = sqrt(x^3 + ax + b) of the tagged parity (p = 3 mod 4), (x, y) on the curve: OpenSSL's
    # SEC1 decoding (EC_POINT_oct2point), which refuses anything else.
    return _p256.from_compressed(data)


def _secret_scalar(secret_key: bytes) -> int:
    if not isinstance(secret_key, (bytes, bytearray)) or len(secret_key) != SK_LEN:
        raise InvalidKey(f"VRF secret key must be {SK_LEN} bytes")
    x = _string_to_int(bytes(secret_key))
    if not 1 <= x < _Q:
        raise InvalidKey("VRF secret key is out of range: the scalar must satisfy 1 <= x < q")
    return x


def _encode_to_curve(salt: bytes, alpha: bytes) -> tuple[Point, int]:
    """ECVRF_encode_to_curve_try_and_increment (section 5.4.1.1); returns H and the ctr it succeeded on.

    The salt is PK_string (section 5.5: encode_to_curve_salt = PK_string), which binds H to the key.
    """
    # 1.-2. ctr = 0; H = "INVALID"
    for ctr in range(256):
        # 4.A ctr_string = int_to_string(ctr, 1)
        # 4.B hash_string = Hash(suite_string || front || salt || alpha || ctr_string || back)
        hash_string = hashlib.sha256(
            SUITE_STRING + _E2C_FRONT + salt + alpha + _int_to_string(ctr, 1) + _BACK
        ).digest()
        # 4.C H = interpret_hash_value_as_a_point(hash_string) = string_to_point(0x02 || hash_string)
        point = _string_to_point(b"\x02" + hash_string)
        # 4.D cofactor is 1 for P-256: H itself, which string_to_point never returns as the identity
        if point is not None:
            return point, ctr
    # The RFC bounds ctr by one octet; failing 256 times in a row has probability about 2^-256.
    raise InvalidProof("encode_to_curve found no point in 256 tries")  # pragma: no cover


def _nonce(x: int, h_string: bytes) -> int:
    """ECVRF_nonce_generation_RFC6979 (section 5.4.2.1): RFC 6979 section 3.2 with m = h_string.

    RFC 6979 step a hashes the message: h1 = SHA-256(h_string); `generate_k` runs steps b-h on h1.
    """
    return int(generate_k(_Q, x, hashlib.sha256, hashlib.sha256(h_string).digest()))


def _challenge(*points: Point) -> int:
    """ECVRF_challenge_generation (section 5.4.3): c from the five points Y, H, Gamma, U, V."""
    # 1.-3. str = suite_string || front || point_to_string(P1..P5) || back
    data = SUITE_STRING + _CHALLENGE_FRONT + b"".join(_point_to_string(p) for p in points) + _BACK
    # 4.-6. c_string = Hash(str); truncated_c_string = c_string[0]...c_string[cLen-1]; c = OS2IP
    return _string_to_int(hashlib.sha256(data).digest()[:C_LEN])


def _decode_proof(pi: bytes) -> tuple[Point, int, int]:
    """ECVRF_decode_proof (section 5.4.4); InvalidProof names what is wrong."""
    if not isinstance(pi, (bytes, bytearray)):
        raise InvalidProof("VRF proof must be bytes")
    if len(pi) != PI_LEN:
        raise InvalidProof(f"VRF proof must be {PI_LEN} bytes, got {len(pi)}")
    pi = bytes(pi)
    gamma_string, c_string, s_string = pi[:PT_LEN], pi[PT_LEN:PT_LEN + C_LEN], pi[PT_LEN + C_LEN:]
    gamma = _string_to_point(gamma_string)
    if gamma is None:
        raise InvalidProof("VRF proof's Gamma is not a valid compressed P-256 point")
    c = _string_to_int(c_string)
    s = _string_to_int(s_string)
    if s >= _Q:
        raise InvalidProof("VRF proof's s is not below the group order q")
    return gamma, c, s


def _gamma_to_hash(gamma: Point) -> bytes:
    """Section 5.2 steps 4-6: beta = Hash(suite_string || 0x03 || point_to_string(cofactor*Gamma) || 0x00)."""
    return hashlib.sha256(SUITE_STRING + _P2H_FRONT + _point_to_string(gamma) + _BACK).digest()


def public_key(secret_key: bytes) -> bytes:
    """The VRF public key PK_string = point_to_string(x*B) of a 32-byte secret scalar."""
    return _point_to_string(_p256.base_mul(_secret_scalar(secret_key)))


def prove(secret_key: bytes, alpha: bytes) -> bytes:
    """ECVRF_prove (section 5.1): pi_string (81 bytes) for input `alpha` under `secret_key`."""
    x = _secret_scalar(secret_key)
    alpha = bytes(alpha)
    # 1. Y = x*B; PK_string = point_to_string(Y)
    y_point = _p256.base_mul(x)
    pk_string = _point_to_string(y_point)
    # 2. H = ECVRF_encode_to_curve(encode_to_curve_salt = PK_string, alpha_string)
    h_point, _ = _encode_to_curve(pk_string, alpha)
    # 3. h_string = point_to_string(H)
    h_string = _point_to_string(h_point)
    # 4. Gamma = x*H
    gamma = _p256.mul(h_point, x)
    # 5. k = ECVRF_nonce_generation(SK, h_string)
    k = _nonce(x, h_string)
    # 6. c = ECVRF_challenge_generation(Y, H, Gamma, k*B, k*H)
    c = _challenge(y_point, h_point, gamma, _p256.base_mul(k), _p256.mul(h_point, k))
    # 7. s = (k + c*x) mod q
    s = (k + c * x) % _Q
    # 8. pi_string = point_to_string(Gamma) || int_to_string(c, cLen) || int_to_string(s, qLen)
    return _point_to_string(gamma) + _int_to_string(c, C_LEN) + _int_to_string(s, Q_LEN)


def proof_to_hash(pi: bytes) -> bytes:
    """ECVRF_proof_to_hash (section 5.2): beta of a proof. It does NOT verify the proof: use `verify`
    for anything received from someone else; this is for a prover reading its own output."""
    gamma, _, _ = _decode_proof(pi)
    return _gamma_to_hash(gamma)


def evaluate(secret_key: bytes, alpha: bytes) -> bytes:
    """beta for (secret_key, alpha) without building the proof: steps 1, 2 and 4 of prove only.

    Same value as `proof_to_hash(prove(secret_key, alpha))` at a third of the cost: for a node that
    only needs its own draw (and for statistical tests that need thousands of real VRF outputs).
    """
    x = _secret_scalar(secret_key)
    h_point, _ = _encode_to_curve(_point_to_string(_p256.base_mul(x)), bytes(alpha))
    return _gamma_to_hash(_p256.mul(h_point, x))


def verify(public_key: bytes, pi: bytes, alpha: bytes) -> bytes:
    """ECVRF_verify (section 5.3) with key validation: beta if `pi` proves `alpha` under `public_key`.

    Raises InvalidProof on ANY failure (bad key encoding, malformed proof, wrong key or input), so a
    caller can never mistake a failure for an output. A fault that is not the input's (libcrypto
    missing, OpenSSL out of memory) raises `_p256.OpenSSLError` instead: no verdict on the proof.
    """
    if not isinstance(public_key, (bytes, bytearray)) or not isinstance(alpha, (bytes, bytearray)):
        raise InvalidProof("VRF public key and alpha must be bytes")
    pk_string = bytes(public_key)
    # 1.-2. Y = string_to_point(PK_string); INVALID if that fails
    y_point = _string_to_point(pk_string)
    if y_point is None:
        raise InvalidProof("VRF public key is not a valid compressed P-256 point")
    # 3. validate_key (section 5.4.5): Y must not be the identity (or of low order: cofactor is 1)
    if _is_identity(y_point):  # pragma: no cover - string_to_point cannot return the identity
        raise InvalidProof("VRF public key is the identity point")
    # 4.-5. D = ECVRF_decode_proof(pi_string); (Gamma, c, s) = D
    gamma, c, s = _decode_proof(pi)
    # 6. H = ECVRF_encode_to_curve(encode_to_curve_salt = PK_string, alpha_string)
    h_point, _ = _encode_to_curve(pk_string, bytes(alpha))
    # 7. U = s*B - c*Y  (as s*B + (q-c)*Y, one OpenSSL call; a scalar of 0 gives the identity)
    u_point = _p256.base_mul_add(s, y_point, (_Q - c) % _Q)
    # 8. V = s*H - c*Gamma  (as s*H + (q-c)*Gamma)
    v_point = _p256.add(_p256.mul(h_point, s), _p256.mul(gamma, (_Q - c) % _Q))
    if _is_identity(u_point) or _is_identity(v_point):
        # An honest proof never yields the identity here (probability ~2^-256); a forged one may try.
        raise InvalidProof("VRF proof does not verify: U or V is the identity")
    # 9.-10. c' = ECVRF_challenge_generation(Y, H, Gamma, U, V); VALID iff c == c'
    c_prime = _challenge(y_point, h_point, gamma, u_point, v_point)
    if not hmac.compare_digest(_int_to_string(c, C_LEN), _int_to_string(c_prime, C_LEN)):
        raise InvalidProof("VRF proof does not verify for this public key and alpha")
    return _gamma_to_hash(gamma)
