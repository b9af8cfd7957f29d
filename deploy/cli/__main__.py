"""``python -m deploy.cli`` is the ``carefl`` command."""

from deploy.cli.main import main

main()
