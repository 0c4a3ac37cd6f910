"""Python and the trustcap agent for the HPC initramfs.

The interpreter and its shared libraries come from Debian .debs (`python3.11-minimal`, the stdlib, libc
and the few libraries the stdlib's extension modules and the agent's wheels link against), extracted with
`dpkg-deb -x`. The agent's Python dependencies are the ones its own import closure pulls in from the
build environment's site-packages (no `__pycache__`, tests, C sources or type stubs), and the trustcap
code is copied as files (core without its CLI, plus `agent/` as `trustcap/agent`). Everything goes in
sorted, with fixed owners and times (`cpio.pack`), so equal inputs give equal bytes.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from trustcap.netboot.errors import ImageBuildError
from trustcap.netboot.image.cpio import Entry

__all__ = ["PY_DEBS", "agent_entries", "python_entries"]

PY_DEBS = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "zlib1g", "libexpat1",
           "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libuuid1", "libcrypt1", "libgcc-s1")
DIST = "usr/lib/python3/dist-packages"
_STDLIB_SKIP = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
                "config-3.11-x86_64-linux-gnu", "unittest/test", "distutils/tests", "ctypes/test", "sqlite3/test")
_SKIP_SUFFIX = (".pyc", ".pyi", ".c", ".h", ".pyx", ".pxd", ".a")


def _keep(rel: str) -> bool:
    if rel.startswith(("usr/share", "usr/lib/x86_64-linux-gnu/gconv", "usr/lib/x86_64-linux-gnu/audit", "sbin",
                       "usr/sbin", "etc", "var", "usr/libexec", "usr/lib/x86_64-linux-gnu/engines-3",
                       "usr/lib/x86_64-linux-gnu/ossl-modules")):
        return False
    if rel.startswith("usr/bin") and rel not in ("usr/bin", "usr/bin/python3.11"):
        return False
    for skip in _STDLIB_SKIP:
        if rel == f"usr/lib/python3.11/{skip}" or rel.startswith(f"usr/lib/python3.11/{skip}/"):
            return False
    return "__pycache__" not in rel and not rel.endswith(_SKIP_SUFFIX)


def tree_entries(tree: Path, prefix: str = "", keep: bool = True) -> list[Entry]:
    """Entries for every kept file, symlink and folder below `tree`, mode bits preserved."""
    out: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            p = Path(dirpath) / name
            rel = (prefix + p.relative_to(tree).as_posix()).lstrip("/")
            if (keep and not _keep(rel)) or "__pycache__" in rel or rel.endswith(_SKIP_SUFFIX):
                continue
            st = p.lstat()
            if p.is_symlink():
                out.append(Entry(rel, "symlink", os.readlink(p).encode()))
            elif p.is_dir():
                out.append(Entry(rel, "dir", mode=st.st_mode & 0o755))
            elif p.is_file():
                out.append(Entry(rel, "file", p.read_bytes(), mode=st.st_mode & 0o755))
    return out


def python_entries(debs: dict[str, Path], workdir: Path) -> list[Entry]:
    """The interpreter, its stdlib and shared libraries, from the given .debs (name -> file)."""
    tree = workdir / "python-root"
    for name in PY_DEBS:
        if name not in debs:
            raise ImageBuildError(f"python image: {name} .deb is missing")
        proc = subprocess.run(["dpkg-deb", "-x", str(debs[name]), str(tree)], capture_output=True, text=True,
                              timeout=300, check=False)
        if proc.returncode != 0:
            raise ImageBuildError(f"dpkg-deb -x {debs[name].name}: {proc.stderr.strip()[-300:]}")
    entries = tree_entries(tree)
    entries.append(Entry("usr/bin/python3", "symlink", b"python3.11"))
    return entries


_CLOSURE = """
import importlib, json, os, sys
import trustcap.agent.__main__, trustcap.agent.service  # noqa: F401
for name in sys.argv[1:]:  # imports made inside functions (lazy), found in the agent's source
    try:
        importlib.import_module(name)
    except ImportError:
        pass
