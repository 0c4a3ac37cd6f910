"""`python3 -m trustcap.gateway`: the Pi's attestation services for its one HPC, wired together.

    trust root (--trustroot DIR)  ->  AttestationServer (--listen, the HPC link)  <- agent enrols, answers
    TokenBook (--boot-digest ...)     BootArming: one one-time token per boot in --token-file (0600), which
                                      netboot follows (DHCP serves the HPC only while one is armed, option
                                      224 -> trustcap.token=); cleared once that boot enrolled
    Rebooter (--reboot-command)       the `reboot` wipe: revoke the boot key, arm a token, power-cycle, wait
                                      for a fresh enrolment, sign the proof (journal + HPCNode lastWipe);
                                      asked by the monitor's `reboot` action or trustcap.io/reboot=<id>
    GatewayPolicy (--policy FILE) ->  Monitor: checks at exponential random times, actions; every record
                                      to --journal (JSON lines, rotated) before memory's bounded window
                                  ->  RelayService (--relay, the cluster side): committee challenges, and
                                      liveness answers the operator turns into Gateway.status.lastSeen
                                  ->  MetricsService (--metrics-address, loopback by default): /metrics
                                      and the node's expiring trust status, for the Pi's operator only
    with --chain-rpc, --deployment and --kubeconfig, the capsule lifecycle (docs/decisions/0090-*):
    Participant                       commit on chain and reveal privately for every funded capsule
    CommitteeMember                   challenge, appraise and sign a verdict in every round it sits on
    Runner                            prepare, release inputs through the owners' brokers, run, store
                                      the sealed results, for every CapsuleRun that names this gateway
    CosignService (relay /v1/cosign)  co-sign a chain-writer batch once every leaf is checked (0094)

Only wiring lives here (`assemble`, with the outside world it reaches injected as `Hooks`, so a test can
build a whole gateway without a Zymkey, a cluster or a chain); each part's module says why it is built
the way it is.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustcap.api import HPCNodePhase
from trustcap.errors import ConfigError, TrustcapError
from trustcap.forms import hex_digest

if TYPE_CHECKING:
    from trustcap.gateway.server import AgentSession
    from trustcap.gateway.verifiers import VerifierDirectory


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _hostport_or_off(value: str) -> tuple[str, int] | None:
    return None if value == "off" else _hostport(value)


def _digest(value: str) -> str:
    digest = hex_digest(value)
    if digest is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not sha256:<64 hex>")
    return digest


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m trustcap.gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trustroot", type=Path, required=True, help="trust root home (Zymkey or software store)")
    p.add_argument("--kek-file", type=Path, help="KEK of a software trust root (else $TRUSTCAP_TRUSTROOT_KEK)")
    p.add_argument("--node", required=True, help="the HPCNode this gateway serves")
    p.add_argument("--boot-digest", type=_digest, action="append", required=True,
                   help="an approved boot-image digest (sha256:HEX); repeat for several")
    p.add_argument("--policy", type=Path, required=True, help="GatewayPolicy YAML (monitoring and attestation)")
    p.add_argument("--listen", type=_hostport, required=True, help="HOST:PORT for the agent, on the HPC link")
    p.add_argument("--relay", type=_hostport, required=True, help="HOST:PORT of the relay, on the cluster side")
    p.add_argument("--verifier", action="append", default=[], metavar="ADDR",
                   help="a committee verifier's trust-root address (0x...) allowed to challenge through the relay; "
                        "repeat for several. With --kubeconfig, every Gateway object's spec.address is allowed too. "
                        "One of the two is required: the relay serves only signed challenges of known verifiers")
    p.add_argument("--directory-max-age", type=float, default=180.0, metavar="SECONDS",
                   help="a Gateway object whose status.lastSeen (written by the operator once the Gateway's key "
                        "answered its liveness nonce) is older than this is no verifier (default 180: three of "
                        "the operator's 60 s writes)")
    p.add_argument("--directory-require-seen", action=argparse.BooleanOptionalAction, default=True,
                   help="a Gateway object the operator never saw (no status.lastSeen) is no verifier (default on; "
                        "turn it off only in a cluster whose operator does not probe gateways)")
    p.add_argument("--directory-require-active", action=argparse.BooleanOptionalAction, default=None,
                   help="a Gateway the operator has not judged Active on chain is no verifier, and the chain "
                        "itself is asked (default: on with --chain-rpc and --deployment)")
    p.add_argument("--metrics-address", type=_hostport_or_off, default=("127.0.0.1", 9466), metavar="HOST:PORT",
                   help="where /metrics and /v1/status are served, apart from the relay (default 127.0.0.1:9466; "
                        "'off' for none); anywhere but loopback needs --metrics-tls-cert, --metrics-tls-key and "
                        "--metrics-client-ca, since the counters say when this node is attested")
    p.add_argument("--metrics-tls-cert", default=None, help="PEM certificate of the metrics listener")
    p.add_argument("--metrics-tls-key", default=None, help="PEM key of the metrics listener")
    p.add_argument("--metrics-client-ca", default=None,
                   help="PEM CA whose client certificates alone may scrape the metrics listener")
    p.add_argument("--hpc-link", default=None, metavar="IFACE",
                   help="the Pi's interface to its HPC: guard it with nftables so the HPC reaches only the agent "
                        "channel (--listen, which must then be this link's IPv4 address) and netboot; the table "
                        "outlives the gateway (fail closed) and a restart replaces it atomically")
    p.add_argument("--netboot-tftp-port", type=int, default=69, metavar="PORT",
                   help="with --hpc-link: netboot's TFTP port on this link (0: none)")
    p.add_argument("--netboot-http-port", type=int, default=8080, metavar="PORT",
                   help="with --hpc-link: netboot's HTTP boot-file port on this link (0: none)")
    p.add_argument("--netboot-dhcp", action=argparse.BooleanOptionalAction, default=True,
                   help="with --hpc-link: let the HPC's DHCP requests reach the Pi (netboot's dnsmasq)")
    p.add_argument("--deny-network", action="append", default=[], metavar="CIDR",
                   help="with --hpc-link: an IPv4 network the HPC never reaches, whatever a manifest declares "
                        "(repeat it for the cluster's pod, service and node networks; beyond the Pi no address "
                        "check can tell those from the internet)")
    p.add_argument("--token-file", type=Path, required=True,
                   help="the one-time enrolment token armed for the HPC's next boot (mode 0600, replaced "
                        "atomically, empty when no boot is armed); give the same path to netboot serve")
    p.add_argument("--address-file", type=Path, default=None,
                   help="write this gateway's trust-root address (0x...) here at start, before any boot is "
                        "armed; give the same path to netboot serve --gateway-address-file, which hands it to "
                        "the HPC with the token so the agent pins this gateway")
    p.add_argument("--rekey-after", type=int, default=16, help="rotate channel keys every N requests")
    p.add_argument("--rekey-seconds", type=float, default=300.0, help="...or every T seconds")
    p.add_argument("--status-max-age", type=float, default=0.0,
                   help="seconds a passing check counts as fresh (default: max(maxQuoteAge, 10 x mean interval))")
    p.add_argument("--journal", type=Path, default=None,
                   help="append every monitor check record here as JSON lines, rotated by size (default: none; "
                        "records then live only in memory, the latest 1000, and in the Prometheus counters)")
    p.add_argument("--journal-max-bytes", type=int, default=10 * 1024 * 1024, help="rotate the journal at this size")
    p.add_argument("--journal-backups", type=int, default=5, help="rotated journal files kept (journal.1 ... .N)")
    p.add_argument("--kubeconfig", default=None,
                   help="publish each enrolment into the node's HPCNode status through this kubeconfig "
                        "('in-cluster' for a service account; default: no Kubernetes); with it, a check whose "
                        "policy action is quarantine also puts the HPCNode in Quarantined")
    p.add_argument("--reboot-command", default=None,
                   help="command that power-cycles this HPC (GPIO relay, IPMI, Wake-on-LAN), run when a check's "
                        "policy action is reboot, with TRUSTCAP_NODE and TRUSTCAP_REASON set; the gateway then "
                        "waits for the fresh boot to enrol and signs a wipe proof")
    p.add_argument("--carrier-link", default=None, metavar="IFACE",
                   help="with --reboot-command: the interface whose carrier the reboot wipe watches, which must "
                        "drop and return between the power command and the fresh boot's enrolment for the proof "
                        "to be clean (default: --hpc-link; --reboot-command without either is refused)")
    p.add_argument("--boot-timeout", type=float, default=600.0,
                   help="seconds an armed boot (at start, after a reboot) has to enrol: until then the monitor "
                        "reports the HPC as booting and takes no action; after it a reboot counts as failed")
    p.add_argument("--chain-rpc", default=None,
                   help="JSON-RPC URL of the chain (with --deployment and --kubeconfig: take part in capsules)")
    p.add_argument("--deployment", type=Path, default=None, help="the contracts' deployment.json")
    p.add_argument("--system-namespace", default="trustcap-system",
                   help="where the operator keeps rounds, run orders and reveals")
    return p


Lifecycle = tuple[list[Any], Any, Any, Any]  # (loops to start, round_members, before_capsule_quote, cosign)


def _lifecycle(args: argparse.Namespace, root: Any, server: Any, policy: Any, link: Any = None) -> Lifecycle:
    """(loops to start, round_members, before_capsule_quote, cosign) for the capsule lifecycle; nothing
    without a chain: the gateway then serves attestation only. `link` is the HPC link guard the runner
    opens to each run's declared endpoints (None without --hpc-link)."""
    if not (args.chain_rpc and args.deployment and args.kubeconfig):
        if args.chain_rpc or args.deployment:
            raise ConfigError("--chain-rpc and --deployment need each other and --kubeconfig")
        return [], None, None, None
    from trustcap.chain.client import ChainClient, Deployment
    from trustcap.chain.escrow import Escrow
    from trustcap.gateway.committee import CommitteeMember, KubeRounds, endpoint_from_gateways
    from trustcap.gateway.cosign import CosignService
    from trustcap.gateway.participant import KubeCapsules, Participant
    from trustcap.gateway.relay import kube_round_members
    from trustcap.gateway.runner import Runner

    kubeconfig = None if args.kubeconfig == "in-cluster" else args.kubeconfig
    ns = args.system_namespace
    escrow = Escrow(ChainClient(args.chain_rpc, root), Deployment.load(args.deployment))
    kube = KubeCapsules(kubeconfig)
    rounds = KubeRounds(kubeconfig)
    runner = Runner(server, root, kube, namespace=ns, link=link)
    member = CommitteeMember(root, kube=rounds, namespace=ns, domain=escrow.domain(), policy=policy.attestation,
                             endpoint_of=endpoint_from_gateways(rounds.gateways))

    def eligible() -> bool:
        """Only a node whose agent is connected and whose HPCNode the operator calls Enrolled takes part
        (a quarantined or not yet enrolled HPC would only fail its committee, and lock the deposit)."""
        server.wait_for_agent(0)  # raises when no agent is connected
        node = rounds.hpcnode(args.node) or {}
        return (node.get("status") or {}).get("phase") == HPCNodePhase.ENROLLED

    participant = Participant(root, escrow, kube, namespace=ns, eligible=_quietly(eligible))
    cosign = CosignService(root, rounds, namespace=ns, domain=escrow.domain(), view=escrow, reveals=kube)
    return [participant, member, runner], kube_round_members(kubeconfig, ns), runner.ensure_prepared, cosign


