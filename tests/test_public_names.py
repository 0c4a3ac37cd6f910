"""Each package's `__all__` is exactly its public names, as httpx checks its own (issue 10 item 7).

A package's public names are what `from trustcap.x import *` would hand a reader: the names not starting
with `_` that are not submodules and not someone else's objects (a `Path` or `Console` a package merely
uses). A name defined in the project or a plain value left out of `__all__` is an export nobody declared;
a name in `__all__` that is not there is a stale promise. Either fails here.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import trustcap

COMPONENTS = ("trustcap.operator", "trustcap.gateway", "trustcap.agent", "trustcap.netboot")


def _packages() -> list[str]:
    names = {"trustcap", *COMPONENTS}
    for info in pkgutil.walk_packages(trustcap.__path__, "trustcap."):
        if info.ispkg:
            names.add(info.name)
    return sorted(names)


def _first_party_or_value(obj: object) -> bool:
    if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return (getattr(obj, "__module__", "") or "").split(".")[0] == "trustcap"
    return True  # a constant, an enum member, an instance: exported if public


def _public(module: ModuleType) -> set[str]:
    return {name for name, obj in vars(module).items()
            if not name.startswith("_") and not inspect.ismodule(obj) and name != "annotations"
            and _first_party_or_value(obj)}


@pytest.mark.parametrize("package", _packages())
def test_all_is_exactly_the_public_names(package: str) -> None:
    module = importlib.import_module(package)
    public = _public(module)
    declared = getattr(module, "__all__", None)
    if declared is None:
        assert not public, f"{package} exports {sorted(public)} without an __all__: declare them or make them private"
        return
    assert len(declared) == len(set(declared)), f"{package}.__all__ repeats a name"
    stale = sorted(n for n in declared if not hasattr(module, n))
    assert not stale, f"{package}.__all__ names {stale}, which the package does not define"
    undeclared = sorted(public - set(declared) - {"__version__"})
    assert not undeclared, f"{package} exports {undeclared} outside its __all__: add them or make them private"


def test_the_check_sees_an_undeclared_export() -> None:
    """Positive control: a package with one public function beyond its __all__ is caught."""
    fake = ModuleType("trustcap.fake")
    exec("__all__ = ['a']\ndef a(): pass\ndef b(): pass\nfrom pathlib import Path", fake.__dict__)  # noqa: S102
    for fn in ("a", "b"):
        fake.__dict__[fn].__module__ = "trustcap.fake"
    assert _public(fake) - set(fake.__all__) == {"b"}
