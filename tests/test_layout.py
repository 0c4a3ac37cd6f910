"""The layout docs/design.md draws, checked: every package is installed, and layers only point down.

import-linter (grimp) cannot see packages mapped in from other folders by `package-dir`
(it raises NotATopLevelModule for `trustcap.operator`), so the layering contract is checked here from
the source itself with `ast`: docs/decisions/0001-layout-and-layering.md.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
COMPONENTS = ("trustcap.operator", "trustcap.gateway", "trustcap.agent", "trustcap.netboot")


def _package_folders() -> dict[str, Path]:
    """Every folder with an __init__.py below each mapped root, by dotted package name."""
    found: dict[str, Path] = {}
    for pkg, folder in PACKAGE_DIR.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if "__pycache__" in rel.parts or any(p.startswith(".") for p in rel.parts):
                continue
            name = ".".join((pkg, *rel.parts)) if rel.parts else pkg
            if name.startswith("trustcap.") and pkg == "trustcap" and rel.parts and \
                    f"trustcap.{rel.parts[0]}" in PACKAGE_DIR:
                continue
            found[name] = init.parent
    return found


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _owner(module: str) -> str | None:
    for comp in (*COMPONENTS, "trustcap.cli"):
        if module == comp or module.startswith(comp + "."):
            return comp
    return None


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    missing = sorted(set(_package_folders()) - listed)
    assert not missing, f"add these packages to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_listed_packages_exist() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    ghosts = sorted(listed - set(_package_folders()))
    assert not ghosts, f"pyproject.toml lists packages with no folder: {ghosts}"


def _sources(package: str) -> list[Path]:
    folder = _package_folders()[package]
    return [p for p in folder.rglob("*.py") if "__pycache__" not in p.parts]


def test_core_imports_no_component_and_not_the_cli() -> None:
    core = ROOT / PACKAGE_DIR["trustcap"]
    offenders = []
    for path in core.rglob("*.py"):
        if (core / "cli") in path.parents or "__pycache__" in path.parts:
            continue
        for name in _imports(path):
            if _owner(name):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, "the core library must not import components or the CLI:\n" + "\n".join(offenders)


@pytest.mark.parametrize("component", COMPONENTS)
def test_components_do_not_import_each_other_or_the_cli(component: str) -> None:
    offenders = []
    for path in _sources(component):
        for name in _imports(path):
            owner = _owner(name)
            if owner and owner != component:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, f"{component} may use only the core library:\n" + "\n".join(offenders)


def test_operator_does_not_shadow_the_standard_library() -> None:
    import operator

    assert operator.__file__ is None or "site-packages" in operator.__file__ or "lib/python" in operator.__file__
    import trustcap.operator

    assert trustcap.operator.__file__ is not None
    assert Path(trustcap.operator.__file__).resolve() == (ROOT / "operator" / "__init__.py").resolve()


def test_python_subprocesses_run_in_safe_path_mode() -> None:
    """`sys.executable, "-m"` without `-P` lets operator/ shadow the standard library (decision 0001)."""
    offenders = []
    for folder in {*PACKAGE_DIR.values(), "tests", "e2e", "bench"}:
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in path.parts or path == Path(__file__).resolve():
                continue
            text = path.read_text()
            for lineno, line in enumerate(text.splitlines(), 1):
                if "sys.executable" in line and '"-m"' in line and '"-P"' not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}")
    assert not offenders, 'start Python as [sys.executable, "-P", "-m", ...]:\n' + "\n".join(offenders)


# Each third-party client lives in the modules named here and nowhere else, as kopf's import-linter
# `forbidden` contract keeps its own: a new module that needs the API server, the Docker Engine or the
# chain goes through these (or is added here, in review, with the reason).
CLIENTS: dict[str, tuple[str, ...]] = {
    # the chain: one client and its typed calls, which every caller goes through
    "web3": ("trustcap/chain/*",),
    # Docker Engine: the agent's executor and wipe, netboot's boot-services container, the local stack's
    # image builds and `trustcap capsule build`
    "docker": ("agent/engine.py", "agent/executor.py", "agent/wipe.py", "netboot/container.py",
               "trustcap/stack/*", "trustcap/cli/capsule.py"),
    # the Kubernetes API: the shared loader, the operator's one helper, and the gateway and netboot
    # modules that read or write their own resources; the CLI's demo and verify read capsules
    "kubernetes": ("trustcap/kubeclient.py", "operator/kube.py", "gateway/committee.py", "gateway/participant.py",
                   "gateway/publish.py", "gateway/relay.py", "gateway/verifiers.py", "netboot/approval.py",
                   "netboot/events.py", "trustcap/cli/demo.py", "trustcap/cli/verify.py"),
    # kopf: the operator only
    "kopf": ("operator/*",),
}


def _client_offenders(client: str, allowed: tuple[str, ...]) -> list[str]:
    import fnmatch

    offenders = []
    for folder in PACKAGE_DIR.values():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if "__pycache__" in path.parts or any(fnmatch.fnmatch(rel, pattern) for pattern in allowed):
                continue
            used = sorted(n for n in _imports(path) if n == client or n.startswith(client + "."))
            if used:
                offenders.append(f"{rel} imports {used[0]}")
    return offenders


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_each_third_party_client_stays_in_its_named_modules(client: str) -> None:
    offenders = _client_offenders(client, CLIENTS[client])
    assert not offenders, (f"{client} may be imported only by {', '.join(CLIENTS[client])}:\n"
                           + "\n".join(offenders))


def test_the_client_contract_sees_an_import_outside_its_modules() -> None:
    """Positive control: with the chain client's folder taken off its list, its own imports are caught."""
    assert any(o.startswith("trustcap/chain/") for o in _client_offenders("web3", ()))
