"""The boot-services container copies netboot and a list of core modules (netboot/container.py); every
core module netboot imports, directly or through those modules, must be on the list, or the container
cannot start (as happened twice when a refactor gave netboot a new core import)."""

from __future__ import annotations

import ast
from pathlib import Path

from trustcap.netboot.container import CORE_FILES, PURE_DEPS

ROOT = Path(__file__).resolve().parents[2]


def _core_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        else:
            continue
        for mod in mods:
            parts = mod.split(".")
            if parts[0] == "trustcap" and len(parts) > 1 and parts[1] not in ("netboot",) \
                    and (ROOT / "trustcap" / f"{parts[1]}.py").is_file():
                names.add(f"{parts[1]}.py")
    return names


def test_every_core_module_netboot_needs_is_copied() -> None:
    needed: set[str] = set()
    todo = [p for p in (ROOT / "netboot").glob("*.py")]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _core_imports(path):
            needed.add(name)
            todo.append(ROOT / "trustcap" / name)
    assert needed - set(CORE_FILES) == set(), "add these to netboot/container.py CORE_FILES"


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported when `path` is imported: its module body's imports, not those inside functions
    or inside a `try` (an optional import that falls back, as trustcap/kubeclient.py's urllib3 does)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def _source(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != "trustcap" or len(parts) < 2:
        return None
    folder = ROOT / "netboot" if parts[1] == "netboot" else ROOT / "trustcap"
    rest = parts[2:] if parts[1] == "netboot" else parts[1:]
    for candidate in (folder.joinpath(*rest).with_suffix(".py"), folder.joinpath(*rest, "__init__.py")):
        if rest and candidate.is_file():
            return candidate
    return folder / "__init__.py" if not rest and (folder / "__init__.py").is_file() else None


def test_the_containers_entry_point_imports_only_what_the_container_has() -> None:
    """The container has Debian's python3 and the pure-Python PURE_DEPS it copies: `python -m
    trustcap.netboot serve` must import nothing else at load time (CI: kubeclient's `import urllib3`
    stopped the container)."""
    import sys

    todo = [ROOT / "netboot" / "__main__.py"]
    seen: set[Path] = set()
    third_party: set[str] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for mod in _top_level_imports(path):
            top = mod.split(".")[0]
            if top == "trustcap":
                src = _source(mod)
                if src is not None:
                    todo.append(src)
            elif top != "__future__" and top not in sys.stdlib_module_names and top not in PURE_DEPS:
                third_party.add(f"{mod} (from {path.relative_to(ROOT)})")
    assert len(seen) > 5, seen  # the walk found the serve path, not only the entry point
    assert not third_party, f"import these inside the functions that need them: {sorted(third_party)}"
