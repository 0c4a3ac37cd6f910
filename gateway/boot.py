"""The HPC's boots as the gateway runs them: one one-time token per boot, and the `reboot` wipe.

Per-boot tokens (`BootArming`). The gateway arms a token when the HPC is meant to boot (at start, and for
a reboot) and writes it to the token file that the boot services follow (netboot `--token-file`): DHCP
answers the HPC only while a token is armed and hands out exactly that one. When the boot enrols, the
token is burnt and the file cleared, so the HPC is not served again until the gateway means it to boot
(docs/design.md: netboot serves a node only while it is meant to boot). An armed token that waits long is
replaced at half its lifetime; the one it replaces stays valid to the end of its own, so a boot already
in flight with it still enrols.

The `reboot` wipe (`Rebooter`), the strongest clean (docs/design.md, verified wipe; HPCNode policy
`wipe: Reboot`): nothing of a boot survives a power cycle into a fresh image from the gateway, and the
gateway, not the agent being thrown away, proves it:

    request (monitor action `reboot`, or annotation trustcap.io/reboot=<id> on the HPCNode)
      | HPCNode lastWipe{request, state InProgress, startedAt} (the operator derives phase Wiping from it)
      | TokenBook.revoke(node): the old boot key can never reconnect; drop the live session
      | BootArming.arm(): a fresh token -> token file -> netboot DHCP serves the HPC again
      | the HPC link's carrier count (the Pi's own kernel: /sys/class/net/IFACE/carrier_changes)
      | power-cycle command (GPIO relay, IPMI, Wake-on-LAN; in the lab a qemu reset with the link cut)
      |                                   HPC: PXE -> approved image -> new boot key -> enrols with the token
      | the carrier count again at the instant the new key enrols: down and up since the power command?
      | wait for a session under a new key; quote it on a fresh nonce (the next reboot's baseline too)
      | proof: before/after keys, approved image, carrier counts, measurements after vs the old boot's first quote
      v signed by the trust root -> journal line + HPCNode lastWipe (the operator also re-verifies the
        new enrolment and calls the node Enrolled again)

RAM: a real power cycle clears it; in the qemu lab the reset is a `system_reset`, which does not.

What the Pi sees itself (issue 12 item 19, decision 0119). A new key enrolling from an approved image is
also what HPC software that never rebooted can produce: it can ask DHCP for the armed token and make a
key. So the proof also needs the link's carrier to have dropped and come back between the power command
and the new key's enrolment, as the Pi's own kernel counts it (`linkCycled`; the counter cannot be reset
from the HPC). A power cycle drops it on every NIC; forging it takes HPC software that downs and ups its
own link at the right moment, which the proof's notCovered still says. `linkCycled` is the one check that
a null does not pass: without a watched link the proof is never clean (the gateway refuses
--reboot-command without a link to watch; a Rebooter made without one says so in the proof).
`matchesBaseline` may be null: the gateway compares measurements with the first quote of the old boot it
saw, and a restarted gateway has none; notCovered then says the measurements were not compared.
The request id is the requester's nonce: the proof names it and the trust root signs it, so a proof
answers one request only.
The gateway writes only `status.lastWipe`, never the phase (decision 0113): the operator calls the node
Wiping while a wipe is InProgress and no enrolment newer than its start has been verified.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trustcap.evidence import Signer, quote_digest, sign_wipe_proof, wipe_proof_digest
from trustcap.gateway.actions import failed_claims
from trustcap.gateway.enrol import Enrolment, TokenBook
from trustcap.gateway.errors import GatewayError
from trustcap.gateway.monitor import CheckRecord
from trustcap.gateway.publish import HPCNodeStore, status_time
from trustcap.gateway.server import AgentSession, AttestationServer

__all__ = ["REBOOT_ANNOTATION", "BootArming", "CarrierWatch", "RebootRequests", "Rebooter", "write_private"]

log = logging.getLogger("trustcap.gateway")
REBOOT_ANNOTATION = "trustcap.io/reboot"
_KEEP = 8  # boots' first quotes and proofs kept in memory


class _Periodic:
    """Run `tick` every `every_s` seconds in a daemon thread until `stop()`."""

    def __init__(self, name: str, every_s: float, tick: Callable[[], object]) -> None:
        self._stop = threading.Event()
        self._every_s = every_s
        self._tick = tick
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._every_s):
            self._tick()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def write_private(path: Path, text: str) -> None:
    """Replace `path` atomically with `text`, mode 0600 (a reader never sees half a token)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class BootArming:
    """The token armed for the HPC's next boot, kept in the token file netboot follows."""

    def __init__(self, tokens: TokenBook, node: str, path: Path, *, refresh_s: float | None = None,
                 boot_timeout_s: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.tokens = tokens
        self.node = node
        self.path = path
        self.refresh_s = refresh_s if refresh_s is not None else tokens.ttl / 2
        self.boot_timeout_s = boot_timeout_s
        self.clock = clock
        self.token: str | None = None
        self.armed_at = 0.0   # when the current token was minted (refreshes included)
        self.boot_since: float | None = None  # when the awaited boot was asked for (start, reboot; not a refresh)
        self._lock = threading.Lock()
        self._refresher: _Periodic | None = None
        tokens.on_enrolled.append(self._enrolled)

    def arm(self, *, refresh: bool = False) -> str:
        """Mint the next boot's token and publish it to the boot services (`refresh`: the same boot is
        still awaited, only its token is renewed)."""
        with self._lock:
            self.token = self.tokens.issue(self.node)
            self.armed_at = self.clock()
            if not refresh or self.boot_since is None:
                self.boot_since = self.armed_at
            write_private(self.path, self.token + "\n")
        log.info("boot of %s armed: one-time token written to %s", self.node, self.path)
        return self.token

    def disarm(self) -> None:
        with self._lock:
            self.token = None
            self.tokens.drop_pending(self.node)
            write_private(self.path, "")

    def _enrolled(self, e: Enrolment) -> None:
        if e.node_id == self.node:
            self.disarm()
            log.info("boot of %s enrolled: token burnt, DHCP stops serving it", self.node)

    def awaiting_boot(self) -> bool:
        """True while a boot is armed and not yet enrolled, within `boot_timeout_s` of being asked for: the
        monitor then reports the HPC as booting instead of acting on a missing agent."""
        with self._lock:
            return (self.token is not None and self.boot_since is not None
                    and self.clock() - self.boot_since < self.boot_timeout_s)

    def refresh_due(self) -> bool:
        with self._lock:
            return self.token is not None and self.clock() - self.armed_at >= self.refresh_s

    def _refresh(self) -> None:
        if self.refresh_due():
            self.arm(refresh=True)

    def start(self, poll_s: float = 5.0) -> BootArming:
        self._refresher = _Periodic("trustcap-boot-arming", poll_s, self._refresh)
        self._refresher.start()
        return self

    def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.stop()


class CarrierWatch:
    """The HPC link's carrier as the Pi's kernel counts it: `carrier_changes` rises by one on every drop and
    every return of the link, and nothing on the far side of the cable can lower it."""

    def __init__(self, iface: str, sysfs: Path = Path("/sys/class/net")) -> None:
        if not iface or "/" in iface or iface in (".", ".."):
            raise GatewayError(f"carrier link {iface!r} is not an interface name")
        self.iface = iface
        self._path = sysfs / iface / "carrier_changes"

    def changes(self) -> int:
        """The count now; GatewayError when the interface is gone or the kernel does not count it."""
        try:
            return int(self._path.read_text().strip())
        except (OSError, ValueError) as exc:
            raise GatewayError(f"cannot read the carrier count of {self.iface} ({self._path}): {exc}") from exc


class Rebooter:
    """Runs the `reboot` wipe for one HPC and signs what it saw (one at a time; see the module doc)."""

    def __init__(self, server: AttestationServer, arming: BootArming, power: Callable[[str], None],
                 root: Signer, *, boot_timeout_s: float = 600.0, store: HPCNodeStore | None = None,
                 sinks: list[Callable[[dict[str, Any]], None]] | None = None,
                 wall: Callable[[], float] = time.time, carrier: CarrierWatch | None = None) -> None:
        self.server = server
        self.arming = arming
        self.tokens = arming.tokens
        self.node = arming.node
        self.power = power
        self.root = root
        self.boot_timeout_s = boot_timeout_s
        self.store = store
        self.sinks = list(sinks or [])
        self.wall = wall
        self.proofs: deque[dict[str, Any]] = deque(maxlen=_KEEP)  # the latest signed proofs (journal: all)
        self._boot_quotes: dict[str, dict[str, Any]] = {}  # agent key -> its boot's first quote (summary)
        self.carrier = carrier
        self._carrier_at_enrol: dict[str, int | str] = {}  # agent key -> carrier count when it enrolled (or why not)
        self._carrier_lock = threading.Lock()
        if carrier is not None:
            self.tokens.on_enrolled.append(self._count_carrier)
        self._quote_lock = threading.Lock()
        self._busy = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- each boot's first quote: the baseline the next reboot is compared with -----------------------------
    def on_session(self, session: AgentSession) -> None:
        """Server hook: quote each newly enrolled boot once, off the accept thread."""
        key = session.enrolment.agent_key
        if key not in self._boot_quotes:
            threading.Thread(target=self._boot_quote_quietly, args=(key,), daemon=True,
                             name="trustcap-boot-quote").start()

    def _count_carrier(self, enrolment: Enrolment) -> None:
        """TokenBook hook, at the instant a key enrols: inside the handshake, before the session is
        installed (so before anything waiting for the new boot can see it), on the accept thread. A link
        toggle after this does not count."""
        if enrolment.node_id != self.node or self.carrier is None:
            return
        try:
            count: int | str = self.carrier.changes()
        except GatewayError as exc:
            count = str(exc)
        with self._carrier_lock:  # accept threads of several handshakes may run this at once
            self._carrier_at_enrol.setdefault(enrolment.agent_key, count)
            while len(self._carrier_at_enrol) > _KEEP:
                self._carrier_at_enrol.pop(next(iter(self._carrier_at_enrol)), None)

    def _boot_quote_quietly(self, key: str) -> None:
        try:
            self.boot_quote(key)
        except GatewayError as exc:
            log.warning("first quote of boot key %s not taken: %s", key[:12], exc)

    def boot_quote(self, key: str) -> dict[str, Any]:
        with self._quote_lock:
            if key in self._boot_quotes:
                return self._boot_quotes[key]
            nonce = os.urandom(32)
            signed = self.server.challenge(nonce)
            if signed.quote.agent_key != key:
                raise GatewayError("the connected agent is not the boot being quoted")
            q = {"agentKey": key, "bootImageDigest": signed.quote.boot_image_digest, "nonce": "0x" + nonce.hex(),
                 "quoteDigest": "0x" + quote_digest(signed.quote).hex(),
                 "measurements": dict(signed.quote.measurements)}
            self._boot_quotes[key] = q
            while len(self._boot_quotes) > _KEEP:  # only the latest boots can be a baseline
                del self._boot_quotes[next(iter(self._boot_quotes))]
            return q

    # -- the reboot ------------------------------------------------------------------------------------------
    def request(self, reason: str, request_id: str = "") -> bool:
        """Start a reboot in the background; False (and nothing done) while one is running."""
        if not self._busy.acquire(blocking=False):
            log.info("reboot of %s already in progress; request %r joins it", self.node, request_id or reason)
            return False
        self._thread = threading.Thread(target=self._run_locked, args=(reason, request_id), daemon=True,
                                        name="trustcap-reboot")
        self._thread.start()
        return True

    def __call__(self, rec: CheckRecord) -> None:
        """Monitor hook for the policy action `reboot`."""
        started = self.request(f"monitor: {failed_claims(rec)}")
        rec.extra["reboot"] = "started" if started else "already-in-progress"

    def reboot(self, reason: str, request_id: str = "") -> dict[str, Any]:
        """Blocking: the whole reboot; the signed proof (also when it failed: `clean` false, `error`)."""
        with self._busy:
            return self._reboot(reason, request_id)

    def _run_locked(self, reason: str, request_id: str) -> None:
        try:
            self._reboot(reason, request_id)
        except Exception:  # never lose the lock to a bug: the next request must be able to run
            log.exception("reboot of %s failed unexpectedly", self.node)
        finally:
            self._busy.release()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _reboot(self, reason: str, request_id: str) -> dict[str, Any]:
        started = self.wall()
        t0 = time.monotonic()
        session = self.server.session
        before = None if session is None else {"agentKey": session.enrolment.agent_key,
                                               "bootImageDigest": session.enrolment.boot_digest}
        baseline = None if before is None else self._boot_quotes.get(before["agentKey"])
        self._patch({"level": "Reboot", "request": request_id, "state": "InProgress",
                     "startedAt": status_time(started)})
        log.warning("rebooting HPC %s: %s", self.node, reason)
        revoked, _ = self.tokens.revoke(self.node)
        self.arming.arm()  # before the session goes: the monitor sees a boot awaited, not a lost agent
        self.server.drop_session()
        proof: dict[str, Any] = {
            "version": 1, "level": "reboot", "node": self.node, "gateway": self.root.address,
            "request": request_id, "reason": reason[:1024], "requestedAt": int(started),
            "before": before, "after": None, "baseline": None if baseline is None else {
                "agentKey": baseline["agentKey"], "quoteDigest": baseline["quoteDigest"]},
            "measurements": {"same": [], "differ": []}, "revokedKeys": len(revoked), "error": "",
            "notCovered": [] if self.carrier is not None else [
                "the HPC link's carrier: the gateway watched no link (--carrier-link), so nothing it saw itself "
                "shows the HPC lost power"],
        }
        after = None
        checks: dict[str, bool | None] = {"powerCycled": False, "newBootKey": None, "approvedImage": None,
                                          "matchesBaseline": None, "linkCycled": None}
        carrier_before: int | None = None
        try:
            if self.carrier is not None:
                carrier_before = self.carrier.changes()
            self.power(reason)
            checks["powerCycled"] = True
            new = self.server.wait_for_new_session(None if before is None else before["agentKey"],
                                                   self.boot_timeout_s)
            self._judge_carrier(proof, checks, carrier_before, new.enrolment.agent_key)
            after = self.boot_quote(new.enrolment.agent_key)
        except (GatewayError, OSError) as exc:
            proof["error"] = str(exc)[:1024]
            log.error("reboot of %s did not complete: %s", self.node, exc)
        if self.carrier is not None and checks["linkCycled"] is None:
            checks["linkCycled"] = False  # watched, but never judged: no count before, or no new boot
        proof["seconds"] = round(time.monotonic() - t0, 1)
        if after is not None:
            proof["enrolledAt"] = int(self.wall())
            proof["after"] = {k: after[k] for k in ("agentKey", "bootImageDigest", "quoteDigest", "nonce")}
            checks["newBootKey"] = before is None or after["agentKey"] != before["agentKey"]
            checks["approvedImage"] = after["bootImageDigest"] in self.tokens.allowed
            if baseline is not None:
                names = sorted(set(baseline["measurements"]) | set(after["measurements"]))
                same = [n for n in names if baseline["measurements"].get(n) == after["measurements"].get(n)]
                proof["measurements"] = {"same": same, "differ": [n for n in names if n not in same]}
                checks["matchesBaseline"] = not proof["measurements"]["differ"]
            else:
                proof["notCovered"].append("the new boot's measurements: this gateway holds no quote of the old "
                                           "boot to compare them with (it started after that boot)")
        proof["checks"] = checks
        # Every check that was made passed, and the carrier was seen to drop (never null: the one check
        # only the Pi can make, decision 0119).
        proof["clean"] = after is not None and checks["linkCycled"] is True and \
            all(v is not False for v in checks.values())
        signed = sign_wipe_proof(proof, self.root)
        self._finish(signed)
        return signed

    def _judge_carrier(self, proof: dict[str, Any], checks: dict[str, bool | None], before: int | None,
                       key: str) -> None:
        """linkCycled: the carrier dropped and came back (count +2 or more) between the power command and
        the instant the new key enrolled. A count that could not be read is a failed check, named."""
        if self.carrier is None or before is None:
            return
        deadline = time.monotonic() + 2.0  # counted inside the handshake: normally there already
        while (at_enrol := self._carrier_count_at_enrol(key)) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if at_enrol is None:  # a count taken now could include a toggle after the enrolment: refuse instead
            at_enrol = "not taken at enrolment (the key did not enrol through this Rebooter's TokenBook)"
        proof["link"] = {"iface": self.carrier.iface, "carrierChangesBefore": before,
                         "carrierChangesAtEnrolment": at_enrol if isinstance(at_enrol, int) else None}
        if not isinstance(at_enrol, int):
            proof["error"] = f"carrier count at enrolment: {at_enrol}"[:1024]
            checks["linkCycled"] = False
            return
        checks["linkCycled"] = at_enrol - before >= 2
        if not checks["linkCycled"]:
            log.error("reboot of %s: link %s never dropped between the power command and the new enrolment "
                      "(carrier changes %d -> %d): not a power cycle the Pi saw", self.node, self.carrier.iface,
                      before, at_enrol)

    def _carrier_count_at_enrol(self, key: str) -> int | str | None:
        with self._carrier_lock:
            return self._carrier_at_enrol.get(key)

    def _finish(self, signed: dict[str, Any]) -> None:
        proof = signed["proof"]
        self.proofs.append(signed)
        for sink in self.sinks:
            try:
                sink(signed)
            except Exception as exc:  # a full disk must not lose the HPCNode status below
                log.error("reboot proof not exported: %s", exc)
        text = json.dumps(signed, sort_keys=True, separators=(",", ":"))
        failed = ", ".join([k for k, v in proof["checks"].items() if v is False] +
                           (["linkCycled (no carrier watched)"] if proof["checks"].get("linkCycled") is None else []))
        self._patch({"level": "Reboot", "request": proof["request"],
                     "state": "Clean" if proof["clean"] else "Failed", "clean": proof["clean"],
                     "startedAt": status_time(proof["requestedAt"]), "time": status_time(self.wall()),
                     "proof": text, "proofDigest": "sha256:" + wipe_proof_digest(proof).hex(),
                     "message": proof["error"] or ("clean" if proof["clean"] else "checks failed: " + failed)})
        log.warning("reboot of %s finished: clean=%s in %.1f s", self.node, proof["clean"], proof["seconds"])

    def _patch(self, last_wipe: dict[str, Any]) -> None:
        if self.store is None:
            return
        try:
            self.store.patch_status(self.node, {"status": {"lastWipe": last_wipe}})
        except Exception as exc:  # the API being down must not stop the reboot; the journal has the proof
            log.error("HPCNode %s status not updated for the reboot: %s", self.node, exc)


class RebootRequests:
    """Follow the HPCNode's `trustcap.io/reboot` annotation: each new value is one reboot request.

    `kubectl annotate hpcnode NODE trustcap.io/reboot=$(date +%s) --overwrite` asks for a reboot; the
    operator will do the same for a capsule whose node's policy says `wipe: Reboot`. A value already in
    `status.lastWipe.request`, or already taken by this process, is not served twice.
    """

    def __init__(self, rebooter: Rebooter, store: HPCNodeStore, *, poll_s: float = 2.0) -> None:
        self.rebooter = rebooter
        self.store = store
        self.poll_s = poll_s
        self.taken: set[str] = set()
        self._poller = _Periodic("trustcap-reboot-requests", poll_s, self.poll)

    def recover(self) -> bool:
        """At start: a reboot this gateway left InProgress (it was restarted mid-reboot) lost its proof;
        say so (state Failed, request kept so the same annotation value is not served again)."""
        try:
            last = (self.store.get(self.rebooter.node).get("status") or {}).get("lastWipe") or {}
            if last.get("state") != "InProgress":
                return False
            self.store.patch_status(self.rebooter.node, {"status": {"lastWipe": {
                **last, "state": "Failed", "clean": False,
                "message": "the gateway restarted during this reboot; its proof is lost (ask again for a new one)"}}})
        except Exception as exc:
            log.error("could not close the interrupted reboot of %s: %s", self.rebooter.node, exc)
            return False
        log.warning("reboot of %s was interrupted by a gateway restart; marked Failed", self.rebooter.node)
        return True

    def poll(self) -> str | None:
        """Check once; the request id started, if any."""
        try:
            node = self.store.get(self.rebooter.node)
        except Exception as exc:
            log.debug("HPCNode not readable for reboot requests: %s", exc)
            return None
        value = ((node.get("metadata") or {}).get("annotations") or {}).get(REBOOT_ANNOTATION)
        served = ((node.get("status") or {}).get("lastWipe") or {}).get("request")
        if not value or value == served or value in self.taken:
            return None
        if len(value) > 253:
            log.error("%s annotation on %s is longer than 253 characters; ignored", REBOOT_ANNOTATION,
                      self.rebooter.node)
            self.taken.add(value)
            return None
        if not self.rebooter.request(f"requested by annotation {REBOOT_ANNOTATION}={value}", request_id=value):
            return None  # one is running; this value is seen again on a later poll
        self.taken.add(value)
        return str(value)

    def start(self) -> RebootRequests:
        self.recover()
        self._poller.start()
        return self

    def stop(self) -> None:
        self._poller.stop()
