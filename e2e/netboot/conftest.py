"""Fixtures live in pxekit (importable by the tests by its unique name); registered here."""

from pxekit import boot, image, pxe_rig, tampered

__all__ = ["boot", "image", "pxe_rig", "tampered"]
