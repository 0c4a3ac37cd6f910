"""`trustcap policy digest FILE`: the digest an HPCNode declares and committee members appraise under.

An HPCNode's `spec.policy.digest` (or the operator's TRUSTCAP_POLICY_DIGEST, for nodes that declare
none) must be the digest of the attestation policy its gateway and committee apply (decision 0116).
The digest is of the canonical form of the parsed policy, so it cannot be computed by hashing the file:
this command parses the file exactly as the gateway does and prints it. FILE is a GatewayPolicy (its
`attestation` section is what counts) or an AttestationPolicy.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from trustcap.errors import ConfigError
from trustcap.evidence import parse_policy, policy_digest
from trustcap.evidence.errors import EvidenceFormatError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("policy", help="attestation policies: the digest nodes declare")
    sub = parser.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    digest = sub.add_parser("digest", help="print the digest of a GatewayPolicy's (or an AttestationPolicy's) "
                                           "attestation policy, for spec.policy.digest or TRUSTCAP_POLICY_DIGEST")
    digest.add_argument("file", type=Path, metavar="FILE")
    digest.set_defaults(func=_digest)


def _digest(args: argparse.Namespace) -> int:
    try:
        doc = yaml.safe_load(args.file.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{args.file} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{args.file} must be a YAML mapping (a GatewayPolicy or an AttestationPolicy)")
    if doc.get("kind") == "GatewayPolicy":
        if not isinstance(doc.get("attestation"), dict):
            raise ConfigError(f"{args.file}: a GatewayPolicy needs an attestation section (the policy quotes "
                              "are appraised under)")
        doc = doc["attestation"]
    try:
        policy = parse_policy(yaml.safe_dump(doc))
    except EvidenceFormatError as exc:
        raise ConfigError(f"{args.file}: {exc}") from None
    print("sha256:" + policy_digest(policy).hex())
    return 0
