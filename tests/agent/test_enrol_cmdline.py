"""The contract between netboot and the agent: the kernel command line the approved iPXE script builds
(with the DHCP options dnsmasq hands out filled in, as iPXE does) is one the agent boots from, and the
tokens the gateway mints pass both netboot's DHCP validation and the agent's parser."""

from __future__ import annotations

import re

import pytest

from trustcap.agent.identity import parse_cmdline
from trustcap.gateway.enrol import TokenBook
from trustcap.netboot.dhcp import DhcpConfig
from trustcap.netboot.ipxe import (
    AGENT_ENDPOINT_OPTION,
    GATEWAY_ADDRESS_OPTION,
    NODE_OPTION,
    TOKEN_OPTION,
    boot_digest,
    render_script,
)

GW_ADDR = "0x" + "1f" * 20


def _kernel_args(script: str, options: dict[int, str], next_server: str) -> str:
    """What iPXE passes to the kernel: the `kernel` line's arguments with ${...} settings expanded."""
    line = next(ln for ln in script.splitlines() if ln.startswith("kernel "))
    args = line.split(" ", 2)[2].removesuffix(" || goto failed")

    def expand(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "next-server":
            return next_server
        return options[int(name.split(":")[0])]

    return re.sub(r"\$\{([^}]+)\}", expand, args)


@pytest.fixture
def minted_token() -> str:
    return str(TokenBook(["0x" + "ab" * 32]).issue("hpc-7"))


def test_the_agent_boots_from_the_command_line_netboot_serves(minted_token: str) -> None:
    digest = boot_digest(b"\x01" * 32, b"\x02" * 32, "console=ttyS0 quiet")
    script = render_script(8080, "vmlinuz", "initrd.img", "console=ttyS0 quiet", digest)
    options = {TOKEN_OPTION: minted_token, NODE_OPTION: "hpc-7", GATEWAY_ADDRESS_OPTION: GW_ADDR,
               AGENT_ENDPOINT_OPTION: "169.254.7.1:7443"}
    cfg = parse_cmdline(_kernel_args(script, options, "169.254.7.1"))
    assert (cfg.gateway_host, cfg.gateway_port) == ("169.254.7.1", 7443)
    assert cfg.token == minted_token and cfg.node_id == "hpc-7"
    assert cfg.boot_digest == "0x" + digest.removeprefix("sha256:")
    assert cfg.gateway_address.lower() == GW_ADDR


def test_minted_tokens_pass_netboots_dhcp_validation(minted_token: str) -> None:
    cfg = DhcpConfig(interface="tcnb0", gateway_ip="169.254.7.1", range_start="169.254.7.2",
                     range_end="169.254.7.2", netmask="255.255.255.252", macs={"52:54:00:00:00:07": minted_token},
                     nodes={"52:54:00:00:00:07": "hpc-7"}, gateway_address=GW_ADDR)
    cfg.validate()


@pytest.mark.parametrize(("option", "value", "key"), [
    pytest.param(TOKEN_OPTION, "", "trustcap.token", id="no-token-option"),
    pytest.param(NODE_OPTION, "", "trustcap.node", id="no-node-option"),
    pytest.param(GATEWAY_ADDRESS_OPTION, "", "trustcap.gatewayaddr", id="no-gateway-address-option"),
    pytest.param(AGENT_ENDPOINT_OPTION, "", "trustcap.gateway", id="no-endpoint-option"),
])
def test_a_missing_dhcp_option_is_named_at_boot(minted_token: str, option: int, value: str, key: str) -> None:
    from trustcap.agent.errors import EnrolmentError

    script = render_script(8080, "vmlinuz", "initrd.img", "", "sha256:" + "cd" * 32)
    options = {TOKEN_OPTION: minted_token, NODE_OPTION: "hpc-7", GATEWAY_ADDRESS_OPTION: GW_ADDR,
               AGENT_ENDPOINT_OPTION: "169.254.7.1:7443", option: value}
    with pytest.raises(EnrolmentError, match=re.escape(key) + "="):
        parse_cmdline(_kernel_args(script, options, "169.254.7.1"))
