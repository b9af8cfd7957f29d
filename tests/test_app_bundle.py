"""The app bundle (the FAB every site approves by its hash) holds exactly what the ServerApp and the
ClientApp import, found by reading their import statements (also those inside functions). Code that only
the command line, the site runtime, the demo or the auditor uses stays out, so changing it leaves the
hash every hospital approved unchanged."""

from __future__ import annotations

import ast
import io
import shutil
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from deploy.site.approval import app_hash

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "client", "shared_models", "privacy", "deploy")
APPS = ("server/server_app.py", "client/client_app.py")


def _module_file(name: str) -> Path | None:
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names (``from a import b``: ``a`` and ``a.b``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def app_closure() -> set[str]:
    """Repository paths of every carefl file the two apps can import, with the packages on the way."""
    todo = [ROOT / a for a in APPS]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
                found = _module_file(".".join(parts[:i]))
                if found is not None and found not in seen:
                    todo.append(found)
    return {p.relative_to(ROOT).as_posix() for p in seen}


def bundle_files(app_dir: Path) -> set[str]:
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app_dir))) as fab:
        return {n for n in fab.namelist() if not n.startswith(".info/")}


def test_the_bundle_holds_exactly_what_the_apps_import():
    files = bundle_files(ROOT)
    code = {f for f in files if f.endswith(".py")}
    closure = app_closure()
    assert code - closure == set(), "in the bundle but imported by neither app"
    assert closure - code == set(), "imported by an app but missing from the bundle"
    assert files - code == {"pyproject.toml"} | {f"shared_models/schemas/{p.name}"
                                                 for p in (ROOT / "shared_models" / "schemas").glob("*.toml")}
    assert not any(f.startswith(("deploy/", "tests/", "benchmarks/", "privacy/auditor/")) for f in files)


def test_a_command_line_change_leaves_the_app_hash_alone(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(ROOT / "pyproject.toml", app)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    before = app_hash(app)
    cli = app / "deploy" / "cli" / "main.py"
    cli.write_text(cli.read_text().replace("federated learning for hospitals", "federated learning, hospitals"))
    gate = app / "deploy" / "site" / "gate.py"
    gate.write_text(gate.read_text() + "\n# a site-runtime change\n")
    assert app_hash(app) == before
    handler = app / "client" / "client_app.py"
    handler.write_text(handler.read_text() + "\n# an app change\n")
    assert app_hash(app) != before
