"""A whole trustcap network on this machine: what `trustcap demo psi` and the lifecycle e2e run on.

    this machine (root network namespace)                         network namespace tcw<i> (one per HPC)
      kube-apiserver (the stack)   <- operator (capsule, rounds,    agent: enrols with a one-time token,
        CRDs, Gateway / BootImage /   chain-writer, Gateway Ready)  quotes, runs capsules on Docker Engine
        HPCNode objects                                              |  veth 169.254.(80+i).2/30 only
      anvil (its own, 1 s blocks)  <- contracts, 4 nodes             |
      gateway i (trust root i)  169.254.(80+i).1 <-------------------+
        participant, committee member, runner; relay on 127.0.0.1 (with /v1/cosign for the chain-writer);
        /metrics (its own and its agent's, fetched over the channel) on its own 127.0.0.1 port
      brokers B and C (127.0.0.1), a file store

Why a world of its own: the demo and the e2e must show the seed's mission on real components (the API
server, Docker Engine, anvil, network namespaces), yet leave nothing behind and never touch an address off
this machine. Each HPC's only link is a veth to its gateway (the Pi's point-to-point cable), so the agent
can reach nothing but its gateway. The chain is a fresh anvil with `--block-time 1`, so a funded task gets
its seed block within a second and nothing the stack's shared anvil holds is disturbed.

The chain-writer's batches are co-signed by the verifier gateways themselves (decision 0094,
TRUSTCAP_CHAIN_COSIGN=gateways): AttestationLog's quorum is 2, the operator holds no batch key, and each
gateway signs a batch only after finding every leaf among the decided rounds' verdicts. One world runs
on a stack at a time (a lock in the stack's state folder; a second waits): two would share the system
namespace and the cluster-scoped Gateways. Everything started here is stopped, and every namespace and
object removed, when the `World.up` block ends, even when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trustcap.api import ATTESTATIONS, BOOTIMAGES, CAPSULERUNS, CAPSULES, GATEWAYS, GROUP, HPCNODES, VERSION
from trustcap.errors import TrustcapError

__all__ = ["SYSTEM_NAMESPACE", "World", "WorldError"]

SYSTEM_NAMESPACE = "trustcap-system"
BOOT_DIGEST = "0x" + "b0" * 32  # the (simulated) approved boot image every agent here reports
AGENT_PORT = 7100
WORLD_LABEL = "trustcap.io/world"
_KINDS = (CAPSULES, CAPSULERUNS, ATTESTATIONS, HPCNODES, GATEWAYS, BOOTIMAGES)
Progress = Callable[..., None]


class WorldError(TrustcapError):
    """A part of the world did not come up; the message names it and its log."""


@dataclass
class _Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass
class World:
    workdir: Path
    namespace: str
    kubeconfig: Path
    rpc_url: str = ""
    deployment: Path = Path()
    store_url: str = ""
    payer: Any = None
    payer_address: str = ""
    policy_digest: str = ""
    owners: dict[str, dict[str, str]] = field(default_factory=dict)
    gateways: list[dict[str, Any]] = field(default_factory=list)
    procs: list[_Proc] = field(default_factory=list)
    _cleanup: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _kubectl_bin: Path = Path("kubectl")
    _owner: Any = None
    _keys: Path = Path()
    _policy: Path = Path()
    _saved_guards: dict[str, str] = field(default_factory=dict)

    # --- the one entry point -------------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def up(cls, n: int = 4, workdir: Path | None = None, *, namespace: str = "default",
           progress: Progress | None = None) -> Iterator[World]:
        from trustcap.stack.stack import Stack

        stack = Stack()
        if not stack.apiserver_ready():
            raise WorldError("the stack is not up: run `trustcap stack up` (or `make demo`)")
        if os.geteuid() != 0:
            raise WorldError("the world makes network namespaces and veths for its HPC agents: run it as root")
        workdir = Path(workdir or (stack.state / "world"))
        workdir.mkdir(parents=True, exist_ok=True)
        w = cls(workdir=workdir, namespace=namespace, kubeconfig=stack.kubeconfig)
        say = progress or (lambda *_a, **_k: None)
        with w._cleanup:
            w._cleanup.enter_context(_one_world(stack.state / "world.lock", say))
            w._kubectl_bin = stack.bin / "kubectl"
            w._steps(n, say)
            yield w

    def _steps(self, n: int, say: Progress) -> None:
        steps: list[tuple[str, Callable[[], None]]] = [
            ("custom resources and namespaces", self._crds),
            ("a fresh chain (anvil, 1 s blocks)", self._chain),
            (f"{n} gateway trust roots, registered and staked on chain", lambda: self._nodes(n)),
            ("the cluster's view: Gateways, an approved BootImage, HPCNodes", self._objects),
            ("owners B and C: keys and key-release brokers", self._owners),
            ("the operator (capsules, rounds, chain-writer)", self._operator),
            (f"{n} gateways and their HPC agents, each agent alone in its network namespace", self._pairs),
            ("every HPC enrolled and every gateway active", self._wait_ready),
        ]
        for what, step in steps:
            say(what)
            step()
            say(what, done=True)
        # runs first at the end, while the operator and the runners still live to release, wipe and
        # take their finalizers off
        self._cleanup.callback(self._remove_objects)

    def _purge(self) -> None:
        """What a crashed earlier world left: its objects, finalizers stripped (no operator runs now)."""
        for kind in _KINDS:
            out = self._kubectl("get", kind, "-A", "-l", f"{WORLD_LABEL}=true", "-o", "json")
            for item in json.loads(out)["items"]:
                meta = item["metadata"]
                ns = ["-n", meta["namespace"]] if meta.get("namespace") else []
                with contextlib.suppress(WorldError):
                    self._kubectl("patch", kind, meta["name"], *ns, "--type=merge", "-p",
                                  '{"metadata":{"finalizers":null}}')
                    self._kubectl("delete", kind, meta["name"], *ns, "--wait=false", "--ignore-not-found")

    # --- parts --------------------------------------------------------------------------------------
    def _kubectl(self, *args: str, input: str | None = None) -> str:
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        proc = subprocess.run([str(self._kubectl_bin), *args], capture_output=True, text=True, env=env,
                              input=input, timeout=120, check=False)
        if proc.returncode != 0:
            raise WorldError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def _crds(self) -> None:
        from trustcap.stack import paths

        crds = paths.repo_root() / "crds"
        # -R: kopf's peering CRDs sit in crds/kopf-peering/, which a plain `-f crds` does not read
        self._kubectl("apply", "-R", "-f", str(crds))
        self._kubectl("wait", "--for=condition=Established", "--timeout=60s", "-R", "-f", str(crds))
        for ns in dict.fromkeys((SYSTEM_NAMESPACE, self.namespace)):
            self._kubectl("apply", "-f", "-", input=json.dumps(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
        self._purge()

    def _chain(self) -> None:
        from trustcap.chain.anvil import Anvil

        anvil = Anvil(block_time=1, log_file=self.workdir / "anvil.log").start()
        self._cleanup.callback(anvil.stop)
        self.rpc_url = anvil.url

    def _nodes(self, n: int) -> None:
        from trustcap.chain.client import ChainClient
        from trustcap.chain.escrow import NodeSpec, deploy_network
        from trustcap.chain.keys import ANVIL_KEYS, KeySigner
        from trustcap.trustroot import SoftwareTrustRoot

        owner = KeySigner(ANVIL_KEYS[0])
        self.payer = KeySigner(ANVIL_KEYS[1])
        self.payer_address = self.payer.address
        client = ChainClient(self.rpc_url, owner)
        specs = []
        for i in range(n):
            home = self.workdir / f"gw{i}" / "trustroot"
            home.mkdir(parents=True, exist_ok=True)
            kek = os.urandom(32)
            (home.parent / "kek").write_bytes(kek)
            os.chmod(home.parent / "kek", 0o600)
            root = SoftwareTrustRoot.create(home, kek)
            self._cleanup.callback(root.close)
            client.w3.provider.make_request("anvil_setBalance", [root.address, hex(100 * 10**18)])  # type: ignore[arg-type]
            self.gateways.append({"index": i, "address": root.address.lower(), "root": root, "home": home,
                                  "name": f"gw-{i}", "node": f"hpc-{i}", "ip": f"169.254.{80 + i}.1",
                                  "hpc_ip": f"169.254.{80 + i}.2", "netns": f"tcw{i}", "link": f"tcg{i}"})
            specs.append(NodeSpec(root, root.vrf_public_key(), bytes.fromhex(root.address[2:]).rjust(32, b"\0")))
        # quorum 2: two verifier gateways co-sign each batch (module docstring); no extra signer nodes.
        # Commits close 6 s after funding on the chain's clock (decision 0096): each gateway polls every
        # second and anvil mines every second, so every live gateway is in, and the demo waits no longer.
        d = deploy_network(self.rpc_url, owner, specs, coordinator=KeySigner(ANVIL_KEYS[2]).address, quorum=2,
                           commit_window=6)
        self.deployment = self.workdir / "deployment.json"
        d.save(self.deployment)
        self._owner = owner
        self._keys = self.workdir / "chain-keys.json"
        self._keys.write_text(json.dumps({"sender": ANVIL_KEYS[2]}))  # the coordinator's account; no batch keys
        os.chmod(self._keys, 0o600)

    def _objects(self) -> None:
        from trustcap.bootimage import image_id_of_spec
        from trustcap.chain.client import ChainClient, Deployment

        boot = {"version": "world", "bootDigest": "sha256:" + BOOT_DIGEST[2:],
                **{part: {"path": f"world/{part}", "digest": "sha256:" + os.urandom(32).hex()}
                   for part in ("kernel", "initrd", "ipxeScript")}}
        objs: list[dict[str, Any]] = [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "BootImage",
                                       "metadata": {"name": "world-boot", "labels": {WORLD_LABEL: "true"}},
                                       "spec": boot}]
        for g in self.gateways:
            root = g["root"]
            g["relay_port"] = _free_port()
            g["metrics_port"] = _free_port()  # each gateway's own: they share this host's loopback
            objs.append({"apiVersion": f"{GROUP}/{VERSION}", "kind": "Gateway",
                         "metadata": {"name": g["name"], "labels": {WORLD_LABEL: "true"}},
                         "spec": {"address": root.address, "signingKey": "0x" + root.public_key().hex(),
                                  "vrfKey": "0x" + root.vrf_public_key().hex(), "trustRoot": "software",
                                  "endpoint": f"127.0.0.1:{g['relay_port']}"}})
            objs.append({"apiVersion": f"{GROUP}/{VERSION}", "kind": "HPCNode",
                         "metadata": {"name": g["node"], "labels": {WORLD_LABEL: "true"}},
                         "spec": {"gateway": g["name"], "mac": f"02:00:00:00:00:{g['index']:02x}",
                                  "bootImage": "world-boot"}})
        self._kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs))
        owner = ChainClient(self.rpc_url, self._owner)
        d = Deployment.load(self.deployment)
        owner.transact(owner.contract("NodeRegistry", d.registry).functions.approveBootImage(image_id_of_spec(boot)))
        policy = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "GatewayPolicy",
                  "monitor": {"meanIntervalSeconds": 5, "minIntervalSeconds": 1, "maxQuoteAgeSeconds": 30},
                  "actions": {"critical": "report", "high": "report", "medium": "report",
                              "unreachable": "report"},
                  "attestation": {"bootImages": [BOOT_DIGEST], "allowUnlistedMeasurements": True}}
        self._policy = self.workdir / "gateway-policy.yaml"
        self._policy.write_text(yaml.safe_dump(policy))
        from trustcap.evidence.policy import parse_policy, policy_digest

        self.policy_digest = "0x" + policy_digest(parse_policy(yaml.safe_dump(policy["attestation"]))).hex()
        self.store_url = f"file://{self.workdir / 'store'}"

    def _owners(self) -> None:
        from trustcap.capsule.keys import KeyPair

        for who in ("b", "c"):
            key_dir = self.workdir / "owners" / who
            key_dir.mkdir(parents=True, exist_ok=True)
            KeyPair.generate().save(key_dir)
            url = self._spawn(f"broker-{who}", [sys.executable, "-P", "-m", "trustcap.cli", "broker", "serve",
                                                 "--key", str(key_dir), "--rpc", self.rpc_url, "--deployment",
                                                 str(self.deployment), "--listen", "127.0.0.1:0"],
                              ready_stdout=True)
            self.owners[who] = {"key_dir": str(key_dir), "key_file": str(key_dir / "key"), "broker_url": url}

    def _operator(self) -> None:
        env = self._env()
        env.update({
            "TRUSTCAP_SYSTEM_NAMESPACE": SYSTEM_NAMESPACE, "TRUSTCAP_STORE": self.store_url,
            "TRUSTCAP_COMMIT_WINDOW_SECONDS": "3", "TRUSTCAP_ROUND_TIMEOUT_SECONDS": "60",
            "TRUSTCAP_POLICY_DIGEST": self.policy_digest, "TRUSTCAP_CHAIN_RPC": self.rpc_url,
            "TRUSTCAP_CHAIN_DEPLOYMENT": str(self.deployment), "TRUSTCAP_CHAIN_KEYS": str(self._keys),
            "TRUSTCAP_CHAIN_COSIGN": "gateways", "TRUSTCAP_CHAIN_JOURNAL": str(self.workdir / "chain-journal.sqlite"),
            "TRUSTCAP_CHAIN_BATCH_SECONDS": "2", "TRUSTCAP_CHAIN_CONFIRMATIONS": "1",
            "TRUSTCAP_BOOTIMAGE_POLL_SECONDS": "2",
        })
        self._spawn("operator", [sys.executable, "-P", "-m", "trustcap.operator", "--standalone", "--all-namespaces"],
                    env=env)

    def _pairs(self) -> None:
        # each gateway guards its own HPC link (--hpc-link) and leaves the table on exit (fail closed):
        # the world removes them at teardown
        self._cleanup.callback(self._remove_guards)
        for g in self.gateways:
            self._netns(g)
            token = self.workdir / f"gw{g['index']}" / "token"
            self._spawn(g["name"], [
                sys.executable, "-P", "-m", "trustcap.gateway", "--trustroot", str(g["home"]),
                "--kek-file", str(g["home"].parent / "kek"), "--node", g["node"], "--boot-digest", BOOT_DIGEST,
                "--policy", str(self._policy), "--listen", f"{g['ip']}:{AGENT_PORT}", "--hpc-link", g["link"],
                "--relay", f"127.0.0.1:{g['relay_port']}", "--metrics-address", f"127.0.0.1:{g['metrics_port']}",
                "--token-file", str(token),
                "--kubeconfig", str(self.kubeconfig), "--chain-rpc", self.rpc_url,
                "--deployment", str(self.deployment), "--system-namespace", SYSTEM_NAMESPACE,
                "--journal", str(self.workdir / f"gw{g['index']}" / "journal.jsonl")], ready_stdout=True)
            armed = _wait_file(token, 30)
            self._spawn(f"agent-{g['index']}", [
                # nsenter --net only: `ip netns exec` and `unshare --mount` give the agent a mount namespace
                # of its own, and the engine could not see the scratch filesystem the agent mounts
                "nsenter", f"--net=/run/netns/{g['netns']}", "--", sys.executable, "-P", "-m", "trustcap.agent",
                "--gateway", f"{g['ip']}:{AGENT_PORT}",
                "--token", armed, "--bootdigest", "sha256:" + BOOT_DIGEST[2:], "--gatewayaddr", g["root"].address,
                "--node", g["node"]])

    # --- the Pi's guard on every HPC link ------------------------------------------------------------
    # Each gateway installs it (`--hpc-link`, gateway/egress.py): from its HPC only the agent channel
    # and netboot reach the Pi, nothing is forwarded, every other attempt is counted and dropped. The
    # world only reads it, and for a control takes it off and puts the very same table back.
    def _link_tables(self) -> list[str]:
        return [f"trustcap_link_{g['link']}" for g in self.gateways]

    def guard_off(self) -> None:
        """Delete every gateway's link table, keeping its text (rules, sets, counters) for `guard_on`."""
        for table in self._link_tables():
            listed = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, text=True,
                                    check=False)
            if listed.returncode == 0:
                self._saved_guards[table] = listed.stdout
                subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, check=False)

    def guard_on(self) -> None:
        """Put back the tables `guard_off` took off, exactly as the gateways had installed them."""
        for table, text in list(self._saved_guards.items()):
            _run(["nft", "-f", "-"], stdin=text)
            del self._saved_guards[table]

    def _remove_guards(self) -> None:
        for table in self._link_tables():
            subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, check=False)
        self._saved_guards.clear()

    def guard_drops(self) -> int:
        """Packets the gateways' guards dropped so far (their counters, read back from the kernel)."""
        total = 0
        for table in self._link_tables():
            out = subprocess.run(["nft", "-j", "list", "table", "inet", table], capture_output=True, text=True,
                                 check=False).stdout
            for item in (json.loads(out).get("nftables", []) if out else []):
                counter = item.get("counter") or {}
                if counter.get("name") in ("denied", "denied_gateway"):
                    total += int(counter.get("packets", 0))
        return total

    def _netns(self, g: dict[str, Any]) -> None:
        ns, i = g["netns"], g["index"]
        host, peer = g["link"], f"tch{i}"
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)  # a crashed earlier run's
        subprocess.run(["ip", "link", "del", host], capture_output=True, check=False)
        for cmd in (["ip", "netns", "add", ns],
                    ["ip", "link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns],
                    ["ip", "addr", "add", f"{g['ip']}/30", "dev", host], ["ip", "link", "set", host, "up"],
                    ["ip", "-n", ns, "addr", "add", f"{g['hpc_ip']}/30", "dev", peer],
                    ["ip", "-n", ns, "link", "set", peer, "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]):
            _run(cmd)
        self._cleanup.callback(subprocess.run, ["ip", "netns", "del", ns], capture_output=True, check=False)

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            nodes = json.loads(self._kubectl("get", HPCNODES, "-o", "json"))["items"]
            gws = json.loads(self._kubectl("get", GATEWAYS, "-o", "json"))["items"]
            mine = {g["node"] for g in self.gateways}
            enrolled = {x["metadata"]["name"] for x in nodes
                        if x["metadata"]["name"] in mine and (x.get("status") or {}).get("agentKey")}
            active = {x["metadata"]["name"] for x in gws if (x.get("status") or {}).get("phase") == "Active"}
            if enrolled == mine and {g["name"] for g in self.gateways} <= active:
                return
            if time.monotonic() > deadline:
                raise WorldError(f"after {timeout:g} s: enrolled {sorted(enrolled)} of {sorted(mine)}, active "
                                 f"gateways {sorted(active)}\n{self.logs_tail()}")
            time.sleep(1)

    # --- helpers ------------------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), PYTHONSAFEPATH="1")
        env.pop("PYTHONPATH", None)
        return env

    def _spawn(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
               ready_stdout: bool = False) -> str:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE if ready_stdout else out, stderr=out,
                                    env=env or self._env(), cwd="/", start_new_session=True)
        p = _Proc(name, proc, log)
        self.procs.append(p)
        self._cleanup.callback(p.stop)
        if not ready_stdout:
            return ""
        assert proc.stdout is not None
        line = proc.stdout.readline().decode(errors="replace").strip()
        if not line.startswith("ready"):
            proc.wait(timeout=10)
            proc.stdout.close()  # no drain thread will own it
            raise WorldError(f"{name} did not start: {line or 'no output'}; log {log}:\n{p.tail()}")
        threading.Thread(target=_drain, args=(proc.stdout, log), name=f"world-{name}-stdout", daemon=True).start()
        fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
        return fields.get("url", line)

    def check_alive(self) -> None:
        """Raise naming any process of the world that has died, with the end of its log."""
        for p in self.procs:
            if not p.alive():
                raise WorldError(f"{p.name} exited with {p.proc.returncode}; log {p.log}:\n{p.tail()}")

    def logs_tail(self, lines: int = 25) -> str:
        return "\n".join(f"--- {p.name} ({p.log})\n{p.tail(lines)}" for p in self.procs)

    def _remove_objects(self) -> None:
        with contextlib.suppress(WorldError):
            self._kubectl("delete", CAPSULES, "--all", "-n", self.namespace, "--wait=true", "--timeout=90s")
        for kind in _KINDS[1:]:
            with contextlib.suppress(WorldError):  # only this world's: other tests share the cluster
                which = (["--all", "-n", SYSTEM_NAMESPACE] if kind in (CAPSULERUNS, ATTESTATIONS)
                         else ["-l", f"{WORLD_LABEL}=true"])
                self._kubectl("delete", kind, *which, "--wait=true", "--timeout=60s")
        with contextlib.suppress(WorldError):
            self._kubectl("delete", "secrets", "-n", SYSTEM_NAMESPACE, "-l", "trustcap.io/reveal", "--wait=false")
        with contextlib.suppress(WorldError):
            self._purge()


@contextlib.contextmanager
def _one_world(lock: Path, say: Progress, timeout: float = 900.0) -> Iterator[None]:
    """One world at a time on a stack: two would share the system namespace, the cluster-scoped Gateways
    and HPCNodes, and two operators would drive the same capsules. A second waits for the first."""
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if not waiting:
                    say(f"waiting for another world (pid {holder}) to end")
                    waiting = True
                if time.monotonic() > deadline:
                    raise WorldError(f"another world (pid {holder}) holds {lock} after {timeout:g} s; stop it "
                                     "(Ctrl-C in its terminal, or kill that pid)") from None
                time.sleep(1)
        if waiting:
            say(f"waiting for another world (pid {holder}) to end", done=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _drain(stream: Any, log: Path) -> None:
    """Copy what a process prints after its ready line into its log (a full pipe would block it)."""
    with stream, log.open("ab") as out:
        for chunk in iter(lambda: stream.read1(4096), b""):
            out.write(chunk)
            out.flush()


def _run(cmd: list[str], stdin: str | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False, input=stdin)
    if proc.returncode != 0:
        raise WorldError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_file(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            text = path.read_text().strip()
            if text:
                return text
        time.sleep(0.1)
    raise WorldError(f"no enrolment token armed in {path} within {timeout:g} s")