def _quietly(probe: Callable[[], bool]) -> Callable[[], bool]:
    def call() -> bool:
        try:
            return probe()
        except TrustcapError:
            return False

    return call


def _fan_out(hooks: list[Callable[[AgentSession], None]]) -> Callable[[AgentSession], None] | None:
    """One server hook that calls each in turn (each must not block: they start their own threads)."""
    if not hooks:
        return None

    def call(session: AgentSession) -> None:
        for hook in hooks:
            hook(session)

    return call


class _ReadOnlySigner:
    """The directory's chain view only reads (NodeRegistry.isActive, nodeOf): it never signs, and it must
    not wait for the trust root, which opens after the directory (`assemble`)."""

    address = "0x" + "00" * 20

    def public_key(self) -> bytes:
        raise ConfigError("the verifier directory's chain view has no key: it only reads the chain")

    def sign_digest(self, digest32: bytes) -> bytes:
        raise ConfigError("the verifier directory's chain view has no key: it only reads the chain")


def _chain_active(args: argparse.Namespace) -> Callable[[str], bool] | None:
    """True when the NodeRegistry calls the address active and staked (None without a chain)."""
    if not (args.chain_rpc and args.deployment):
        return None
    from trustcap.chain.client import ChainClient, Deployment
    from trustcap.chain.escrow import Escrow

    view = Escrow(ChainClient(args.chain_rpc, _ReadOnlySigner(), timeout=5), Deployment.load(args.deployment))

    def active(address: str) -> bool:
        info = view.node(address)
        return info is not None and info.active and int(info.stake) > 0

    return active


