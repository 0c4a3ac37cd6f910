"""A software secp256k1 Signer for chain accounts that are plain keys (anvil's dev accounts, the bench).

Production gateways sign with their trust root (trustcap.trustroot), which has the same shape; the chain
code only ever sees the Signer interface. Keys are never logged or put in a repr.
"""

from __future__ import annotations

from eth_keys import keys  # type: ignore[attr-defined]

__all__ = ["ANVIL_KEYS", "KeySigner"]

_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

#: anvil's first ten dev accounts (mnemonic "test test ... junk"): public knowledge, local chains only.
ANVIL_KEYS = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
)


class KeySigner:
    """Signer over a private key held in memory."""

    def __init__(self, private_key: bytes | str) -> None:
        raw = bytes.fromhex(private_key[2:] if private_key.startswith("0x") else private_key) if isinstance(
            private_key, str
        ) else bytes(private_key)
        self._key = keys.PrivateKey(raw)
        self._address = str(self._key.public_key.to_checksum_address())

    def __repr__(self) -> str:
        return f"KeySigner({self._address})"

    @property
    def address(self) -> str:
        return self._address

    def public_key(self) -> bytes:
        compressed: bytes = self._key.public_key.to_compressed_bytes()
        return bytes(compressed)

    def sign_digest(self, digest32: bytes) -> bytes:
        sig = self._key.sign_msg_hash(bytes(digest32))
        r, s, v = int(sig.r), int(sig.s), int(sig.v)
        if s > _N // 2:  # eth_keys already signs low-s; keep the rule explicit
            s, v = _N - s, v ^ 1
        return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v + 27])

    def sign_raw(self, digest32: bytes) -> tuple[int, int, int]:
        """(y-parity, r, s) for signing a transaction hash."""
        sig = self.sign_digest(digest32)
        return sig[64] - 27, int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big")
