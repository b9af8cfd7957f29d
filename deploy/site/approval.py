"""Which app versions a site lets run: the ``[approval] apps`` list of its site.toml.

An app version is the sha256 of its FAB, the zip ``flwr run`` builds and the SuperLink stores and
names by that hash. Flower builds FABs deterministically (fixed timestamps, filtered file list), so
a site can approve the FAB file the coordinator sent, its own checkout of the same code, or the
bare hash, and all three agree.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from client.errors import SiteError
from client.site import read_site_toml

HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ApprovalError(ValueError):
    """The approval list or the thing to approve is not usable; the message says which and why."""


def app_hash(target: str | Path) -> str:
    """sha256 of an app: a 64-hex hash as given, a .fab file's bytes, or the FAB built from a folder."""
    text = str(target).strip().lower().removeprefix("sha256:")
    if HEX64.match(text):
        return text
    path = Path(target)
    if path.is_dir():
        from deploy.site.flower_seam import build_fab_from_disk  # Flower's own builder: the hash flwr run sends
        try:
            return hashlib.sha256(build_fab_from_disk(path.resolve())).hexdigest()
        except Exception as exc:  # Flower raises click/typer exceptions for a bad app folder
            raise ApprovalError(f"{path} is not a Flower app folder: {exc}") from None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    raise ApprovalError(f"{target} is neither a sha256, a .fab file nor an app folder")


def approved_apps(site_config: Path) -> set[str]:
    """The hashes under ``[approval] apps``; an unreadable file approves nothing (fail closed)."""
    try:
        raw = read_site_toml(Path(site_config))
    except SiteError as exc:
        raise ApprovalError(str(exc)) from None
    apps = raw.get("approval", {}).get("apps", [])
    if not isinstance(apps, list) or not all(isinstance(a, str) and HEX64.match(a) for a in apps):
        raise ApprovalError(f"site config {site_config}: [approval] apps must be a list of sha256 hex strings")
    return set(apps)


_APPS_LINE = re.compile(r"(?ms)^(\[approval\][^\[]*?^apps\s*=\s*)\[[^\]]*\]")


def approve(site_config: Path, digest: str) -> bool:
    """Add ``digest`` to the site's approval list; False if it was already there.

    The file is the site's own, with its comments: only the ``apps = [...]`` line is rewritten, the
    result is re-read to prove it says what was meant, and it replaces the old file atomically.
    """
    site_config = Path(site_config)
    current = approved_apps(site_config)
    if digest in current:
        return False
    text = site_config.read_text(encoding="utf-8")
    listed = ", ".join(f'"{h}"' for h in sorted(current | {digest}))
    if _APPS_LINE.search(text):
        new = _APPS_LINE.sub(lambda m: m.group(1) + f"[{listed}]", text, count=1)
    elif "[approval]" not in text:
        new = text.rstrip("\n") + f"\n\n[approval]\napps = [{listed}]\n"
    else:
        raise ApprovalError(f"{site_config}: [approval] has no `apps = [...]` line to extend; add it by hand")
    tmp = site_config.with_name(site_config.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    if approved_apps(tmp) != current | {digest}:
        tmp.unlink()
        raise ApprovalError(f"{site_config}: could not add the hash safely; add it to [approval] apps by hand")
    tmp.replace(site_config)
    return True
