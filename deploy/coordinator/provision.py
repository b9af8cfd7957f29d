"""Startup kits for a consortium: ``carefl provision consortium.toml --out kits/``.

One folder per participant, holding only what that participant needs::

    kits/ca/                 ca.crt, ca.key       the provisioner's; never part of a kit
    kits/coordinator/        ca.crt, coordinator.crt, coordinator.key, audit-signing.{key,pub},
                             coordinator.toml, sites/<site>.pub, README.md
    kits/<site>/             ca.crt, supernode.{key,pub}, audit-signing.{key,pub}, site.toml, README.md

A site may instead make its own keys (``carefl site keygen``) and send only the public key: name it
in consortium.toml (``public-key = "…"``) or hand it to ``carefl coordinator add-site``; that site's
kit then holds no private key at all. Re-running provision keeps every existing key and
certificate, and refuses (naming the file) where what exists disagrees with consortium.toml.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from deploy.coordinator import tls

from shared_models.toml_file import TomlFileError, read_toml

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
RESERVED = {"ca", "coordinator"}
# The coordinator's own admin commands connect locally; "coordinator" is its name behind the proxy
# in deploy/compose.yaml and deploy/k8s (the proxy verifies the SuperLink's certificate by it).
LOCAL_NAMES = ["localhost", "127.0.0.1", "coordinator"]
DEFAULT_PORT = 8000


class ProvisionError(ValueError):
    """consortium.toml, a key file or an existing kit is not usable; the message says which and why."""


@dataclass(frozen=True)
class SiteSpec:
    name: str
    public_key: Path | None = None  # the site made its own SuperNode key


@dataclass(frozen=True)
class Consortium:
    name: str
    hosts: list[str]                 # the coordinator's DNS names / IPs (certificate SANs)
    port: int                        # the SuperLink's port
    address: str                     # what sites dial: host:port (the proxy's, when there is one)
    sites: list[SiteSpec]
    days: int = 365
    listen_host: str = "0.0.0.0"


@dataclass
class Report:
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def load_consortium(path: Path) -> Consortium:
    path = Path(path)
    try:
        raw = read_toml(path, "consortium file")
    except TomlFileError as exc:
        raise ProvisionError(str(exc)) from None
    problems = []
    cons, coord, sites = raw.get("consortium", {}), raw.get("coordinator", {}), raw.get("sites", {})
    hosts = coord.get("hosts", [])
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
        problems.append("[coordinator] hosts must list the coordinator's DNS names or IP addresses")
        hosts = ["invalid"]
    port = coord.get("port", DEFAULT_PORT)
    if not isinstance(port, int) or not 0 < port < 65536:
        problems.append(f"[coordinator] port must be a TCP port number, not {port!r}")
    days = cons.get("days", 365)
    if not isinstance(days, int) or days < 1:
        problems.append("[consortium] days (certificate validity) must be a positive integer")
    if not isinstance(sites, dict) or not sites:
        problems.append("no [sites.<name>] section: name at least one site")
        sites = {}
    specs = []
    for name, spec in sites.items():
        if not NAME.match(name) or name in RESERVED:
            problems.append(f"site name {name!r} must be letters, digits, '.', '_' or '-' "
                            f"(and not {' or '.join(sorted(RESERVED))})")
            continue
        key = spec.get("public-key") if isinstance(spec, dict) else None
        specs.append(SiteSpec(name, (path.parent / key).resolve() if key else None))
    if problems:
        raise ProvisionError(f"{path}: " + "; ".join(problems))
    return Consortium(name=str(cons.get("name", "carefl")), hosts=list(hosts), port=port,
                      address=str(coord.get("address", f"{hosts[0]}:{port}")), sites=specs, days=days,
                      listen_host=str(coord.get("listen-host", "0.0.0.0")))


def _toml_str(value: str) -> str:
    import json
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _write_once(path: Path, data: bytes, report: Report) -> None:
    """Create a public file; an existing one must hold the same bytes (else refuse, naming it)."""
    if path.exists():
        if path.read_bytes() != data:
            raise ProvisionError(f"{path} exists and differs from what provisioning would write; "
                                 f"keys and certificates are never replaced silently — move it away to re-issue")
        report.kept.append(path)
        return
    tls.write_public(path, data)
    report.created.append(path)


def _key_pair(private: Path, public: Path, make, openssh: bool, report: Report) -> bytes:
    """Keep an existing private key (and derive its public key), or make a new pair."""
    from cryptography.hazmat.primitives import serialization
    if private.exists():
        raw = private.read_bytes()
        key = (serialization.load_ssh_private_key(raw, password=None) if openssh
               else serialization.load_pem_private_key(raw, password=None))
        report.kept.append(private)
    else:
        key = make()
        tls.write_private_key(private, key, openssh=openssh)
        report.created.append(private)
    pub = tls.openssh_public(key)
    _write_once(public, pub, report)
    return pub


def write_keygen(out: Path, report: Report | None = None) -> bytes:
    """A participant's own keys: SuperNode EC P-384 and audit-log Ed25519; returns the SuperNode public key."""
    report = report if report is not None else Report()
    out.mkdir(parents=True, exist_ok=True)
    pub = _key_pair(out / "supernode.key", out / "supernode.pub", tls.new_supernode_key, True, report)
    _key_pair(out / "audit-signing.key", out / "audit-signing.pub", tls.new_signing_key, False, report)
    return pub


