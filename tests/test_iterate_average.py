"""The coordinator's moving average of global models (run config ``weight-average``): its arithmetic, and a
real study over the in-process transport in which the sites evaluate the average, training goes on from the
plain aggregate, the run publishes the average, and a resumed study averages on where it stopped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from client.client_app import app as client_app
from deploy.demo.inprocess import InProcessGrid
from server.iterate_average import IterateAverage
from server.server_app import app as server_app
from server.settings import RunSettings
from tests.helpers import default_run_config, site_config

CENTRES = ("cleveland", "hungarian", "switzerland", "va")


def _record(value: float) -> ArrayRecord:
    return ArrayRecord({"w": torch.full((3,), value), "b": torch.tensor([value * 2])})


def _flat(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([a.numpy().astype(np.float64).ravel() for a in arrays.values()])


def test_the_average_is_bias_corrected_and_decay_zero_is_the_plain_model():
    average = IterateAverage(0.5)
    first = average.add(_record(4.0))
    assert _flat(first) == pytest.approx(_flat(_record(4.0)))  # round 1: not pulled towards zero or the start
    second = average.add(_record(1.0))
    assert _flat(second) == pytest.approx(_flat(_record((0.5 * 4.0 + 1.0) / 1.5)))
    assert second["w"].numpy().dtype == np.float32
    plain = IterateAverage(0.0)
    plain.add(_record(4.0))
    assert _flat(plain.add(_record(1.0))) == pytest.approx(_flat(_record(1.0)))


def test_a_resumed_average_goes_on_as_if_it_never_stopped():
    straight, stopped = IterateAverage(0.8), IterateAverage(0.8)
    for value in (1.0, 2.0):
        straight.add(_record(value))
        stopped.add(_record(value))
    resumed = IterateAverage(0.8)
    resumed.restore(stopped.state())
    assert _flat(resumed.add(_record(3.0))) == pytest.approx(_flat(straight.add(_record(3.0))))


@pytest.mark.parametrize("value", [1.0, -0.1, "x"])
def test_the_run_config_check_names_the_key(value):
    with pytest.raises(ValueError, match="weight-average"):
        RunSettings.from_run_config(default_run_config(**{"weight-average": value}))


def test_sites_evaluate_the_average_training_goes_on_from_the_aggregate_and_the_run_publishes_it(tmp_path):
    nodes = {10 + i: {"site-config": str(site_config(tmp_path / "sites", c, accountant="rdp", evaluation="exact",
                                                     epsilon_budget=20.0))} for i, c in enumerate(CENTRES)}
    cfg = default_run_config(**{"num-server-rounds": 3, "local-steps": 10, "out-dir": str(tmp_path / "run"),
                                "round-timeout": 5, "noise-multiplier": 1.0, "target-epsilon": 0.0,
                                "weight-average": 0.5})
    grid = InProcessGrid(client_app, nodes, cfg)
    server_app(grid, Context(run_id=3, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))

    def sent(kind: str) -> list[np.ndarray]:  # the model of each round's messages of this kind (one per round)
        models = {}
        for m in grid.sent:
            if m.metadata.message_type == kind:
                models.setdefault(int(m.metadata.group_id), _flat(m.content["arrays"]))
        return [models[r] for r in sorted(models)]

    trained_from, evaluated = sent("train"), sent("evaluate")
    aggregates = trained_from[1:]  # round r+1 trains from round r's plain aggregate
    assert len(evaluated) == 3 and len(aggregates) == 2
    assert np.allclose(evaluated[0], aggregates[0], atol=1e-6)  # round 1: the average of one model
    assert np.allclose(evaluated[1], (0.5 * aggregates[0] + aggregates[1]) / 1.5, atol=1e-6)
    assert not np.allclose(evaluated[1], aggregates[1], atol=1e-4)  # the sites did not evaluate the aggregate
    saved = torch.load(tmp_path / "run" / "final_model.pt", weights_only=True)["state_dict"]
    assert np.allclose(np.concatenate([v.numpy().ravel() for v in saved.values()]), evaluated[2], atol=1e-6)
