"""The cluster side of the PXE join (issue 6 item 5): the HPCNode of a netbooted HPC becomes `Enrolled`.

The PXE rig (pxekit) boots qemu from the gateway namespace; this module adds what the cluster needs to
judge that boot: our CRDs on the stack's real API server, a Gateway (the trust root's address and key),
an Approved BootImage (the built image's files and boot digest), the HPCNode for the qemu NIC's MAC,
the operator as a real process, and the gateway namespace's cluster link (127.0.0.1:<apiserver port>
inside it, forwarded to the host), through which the in-process gateway publishes its enrolment evidence
and `netboot serve --report-node` posts its refusals as events.

    host: kube-apiserver <-- ClusterLink <-- gateway netns: AttestationServer + EnrolmentPublisher,
          operator process                                  netboot serve (dnsmasq, TFTP, HTTP)
                                                               | veth / bridge / tap
                                                            qemu HPC (iPXE -> kernel -> agent)

The cluster side (CRDs, object tracker, operator process, ClusterLink) is e2e/clusterkit.py, shared with
the enrolment e2e; the fixtures here are thin wrappers that keep this suite's names.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from clusterkit import (
    Cluster,
    ClusterLink,
    Proc,
    apiserver_port,
    apply_node_crds,
    operator_env,
    register_node,
    running_operator,
    tracked_cluster,
    wait_for,
)
from pxelab import HPC_MAC

from trustcap.netboot.image.builder import INITRD_FILE, KERNEL_FILE, SCRIPT_FILE, BuiltImage

__all__ = ["ClusterLink", "JoinObjects", "apiserver_port", "create_join_objects", "join_cluster", "join_crds",
           "join_operator", "wait_for"]


@pytest.fixture(scope="session")
def join_crds(kubectl: Any) -> None:
    """The CRDs the join needs, and the operator's namespace; the same objects e2e/enrol applies, so
    either suite may run first."""
    apply_node_crds(kubectl)


@pytest.fixture
def join_cluster(k8s_api: Any, join_crds: None) -> Iterator[Cluster]:
    with tracked_cluster(k8s_api) as tracker:
        yield tracker


@pytest.fixture(scope="module")
def join_operator(kube_env: dict[str, str], join_crds: None,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """`python -m trustcap.operator` as a real process (chain-writer off: not under test here)."""
    with running_operator(operator_env(kube_env), tmp_path_factory.mktemp("nb-operator") / "operator.log") as op:
        yield op


@dataclass
class JoinObjects:
    node: str
    gateway: str
    boot_image: str
    approved: str  # the BootImage's status.imageDigest, sha256:<hex>


def create_join_objects(cluster: Cluster, tag: str, image: BuiltImage, address: str, signing_key: bytes) -> JoinObjects:
    """Gateway, Approved BootImage and HPCNode for one boot, all removed by the cluster fixture."""
    gw, bi, node = f"gw-nb-{tag}", f"bi-nb-{tag}", f"hpc-nb-{tag}"
    files = {"kernel": KERNEL_FILE, "initrd": INITRD_FILE, "ipxeScript": SCRIPT_FILE}
    register_node(cluster, node=node, gateway=gw, boot_image=bi, address=address,
                  signing_key="0x" + signing_key.hex(), endpoint="gw.local:7443",
                  files={part: {"path": name, "digest": image.digests[name]} for part, name in files.items()},
                  image_digest=image.bootdigest, mac=HPC_MAC)
    return JoinObjects(node, gw, bi, image.bootdigest)
