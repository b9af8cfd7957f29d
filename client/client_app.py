"""The site's ClientApp: ``query``, ``train`` and ``evaluate`` handlers.

Every handler replies with a Flower error (never a traceback, never a data value) when the
site cannot do the work, so the coordinator sees a reason and no weights leave the site.
"""

from __future__ import annotations

import functools
import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import training
from client.errors import SiteError
from client.site import site_from_configs
from shared_models.registry import build_model, model_names

log = logging.getLogger("carefl.site")

app = ClientApp()

# Error codes in replies (Flower reserves small numbers for its own).
CODE_SITE_ERROR = 4001     # data or configuration at the site
CODE_BAD_REQUEST = 4002    # the coordinator asked for something invalid
CODE_INTERNAL = 4003       # unexpected failure; details stay in the site's own log


def replies_with_errors(handler):
    """Turn failures into error replies whose reason is safe to send to the coordinator."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except SiteError as exc:
            return Message(Error(CODE_SITE_ERROR, f"site error: {exc}"), reply_to=msg)
        except (ValueError, KeyError, TypeError) as exc:
            return Message(Error(CODE_BAD_REQUEST, f"refused: {exc}"), reply_to=msg)
        except Exception:  # noqa: BLE001 - the details may carry data; keep them local
            log.exception("unexpected failure handling %s", msg.metadata.message_type)
            return Message(Error(CODE_INTERNAL, "internal error at the site; see the site's log"), reply_to=msg)

    return wrapped


def _model_from(msg: Message, n_features: int):
    config = msg.content["config"]
    model = build_model(str(config["model"]), n_features=n_features)
    try:
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    except RuntimeError:
        raise ValueError(f"the arrays sent do not fit model '{config['model']}' with {n_features} features") from None
    return model


@app.query()
@replies_with_errors
def query(msg: Message, context: Context) -> Message:
    """Identity and capabilities: site id, task, models; counts only, no data statistics."""
    site = site_from_configs(context.node_config, context.run_config)
    data = site.load_data()
    info = ConfigRecord({"site-id": site.site_id, "task": "ehr", "dataset": "heart-disease",
                         "models": model_names("ehr")})
    counts = MetricRecord({"n-train": len(data.y_train), "n-test": len(data.y_test),
                           "n-features": data.n_features})
    return Message(RecordDict({"site": info, "counts": counts}), reply_to=msg)


@app.train()
@replies_with_errors
def train(msg: Message, context: Context) -> Message:
    site = site_from_configs(context.node_config, context.run_config)
    data = site.load_data()
    config = msg.content["config"]
    settings = training.TrainSettings.from_config(config)
    model = _model_from(msg, data.n_features)
    metrics = training.train(model, data.x_train, data.y_train, settings, training.pick_device(site.device))
    reply = RecordDict({
        "arrays": ArrayRecord(model.cpu().state_dict()),
        "metrics": MetricRecord({"num-examples": len(data.y_train), **metrics}),
    })
    return Message(reply, reply_to=msg)


@app.evaluate()
@replies_with_errors
def evaluate(msg: Message, context: Context) -> Message:
    site = site_from_configs(context.node_config, context.run_config)
    data = site.load_data()
    model = _model_from(msg, data.n_features)
    report = training.evaluate(model, data.x_test, data.y_test, training.pick_device(site.device))
    metrics = MetricRecord({"num-examples": len(data.y_test), **report})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
