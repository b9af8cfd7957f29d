"""The auditor's public keys: load a participant's Ed25519 key (the OpenSSH line ``carefl provision``
writes as audit-signing.pub, or PEM), print its fingerprint, and check one signature under it.

Apart because the public keys are all the auditor trusts: both the chain verifier (each record's
signature) and the cross-log check (a site's signed head held by the coordinator) go through
``signature_ok`` here, and nothing else decides what a valid signature is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from privacy.auditor.results import AuditError


def load_public_key(key) -> ed25519.Ed25519PublicKey:
    """An Ed25519 public key: the key itself, or a file with its OpenSSH line (``ssh-ed25519 …``, what
    ``carefl provision`` writes as audit-signing.pub) or a PEM public key."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    path = Path(key)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditError(f"public key {path} cannot be read: {exc.strerror}") from None
    try:
        loaded = (serialization.load_pem_public_key(data) if data.lstrip().startswith(b"-----")
                  else serialization.load_ssh_public_key(data.strip()))
    except (ValueError, TypeError, IndexError, binascii.Error):
        raise AuditError(f"{path} is not an OpenSSH or PEM public key") from None
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise AuditError(f"{path} is not an Ed25519 key (the audit-signing.pub of a kit is)")
    return loaded


def fingerprint(key: ed25519.Ed25519PublicKey) -> str:
    """SHA256:… of the raw key, as ``ssh-keygen -l`` prints it."""
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def signature_ok(key: ed25519.Ed25519PublicKey, digest: str, sig) -> bool:
    """Whether ``sig`` (base64, in its one canonical spelling) signs the ASCII of ``digest`` under ``key``."""
    if not isinstance(sig, str) or not sig:
        return False
    try:
        raw = base64.b64decode(sig, validate=True)
        if base64.b64encode(raw).decode("ascii") != sig:  # one spelling only (unused bits must be zero)
            return False
        key.verify(raw, digest.encode("ascii"))
    except (InvalidSignature, binascii.Error, ValueError, UnicodeEncodeError):
        return False
    return True
