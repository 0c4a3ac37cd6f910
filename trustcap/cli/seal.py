"""`trustcap seal` and `trustcap open`: seal a file to recipients' public keys, open it with a secret key.

    trustcap seal --to PUBKEY_FILE [--to ...] --in FILE --out FILE [--key OWNER_KEY] [BINDING]
    trustcap open --key SECRET_KEY_FILE --in FILE --out FILE --owner PUBKEY_FILE [BINDING]

    BINDING is either  --capsule-namespace NS --capsule-name NAME --manifest capsule.yaml
                or     --capsule-id HEX --manifest-digest HEX   (the raw ids, for experts)

Why the first form: an input owner binds its envelope to the capsule it is meant for before the Capsule
exists, and the ids are derived, not chosen (docs/decisions/0090): the capsule id from its namespace and
name, the binding digest from the manifest's spec with each input cut to {name, owner, broker}. A person
who types them from the capsule.yaml they will apply cannot get them wrong by a digit. The inputs' CIDs
are not part of the binding, so --manifest may still hold placeholders there (any value or none): seal
first, fill in the CIDs after `trustcap store put`. The two forms are never mixed.

Without --key the envelope is signed by a one-off key: it still proves the file was not altered, but not
who sealed it, and `open` (which always names --owner) refuses it. Without a binding the envelope is bound
to all-zero ids ("not bound to a capsule"). The output is written to a temporary file beside --out and
renamed only when everything checked out, so a failure never leaves partial plaintext.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from trustcap.capsule import envelope
from trustcap.capsule.errors import CapsuleError
from trustcap.capsule.keys import KeyPair, load_public_key
from trustcap.errors import ConfigError


def register(subparsers: Any) -> None:
    seal = subparsers.add_parser("seal", help="seal a file to one or more recipients' public keys")
    seal.add_argument("--to", required=True, action="append", type=Path, metavar="PUBKEY_FILE",
                      help="a recipient's key.pub (repeat for several recipients)")
    seal.add_argument("--in", dest="src", required=True, type=Path, metavar="FILE")
    seal.add_argument("--out", required=True, type=Path, metavar="FILE")
    seal.add_argument("--key", type=Path, metavar="SECRET_KEY_FILE", help="the owner's key that signs the envelope")
    _binding(seal)
    seal.set_defaults(func=_seal)

    opener = subparsers.add_parser("open", help="open a sealed file with your secret key")
    opener.add_argument("--key", required=True, type=Path, metavar="SECRET_KEY_FILE")
    opener.add_argument("--in", dest="src", required=True, type=Path, metavar="FILE")
    opener.add_argument("--out", required=True, type=Path, metavar="FILE")
    opener.add_argument("--owner", required=True, type=Path, metavar="PUBKEY_FILE",
                        help="the owner's key.pub: an envelope not signed by this owner is refused")
    _binding(opener)
    opener.set_defaults(func=_open)


def _binding(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "binding to a capsule", "either the capsule's namespace, name and manifest (the ids are computed from "
        "them), or the raw --capsule-id and --manifest-digest; never both")
    g.add_argument("--capsule-namespace", metavar="NS", help="the namespace the Capsule is (to be) applied in")
    g.add_argument("--capsule-name", metavar="NAME", help="the Capsule's metadata.name")
    g.add_argument("--manifest", type=Path, metavar="FILE",
                   help="the Capsule YAML (as applied, or `kubectl get capsule NAME -o yaml`); its inputs' CIDs "
                        "may still be placeholders")
    g.add_argument("--capsule-id", metavar="HEX", help="expert: the 32-byte capsule id, as hex")
    g.add_argument("--manifest-digest", metavar="HEX", help="expert: the 32-byte binding digest, as hex")


_NAMED = ("--capsule-namespace", "--capsule-name", "--manifest")
_RAW = ("--capsule-id", "--manifest-digest")
#: stands in for an input's CID while the binding is computed: the binding leaves CIDs out (decision 0090)
_CID_STANDIN = "bafkreicgnswajfvowfhadauc2mw5qilofj5cdgz65hrua6kosr2pa63eli"


def _given(args: argparse.Namespace, flags: tuple[str, ...]) -> list[str]:
    return [f for f in flags if getattr(args, f[2:].replace("-", "_"), None) is not None]


def resolve_binding(args: argparse.Namespace) -> tuple[bytes, bytes]:
    """(capsule id, binding digest) from the parsed flags; all-zero ids when none is given."""
    named, raw = _given(args, _NAMED), _given(args, _RAW)
    if named and raw:
        raise ConfigError(f"{' and '.join(named + raw)}: these are two ways to name the binding; give either "
                          "--capsule-namespace, --capsule-name and --manifest (the ids are computed from them) "
                          "or the raw --capsule-id and --manifest-digest, not both")
    if named:
        missing = [f for f in _NAMED if f not in named]
        if missing:
            raise ConfigError(f"{', '.join(named)} without {', '.join(missing)}: the binding needs all three of "
                              "--capsule-namespace, --capsule-name and --manifest")
        return capsule_binding(args.capsule_namespace, args.capsule_name, args.manifest)
    return (_id(args.capsule_id, "--capsule-id") or bytes(32),
            _id(args.manifest_digest, "--manifest-digest") or bytes(32))


def capsule_binding(namespace: str, name: str, manifest: Path) -> tuple[bytes, bytes]:
    """(capsule_id(namespace, name), binding digest of the manifest's spec), as trustcap.scenario seals.

    The manifest is a Capsule document (the first one in the file) or a bare spec. A metadata.name or
    metadata.namespace in it that differs from the flags is refused: that envelope would never open."""
    import yaml

    from trustcap.capsule.errors import ManifestError
    from trustcap.capsule.ids import capsule_id
    from trustcap.capsule.manifest import parse_manifest

    try:
        docs = [d for d in yaml.safe_load_all(manifest.read_text(encoding="utf-8")) if d is not None]
    except OSError as exc:
        raise ConfigError(f"cannot read the manifest {manifest}: {exc.strerror or exc}") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{manifest} is not YAML: {exc}") from exc
    if not docs or not isinstance(docs[0], dict):
        raise ManifestError(f"{manifest} holds no Capsule (a YAML mapping with kind: Capsule and a spec)")
    doc = docs[0]
    if "spec" in doc:
        if doc.get("kind", "Capsule") != "Capsule":
            raise ManifestError(f"{manifest}: the first document is a {doc.get('kind')}, not a Capsule")
        meta = doc.get("metadata") or {}
        for key, flag, value in (("name", "--capsule-name", name), ("namespace", "--capsule-namespace", namespace)):
            if meta.get(key) is not None and meta[key] != value:
                raise ConfigError(f"{flag} {value} but {manifest} says metadata.{key}: {meta[key]}: the capsule "
                                  f"applied from it would have another id; use the same {key} in both")
        spec = doc["spec"]
    else:
        spec = doc
    if isinstance(spec, dict) and isinstance(spec.get("inputs"), list):
        spec = {**spec, "inputs": [{**i, "cid": _CID_STANDIN} if isinstance(i, dict) else i
                                   for i in spec["inputs"]]}
    try:
        binding = parse_manifest(spec).binding_digest()
    except ManifestError as exc:
        raise ManifestError(f"{manifest}: {exc}") from exc
    return capsule_id(namespace, name), binding


def _id(value: str | None, flag: str) -> bytes | None:
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value[2:] if value.startswith("0x") else value)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{flag} must be 32 bytes of hex (64 digits)")
    return raw


def _write_whole(src: Path, out: Path, what: str, write: Callable[[BinaryIO, BinaryIO], object], *,
                 mode: int) -> None:
    """`write(src, dst)` into a private partial file that replaces `out` only once it is complete, so a
    failed seal or open never leaves a truncated file under the name a reader expects. `mode` before the
    umask: an opened plaintext is the owner's alone (0o600), a sealed envelope is not secret."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with src.open("rb") as reader, os.fdopen(fd, "wb") as dst:
            write(reader, dst)
        os.replace(tmp, out)
    except OSError as exc:
        raise CapsuleError(f"cannot {what} {src} {'to' if what == 'seal' else 'into'} {out}: "
                           f"{exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _seal(args: argparse.Namespace) -> int:
    recipients = [load_public_key(p) for p in args.to]
    owner = KeyPair.load(args.key) if args.key else KeyPair.generate()
    capsule_id, manifest_digest = resolve_binding(args)
    _write_whole(args.src, args.out, "seal", lambda src, dst: envelope.seal_stream(
        src, dst, length=os.fstat(src.fileno()).st_size, recipients=recipients, owner=owner,
        capsule_id=capsule_id, manifest_digest=manifest_digest), mode=0o666)
    return 0


def _open(args: argparse.Namespace) -> int:
    key = KeyPair.load(args.key)
    owner = load_public_key(args.owner)
    capsule_id, manifest_digest = resolve_binding(args)
    _write_whole(args.src, args.out, "open", lambda src, dst: envelope.open_stream(
        src, dst, key=key, owner=owner, capsule_id=capsule_id, manifest_digest=manifest_digest), mode=0o600)
    return 0
