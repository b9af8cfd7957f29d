"""One task table (shared_models/tasks.py) that every command, both apps and the report read."""

from __future__ import annotations

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