site = sorted(p for p in sys.path if p.endswith("site-packages"))
tops = set()
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None) or ""
    for s in site:
        if f.startswith(s + os.sep):
            tops.add((s, os.path.relpath(f, s).split(os.sep)[0]))
import importlib.metadata as md
owners = md.packages_distributions()
for s, top in sorted(tops):
    for dist in owners.get(top.split(".")[0], []):
        path = getattr(md.distribution(dist), "_path", None)
        if path is not None and str(path).startswith(s + os.sep):
            tops.add((s, os.path.relpath(str(path), s)))
print(json.dumps(sorted(tops)))
"""


def _imports_in(folder: Path) -> set[str]:
    """Every absolute module an agent source file imports, at any depth (lazy imports included)."""
    names: set[str] = set()
    for py in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(py.read_text(), filename=str(py))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
    other = ("trustcap.cli", "trustcap.stack", "trustcap.operator", "trustcap.gateway", "trustcap.netboot")
    return {n for n in names if not n.startswith(other)}


def agent_entries() -> list[Entry]:
    """trustcap core + agent as files, and the site-packages the agent's imports reach."""
    import importlib.util

    import trustcap

    # The agent is packaged as files, never imported here (components do not import each other).
    spec = importlib.util.find_spec("trustcap" + ".agent")
    if spec is None or not spec.origin:
        raise ImageBuildError("trustcap.agent is not installed; cannot put the agent into the image")
    agent = Path(spec.origin).parent
    lazy = sorted(_imports_in(agent))
    proc = subprocess.run([sys.executable, "-P", "-c", _CLOSURE, *lazy], capture_output=True, text=True,
                          timeout=120, check=False)
    if proc.returncode != 0:
        raise ImageBuildError(f"cannot import the agent to find its dependencies: {proc.stderr.strip()[-400:]}")
    entries: list[Entry] = []
    tops = [tuple(t) for t in json.loads(proc.stdout)]
    # A manylinux wheel keeps the shared libraries its extension links against beside it, in
    # `<package>.libs/` (auditwheel): no module lives there, so the import closure cannot see it, but without
    # it the extension does not load (e.g. a wheel's bundled libgmp or libffi).
    tops += [(site, f"{top}.libs") for site, top in tops if (Path(site) / f"{top}.libs").is_dir()]
    for site, top in sorted(set(tops)):
        if top.startswith(("__editable__", "_distutils_hack")) or top.endswith(".pth"):
            continue
        src = Path(site) / top
        if src.is_dir():
            entries.append(Entry(f"{DIST}/{top}", "dir"))
            entries += tree_entries(src, f"{DIST}/{top}/", keep=False)
        else:
            entries.append(Entry(f"{DIST}/{top}", "file", src.read_bytes(), mode=0o644))
    core = Path(trustcap.__file__).parent
    entries.append(Entry(f"{DIST}/trustcap", "dir"))
    for sub in sorted(core.iterdir()):
        if sub.name in ("cli", "stack", "__pycache__"):
            continue
        if sub.is_dir():
            entries.append(Entry(f"{DIST}/trustcap/{sub.name}", "dir"))
            entries += tree_entries(sub, f"{DIST}/trustcap/{sub.name}/", keep=False)
        elif sub.is_file():
            entries.append(Entry(f"{DIST}/trustcap/{sub.name}", "file", sub.read_bytes(), mode=0o644))
    entries.append(Entry(f"{DIST}/trustcap/agent", "dir"))
    entries += tree_entries(agent, f"{DIST}/trustcap/agent/", keep=False)
    return [Entry(e.path, e.kind, e.data, 0o644 if e.kind == "file" and not e.mode & 0o111 else e.mode, e.rdev)
            for e in entries]


def entries_digest(entries: list[Entry]) -> str:
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda x: x.path):
        h.update(f"{e.path}\0{e.kind}\0{e.mode}\0".encode() + hashlib.sha256(e.data).digest())
    return h.hexdigest()