def _verifier_directory(args: argparse.Namespace) -> VerifierDirectory:
    """`--verifier` addresses and/or the cluster's Gateway objects; none at all is a configuration error.
    A Gateway object is a verifier only while the operator has seen it lately (its key answered the
    operator's liveness nonce) and, with a chain, while it is active and staked there (decision 0114)."""
    from trustcap.gateway.attest_errors import DirectoryError
    from trustcap.gateway.verifiers import AnyDirectory, KubeGatewayDirectory, StaticDirectory

    sources: list[VerifierDirectory] = []
    if args.verifier:
        sources.append(StaticDirectory(args.verifier))
    if args.kubeconfig:
        if not args.directory_max_age > 0:
            raise ConfigError(f"--directory-max-age {args.directory_max_age:g} must be a positive number of seconds")
        chain_active = _chain_active(args)
        require_active = chain_active is not None if args.directory_require_active is None \
            else args.directory_require_active
        sources.append(KubeGatewayDirectory(None if args.kubeconfig == "in-cluster" else args.kubeconfig,
                                            max_age_s=args.directory_max_age, require_seen=args.directory_require_seen,
                                            require_active=require_active, chain_active=chain_active, miss_s=5.0))
    if not sources:
        raise DirectoryError("no verifier directory: give --verifier ADDR (repeatable) or --kubeconfig (every "
                             "Gateway object's spec.address), or no committee can challenge this relay")
    return sources[0] if len(sources) == 1 else AnyDirectory(*sources)


