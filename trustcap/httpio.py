"""What the project's small HTTP servers (the relay, the key-release broker) share about reading a body."""

from __future__ import annotations

import io
import time

__all__ = ["drain"]


def drain(rfile: io.BufferedIOBase, declared: int, *, cap: int, timeout_s: float) -> None:
    """Read and drop an oversize body, at most `cap` bytes and `timeout_s` seconds, before answering 413.

    A client that sends its whole body before it reads the answer (urllib does) would otherwise meet a
    closed socket mid-send and see a broken pipe instead of the refusal; the bounds keep a refused body
    from costing more than a few times an accepted one.
    """
    left = min(declared, cap)
    deadline = time.monotonic() + timeout_s
    try:
        while left > 0 and time.monotonic() < deadline and (chunk := rfile.read1(min(left, 64 * 1024))):
            left -= len(chunk)
    except OSError:
        pass
