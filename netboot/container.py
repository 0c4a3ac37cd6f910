"""Seed Task 3's option: run the boot services in a container that is gone once the HPC has booted.

The container gets no network of its own (`--network none`); the host then moves the HPC link interface
into the container's namespace and gives it the gateway address, so the boot services can reach the
HPC link and nothing else, and the host's other interfaces are invisible to them. The services run with
`--stop-after-boot`: when the HPC reports it booted, they stop and the container exits; a physical NIC
then returns to the host namespace (a lab veth is destroyed with the namespace).

    host (gateway)                    docker                       container (netns: link only)
      | build image trustcap/netboot (python3, dnsmasq-base, our code, pure-Python deps)
      | run --network none --read-only, boot root ro -------------> serve --wait-link (waits for address)
      | ip link set IFACE netns <pid>; nsenter: addr add, up ------> binds DHCP/TFTP/HTTP on IFACE
      |                                                               ... HPC PXE-boots, GET /trustcap/booted
      | wait() -> exit 0 <------------------------------------------ services stop, container exits

The image is built locally from Debian packages (no registry is reachable) on top of the stack's base
image, and tagged by a hash of what it contains, so a code change gives a new tag.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from trustcap.netboot.errors import ServiceError

__all__ = ["BootContainer", "ensure_image"]

log = logging.getLogger("trustcap.netboot")

BASE_IMAGE = "trustcap/base:bookworm"
PURE_DEPS = ("tftpy", "prometheus_client", "rfc8785")
# the core files netboot imports (the container holds no other trustcap code)
CORE_FILES = ("__init__.py", "api.py", "errors.py", "canonical.py", "bootimage.py", "forms.py", "kubeclient.py")
# Bind :67/:69, DHCP raw sockets and ARP (dnsmasq), drop to nobody (SETUID/SETGID), and signal dnsmasq once
# it runs as nobody (KILL). Everything else is dropped.
CAPS = ["NET_BIND_SERVICE", "NET_RAW", "NET_ADMIN", "SETUID", "SETGID", "KILL"]
DOCKERFILE = f"""FROM {BASE_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends python3 dnsmasq-base \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
COPY site/ /opt/trustcap/site/
ENV PYTHONPATH=/opt/trustcap/site PYTHONSAFEPATH=1 PYTHONDONTWRITEBYTECODE=1
ENTRYPOINT ["python3", "-m", "trustcap.netboot"]
"""


def _stage(dest: Path) -> str:
    """Copy what the container runs into `dest/site`; return a hash of it (the image tag)."""
    import trustcap
    import trustcap.netboot

    site = dest / "site"
    core = Path(trustcap.__file__).parent
    nb = Path(trustcap.netboot.__file__).parent
    (site / "trustcap" / "netboot").mkdir(parents=True)
    for fname in CORE_FILES:
        shutil.copyfile(core / fname, site / "trustcap" / fname)
    for py in sorted(nb.glob("*.py")):
        shutil.copyfile(py, site / "trustcap" / "netboot" / py.name)
    for dep in PURE_DEPS:
        mod = importlib.import_module(dep)
        origin = Path(mod.__file__ or "")
        if origin.name == "__init__.py":
            shutil.copytree(origin.parent, site / dep, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(origin, site / origin.name)
    (dest / "Dockerfile").write_text(DOCKERFILE)
    h = hashlib.sha256(DOCKERFILE.encode())
    for p in sorted(site.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(site).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def _docker() -> Any:
    import docker
    from docker.errors import DockerException

    try:
        return docker.from_env(timeout=600)
    except DockerException as exc:
        raise ServiceError(f"Docker Engine is not reachable: {exc}") from exc


def ensure_image(client: Any | None = None) -> str:
    """The tag of the boot-services image, built now if this content has no image yet."""
    from docker.errors import BuildError, DockerException, ImageNotFound

    client = client or _docker()
    with tempfile.TemporaryDirectory(prefix="trustcap-nbctx-") as tmp:
        tag = f"trustcap/netboot:{_stage(Path(tmp))}"
        try:
            client.images.get(tag)
            return tag
        except ImageNotFound:
            pass
        try:
            client.images.build(path=tmp, tag=tag, rm=True, forcerm=True)
        except (BuildError, DockerException) as exc:
            raise ServiceError(f"cannot build {tag}: {exc}") from exc
    log.info("built boot-services image %s", tag)
    return tag


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise ServiceError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")


class BootContainer:
    """One boot, in a container: start, hand it the link, wait for it to exit after the boot."""

    def __init__(self, root: Path, interface: str, cidr: str, serve_args: list[str],
                 manifest: Path | None = None, events_dir: Path | None = None, name: str | None = None) -> None:
        self.root, self.interface, self.cidr = root, interface, cidr
        self.serve_args, self.manifest, self.events_dir = serve_args, manifest, events_dir
        self.name = name
        self.client = _docker()
        self.container: Any = None

    def start(self) -> BootContainer:
        from docker.errors import DockerException

        image = ensure_image(self.client)
        volumes = {str(self.root.resolve()): {"bind": "/srv/boot", "mode": "ro"}}
        args = ["serve", "--root", "/srv/boot", "--state-dir", "/state", "--wait-link", "30", "--stop-after-boot",
                *self.serve_args]
        if self.manifest:
            volumes[str(self.manifest.resolve())] = {"bind": "/srv/approved.json", "mode": "ro"}
            args += ["--manifest", "/srv/approved.json"]
        if self.events_dir:
            volumes[str(self.events_dir.resolve())] = {"bind": "/events", "mode": "rw"}
            args += ["--events", "/events/events.jsonl"]
        try:
            self.container = self.client.containers.run(
                image, args, name=self.name, detach=True, network_mode="none", read_only=True,
                tmpfs={"/state": "", "/tmp": ""},  # noqa: S108 -- paths inside the container
                volumes=volumes, security_opt=["no-new-privileges"],
                cap_drop=["ALL"], cap_add=CAPS,
            )
            self.container.reload()
            pid = int(self.container.attrs["State"]["Pid"])
        except DockerException as exc:
            self.stop()
            raise ServiceError(f"cannot start the boot container: {exc}") from exc
        try:
            _run(["ip", "link", "set", "dev", self.interface, "netns", str(pid)])
            ns = ["nsenter", "-t", str(pid), "-n"]
            _run([*ns, "ip", "addr", "add", self.cidr, "dev", self.interface])
            _run([*ns, "ip", "link", "set", self.interface, "up"])
            _run([*ns, "ip", "link", "set", "lo", "up"])
        except ServiceError:
            self.stop()
            raise
        log.info("boot container %s has %s (%s)", self.container.short_id, self.interface, self.cidr)
        return self

    def wait(self, timeout: float) -> int:
        """The container's exit code once it exits by itself (after the boot), or ServiceError on timeout."""
        import requests

        try:
            result = self.container.wait(timeout=timeout)
        except requests.exceptions.ConnectionError as exc:  # docker-py signals a wait timeout this way
            raise ServiceError(f"boot container still running after {timeout:.0f}s") from exc
        return int(result.get("StatusCode", -1))

    def logs(self) -> str:
        try:
            return str(self.container.logs().decode(errors="replace")) if self.container else ""
        except Exception:
            return ""

    def stop(self) -> None:
        from docker.errors import DockerException

        if self.container is None:
            return
        try:
            self.container.remove(force=True)
        except DockerException as exc:
            log.warning("removing boot container: %s", exc)
        self.container = None
