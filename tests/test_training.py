"""Local training on one site's real data (Cleveland), step counting, FedProx and settings checks."""

from __future__ import annotations

import numpy as np
import pytest

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from client import training
from client.ingest import heart_disease
from shared_models.ehr import binary_loss
from shared_models.registry import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cleveland(data_dir) -> heart_disease.SiteData:
    return heart_disease.load_centre(heart_disease.centre_file(data_dir, "cleveland"))


def _settings(**overrides) -> training.TrainSettings:
    values = dict(local_steps=200, local_epochs=1, batch_size=4, optimizer="sgd", lr=0.05, proximal_mu=0.0, seed=0)
    values.update(overrides)
    return training.TrainSettings(**values)


def _model(name: str = "ehr-logreg", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, n_features=13)


def _full_loss(model, x, y) -> float:
    with torch.no_grad():
        model.eval()
        return binary_loss(model(torch.from_numpy(x)), torch.from_numpy(y)).item()


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


class StepCounter:
    """Counts real optimizer steps, whoever takes them."""

    def __init__(self) -> None:
        self.steps = 0

    def __enter__(self):
        self.handle = register_optimizer_step_post_hook(self._hook)
        return self

    def _hook(self, optimizer, args, kwargs) -> None:
        self.steps += 1

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_logreg_learns_cleveland(cleveland):
    model = _model()
    before = _full_loss(model, cleveland.x_train, cleveland.y_train)
    out = training.train(model, cleveland.x_train, cleveland.y_train, _settings(), CPU)
    after = _full_loss(model, cleveland.x_train, cleveland.y_train)
    assert after < before - 0.05
    assert out["local-steps"] == 200
    assert np.isfinite(out["train-loss"])

    report = training.evaluate(model, cleveland.x_test, cleveland.y_test, CPU)
    assert report["accuracy"] > 0.7
    assert report["tp"] + report["fp"] + report["tn"] + report["fn"] == len(cleveland.y_test) == 104
    # the reported accuracy is the real one on the test split
    pred = training.predict(model, cleveland.x_test, CPU) > 0.5
    assert report["accuracy"] == pytest.approx(np.mean(pred == cleveland.y_test.astype(bool)))
    assert sum(report["score-hist-pos"]) + sum(report["score-hist-neg"]) == 104


@pytest.mark.parametrize("steps,batch_size", [(1, 4), (7, 4), (60, 4), (3, 256)])
def test_local_steps_exactly_honoured(cleveland, steps, batch_size):
    # 60 steps of 4 cross an epoch boundary (199 rows = 50 batches); batch 256 is one batch per epoch
    model = _model()
    with StepCounter() as counter:
        out = training.train(model, cleveland.x_train, cleveland.y_train,
                             _settings(local_steps=steps, batch_size=batch_size), CPU)
    assert out["local-steps"] == steps
    assert counter.steps == steps


def test_local_epochs_when_no_step_count(cleveland):
    with StepCounter() as counter:
        out = training.train(_model(), cleveland.x_train, cleveland.y_train,
                             _settings(local_steps=0, local_epochs=2, batch_size=32), CPU)
    expected = 2 * int(np.ceil(len(cleveland.y_train) / 32))
    assert out["local-steps"] == expected == counter.steps


def test_training_is_reproducible_with_a_seed(cleveland):
    models = []
    for _ in range(2):
        model = _model(seed=3)
        training.train(model, cleveland.x_train, cleveland.y_train, _settings(local_steps=30, seed=11), CPU)
        models.append(_flat(model))
    torch.testing.assert_close(models[0], models[1])
    other = _model(seed=3)
    training.train(other, cleveland.x_train, cleveland.y_train, _settings(local_steps=30, seed=12), CPU)
    assert not torch.equal(models[0], _flat(other))


@pytest.mark.parametrize("name", ["ehr-logreg", "ehr-mlp"])
def test_proximal_term_keeps_weights_near_the_start(cleveland, name):
    distances = {}
    for mu in (0.0, 1.0):
        model = _model(name, seed=5)
        start = _flat(model)
        training.train(model, cleveland.x_train, cleveland.y_train,
                       _settings(local_steps=60, proximal_mu=mu, seed=7), CPU)
        distances[mu] = torch.linalg.norm(_flat(model) - start).item()
    assert distances[0.0] > 0
    assert distances[1.0] < distances[0.0]


def test_adam_also_trains(cleveland):
    model = _model("ehr-mlp")
    before = _full_loss(model, cleveland.x_train, cleveland.y_train)
    training.train(model, cleveland.x_train, cleveland.y_train, _settings(optimizer="adam", lr=0.005, local_steps=50), CPU)
    assert _full_loss(model, cleveland.x_train, cleveland.y_train) < before


@pytest.mark.parametrize("overrides,key", [
    ({"batch_size": 0}, "batch-size"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"lr": 0.0}, "lr"),
    ({"lr": -0.1}, "lr"),
    ({"local_steps": -1}, "local-steps"),
    ({"local_steps": 0, "local_epochs": 0}, "local-epochs"),
    ({"proximal_mu": -0.5}, "proximal-mu"),
])
def test_train_settings_reject_bad_values(overrides, key):
    with pytest.raises(ValueError) as info:
        _settings(**overrides)
    assert key in str(info.value)


def test_train_settings_list_every_problem():
    with pytest.raises(ValueError) as info:
        _settings(batch_size=0, optimizer="rmsprop", lr=0.0)
    message = str(info.value)
    assert "batch-size" in message and "optimizer" in message and "lr" in message


def test_pick_device():
    assert training.pick_device("cpu") == torch.device("cpu")
    assert training.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
