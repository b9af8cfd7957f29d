"""Provisioning kits, a site's own keys, app approval and the SuperNode code gate (real files, real crypto)."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from deploy.site import approval_hook as gate
from deploy.site.approval import ApprovalError, app_hash, approve, approved_apps
from deploy.coordinator.superlink import APP_DIR
from deploy.processes import flower_env, tool
from deploy.coordinator.provision import ProvisionError, add_site, load_consortium, provision, write_keygen


def _consortium(tmp_path: Path, body: str = "", hosts='["fl.example.org", "10.1.2.3"]') -> Path:
    path = tmp_path / "consortium.toml"
    path.write_text(f'[consortium]\nname = "test"\n\n[coordinator]\nhosts = {hosts}\nport = 8443\n\n'
                    f'[sites.site-a]\n[sites.site-b]\n{body}')
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_provision_writes_one_kit_per_participant_with_only_its_own_secrets(tmp_path):
    kits = tmp_path / "kits"
    provision(load_consortium(_consortium(tmp_path)), kits)
    coord, a = kits / "coordinator", kits / "site-a"
    assert sorted(p.name for p in coord.iterdir()) == [
        "README.md", "audit-signing.key", "audit-signing.pub", "ca.crt", "coordinator.crt", "coordinator.key",
        "coordinator.toml", "sites"]
    assert sorted(p.name for p in a.iterdir()) == [
        "README.md", "audit-signing.key", "audit-signing.pub", "ca.crt", "site.toml", "supernode.key", "supernode.pub"]
    for key in [*kits.rglob("*.key")]:
        assert _mode(key) == 0o600, key
    # the CA key is the provisioner's alone
    assert not any(p.name == "ca.key" for k in ("coordinator", "site-a", "site-b") for p in (kits / k).rglob("*"))

    ca = x509.load_pem_x509_certificate((kits / "ca" / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((coord / "coordinator.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost", "coordinator"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1"}

    # SuperNode key: EC P-384 in OpenSSH format (what flower-supernode reads); the coordinator holds its public half
    node_key = serialization.load_ssh_private_key((a / "supernode.key").read_bytes(), password=None)
    assert isinstance(node_key, ec.EllipticCurvePrivateKey) and node_key.curve.name == "secp384r1"
    assert (coord / "sites" / "site-a.pub").read_bytes() == (a / "supernode.pub").read_bytes()
    assert (a / "supernode.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    audit = serialization.load_pem_private_key((a / "audit-signing.key").read_bytes(), password=None)
    assert isinstance(audit, ed25519.Ed25519PrivateKey)
    # the site's template names it and its coordinator, approves nothing yet
    site_toml = (a / "site.toml").read_text()
    assert 'id = "site-a"' in site_toml and 'coordinator = "fl.example.org:8443"' in site_toml
    assert approved_apps(a / "site.toml") == set()
    assert "carefl site start --kit . --config site.toml" in (a / "README.md").read_text()


def test_reprovisioning_keeps_every_key_and_refuses_silent_changes(tmp_path):
    kits = tmp_path / "kits"
    spec = _consortium(tmp_path)
    provision(load_consortium(spec), kits)
    before = {p: p.read_bytes() for p in kits.rglob("*") if p.suffix in (".key", ".pub", ".crt")}
    (kits / "site-a" / "site.toml").write_text((kits / "site-a" / "site.toml").read_text() + "# edited by the site\n")
    report = provision(load_consortium(spec), kits)
    assert {p: p.read_bytes() for p in before} == before
    assert set(before) <= set(report.kept)
    assert (kits / "site-a" / "site.toml").read_text().endswith("# edited by the site\n")

    # new host names: the certificate would have to change, so provisioning says so instead
    with pytest.raises(ProvisionError, match="coordinator.crt names"):
        other = tmp_path / "other"
        other.mkdir()
        provision(load_consortium(_consortium(other, hosts='["other.example.org"]')), kits)
    # a site key swapped at the coordinator is not papered over
    (kits / "coordinator" / "sites" / "site-b.pub").write_bytes((kits / "site-a" / "supernode.pub").read_bytes())
    with pytest.raises(ProvisionError, match="site-b.pub exists and differs"):
        provision(load_consortium(spec), kits)


def test_a_site_can_keep_its_private_key_and_send_only_the_public_key(tmp_path):
    own = tmp_path / "site-b-own"
    pub = write_keygen(own)
    assert _mode(own / "supernode.key") == 0o600 and pub.startswith(b"ecdsa-sha2-nistp384 ")
    assert write_keygen(own) == pub  # running keygen again keeps the key
    spec = _consortium(tmp_path).read_text().replace("[sites.site-b]\n", '[sites.site-b]\npublic-key = "site-b-own/supernode.pub"\n')
    (tmp_path / "consortium.toml").write_text(spec)
    kits = tmp_path / "kits"
    provision(load_consortium(tmp_path / "consortium.toml"), kits)
    assert not list((kits / "site-b").glob("*.key"))  # the coordinator never had it
    assert (kits / "coordinator" / "sites" / "site-b.pub").read_bytes() == pub
    assert "copy `supernode.key`" in (kits / "site-b" / "README.md").read_text()


def test_add_site_accepts_only_p384_keys_and_never_swaps_one_silently(tmp_path):
    kits = tmp_path / "kits"
    provision(load_consortium(_consortium(tmp_path)), kits)
    coord = kits / "coordinator"
    pub = write_keygen(tmp_path / "site-c") and tmp_path / "site-c" / "supernode.pub"
    assert add_site(coord, "site-c", pub).read_bytes() == pub.read_bytes()
    assert add_site(coord, "site-c", pub).exists()  # same key again: fine
    with pytest.raises(ProvisionError, match="already the key of site 'site-c'"):
        add_site(coord, "site-d", pub)
    other = write_keygen(tmp_path / "site-c2") and tmp_path / "site-c2" / "supernode.pub"
    with pytest.raises(ProvisionError, match="--replace"):
        add_site(coord, "site-c", other)
    assert add_site(coord, "site-c", other, replace=True).read_bytes() == other.read_bytes()
    with pytest.raises(ProvisionError, match="not an EC P-384 key"):
        add_site(coord, "site-e", tmp_path / "site-c" / "audit-signing.pub")
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(ProvisionError, match="junk.pub is not an OpenSSH public key"):
        add_site(coord, "site-e", tmp_path / "junk.pub")
    with pytest.raises(ProvisionError, match="site name"):
        add_site(coord, "../etc", pub)


def test_bad_consortium_files_list_every_problem(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[coordinator]\nhosts = []\nport = 99999\n[sites."bad name"]\n[sites.coordinator]\n')
    with pytest.raises(ProvisionError) as err:
        load_consortium(path)
    for expected in ("hosts must list", "port must be a TCP port", "'bad name'", "'coordinator'"):
        assert expected in str(err.value)
    path.write_text("[coordinator\n")
    with pytest.raises(ProvisionError, match="cannot be read as TOML"):
        load_consortium(path)
    with pytest.raises(ProvisionError, match="not found"):
        load_consortium(tmp_path / "missing.toml")


def test_app_hash_is_the_hash_flower_gives_the_fab(tmp_path):
    digest = app_hash(APP_DIR)
    done = subprocess.run([tool("flwr"), "build", "--app", str(APP_DIR)], cwd=tmp_path, capture_output=True,
                          text=True, env=flower_env(tmp_path / "flwr-home"), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    fab = next(tmp_path.glob("*.fab"))
    assert hashlib.sha256(fab.read_bytes()).hexdigest() == digest == app_hash(fab)
    assert digest[:8] in fab.name  # Flower names the file after the same hash
    assert app_hash(f"sha256:{digest.upper()}") == digest
    with pytest.raises(ApprovalError, match="neither a sha256"):
        app_hash(tmp_path / "nothing-here")


def test_approve_edits_only_the_approval_list(tmp_path):
    kits = tmp_path / "kits"
    provision(load_consortium(_consortium(tmp_path)), kits)
    config = kits / "site-a" / "site.toml"
    before = config.read_text()
    h1, h2 = "a" * 64, "b" * 64
    assert approve(config, h1) is True and approve(config, h1) is False
    assert approve(config, h2) is True
    assert approved_apps(config) == {h1, h2}
    after = config.read_text()
    assert [l for l in after.splitlines() if not l.startswith("apps")] == \
           [l for l in before.splitlines() if not l.startswith("apps")]  # comments and settings untouched
    config.write_text('[site]\nid = "x"\n')
    assert approve(config, h1) and approved_apps(config) == {h1}
    config.write_text('[approval]\napps = ["not-a-hash"]\n')
    with pytest.raises(ApprovalError, match="sha256 hex strings"):
        approved_apps(config)


def test_gate_refuses_unapproved_and_unreadable_approval_lists(tmp_path):
    sci, original = gate.check_seam()  # the flwr seam the gate wraps is where it expects
    assert original is sci._pull_and_store_message
    config = tmp_path / "site.toml"
    config.write_text(f'[site]\nid = "x"\n[approval]\napps = ["{"c" * 64}"]\n')
    assert gate.refusal_reason(config, "c" * 64) is None
    reason = gate.refusal_reason(config, "d" * 64)
    assert f"sha256:{'d' * 64} is not approved" in reason
    config.write_text("[approval\n")
    assert "refuses every app" in gate.refusal_reason(config, "c" * 64)
    os.chmod(config, 0o000)
    if os.geteuid() != 0:  # root reads anything; the TOML error above already covers fail-closed
        assert "refuses every app" in gate.refusal_reason(config, "c" * 64)
