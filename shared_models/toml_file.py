"""One reader for the TOML files people write by hand — a site's site.toml, the consortium.toml, a kit's
coordinator.toml: each failure is one message naming the file and the reason, which callers raise as
their own error type."""

from __future__ import annotations

import tomllib
from pathlib import Path


class TomlFileError(ValueError):
    """A TOML file is missing, unreadable or not valid TOML; the message names it."""


def read_toml(path: Path, what: str) -> dict:
    """The parsed file; ``what`` names it for people (e.g. "site config")."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TomlFileError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TomlFileError(f"{what} {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise TomlFileError(f"{what} {path} cannot be read as TOML: {exc}") from None
