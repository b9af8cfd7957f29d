"""The coordinator's run configuration, checked against the app's own defaults in pyproject.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from server.settings import STRATEGIES, RunConfigError, RunSettings
from shared_models.registry import model_names

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.fixture(scope="module")
def defaults() -> dict:
    with open(PYPROJECT, "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def test_pyproject_defaults_are_valid(defaults):
    s = RunSettings.from_run_config(defaults)
    assert s.task == defaults["task"]
    assert s.model == defaults["model"]
    assert s.strategy == defaults["strategy"]
    assert s.num_rounds == defaults["num-server-rounds"]
    assert s.lr == pytest.approx(defaults["lr"])
    assert s.batch_size == defaults["batch-size"]
    assert s.sites == ()
    assert s.round_timeout == pytest.approx(float(defaults["round-timeout"]))
    train = s.train_config()
    assert train["model"] == defaults["model"] and train["local-steps"] == defaults["local-steps"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("model", model_names("ehr"))
def test_every_strategy_and_model_is_accepted(defaults, strategy, model):
    s = RunSettings.from_run_config({**defaults, "strategy": strategy.upper(), "model": model})
    assert s.strategy == strategy and s.model == model


def test_the_evaluation_sigma_goes_to_every_site_with_train_and_evaluate_messages(defaults):
    from shared_models.eval_release import EVAL_NOISE_MULTIPLIER

    s = RunSettings.from_run_config({k: v for k, v in defaults.items() if k != "eval-noise-multiplier"})
    assert s.eval_noise_multiplier == EVAL_NOISE_MULTIPLIER  # the measured default (docs/BENCHMARKS.md)
    s = RunSettings.from_run_config({**defaults, "eval-noise-multiplier": 8})
    assert s.train_config()["eval-noise-multiplier"] == 8.0  # sites plan the study's ε with it
    assert s.evaluate_config() == {"model": s.model, "dp": True, "eval-noise-multiplier": 8.0}


def test_sites_are_parsed(defaults):
    s = RunSettings.from_run_config({**defaults, "sites": " cleveland, va ,,hungarian"})
    assert s.sites == ("cleveland", "va", "hungarian")


def test_every_problem_is_listed_in_one_error(defaults):
    bad = {**defaults, "strategy": "fedmagic", "lr": 0, "model": "ehr-oracle"}
    with pytest.raises(RunConfigError) as info:
        RunSettings.from_run_config(bad)
    message = str(info.value)
    assert "strategy 'fedmagic'" in message
    assert "'lr' must be > 0" in message
    assert "unknown model 'ehr-oracle'" in message
    assert message.count(";") >= 2  # three separate problems
    assert isinstance(info.value, ValueError)


def test_missing_and_mistyped_keys_are_listed(defaults):
    bad = {k: v for k, v in defaults.items() if k not in ("seed", "batch-size")}
    bad["num-server-rounds"] = "many"
    with pytest.raises(RunConfigError) as info:
        RunSettings.from_run_config(bad)
    message = str(info.value)
    assert "'seed' is missing" in message
    assert "'batch-size' is missing" in message
    assert "'num-server-rounds' must be int" in message


@pytest.mark.parametrize("key,value,expected", [
    ("task", "imaging", "task 'imaging'"),
    ("batch-size", 0, "'batch-size' must be >= 1"),
    ("min-sites", 0, "'min-sites' must be >= 1"),
    ("local-steps", -3, "'local-steps' must be >= 0"),
    ("server-lr", -1.0, "'server-lr' must be > 0"),
    ("round-timeout", 0, "'round-timeout' must be > 0"),
    ("sites", "va,va", "names a site twice"),
    ("personalise", "fedbn", "'personalise' must be one of none, finetune"),
    ("personalise", "finetune", "needs dp = false"),
    ("eval-noise-multiplier", 0.0, "'eval-noise-multiplier' must be a number > 0"),
    ("eval-noise-multiplier", "lots", "'eval-noise-multiplier' must be a number > 0"),
    ("eval-noise-multiplier", float("inf"), "'eval-noise-multiplier' must be a number > 0"),
])
def test_single_problems(defaults, key, value, expected):
    with pytest.raises(RunConfigError, match=expected.replace("(", r"\(")):
        RunSettings.from_run_config({**defaults, key: value})


# ---- values the sites refuse must be caught at the start of the run ----

# (run-config overrides, the key a site names when it refuses them)
SITE_REFUSED = [
    pytest.param({"optimizer": "rmsprop"}, "optimizer", id="optimizer"),
    pytest.param({"strategy": "fedprox", "proximal-mu": -0.1}, "proximal-mu", id="proximal-mu"),
    pytest.param({"local-steps": 0, "local-epochs": 0}, "local-epochs", id="local-epochs"),
]


def _site_train_settings(cfg: dict):
    """What a site builds from the train message it receives (client/client_app.py: train)."""
    from shared_models.train_request import TrainSettings

    mu = cfg["proximal-mu"] if cfg["strategy"] == "fedprox" else 0.0
    return TrainSettings.from_config({**cfg, "proximal-mu": mu})


@pytest.mark.parametrize("overrides,key", SITE_REFUSED)
def test_sites_refuse_these_values(defaults, overrides, key):
    """Precondition for the test below: every site would refuse every round of such a run."""
    _site_train_settings(defaults)  # the defaults are fine at the site
    with pytest.raises(ValueError, match=key):
        _site_train_settings({**defaults, **overrides})


@pytest.mark.parametrize("overrides,key", SITE_REFUSED)
def test_values_sites_refuse_are_caught_at_start(defaults, overrides, key):
    with pytest.raises(RunConfigError, match=key):
        RunSettings.from_run_config({**defaults, **overrides})