def _open_root(args: argparse.Namespace) -> Any:
    from trustcap.trustroot import open_trust_root

    return open_trust_root(args.trustroot, kek_file=args.kek_file)


def _hpcnodes(kubeconfig: str) -> Any:
    from trustcap.gateway.publish import KubeHPCNodes

    return KubeHPCNodes(None if kubeconfig == "in-cluster" else kubeconfig)


@dataclass(frozen=True)
class Hooks:
    """What the assembly reaches outside the process for: the trust root, the HPCNode store, the
    verifier directory and the capsule lifecycle (chain + cluster)."""

    open_root: Callable[[argparse.Namespace], Any] = _open_root
    hpcnodes: Callable[[str], Any] = _hpcnodes
    verifiers: Callable[[argparse.Namespace], VerifierDirectory] = _verifier_directory
    lifecycle: Callable[..., Lifecycle] = _lifecycle


@dataclass
class Gateway:
    """The assembled parts: `services` start in order and stop in reverse, then `closers` run in order."""

    root: Any
    server: Any
    relay: Any
    policy: Any
    services: list[Any] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)
    capsules: bool = False  # takes part in the capsule lifecycle
    metrics: Any = None  # the MetricsService, None with --metrics-address off
    link_guard: Any = None  # the HPC link's EgressGuard, None without --hpc-link

    def start(self) -> None:
        for service in self.services:
            service.start()

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        for close in self.closers:
            close()


