"""Fixtures live in pxekit (importable by the tests by its unique name); registered here."""

from pxekit import agent_boot, agent_image, boot, container_boot, image, pxe_rig, tampered, workdir

__all__ = ["agent_boot", "agent_image", "boot", "container_boot", "image", "pxe_rig", "tampered", "workdir"]