def add_site(coordinator_kit: Path, name: str, public_key: Path, replace: bool = False) -> Path:
    """Record a site's SuperNode public key in the coordinator's kit (registered at the next start)."""
    if not NAME.match(name) or name in RESERVED:
        raise ProvisionError(f"site name {name!r} must be letters, digits, '.', '_' or '-'")
    if not (coordinator_kit / "coordinator.toml").is_file():
        raise ProvisionError(f"{coordinator_kit} is not a coordinator kit (no coordinator.toml)")
    try:
        line = tls.check_supernode_public_key(Path(public_key).read_bytes(), str(public_key))
    except OSError as exc:
        raise ProvisionError(f"{public_key} cannot be read: {exc.strerror}") from None
    except ValueError as exc:
        raise ProvisionError(str(exc)) from None
    target = coordinator_kit / "sites" / f"{name}.pub"
    target.parent.mkdir(exist_ok=True)
    others = {p.stem: p.read_bytes() for p in target.parent.glob("*.pub") if p.stem != name}
    if line in others.values():
        raise ProvisionError(f"{public_key} is already the key of site "
                             f"{next(k for k, v in others.items() if v == line)!r}")
    if target.exists() and target.read_bytes() != line:
        if not replace:
            raise ProvisionError(f"site {name!r} already has a different key ({target}); "
                                 f"pass --replace to rotate it")
        target.unlink()
    if not target.exists():
        tls.write_public(target, line)
    return target


