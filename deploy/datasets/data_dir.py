"""Where a site keeps its data: ``--data-dir``, else ``$CAREFL_DATA``, else ``~/.cache/carefl``."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "CAREFL_DATA"
DEFAULT_DIR = Path("~/.cache/carefl")


def resolve_data_dir(cli_value: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Return the data directory and where the choice came from (for error messages)."""
    if cli_value:
        return Path(cli_value).expanduser().resolve(), "--data-dir"
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve(), f"${ENV_VAR}"
    return DEFAULT_DIR.expanduser().resolve(), "default location"
