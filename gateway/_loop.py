"""The one polling loop of the gateway's capsule work (Participant, CommitteeMember, Runner).

Each of them reads its whole state from Kubernetes objects on every pass, so a pass that fails (an API
outage, a chain that is not up yet, a bug in one object's handling) is logged and the next pass simply
starts over: the loop outlives every error of one pass.
"""

from __future__ import annotations

import logging
import threading
from typing import ClassVar

from trustcap.errors import TrustcapError

log = logging.getLogger("trustcap.gateway")


class PollingLoop:
    """Calls `step()` every `poll_s` seconds on a daemon thread between `start()` and `stop()`.

    A subclass calls `_init_loop(poll_s)` in its constructor, names its thread and its pass, and may
    read `_halt` inside `step` to end a long pass early when it is stopped."""

    loop_name: ClassVar[str] = "trustcap-gateway-loop"
    step_label: ClassVar[str] = "pass"

    poll_s: float
    _halt: threading.Event
    _thread: threading.Thread | None

    def _init_loop(self, poll_s: float) -> None:
        self.poll_s = poll_s
        self._halt = threading.Event()
        self._thread = None

    def step(self) -> int:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._halt.clear()
        self._thread = threading.Thread(target=self._poll, name=self.loop_name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ends the loop after the pass under way. A thread that outlived `timeout_s` is kept, so a
        `start()` right after cannot run a second loop beside it."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if not self._thread.is_alive():
                self._thread = None

    def _poll(self) -> None:
        while not self._halt.is_set():
            try:
                self.step()
            except (TrustcapError, OSError) as exc:
                log.warning("%s failed, will retry: %s", self.step_label, exc)
            except Exception:  # the loop outlives a bug in one pass; the next pass starts from the objects
                log.exception("%s failed, will retry", self.step_label)
            self._halt.wait(self.poll_s)
