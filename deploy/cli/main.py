"""The ``carefl`` command: every command group is its own sub-app in this folder; this file only
assembles them and turns the errors a person can fix into one clear line (exit code 2), never a traceback.

    carefl demo | simulate           demo.py        a consortium on this machine, one run followed to the end
    carefl provision                 coordinator.py kits for a consortium
    carefl coordinator …             coordinator.py the SuperLink, studies, public pretraining
    carefl site …                    site.py        a hospital's agent, approvals, data checks, budget, report
    carefl data …                    data.py        public data sets and demo sites
    carefl privacy plan              privacy.py     σ for a whole study
    carefl audit …                   audit.py       verify signed logs, audit reports
    carefl report                    report.py      a run's report again
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import typer

from client.errors import SiteError
from deploy.cli import audit, coordinator, data, demo, privacy, report, site
from deploy.cli.common import console
from deploy.coordinator.provision import ProvisionError
from deploy.coordinator.superlink import DeploymentError
from deploy.site.approval import ApprovalError
from privacy.auditor.results import AuditError
from privacy.ledger import LedgerError
from privacy.policy import PolicyError
from server.settings import RunConfigError
from server.sites import SiteSelectionError
from shared_models.public_checkpoint import PublicCheckpointError
from shared_models.tasks import UnknownTaskError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="carefl: federated learning for hospitals.")
app.command()(demo.demo)
app.command()(demo.simulate)
app.command("provision")(coordinator.provision_cmd)
app.command("report")(report.report_cmd)
app.add_typer(data.data_app, name="data")
app.add_typer(privacy.privacy_app, name="privacy")
app.add_typer(site.site_app, name="site")
app.add_typer(coordinator.coordinator_app, name="coordinator")
app.add_typer(audit.audit_app, name="audit")

USER_ERRORS = (SiteError, DeploymentError, RunConfigError, SiteSelectionError, LedgerError, PolicyError,
               ProvisionError, ApprovalError, AuditError, PublicCheckpointError, UnknownTaskError)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(143)  # unwinds the `with LocalFederation` blocks, which stop their processes


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        app()
    except USER_ERRORS as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; every process this command started has been stopped")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - a bug: one line for the person, the traceback to a file
        console.print(f"[bold red]internal error:[/] {type(exc).__name__} in carefl; nothing more was done. "
                      f"Details for a bug report: {_write_traceback()}", highlight=False)
        sys.exit(1)


def _write_traceback() -> Path:
    """The current exception's traceback in a new file (never on the terminal: it may name local paths and
    values a person should look at before sharing them)."""
    path = Path(tempfile.gettempdir()) / f"carefl-error-{time.strftime('%Y%m%d-%H%M%S')}-{id(sys.exc_info()[1]):x}.txt"
    path.write_text(traceback.format_exc())
    return path


if __name__ == "__main__":
    main()