def assemble(args: argparse.Namespace, hooks: Hooks = Hooks()) -> Gateway:
    """Build every part from the flags, in the order that lets nothing start half-configured: the
    verifier directory first (a gateway no committee can reach must not start at all), then policy and
    journal, and only then the trust root, the listeners and the one-time boot token."""
    from trustcap.gateway.actions import QuarantineReporter, RebootCommand
    from trustcap.gateway.boot import BootArming, Rebooter, RebootRequests, write_private
    from trustcap.gateway.enrol import TokenBook
    from trustcap.gateway.monitor import CheckRecord, JournalSink, Monitor
    from trustcap.gateway.policy import load_gateway_policy
    from trustcap.gateway.publish import EnrolmentPublisher
    from trustcap.gateway.relay import MetricsService, RelayService, is_loopback_host
    from trustcap.gateway.server import AttestationServer

    verifiers = hooks.verifiers(args)
    if args.metrics_address is not None and not is_loopback_host(args.metrics_address[0]) \
            and not (args.metrics_tls_cert and args.metrics_tls_key and args.metrics_client_ca):
        raise ConfigError(f"--metrics-address {args.metrics_address[0]}:{args.metrics_address[1]} is not a loopback "
                          "address: give --metrics-tls-cert, --metrics-tls-key and --metrics-client-ca (only a scraper "
                          "with a client certificate is answered), or listen on 127.0.0.1, or say off")
    policy = load_gateway_policy(args.policy)
    link_guard = _guard_hpc_link(args)
    sinks = [JournalSink(args.journal, node_id=args.node, max_bytes=args.journal_max_bytes,
                         backups=args.journal_backups)] if args.journal else []
    root = hooks.open_root(args)
    tokens = TokenBook(args.boot_digest)
    server = AttestationServer(root, args.node, tokens, host=args.listen[0], port=args.listen[1],
                               rekey_after=args.rekey_after, rekey_seconds=args.rekey_seconds)
    on_action: dict[str, Callable[[CheckRecord], None]] = {}
    session_hooks: list[Callable[[AgentSession], None]] = []
    store = None
    if args.kubeconfig:
        store = hooks.hpcnodes(args.kubeconfig)
        session_hooks.append(EnrolmentPublisher(server, args.node, store,
                                                policy_digest=policy.attestation_digest).on_session)
        on_action["quarantine"] = QuarantineReporter(args.node, store)
    arming = BootArming(tokens, args.node, args.token_file, boot_timeout_s=args.boot_timeout)
    requests = None
    if args.reboot_command:
        power = RebootCommand(args.node, args.reboot_command)
        carrier = _carrier_watch(args.carrier_link or args.hpc_link)
        rebooter = Rebooter(server, arming, power.run, root, boot_timeout_s=args.boot_timeout, store=store,
                            sinks=[sinks[0].write] if sinks else [], carrier=carrier)
        session_hooks.append(rebooter.on_session)
        on_action["reboot"] = rebooter
        if store is not None:
            requests = RebootRequests(rebooter, store)
    server.on_session = _fan_out(session_hooks)
    if args.address_file is not None:
        write_private(args.address_file, root.address + "\n")  # before the token: netboot reads both together
    arming.arm()
    monitor = Monitor(server, policy, sinks=sinks, on_action=on_action, booting=arming.awaiting_boot)
    max_age = args.status_max_age or max(policy.max_quote_age_s, 10 * policy.mean_interval_s)
    loops, round_members, before_capsule_quote, cosign = hooks.lifecycle(args, root, server, policy, link_guard)
    relay = RelayService(server, verifiers=verifiers, records=lambda: list(monitor.records),
                         max_age_s=max_age, host=args.relay[0], port=args.relay[1],
                         round_members=round_members, before_capsule_quote=before_capsule_quote,
                         cosign=cosign, serve_idle=not loops, liveness=root)
    closers = [relay.close, server.close, root.close]
    metrics = None
    if args.metrics_address is not None:
        try:
            metrics = MetricsService(relay.status, host=args.metrics_address[0], port=args.metrics_address[1],
                                     certfile=args.metrics_tls_cert, keyfile=args.metrics_tls_key,
                                     client_ca=args.metrics_client_ca)
        except OSError as exc:
            relay.close()
            server.close()
            root.close()
            raise ConfigError(f"--metrics-address {args.metrics_address[0]}:{args.metrics_address[1]}: {exc} "
                              "(another gateway on this host? give each its own port, or say off)") from exc
        closers.insert(0, metrics.close)
    services = [monitor, arming, *([requests] if requests is not None else []), *loops]
    return Gateway(root=root, server=server, relay=relay, policy=policy, services=services,
                   closers=closers, capsules=bool(loops), metrics=metrics, link_guard=link_guard)