def provision(consortium: Consortium, out: Path) -> Report:
    out = Path(out)
    report = Report()
    for d in (out / "ca", out / "coordinator" / "sites", *(out / s.name for s in consortium.sites)):
        d.mkdir(parents=True, exist_ok=True)

    ca_crt, ca_key = out / "ca" / "ca.crt", out / "ca" / "ca.key"
    if ca_crt.exists() != ca_key.exists():
        raise ProvisionError(f"{out / 'ca'} holds only one of ca.crt / ca.key; restore the other")
    if ca_crt.exists():
        key, cert = tls.load_ca(ca_crt, ca_key)
        report.kept += [ca_crt, ca_key]
    else:
        key, cert = tls.make_ca(f"{consortium.name} CA", consortium.days)
        tls.write_private_key(ca_key, key)
        tls.write_public(ca_crt, tls.pem(cert))
        report.created += [ca_key, ca_crt]
    ca_pem = tls.pem(cert)

    coord = out / "coordinator"
    _write_once(coord / "ca.crt", ca_pem, report)
    _coordinator_cert(consortium, coord, key, cert, report)
    _key_pair(coord / "audit-signing.key", coord / "audit-signing.pub", tls.new_signing_key, False, report)
    _write_text(coord / "coordinator.toml", _coordinator_toml(consortium), report, keep=True)

    for site in consortium.sites:
        kit = out / site.name
        _write_once(kit / "ca.crt", ca_pem, report)
        if site.public_key is None:
            pub = write_keygen(kit, report)
        else:
            try:
                pub = tls.check_supernode_public_key(site.public_key.read_bytes(), str(site.public_key))
            except OSError as exc:
                raise ProvisionError(f"public key of site {site.name!r}: {site.public_key}: {exc.strerror}") from None
            except ValueError as exc:
                raise ProvisionError(str(exc)) from None
            _write_once(kit / "supernode.pub", pub, report)
        _write_once(coord / "sites" / f"{site.name}.pub", pub, report)
        _write_text(kit / "site.toml", _site_toml(consortium, site.name), report, keep=True)
        _write_text(kit / "README.md", _site_readme(consortium, site), report, keep=False)
    _write_text(coord / "README.md", _coordinator_readme(consortium), report, keep=False)
    return report


def _coordinator_cert(consortium: Consortium, coord: Path, ca_key, ca_cert, report: Report) -> None:
    crt, key = coord / "coordinator.crt", coord / "coordinator.key"
    hosts = list(dict.fromkeys(consortium.hosts + LOCAL_NAMES))
    if crt.exists() and key.exists():
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        have = {str(v) for v in sans.get_values_for_type(x509.DNSName)} | {
            str(v) for v in sans.get_values_for_type(x509.IPAddress)}
        if have != set(hosts):
            raise ProvisionError(f"{crt} names {sorted(have)} but consortium.toml names {sorted(hosts)}; "
                                 f"move coordinator.crt and coordinator.key away to re-issue")
        report.kept += [crt, key]
        return
    if crt.exists() or key.exists():
        raise ProvisionError(f"{coord} holds only one of coordinator.crt / coordinator.key; move it away")
    server_key, server_cert = tls.issue_server_cert(ca_key, ca_cert, hosts, consortium.days)
    tls.write_private_key(key, server_key)
    tls.write_public(crt, tls.pem(server_cert))
    report.created += [key, crt]


def _write_text(path: Path, text: str, report: Report, keep: bool) -> None:
    """Templates the participant edits (keep=True) are never replaced; generated READMEs are."""
    if keep and path.exists():
        report.kept.append(path)
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    report.created.append(path)


def _coordinator_toml(c: Consortium) -> str:
    return (f"# The coordinator of consortium {c.name!r}: written by `carefl provision`, yours to edit.\n"
            f"[coordinator]\n"
            f"consortium = {_toml_str(c.name)}\n"
            f"listen-host = {_toml_str(c.listen_host)}   # the SuperLink's interface\n"
            f"port = {c.port}\n"
            f"address = {_toml_str(c.address)}   # what sites dial (the proxy, in production)\n")


def _site_toml(c: Consortium, site: str) -> str:
    return f"""# Site {site!r} of consortium {c.name!r}: written by `carefl provision`, yours to edit.
# Paths are relative to this file. Nothing here is ever sent to the coordinator.
[site]
id = {_toml_str(site)}
coordinator = {_toml_str(c.address)}
device = "auto"                      # "cpu", "cuda", "cuda:1"; auto = cuda when present
ledger = "privacy-ledger.sqlite"     # this site's privacy ledger: lifetime ε per dataset
cache = "cache"                      # preprocessed imaging cases
audit_log = "audit.jsonl"            # this site's signed audit log (key: audit-signing.key of the kit)

[approval]
# sha256 of every app version (FAB) this site lets run: `carefl site approve PATH_OR_FAB_OR_HASH`
apps = []

# Add your datasets, then check them with `carefl site validate`:
# [datasets.heart-disease]
# path = "/data/heart/processed.site.data"
# epsilon_budget = 10.0              # lifetime ε of this dataset, across all runs
#
# [datasets.hippocampus]
# manifest = "/data/mri/cases.csv"
# labels = [0, 1, 2]
# modality = "MR"                    # CT, MR or PET: a DICOM image of another modality is refused
# require_deidentified = true
# epsilon_budget = 8.0
"""


