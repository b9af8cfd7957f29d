"""The ``carefl`` command: one Typer sub-app per command group (``main.py`` assembles them)."""
