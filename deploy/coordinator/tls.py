"""Keys and certificates of a consortium, made with ``cryptography``.

- a consortium CA and the coordinator's TLS server certificate (SANs = its host names / IPs);
- a SuperNode key per site: EC P-384, private key in OpenSSH format, which is what
  ``flower-supernode --auth-supernode-private-key`` reads, public key as an OpenSSH line for
  ``flwr supernode register``;
- an Ed25519 key per participant for signing its audit log.

Private keys are created 0600 and never overwritten: ``write_private_key`` refuses an existing file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SUPERNODE_CURVE = ec.SECP384R1


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "carefl"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def write_private_key(path: Path, key, openssh: bool = False) -> None:
    """PEM (PKCS8, or OpenSSH for SuperNode keys), owner-only from the moment the file exists."""
    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def write_public(path: Path, data: bytes) -> None:
    """A public file (certificate, public key), refusing to replace an existing one."""
    with open(path, "xb") as fh:
        fh.write(data)


def openssh_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH) + b"\n"


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def make_ca(name: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def issue_server_cert(ca_key, ca_cert: x509.Certificate, hosts: list[str],
                      days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate whose SANs cover ``hosts`` (IP addresses or DNS names)."""
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_ca(cert_path: Path, key_path: Path):
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return key, cert


def new_supernode_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(SUPERNODE_CURVE())


def new_signing_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def check_supernode_public_key(data: bytes, where: str) -> bytes:
    """The OpenSSH line of an EC P-384 public key, or ValueError saying what is wrong with it."""
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, IndexError):
        raise ValueError(f"{where} is not an OpenSSH public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, SUPERNODE_CURVE):
        raise ValueError(f"{where} is not an EC P-384 key (Flower SuperNode authentication needs "
                         f"ecdsa-sha2-nistp384; make one with `carefl site keygen`)")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
