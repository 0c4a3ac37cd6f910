"""Fixtures live in pxekit and joinkit (importable by the tests by their unique names); registered here."""

from joinkit import join_cluster, join_crds, join_operator
from pxekit import agent_boot, agent_image, boot, container_boot, image, pxe_rig, tampered, workdir

__all__ = ["agent_boot", "agent_image", "boot", "container_boot", "image", "join_cluster", "join_crds",
           "join_operator", "pxe_rig", "tampered", "workdir"]
