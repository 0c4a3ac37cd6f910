"""The iPXE script the HPC runs: fetch kernel and initrd from its gateway over HTTP and boot them.

The script is an approved file itself (its digest is in the BootImage), so it holds only what is the
same for every boot of this image everywhere: file names, the HTTP port and the boot digest. What differs
per gateway or per node (agent endpoint, gateway address, node name, one-time enrolment token) would
change the digest, so dnsmasq hands it out as private DHCP options and the script reads `${224:string}`...

Digest checks: stock iPXE (Debian's ipxe-qemu ROMs included) has no "compare this image's sha256"
command; `imgverify` checks CMS signatures only, against a certificate built into the ROM
(docs/decisions/0050-boot-digest-enforcement.md). So the gateway is the enforcement point (it serves
only bytes whose sha256 equals the approved digest, every time), and the cmdline carries the boot digest
so the agent reports exactly what the gateway approved.
"""

from __future__ import annotations

from trustcap.canonical import digest

__all__ = ["AGENT_ENDPOINT_OPTION", "GATEWAY_ADDRESS_OPTION", "NODE_OPTION", "TOKEN_OPTION", "boot_digest",
           "render_script"]

# Site-private DHCP options (RFC 2132 224-254) the gateway's dnsmasq sets and the script reads.
TOKEN_OPTION = 224            # per node: one-time enrolment token
NODE_OPTION = 225             # per node: its HPCNode name
GATEWAY_ADDRESS_OPTION = 226  # per gateway: the trust root's address (0x...) the agent pins
AGENT_ENDPOINT_OPTION = 227   # per gateway: HOST:PORT of the attestation server the agent enrols with


def boot_digest(kernel_sha256: bytes, initrd_sha256: bytes, cmdline: str) -> str:
    """`sha256:<hex>` of the canonical {kernel, initrd, cmdline}: the identity of what runs on the HPC.

    It cannot include the iPXE script (the script contains this value); the script is approved by its
    own digest beside it.
    """
    value = {"cmdline": cmdline, "initrd": initrd_sha256, "kernel": kernel_sha256}
    return "sha256:" + digest(value).hex()


def render_script(http_port: int, kernel: str, initrd: str, cmdline: str, bootdigest: str) -> str:
    """The `#!ipxe` script text. Nothing in it names a gateway: files come from `${next-server}` (the
    DHCP server, i.e. this HPC's own gateway) and per-gateway/per-node values from DHCP options, so one
    approved image (one set of digests) boots behind every gateway."""
    base = f"http://${{next-server}}:{int(http_port)}"
    args = (
        f"{cmdline} trustcap.netboot=${{next-server}}:{int(http_port)} "
        f"trustcap.gateway=${{{AGENT_ENDPOINT_OPTION}:string}} trustcap.token=${{{TOKEN_OPTION}:string}} "
        f"trustcap.node=${{{NODE_OPTION}:string}} trustcap.gatewayaddr=${{{GATEWAY_ADDRESS_OPTION}:string}} "
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
