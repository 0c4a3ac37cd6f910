"""The agent<->gateway channel: mutually authenticated, encrypted, with automatic session-key rotation.

Seed Task 4: "Agent only communicate with RPI ... Use encryption and automatically change keys." TLS
would need a PKI on a diskless HPC and Python's ssl cannot force TLS 1.3 KeyUpdate, so the channel is a
small Noise-like protocol on the primitives of `cryptography` (decision 0042):

    agent (HPC, boot key A, pins gateway address G)            gateway (trust root G)
      | HELLO {A, eA, nA, node, bootdigest, [token]} sig_A ----> | sig_A ok? A enrolled for node, or a
      |                                                          |   one-time token + allowed boot digest
      | <---- WELCOME {eG, nG, G} sig_G(hello digest, eG, nG) -- |   (token burnt, A bound to node)
      | sig_G recovers to pinned G?                              |
      | keys = HKDF(X25519(eA, eG), salt = sha256(hello||welcome)) -> k_a2g, k_g2a (epoch 0)
      | ==== FINISHED {sig_A(welcome digest)} (first record) ===> | decrypts (eA proven) and sig_A over
      |                                                          |   nG (A live now): only then is the
      |                                                          |   session installed (a replayed HELLO
      |                                                          |   never displaces the live one)
      | <==== REQ {op, ...} (ChaCha20-Poly1305, epoch, seq) ==== |  gateway is the only requester
      | ===== RESP {...} =======================================>|
      | <==== REKEY {eG'} (every N requests or T seconds) ====== |  fresh X25519 each time:
      | ===== REKEY-ACK {eA'} ==================================>|  keys' = HKDF(X25519, salt = old keys)
      |            both switch to epoch+1; old keys dropped      |

Records: 4-byte length | type | epoch(4) | seq(8) | AEAD(ciphertext); header is the AAD, the nonce is the
sequence number, which must increase by exactly one (replays and reorders are refused). An agent that
sees more than 2N records in one epoch closes the channel: a gateway that stops rotating is caught.

The record layer is `trustcap.channel` in the core, shared by both ends.
"""

from __future__ import annotations

import functools
import socket
import time
from collections.abc import Callable

from trustcap.gateway.errors import ChannelError

from trustcap import channel

__all__ = ["MAX_FRAME", "SecureChannel", "derive_keys", "new_ephemeral", "read_frame", "write_frame"]

# --- record layer: trustcap.channel (one implementation for both ends), raising this component's error ---
MAX_FRAME = channel.MAX_FRAME
new_ephemeral = channel.new_ephemeral
encode_msg = channel.encode_msg
write_frame = functools.partial(channel.write_frame, error=ChannelError)
read_frame = functools.partial(channel.read_frame, error=ChannelError)
derive_keys = functools.partial(channel.derive_keys, error=ChannelError)
decode_msg = functools.partial(channel.decode_msg, error=ChannelError)


class SecureChannel(channel.SecureChannel):
    """The shared record layer, raising this component's ChannelError."""

    def __init__(self, sock: socket.socket, send_key: bytes, recv_key: bytes, *, role: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(sock, send_key, recv_key, role=role, clock=clock, error=ChannelError)
