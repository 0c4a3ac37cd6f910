"""A throwaway PKI for the local API server: a CA, the serving certificate, an admin client certificate
(group system:masters) and the service-account signing key pair. Generated once per state folder."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Pki", "ensure_client_cert", "ensure_pki", "ensure_server_ips"]

_VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class Pki:
    dir: Path

    @property
    def ca_crt(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def server_crt(self) -> Path:
        return self.dir / "apiserver.crt"

    @property
    def server_key(self) -> Path:
        return self.dir / "apiserver.key"

    @property
    def admin_crt(self) -> Path:
        return self.dir / "admin.crt"

    @property
    def admin_key(self) -> Path:
        return self.dir / "admin.key"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"

    def complete(self) -> bool:
        files = (self.ca_crt, self.server_crt, self.server_key, self.admin_crt, self.admin_key, self.sa_key,
                 self.sa_pub)
        return all(p.is_file() for p in files)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    is_ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _server_sans(extra_ips: tuple[str, ...] = ()) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("10.96.0.1")),
    ]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in extra_ips]
    return sans


def _load_ca(pki: Pki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca = x509.load_pem_x509_certificate(pki.ca_crt.read_bytes())
    key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{pki.ca_key} is not an EC key; delete {pki.dir} to make a new PKI")
    return ca, key


def ensure_server_ips(pki: Pki, ips: tuple[str, ...]) -> bool:
    """Reissue the serving certificate when it lacks one of `ips` (the node IP of `up --node`).

    Returns True when it was reissued. The API server reloads its serving certificate from disk."""
    cert = x509.load_pem_x509_certificate(pki.server_crt.read_bytes())
    have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.IPAddress)
    if all(ipaddress.ip_address(ip) in have for ip in ips):
        return False
    wanted = tuple(dict.fromkeys([str(ip) for ip in have if str(ip) not in ("127.0.0.1", "10.96.0.1")]
                                 + list(ips)))
    ca, ca_key = _load_ca(pki)
    key = _key()
    server = _issue(_name("kube-apiserver"), key, ca.subject, ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                    sans=_server_sans(wanted))
    _write_key(pki.server_key, key)
    _write_cert(pki.server_crt, server)
    return True


def ensure_client_cert(pki: Pki, name: str, cn: str, org: str | None) -> tuple[Path, Path]:
    """A client certificate `<name>.crt`/`<name>.key` signed by the stack's CA (e.g. the kubelet's node
    identity, CN system:node:<node>, O system:nodes, which the Node authorizer and NodeRestriction need)."""
    crt, key_path = pki.dir / f"{name}.crt", pki.dir / f"{name}.key"
    if crt.is_file() and key_path.is_file():
        subject = x509.load_pem_x509_certificate(crt.read_bytes()).subject
        if subject == _name(cn, org):
            return crt, key_path
    ca, ca_key = _load_ca(pki)
    key = _key()
    cert = _issue(_name(cn, org), key, ca.subject, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    _write_key(key_path, key)
    _write_cert(crt, cert)
    return crt, key_path


def ensure_pki(directory: Path) -> Pki:
    """Create the PKI in `directory` unless a complete one is already there (restarts reuse it)."""
    pki = Pki(directory)
    if pki.complete():
        return pki
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key = _key()
    ca_name = _name("trustcap-local-ca")
    ca = _issue(ca_name, ca_key, ca_name, ca_key, is_ca=True)
    server_key = _key()
    sans = _server_sans()
    server = _issue(_name("kube-apiserver"), server_key, ca_name, ca_key,
                    usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans)
    admin_key = _key()
    admin = _issue(_name("trustcap-admin", "system:masters"), admin_key, ca_name, ca_key,
                   usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    sa_key = _key()
    _write_key(pki.ca_key, ca_key)
    _write_cert(pki.ca_crt, ca)
    _write_key(pki.server_key, server_key)
    _write_cert(pki.server_crt, server)
    _write_key(pki.admin_key, admin_key)
    _write_cert(pki.admin_crt, admin)
    _write_key(pki.sa_key, sa_key)
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return pki
