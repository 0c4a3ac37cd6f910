"""The capsule manifest: the Capsule resource's spec as a strict model, and its canonical digest.

Why a model beside the CRD's OpenAPI schema: the API server checks a spec when it is applied, but the
digest every verifier attests to is computed here, outside the cluster (CLI, gateway, agent), and must
refuse exactly what the CRD refuses. The fields, bounds and patterns mirror `crds/capsule.yaml`.

The manifest digest is sha256 of the RFC 8785 encoding of the spec with defaults filled in
(`trustcap.canonical.digest`), so `{}` and an explicit default hash alike: what the committee attests.
An input envelope binds the binding digest instead (`binding_digest`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from trustcap import canonical
from trustcap import cid as cidmod
from trustcap.capsule.errors import ManifestError

__all__ = ["Committee", "Function", "Input", "Manifest", "Payment", "Recipient", "Resources", "parse_manifest"]

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_PUBKEY = r"^0x0[23][a-f0-9]{64}$"
_IMAGE = (r"^([a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?/)?[a-z0-9]+([._-][a-z0-9]+)*"
          r"(/[a-z0-9]+([._-][a-z0-9]+)*)*$")
_EGRESS = (r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*|\[[0-9a-f:.]{2,45}\]):"
           r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$")
_DEVICE = r"^/dev/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$"
# the owner's key-release broker (trustcap.release): http(s), a host name or an IP literal, a port, no
# user info, query or fragment
_BROKER = (r"^https?://([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*|\[[0-9a-f:.]{2,45}\])"
           r"(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$")

Name = Annotated[str, Field(min_length=1, max_length=63, pattern=_DNS_LABEL)]
PublicKeyHex = Annotated[str, Field(pattern=_PUBKEY)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, alias_generator=to_camel,
                              populate_by_name=True)


class Function(_Strict):
    image: Annotated[str, Field(min_length=1, max_length=255, pattern=_IMAGE)]
    digest: Annotated[str, Field(pattern=r"^sha256:[a-f0-9]{64}$")]
    entrypoint: Annotated[list[Annotated[str, Field(min_length=1, max_length=4096)]],
                          Field(min_length=1, max_length=64)]


class Input(_Strict):
    name: Name
    cid: Annotated[str, Field(max_length=128)]
    owner: PublicKeyHex
    size_bytes: Annotated[int, Field(ge=1, le=1 << 30)] | None = None
    broker: Annotated[str, Field(max_length=253, pattern=_BROKER)] | None = None

    @field_validator("cid")
    @classmethod
    def _cid(cls, value: str) -> str:
        try:
            cidmod.parse(value)
        except cidmod.CidError as exc:
            raise ValueError(str(exc)) from exc
        return value


class Recipient(_Strict):
    name: Name
    public_key: PublicKeyHex


class Resources(_Strict):
    cpu_millis: Annotated[int, Field(ge=100, le=64000)] = 1000
    memory_mi_b: Annotated[int, Field(ge=16, le=262144, alias="memoryMiB")] = 256
    pids: Annotated[int, Field(ge=8, le=4096)] = 64
    scratch_mi_b: Annotated[int, Field(ge=0, le=65536, alias="scratchMiB")] = 64


class Committee(_Strict):
    size: Annotated[int, Field(ge=3, le=31)]
    quorum: Annotated[int, Field(ge=2, le=31)] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> Committee:
        if self.size % 2 != 1:
            raise ValueError("committee size must be odd, so that a majority decision cannot tie")
        if self.quorum is not None:
            if self.quorum > self.size:
                raise ValueError("quorum cannot exceed the committee size")
            if self.quorum * 3 < self.size * 2:
                raise ValueError("quorum must be at least two thirds of the committee size")
        return self


class Payment(_Strict):
    payer: Annotated[str, Field(pattern=r"^0x[a-fA-F0-9]{40}$")]
    amount_wei: Annotated[str, Field(max_length=78, pattern=r"^(0|[1-9][0-9]*)$")]

    @field_validator("amount_wei")
    @classmethod
    def _uint256(cls, value: str) -> str:
        if int(value) >= 1 << 256:
            raise ValueError("amountWei does not fit a uint256")
        return value


class Manifest(_Strict):
    """A Capsule spec. Immutable: the committee attests exactly this, by its digest."""

    function: Function
    inputs: Annotated[list[Input], Field(max_length=16)] = []
    recipients: Annotated[list[Recipient], Field(min_length=1, max_length=16)]
    egress: Annotated[list[Annotated[str, Field(max_length=261, pattern=_EGRESS)]], Field(max_length=32)] = []
    devices: Annotated[list[Annotated[str, Field(max_length=128, pattern=_DEVICE)]], Field(max_length=8)] = []
    resources: Resources = Resources()
    timeout_seconds: Annotated[int, Field(ge=1, le=86400)]
    committee: Committee
    payment: Payment

    @model_validator(mode="after")
    def _unique(self) -> Manifest:
        for what, names in (("inputs", [i.name for i in self.inputs]),
                            ("recipients", [r.name for r in self.recipients]),
                            ("egress", list(self.egress)), ("devices", list(self.devices))):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what} has duplicate entries: {', '.join(dupes)}")
        return self

    @field_validator("devices")
    @classmethod
    def _no_dotdot(cls, devices: list[str]) -> list[str]:
        for d in devices:
            if "/../" in d or d.endswith("/.."):
                raise ValueError(f"device path {d} must not contain '..'")
        return devices

    def to_spec(self) -> dict[str, Any]:
        """The spec as the Capsule resource carries it (camelCase, defaults filled in, no nulls)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    def digest(self) -> bytes:
        """sha256 of the RFC 8785 encoding of `to_spec()`: the identity every verifier attests to."""
        return canonical.digest(self.to_spec())

    def binding_digest(self) -> bytes:
        """What an input envelope binds: the spec with each input cut to {name, owner, broker}.

        The full digest covers every input's CID, which its owner cannot know before it seals, so an
        envelope binds this instead (docs/decisions/0090-*): it still pins the function, recipients,
        bounds, committee, payment and, per input, who owns it and whose broker releases its key."""
        spec = self.to_spec()
        spec["inputs"] = [{k: i[k] for k in ("name", "owner", "broker") if k in i} for i in spec["inputs"]]
        return canonical.digest(spec)

    def recipient_keys(self) -> list[bytes]:
        return [bytes.fromhex(r.public_key[2:]) for r in self.recipients]


def parse_manifest(spec: Any) -> Manifest:
    """Validate a Capsule spec (a dict from YAML or JSON); ManifestError names every bad field."""
    if not isinstance(spec, dict):
        raise ManifestError(f"manifest must be a mapping, got {type(spec).__name__}")
    try:
        return Manifest.model_validate(spec)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "spec"
            problems.append(f"{where}: {err['msg']}")
        raise ManifestError("invalid manifest: " + "; ".join(problems)) from exc
