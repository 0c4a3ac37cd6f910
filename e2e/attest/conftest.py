"""Fixtures live in attestlab (importable by the tests by its unique name); registered here."""

from attestlab import gateway, lab, spawn_agent, trust_root

__all__ = ["gateway", "lab", "spawn_agent", "trust_root"]
