"""The relay's verifier directory: which trust-root addresses may challenge this gateway's agent.

A committee verifier is another Pi gateway; its identity is its trust root's secp256k1 address, which
the cluster lists as a Gateway object (`spec.address`). The relay asks one question, `allowed(address)`,
so where the answer comes from is wiring:

- `StaticDirectory`: addresses given on the command line (`--verifier ADDR`, repeatable): a small fixed
  network, or a lab.
- `KubeGatewayDirectory`: every `gateways.trustcap.io` object's `spec.address`, listed at most once per
  `ttl_s` (~30 s): a new Pi becomes a verifier within a TTL of its Gateway object being created, a removed
  one stops being one within a TTL. With `miss_s`, an address not in the set lists again, at most once
  per `miss_s` (the gateway uses 5 s), so a Gateway whose `lastSeen` the operator has just written is a
  verifier within seconds, and a flood of unknown signers is not a flood of API calls. A failed list
  keeps the last good set and is logged (an API-server restart must not lock the committee out), and is
  retried no sooner than `retry_s`, so a dead API server does not turn every challenge into a blocking
  API call.
- `AnyDirectory`: both sources at once.

A Gateway object is not trust by itself (decision 0097): `KubeGatewayDirectory` drops a Gateway whose
status says the chain judged it other than Active (Offline = exited or slashed, Slashed, Pending,
Registered with no stake), one whose `status.lastSeen` is older than `max_age_s` (its status is no longer
refreshed: offline, or nobody is judging it), and, given a chain view (`chain_active`), one the chain
itself does not call active and staked. A Gateway with no status at all is kept unless `require_active`
(no chain in the cluster judges anyone; a chain-configured gateway sets it), and one without `lastSeen`
unless `require_seen` (the gateway's `__main__` sets it by default: the operator writes `lastSeen` only
after the Gateway's own key signed the operator's fresh nonce at its endpoint, operator/gateway.py,
decision 0114).

Addresses are compared in EIP-55 form: Gateway objects may hold lowercase addresses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, cast

from eth_utils.address import to_checksum_address

from trustcap.api import GATEWAYS, GROUP, VERSION
from trustcap.forms import parse_rfc3339
from trustcap.gateway.attest_errors import DirectoryError

__all__ = ["AnyDirectory", "KubeGatewayDirectory", "StaticDirectory", "VerifierDirectory", "gateway_refusal",
           "normalize_address"]

log = logging.getLogger("trustcap.gateway")
PLURAL = GATEWAYS


class VerifierDirectory(Protocol):
    def allowed(self, address: str) -> bool: ...


def normalize_address(value: Any) -> str:
    """EIP-55 form of a 0x address (lowercase accepted); DirectoryError naming the value if it is not one."""
    try:
        if not isinstance(value, str) or len(value) != 42 or not value.startswith("0x"):
            raise ValueError("not 0x + 40 hex digits")
        int(value[2:], 16)
        if value[2:] != value[2:].lower() and value[2:] != value[2:].upper() and to_checksum_address(value) != value:
            raise ValueError("mixed case that is not its EIP-55 checksum")
        return str(to_checksum_address(value))
    except ValueError as exc:
        raise DirectoryError(f"verifier address {str(value)[:64]!r} is not an Ethereum address: {exc}") from None


class StaticDirectory:
    """A fixed set of verifier addresses."""

    def __init__(self, addresses: Iterable[str]) -> None:
        self.addresses = frozenset(normalize_address(a) for a in addresses)

    def allowed(self, address: str) -> bool:
        return address in self.addresses


class AnyDirectory:
    """Allowed if any of the directories allows it."""

    def __init__(self, *directories: VerifierDirectory) -> None:
        self.directories = directories

    def allowed(self, address: str) -> bool:
        return any(d.allowed(address) for d in self.directories)


def _kube_lister(kubeconfig: str | None, timeout_s: float) -> Callable[[], list[dict[str, Any]]]:
    import yaml
    from kubernetes import client
    from kubernetes.config.config_exception import ConfigException

    try:
        from trustcap.kubeclient import api_client as kube_api_client

        api_client = kube_api_client(kubeconfig)
    except (ConfigException, OSError, ValueError, yaml.YAMLError) as exc:
        raise DirectoryError(f"cannot load kubeconfig {kubeconfig or 'in-cluster'!r}: {exc}") from exc
    api = client.CustomObjectsApi(api_client)

    def list_gateways() -> list[dict[str, Any]]:
        doc = cast(dict[str, Any], api.list_cluster_custom_object(GROUP, VERSION, PLURAL,
                                                                   _request_timeout=timeout_s))
        return cast(list[dict[str, Any]], doc.get("items") or [])

    return list_gateways


_parse_time = parse_rfc3339


def gateway_refusal(item: Mapping[str, Any], *, now: float, max_age_s: float, require_active: bool,
                    require_seen: bool) -> str | None:
    """Why this Gateway object is no verifier by its status (None: it is one). The chain's own answer,
    when the directory has a chain view, is checked apart (`KubeGatewayDirectory.chain_active`)."""
    status = item.get("status") or {}
    phase = status.get("phase")
    if phase is None:
        if require_active:
            return "no chain state in its status (not judged Active by the operator)"
    elif phase != "Active":
        return f"its status says {phase} on chain, not Active"
    seen_raw = status.get("lastSeen")
    if seen_raw is None:
        return "its status has no lastSeen" if require_seen else None
    seen = _parse_time(seen_raw)
    if seen is None:
        return f"its status.lastSeen {str(seen_raw)[:40]!r} is not an RFC 3339 time"
    if now - seen > max_age_s:
        return f"offline: its status was last refreshed {now - seen:.0f} s ago (lastSeen), over {max_age_s:.0f} s"
    return None


class KubeGatewayDirectory:
    """Every live, chain-active Gateway object's `spec.address`, cached for `ttl_s`; a failed list keeps
    the last good set.

    `chain_active(address)` (optional) is the gateway's own chain view: True when the NodeRegistry calls
    the address active and staked; raising counts as a failed list (the last good set is kept)."""

    def __init__(self, kubeconfig: str | None = None, *, ttl_s: float = 30.0, retry_s: float = 5.0,
                 timeout_s: float = 5.0, lister: Callable[[], list[dict[str, Any]]] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 max_age_s: float = 120.0, require_active: bool = False, require_seen: bool = False,
                 chain_active: Callable[[str], bool] | None = None, miss_s: float | None = None) -> None:
        self._list = lister if lister is not None else _kube_lister(kubeconfig, timeout_s)
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self.clock = clock
        self.wall = wall
        self.max_age_s = max_age_s
        self.require_active = require_active
        self.require_seen = require_seen
        self.chain_active = chain_active
        self.miss_s = miss_s
        self._miss_next = float("-inf")  # an unknown address lists again no sooner than this
        self.dropped: dict[str, str] = {}  # Gateway name -> why it is no verifier (last refresh)
        self.addresses: frozenset[str] = frozenset()
        self.loaded = False  # at least one list succeeded
        self.failures = 0
        self._next = float("-inf")
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """List now; on failure keep the last good set (logged) and try again after `retry_s`."""
        try:
            items = self._list()
        except Exception as exc:  # any API, transport or answer failure: keep serving the last good set
            self.failures += 1
            self._next = self._miss_next = self.clock() + self.retry_s
            log.warning("verifier directory: listing Gateway objects failed (%s: %s); keeping the last good set "
                        "of %d", type(exc).__name__, str(exc)[:200], len(self.addresses))
            return
        found: set[str] = set()
        dropped: dict[str, str] = {}
        now = self.wall()
        try:
            for item in items:
                name = str(((item or {}).get("metadata") or {}).get("name", "?"))
                value = ((item or {}).get("spec") or {}).get("address")
                try:
                    address = normalize_address(value)
                except DirectoryError as exc:
                    log.warning("verifier directory: Gateway %s skipped: %s", name, exc)
                    continue
                why = gateway_refusal(item or {}, now=now, max_age_s=self.max_age_s,
                                      require_active=self.require_active, require_seen=self.require_seen)
                if why is None and self.chain_active is not None and not self.chain_active(address):
                    why = "the NodeRegistry does not call it active and staked (exited, slashed or unstaked)"
                if why is not None:
                    dropped[name] = why
                    continue
                found.add(address)
        except Exception as exc:  # the chain view failed: same rule as a failed list, keep the last good set
            self.failures += 1
            self._next = self._miss_next = self.clock() + self.retry_s
            log.warning("verifier directory: asking the chain failed (%s: %s); keeping the last good set of %d",
                        type(exc).__name__, str(exc)[:200], len(self.addresses))
            return
        for name, why in dropped.items():
            if self.dropped.get(name) != why:
                log.warning("verifier directory: Gateway %s is no verifier: %s", name, why)
        self.dropped = dropped
        if found != self.addresses:
            log.info("verifier directory: %d Gateway address(es)", len(found))
        self.addresses = frozenset(found)
        self.loaded = True
        self._next = self.clock() + self.ttl_s
        self._miss_next = float("inf") if self.miss_s is None else self.clock() + self.miss_s

    def allowed(self, address: str) -> bool:
        with self._lock:  # one list at a time; others wait for its result rather than list again
            now = self.clock()
            if now >= self._next or (address not in self.addresses and now >= self._miss_next):
                self.refresh()
            return address in self.addresses
