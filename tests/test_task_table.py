"""One task table (shared_models/tasks.py) that every command, both apps and the report read."""

from __future__ import annotations

import json
import os

import pytest

from client.tasks import SITE_TASKS
from deploy.coordinator.follow import check_run_config
from server.report_data import HEADLINE, SITE_METRICS
from shared_models.registry import get_spec
from shared_models.tasks import TASKS, UnknownTaskError, get_task


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_starts_a_valid_study_from_its_defaults(name):
    task = get_task(name)
    assert get_spec(task.default_model).task == name
    assert name in SITE_TASKS and task.metric_family in SITE_METRICS and HEADLINE[task.metric_family] == task.headline
    for from_checkpoint in (False, True) if task.finetune_config else (False,):
        config = check_run_config(3, None, None, None, None, {"sites": "a,b"},
                                  defaults=task.defaults(from_checkpoint=from_checkpoint))
        assert config["task"] == name and config["model"] == task.default_model


def test_the_command_line_wins_over_the_task_defaults():
    config = check_run_config(2, None, None, 0.05, 7, {}, defaults=get_task("ehr-seq").defaults())
    assert config["lr"] == 0.05 and config["local-steps"] == 7 and config["schema"] == "diabetes-visits"


def test_an_unknown_task_is_one_clear_error():
    with pytest.raises(UnknownTaskError, match="unknown task 'ct'; available: ehr, ehr-seq, seg"):
        get_task("ct")
    with pytest.raises(UnknownTaskError, match="no public-checkpoint fine-tuning"):
        get_task("ehr").defaults(from_checkpoint=True)


# -- every command that takes --task takes every task of the table ----------------------------------

def _task_options():
    """(command path, its --task option) for every ``carefl`` command that has one."""
    import click
    import typer

    from deploy.cli.main import app

    def walk(command, path):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, (*path, name))
        else:
            for param in command.params:
                if "--task" in getattr(param, "opts", ()):
                    yield " ".join(path), param

    return dict(walk(typer.main.get_command(app), ()))


def test_every_command_that_takes_a_task_lists_every_task_of_the_table():
    options = _task_options()
    assert {"demo", "simulate", "coordinator run"} <= set(options)
    for command, option in options.items():
        assert option.default in TASKS, command
        assert " | ".join(TASKS) in option.help, (command, option.help)  # built from the table, not typed in


def test_every_task_has_its_demo_sites_and_can_be_simulated():
    from deploy.cli.demo import DEMO_SITES, RAY_PARTITIONED_KINDS, demo_sites

    assert DEMO_SITES.keys() == TASKS.keys()  # carefl demo, and carefl simulate beyond Ray's partitions
    for name, task in TASKS.items():
        assert demo_sites(name).sites >= 2
        assert task.dataset_kind in RAY_PARTITIONED_KINDS or name in DEMO_SITES


def test_every_task_has_a_site_report():
    from deploy.site.report import BINARY_TEST_SPLITS
    from shared_models.tasks import BINARY, SEGMENTATION

    for task in TASKS.values():
        assert task.metric_family in (BINARY, SEGMENTATION)
        assert task.metric_family != BINARY or task.dataset_kind in BINARY_TEST_SPLITS, task.name


@pytest.mark.parametrize("command", [["demo"], ["simulate"], ["coordinator", "run", "--kit", "kit", "--sites", "a"]])
def test_an_unknown_task_is_the_tables_one_error_in_every_command(command, monkeypatch):
    from typer.testing import CliRunner

    from deploy.cli import coordinator
    from deploy.cli.main import USER_ERRORS, app

    monkeypatch.setattr(coordinator, "_running", lambda kit, state_dir: None)  # no coordinator needed to refuse
    result = CliRunner().invoke(app, [*command, "--task", "ct"])
    assert isinstance(result.exception, UnknownTaskError) and isinstance(result.exception, USER_ERRORS)
    assert str(result.exception) == "unknown task 'ct'; available: ehr, ehr-seq, seg"


def test_a_task_without_demo_sites_is_refused_by_name(monkeypatch):
    from deploy.cli import demo

    monkeypatch.delitem(demo.DEMO_SITES, "seg")
    with pytest.raises(UnknownTaskError, match="task 'seg' has no demo sites"):
        demo.demo_sites("seg")


def test_train_params_a_task_does_not_offer_are_refused_from_the_table():
    assert get_task("ehr").train_params_problem("decoder") == "'train-params' = \"decoder\" needs a U-Net (task seg)"
    assert all(t.train_params_problem("all") is None for t in TASKS.values())
    assert get_task("seg").train_params_problem("decoder") is None


def test_simulate_runs_a_task_beyond_rays_partitions_in_one_process(tmp_path):
    """``carefl simulate --task ehr-seq``: synthetic visit-extract sites, one short round in one process."""
    from tests.helpers import run_carefl

    out = tmp_path / "sim"
    done = run_carefl(["simulate", "--task", "ehr-seq", "--sites", "2", "--rounds", "1", "--local-steps", "2",
                       "--out", str(out)], tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["config"]["task"] == "ehr-seq"
    assert len(summary["per_site"]) == 2 and (out / "feature_stats.json").exists()
    assert "round 1" in (out / "deployment" / "study.log").read_text()  # the study's own log, beside its sites
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and _mentions(pid, "deploy.demo.inprocess",
                                                                                   str(tmp_path))]


def _mentions(pid: str, *words: str) -> bool:
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return all(w in cmd for w in words)
