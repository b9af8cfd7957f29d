"""Can this site reach its coordinator, and does the coordinator's certificate chain to the kit's CA?

The site agent asks this before it starts a SuperNode, and again every few seconds while the
coordinator is down: a TLS handshake costs milliseconds, where a SuperNode start costs seconds of
imports, so the agent can poll often and reconnect within seconds of the coordinator's return. A
certificate the consortium CA does not sign (a wrong ``ca.crt`` in the kit, a wrong address in
``site.toml``, an interception proxy) is not an outage: retrying cannot fix it, so the answer names
the certificate that was presented and the CA file it was checked against.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

REACHABLE, UNREACHABLE, UNTRUSTED = "reachable", "unreachable", "untrusted"


@dataclass(frozen=True)
class LinkState:
    state: str   # REACHABLE, UNREACHABLE or UNTRUSTED
    detail: str  # why (for UNREACHABLE / UNTRUSTED), safe to log: addresses and certificate names only

    @property
    def ok(self) -> bool:
        return self.state == REACHABLE


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); ValueError naming the address otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def check_link(address: str, ca_file: Path, timeout: float = 5.0) -> LinkState:
    """One TCP connection and TLS handshake to ``address``, verified against ``ca_file`` and the host name."""
    host, port = split_address(address)
    try:
        context = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        return LinkState(UNTRUSTED, f"the kit's CA file {ca_file} cannot be read as a certificate ({exc})")
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return LinkState(REACHABLE, "")
    except ssl.SSLCertVerificationError as exc:
        return LinkState(UNTRUSTED, _untrusted(address, host, port, ca_file, exc, timeout))
    except (ssl.SSLError, OSError) as exc:  # refused, reset, timed out, no route, TLS alert from a restarting peer
        return LinkState(UNREACHABLE, getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)


def _untrusted(address: str, host: str, port: int, ca_file: Path, exc: ssl.SSLCertVerificationError,
               timeout: float) -> str:
    presented = _presented_certificate(host, port, timeout)
    try:
        from cryptography import x509
        ca = x509.load_pem_x509_certificate(Path(ca_file).read_bytes()).subject.rfc4514_string()
    except (OSError, ValueError):
        ca = "?"
    return (f"the coordinator at {address} presents a certificate {presented} that the consortium CA in "
            f"{ca_file} ({ca}) does not accept: {exc.verify_message or exc.reason}. Check that ca.crt in the "
            f"kit is your consortium's and that [site] coordinator in site.toml names the coordinator "
            f"(or the proxy in front of it)")


def _presented_certificate(host: str, port: int, timeout: float) -> str:
    """Subject, issuer and names of the certificate the peer presents, read without trusting it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
        from cryptography import x509
        cert = x509.load_der_x509_certificate(der)
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [str(v) for v in sans.get_values_for_type(x509.DNSName)] + [
                str(v) for v in sans.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            names = []
        return (f"({cert.subject.rfc4514_string()}, issued by {cert.issuer.rfc4514_string()}"
                + (f", for {', '.join(names)}" if names else "") + ")")
    except (OSError, ssl.SSLError, ValueError):
        return "(unreadable)"
