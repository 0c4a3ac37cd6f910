"""Offline helpers for the CRD tests: load the CRDs, walk their schemas, resolve printer-column paths, and
validate a manifest against the subset of OpenAPI v3 the CRDs use.

The subset validator is not the API server (e2e/platform proves what the real one accepts); it lets a
unit test catch a manifest/schema drift in milliseconds and name the field like the server would.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"
PSI = ROOT / "capsules" / "psi" / "capsule.yaml"

Schema = dict[str, Any]


def load_crds() -> dict[str, dict[str, Any]]:
    """Every CRD in crds/, by kind."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(docs) == 1, f"{path.name}: one CRD per file, found {len(docs)} documents"
        out[docs[0]["spec"]["names"]["kind"]] = docs[0] | {"_file": path.name}
    return out


def version_schema(crd: dict[str, Any]) -> Schema:
    (version,) = crd["spec"]["versions"]
    schema: Schema = version["schema"]["openAPIV3Schema"]
    return schema


def walk(schema: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every schema node with its dotted path (`[]` for array items)."""
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")


_FILTER = re.compile(r"\[\?\(@\.[A-Za-z0-9_]+==\"[^\"]*\"\)\]")


def resolve(schema: Schema, json_path: str) -> Schema | None:
    """The schema node a printer-column jsonPath reads, or None when it names no field."""
    if not json_path.startswith("."):
        return None
    steps = _FILTER.sub("[]", json_path)[1:]
    node: Schema | None = schema
    for raw in re.findall(r"[^.\[\]]+|\[\]", steps):
        if node is None:
            return None
        if raw == "[]":
            node = node.get("items")
        elif node.get("type") == "object" and raw in (node.get("properties") or {}):
            node = node["properties"][raw]
        elif raw in {"creationTimestamp", "name", "namespace", "generation"} and node.get("type") == "object" \
                and not node.get("properties"):
            return {"type": "string"}  # metadata: served by the API server itself
        else:
            return None
    return node


def validate(value: Any, schema: Schema, path: str = "") -> list[str]:
    """Errors as `field: cause` lines, for the keywords the CRDs use (CEL rules are the server's job)."""
    errors: list[str] = []
    where = path.lstrip(".") or "<root>"
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool}
    if kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{where}: expected integer"]
    elif kind in types and not isinstance(value, types[kind]):
        return [f"{where}: expected {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: does not match {schema['pattern']}")
        if len(value) > schema.get("maxLength", 1 << 30) or len(value) < schema.get("minLength", 0):
            errors.append(f"{where}: length {len(value)} out of bounds")
    if isinstance(value, int) and not isinstance(value, bool):
        if value < schema.get("minimum", -(1 << 63)) or value > schema.get("maximum", 1 << 63):
            errors.append(f"{where}: {value} out of bounds")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", 1 << 30) or len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: {len(value)} items out of bounds")
        for i, item in enumerate(value):
            errors += validate(item, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(value, dict) and kind == "object":
        props = schema.get("properties")
        for req in schema.get("required", []):
            if req not in value:
                errors.append(f"{path.lstrip('.')}{'.' if path else ''}{req}: Required value")
        if props is not None:
            for key, sub in value.items():
                if key not in props:
                    errors.append(f"{path.lstrip('.')}{'.' if path else ''}{key}: unknown field")
                else:
                    errors += validate(sub, props[key], f"{path}.{key}")
    return errors
