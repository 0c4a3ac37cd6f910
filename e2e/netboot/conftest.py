"""Fixtures live in pxekit (importable by the tests by its unique name); registered here."""

from pxekit import boot, container_boot, image, pxe_rig, tampered, workdir

__all__ = ["boot", "container_boot", "image", "pxe_rig", "tampered", "workdir"]