def _carrier_watch(iface: str | None) -> Any:
    """The reboot wipe's CarrierWatch of `iface`, read once now so a wrong name fails at start."""
    from trustcap.gateway.boot import CarrierWatch
    from trustcap.gateway.errors import GatewayError

    log = logging.getLogger("trustcap.gateway")
    if not iface:
        raise ConfigError("--reboot-command needs the HPC link whose carrier the reboot wipe watches: give "
                          "--carrier-link IFACE (or --hpc-link IFACE). Without it a reboot proof cannot tell a "
                          "power cycle from HPC software that never rebooted, and is never clean (decision 0119)")
    try:
        watch = CarrierWatch(iface)
        log.info("reboot wipe watches the carrier of %s (%d changes so far)", iface, watch.changes())
    except GatewayError as exc:
        raise ConfigError(f"--carrier-link {iface}: {exc}") from exc
    return watch


def _guard_hpc_link(args: argparse.Namespace) -> Any:
    """The Pi's guard on its HPC link, installed before any listener opens (issue 12 item 18): from the
    HPC only the agent channel and netboot reach the Pi, nothing is forwarded beyond it, and every other
    attempt is counted. A run's declared endpoints are added with `allow()` and taken out with `clear()`."""
    if not args.hpc_link:
        if args.deny_network:
            raise ConfigError("--deny-network needs --hpc-link: it is a rule of the Pi's guard on that link")
        return None
    import ipaddress

    from trustcap.gateway.egress import EgressGuard, LinkServices

    try:
        if ipaddress.ip_address(args.listen[0]).version != 4 or ipaddress.ip_address(args.listen[0]).is_unspecified:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--hpc-link {args.hpc_link}: --listen {args.listen[0]} must be this link's own IPv4 "
                          "address (the guard admits the agent channel to exactly that address)") from None
    services = LinkServices(gateway_addr=args.listen[0], agent_port=args.listen[1],
                            tftp_port=args.netboot_tftp_port or None, http_port=args.netboot_http_port or None,
                            dhcp=args.netboot_dhcp, deny=tuple(args.deny_network))
    guard = EgressGuard(args.hpc_link, [], tag=args.hpc_link, services=services)
    guard.apply()
    return guard



def main(argv: list[str] | None = None, hooks: Hooks = Hooks()) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        gw = assemble(args, hooks)
    except (TrustcapError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log = logging.getLogger("trustcap.gateway")
    log.info("gateway %s for node %s: agents on %s:%s, relay on %s, policy %s", gw.root.address, args.node,
             *gw.server.address, gw.relay.url, gw.policy.digest)
    if gw.link_guard is not None:
        log.info("HPC link %s guarded (nftables table %s): agent channel and netboot only", args.hpc_link,
                 gw.link_guard.table)
    metrics_url = gw.metrics.url if gw.metrics is not None else "off"
    print(f"ready agent={gw.server.address[0]}:{gw.server.address[1]} relay={gw.relay.url} gateway={gw.root.address} "
          f"metrics={metrics_url}", flush=True)
    gw.start()
    if gw.capsules:
        log.info("taking part in capsules: chain %s, system namespace %s", args.chain_rpc, args.system_namespace)
    try:
        stop.wait()
    finally:
        gw.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
