"""Fixtures live in nbtestkit (importable by the tests by its unique name); registered here."""

from nbtestkit import boot_root, tftp

__all__ = ["boot_root", "tftp"]
