"""Where the stack keeps its cache (built tools, survives `down`) and its state (PKI, data, logs, pids)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Built binaries and image tarballs: `$TRUSTCAP_CACHE`, else `$XDG_CACHE_HOME/trustcap`."""
    env = os.environ.get("TRUSTCAP_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trustcap"


def bin_dir() -> Path:
    return cache_dir() / "bin"


def state_dir() -> Path:
    """PKI, kubeconfig, kine's SQLite file, logs and pid files: `$TRUSTCAP_STATE` or ~/.local/state."""
    env = os.environ.get("TRUSTCAP_STATE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "trustcap" / "stack"


def repo_root() -> Path:
    """The source checkout (the wrapper Go modules live in tools/); editable installs only."""
    return Path(__file__).resolve().parents[2]