def _site_readme(c: Consortium, site: SiteSpec) -> str:
    own_key = site.public_key is not None
    keys = ("You made your own keys with `carefl site keygen`; copy `supernode.key` and "
            "`audit-signing.key` (and their .pub files) into this folder." if own_key else
            "`supernode.key` (SuperNode authentication) and `audit-signing.key` (your audit log) are your "
            "private keys: keep them on this machine only, readable by the agent's user.")
    return f"""# carefl startup kit: site `{site.name}` of consortium `{c.name}`

{keys} `ca.crt` is the consortium CA; the agent only talks to a coordinator whose certificate it signed.

Run every command from this folder.

1. Describe your data in `site.toml` (a `[datasets.<name>]` section with its path or manifest and
   your lifetime ε budget), then check it — nothing leaves this machine:

   ```sh
   carefl site validate --config site.toml --dataset hippocampus   # imaging; skip for tabular data
   ```

2. Approve the app version the coordinator announced (its sha256, its .fab file, or your checkout of it):

   ```sh
   carefl site approve HASH_OR_FAB_OR_PATH --config site.toml
   ```

3. Start the agent (it waits and retries while the coordinator at `{c.address}` is down):

   ```sh
   carefl site start --kit . --config site.toml
   ```

The agent refuses any message from an app version not listed under `[approval]`, saying which hash
it saw. `carefl site budget --config site.toml` shows the ε spent so far. `audit.jsonl` is your signed
audit log; whoever audits it needs `audit-signing.pub` from this folder.
"""


def _coordinator_readme(c: Consortium) -> str:
    sites = ", ".join(s.name for s in c.sites)
    first = c.sites[0].name if c.sites else "SITE"
    return f"""# carefl startup kit: coordinator of consortium `{c.name}`

`coordinator.key` is the SuperLink's TLS key and `audit-signing.key` signs the coordinator's audit
log: keep both on this machine only. `sites/*.pub` are the sites' SuperNode public keys ({sites}).
Sites reach the SuperLink at `{c.address}`; expose only `/v1/fleet/*` to them (docs/SECURITY.md).

Run every command from this folder.

1. Start the SuperLink (TLS, SuperNode authentication, persistent state, no runtime installs,
   no telemetry) and register every site key:

   ```sh
   carefl coordinator start --kit . --state-dir state --background
   ```

2. Tell the sites which app version to approve (they run `carefl site approve`):

   ```sh
   carefl coordinator app-hash
   ```

3. See which sites are online, then run a study on named sites:

   ```sh
   carefl coordinator status --kit . --state-dir state
   carefl coordinator run --kit . --state-dir state --task ehr --sites {first} --rounds 2
   ```

4. Stop the SuperLink:

   ```sh
   carefl coordinator stop --state-dir state
   ```

A site that generated its own key: `carefl coordinator add-site NAME NAME.pub --kit .` (registered at
once if the SuperLink is running, else at the next start).

After an outage or a restart of the SuperLink the sites reconnect by themselves; a study that was
running continues with `carefl coordinator run --kit . --state-dir state --resume state/runs/<run>`.
Your signed audit log is `state/audit.jsonl`, one file for all your runs; give auditors
`audit-signing.pub` (they run `carefl audit verify --state-dir state --kit .`).
"""
