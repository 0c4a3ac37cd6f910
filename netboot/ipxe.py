"""The iPXE script the HPC runs: fetch kernel and initrd from its gateway over HTTP and boot them.

The script is an approved file itself (its digest is in the BootImage), so it holds only what is the
same for every boot of this image: file names, the gateway URL and the boot digest. The per-node
enrolment token is not in it (it would change the digest per node): dnsmasq hands it to the node as
private DHCP option 224 and the script reads it as `${224:string}`.

Digest checks: stock iPXE (Debian's ipxe-qemu ROMs included) has no "compare this image's sha256"
command; `imgverify` checks CMS signatures only, against a certificate built into the ROM
(docs/decisions/0050-boot-digest-enforcement.md). So the gateway is the enforcement point (it serves
only bytes whose sha256 equals the approved digest, every time), and the cmdline carries the boot digest
so the agent reports exactly what the gateway approved.
"""

from __future__ import annotations

from trustcap.canonical import digest

__all__ = ["TOKEN_OPTION", "boot_digest", "render_script"]

TOKEN_OPTION = 224  # site-private DHCP option carrying the per-node enrolment token


def boot_digest(kernel_sha256: bytes, initrd_sha256: bytes, cmdline: str) -> str:
    """`sha256:<hex>` of the canonical {kernel, initrd, cmdline}: the identity of what runs on the HPC.

    It cannot include the iPXE script (the script contains this value); the script is approved by its
    own digest beside it.
    """
    value = {"cmdline": cmdline, "initrd": initrd_sha256, "kernel": kernel_sha256}
    return "sha256:" + digest(value).hex()


def render_script(gateway_url: str, kernel: str, initrd: str, cmdline: str, bootdigest: str) -> str:
    """The `#!ipxe` script text. `gateway_url` is the HTTP root on the HPC link (http://10.x.y.1:8080)."""
    base = gateway_url.rstrip("/")
    args = (
        f"{cmdline} trustcap.gateway={base} trustcap.token=${{{TOKEN_OPTION}:string}} "
        f"trustcap.bootdigest={bootdigest}"
    ).strip()
    return (
        "#!ipxe\n"
        "echo trustcap: fetching approved boot image\n"
        f"kernel {base}/{kernel} {args} || goto failed\n"
        f"initrd {base}/{initrd} || goto failed\n"
        "boot || goto failed\n"
        ":failed\n"
        "echo trustcap: boot image refused or unreachable, halting\n"
        "sleep 5\n"
        "poweroff\n"
    )
