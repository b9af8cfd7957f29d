"""Everything the coordinator's ServerApp and the sites' ClientApp take from Flower beyond its public
app API (``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp``), in one place.

carefl's strategies re-do Flower's aggregation on zero-copy views and fall back to Flower's own
helpers (``aggregate_arrayrecords``, ``trim_mean``), filter replies with FedAvg's private
``_check_and_log_replies``, raise Flower's ``AggregationError`` (not exported by ``flwr.serverapp``), and
read the strategies' constructor attributes; checkpoints (server/checkpoint.py) save and restore
FedAdam/FedYogi's moments (``m_t``, ``v_t``) and shift a resumed run's round numbers by wrapping the
strategy's round methods; the coordinator turns Flower's transport error codes into words and replaces a
rejected reply's content by an error; both audit logs count the serialised bytes of an ``Array``; the
checks and the aggregation read and write that serialised form (an ``np.save`` image) without copies.
None of that is Flower API. It is imported, probed and used here and nowhere else in the app bundle
(``tests/test_flower_seam.py`` reads every import of flwr outside the two seams), so a Flower upgrade
means reviewing this file (and deploy/site/flower_seam.py, its counterpart for the site runtime).

This file is in the app bundle (server/ and client/ import it): it imports only flwr, numpy and the
standard library. At import it checks that the installed flwr is the series it was written against
(``FlowerVersionError``) and that every internal below exists with the shape used
(``FlowerSeamError``); both are ImportErrors, so an app on another Flower fails at load, loudly,
instead of aggregating or logging wrongly later.
"""

from __future__ import annotations

import functools
import inspect
import io
import math
import re
from typing import Iterable

import flwr
import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, RecordDict
from flwr.serverapp import strategy as _strategy

FLOWER_SERIES = "1.41"     # major.minor this seam was written and tested against
FLOWER_LOCKED = "1.41.0"   # the exact version in requirements.lock.txt
SEAM_FILE = "server/flower_seam.py"


class FlowerVersionError(ImportError):
    """The installed Flower is not the series this seam was written against."""


class FlowerSeamError(ImportError):
    """A Flower internal this seam uses is missing or has changed shape."""


def check_flower_version(installed: str, user: str = "carefl's apps use", seam_file: str = SEAM_FILE) -> None:
    """Raise ``FlowerVersionError`` unless ``installed`` is of the ``FLOWER_SERIES`` series (both seams' check)."""
    if ".".join(installed.split(".")[:2]) != FLOWER_SERIES:
        raise FlowerVersionError(
            f"{user} Flower internals written against flwr {FLOWER_SERIES} (tested with "
            f"flwr=={FLOWER_LOCKED}, requirements.lock.txt), but flwr {installed} is installed. Review "
            f"{seam_file} against flwr {installed} (every internal it uses is listed there), then update "
            f"FLOWER_SERIES in server/flower_seam.py; until then install flwr=={FLOWER_LOCKED}.")


def seam_error(problems: list[str], seam_file: str = SEAM_FILE, consequence: str = "") -> FlowerSeamError:
    """Both seams' error for Flower internals that are missing or changed (``consequence``: what then stops)."""
    return FlowerSeamError(f"flwr {flwr.__version__}: " + "; ".join(problems) + f". Review {seam_file}"
                           + (f"; {consequence}" if consequence else ""))


check_flower_version(flwr.__version__)

try:
    from flwr.common.constant import ErrorCode
    from flwr.serverapp.exception import AggregationError
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
except ImportError as _exc:
    raise seam_error([f"cannot import {_exc.name or _exc}"]) from _exc

__all__ = [
    "FLOWER_SERIES", "FLOWER_LOCKED", "FlowerVersionError", "FlowerSeamError", "check_flower_version",
    "aggregate_arrayrecords", "trim_mean", "check_and_log_replies", "AggregationError", "NODE_UNAVAILABLE",
    "REPLY_MESSAGE_UNAVAILABLE", "replace_content_with_error", "array_bytes", "serialized_size",
    "OPTIMISER_STATE", "ROUND_METHODS", "strategy_state", "restore_strategy_state", "number_rounds_from",
]

# Flower's error codes for replies the SuperLink sends on a lost node's behalf.
NODE_UNAVAILABLE: int = getattr(ErrorCode, "NODE_UNAVAILABLE", None)
REPLY_MESSAGE_UNAVAILABLE: int = getattr(ErrorCode, "REPLY_MESSAGE_UNAVAILABLE", None)


def check_and_log_replies(strategy, replies: Iterable[Message], is_train: bool = True
                          ) -> tuple[list[Message], list[Message]]:
    """FedAvg's filter of a round's replies (Flower's own logging of error replies): (valid, errors)."""
    return strategy._check_and_log_replies(replies, is_train=is_train)


def replace_content_with_error(reply: Message, error: Error) -> Message:
    """The reply, its content dropped and ``error`` set instead (Flower allows content or error, not both,
    and offers no way to drop content)."""
    reply.__dict__["_content"] = None
    reply.error = error
    return reply


def array_bytes(array: Array) -> bytes:
    """An ``Array``'s serialised bytes as Flower sends and hashes them (an ``np.save`` image for numpy)."""
    return array.data


def serialized_size(arrays: ArrayRecord) -> int:
    """Bytes of an ArrayRecord's arrays as sent."""
    return sum(len(array_bytes(a)) for a in arrays.values())


# -- a strategy's state and round numbers across a resume (server/checkpoint.py) ----------------------
OPTIMISER_STATE = ("m_t", "v_t")  # FedOpt's moments (FedAdam, FedYogi); None before their first round
ROUND_METHODS = ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate")
_OPTIMISERS = (_strategy.FedAdam, _strategy.FedYogi)  # the server optimisers carefl offers
_STRATEGIES = (_strategy.FedAvg, _strategy.FedProx, _strategy.FedAdam, _strategy.FedYogi, _strategy.FedMedian,
               _strategy.FedTrimmedAvg, _strategy.Krum, _strategy.MultiKrum)  # what server/strategies.py builds on


def strategy_state(strategy) -> dict[str, dict[str, np.ndarray]]:
    """The server optimiser's state Flower keeps on the strategy (FedAdam/FedYogi's moments, name → layer →
    array); empty for a strategy without one, or before its first aggregation."""
    return {name: {k: np.asarray(v) for k, v in getattr(strategy, name).items()}
            for name in OPTIMISER_STATE if getattr(strategy, name, None)}


def restore_strategy_state(strategy, state: dict[str, dict[str, np.ndarray]]) -> None:
    """Put ``strategy_state``'s result back on a fresh strategy (its next aggregation goes on from it)."""
    for name, value in state.items():
        setattr(strategy, name, {k: np.array(v) for k, v in value.items()})


def number_rounds_from(strategy, done: int) -> None:
    """Make the strategy see round ``done + r`` where Flower's ``Strategy.start`` (which counts from 1) passes
    ``r``: its round methods, called positionally with the round first, are wrapped on the instance."""
    for name in ROUND_METHODS:
        method = getattr(strategy, name)
        setattr(strategy, name, lambda server_round, *args, _m=method: _m(server_round + done, *args))


# -- probes: fail loudly at import, not later ---------------------------------------------------------
def _problems() -> list[str]:
    problems = []
    if NODE_UNAVAILABLE is None or REPLY_MESSAGE_UNAVAILABLE is None:
        problems.append("ErrorCode.NODE_UNAVAILABLE / REPLY_MESSAGE_UNAVAILABLE are missing")
    check = getattr(_strategy.FedAvg, "_check_and_log_replies", None)
    if not callable(check) or list(inspect.signature(check).parameters)[:3] != ["self", "replies", "is_train"]:
        problems.append("FedAvg._check_and_log_replies(replies, is_train) is missing or changed")
    for strategy, attributes in ((_strategy.FedAvg(), ("weighted_by_key", "train_metrics_aggr_fn")),
                                 (_strategy.FedTrimmedAvg(), ("beta",)),
                                 (_strategy.MultiKrum(), ("num_malicious_nodes", "num_nodes_to_select"))):
        missing = [a for a in attributes if not hasattr(strategy, a)]
        if missing:
            problems.append(f"{type(strategy).__name__} no longer has {', '.join(missing)}")
    # server/strategies.py puts its FedAvg under Flower's subclasses: their aggregate_train must reach it
    for cls in (_strategy.FedProx, _strategy.FedAdam, _strategy.FedYogi, _strategy.Krum):
        own = vars(cls).get("aggregate_train")
        if not issubclass(cls, _strategy.FedAvg) or (own is not None and "super().aggregate_train(" not in
                                                      inspect.getsource(own)):
            problems.append(f"{cls.__name__}.aggregate_train no longer builds on FedAvg's")
    probe = Message.__new__(Message)  # a message as Flower stores one: content, no error
    probe.__dict__.update(_metadata=None, _content=RecordDict(), _error=None)
    try:
        replace_content_with_error(probe, Error(0, "probe"))
        if probe.has_content() or not probe.has_error():
            raise ValueError("content still set")
    except (ValueError, KeyError, AttributeError) as exc:
        problems.append(f"a Message's content can no longer be replaced by an error ({exc})")
    values = np.arange(3, dtype=np.float32)
    try:
        image = array_bytes(Array(values))
        if not isinstance(image, bytes) or not np.array_equal(np.load(io.BytesIO(image)), values):
            raise ValueError("not an np.save image")
    except (AttributeError, ValueError) as exc:
        problems.append(f"Array.data is no longer the array's np.save image ({exc})")
    if not (isinstance(AggregationError, type) and issubclass(AggregationError, Exception)):
        problems.append("flwr.serverapp.exception.AggregationError is no longer an exception class")
    return problems + _checkpoint_problems()


def _checkpoint_problems() -> list[str]:
    """What server/checkpoint.py relies on through strategy_state and number_rounds_from."""
    problems = []
    for cls in _OPTIMISERS:  # the moments are plain attributes of the instance, read and replaced by aggregation
        source = "".join(inspect.getsource(c) for c in cls.__mro__ if c.__module__.startswith("flwr."))
        missing = [n for n in OPTIMISER_STATE if not hasattr(cls(), n) or f"self.{n} = " not in source]
        if missing:
            problems.append(f"{cls.__name__} no longer keeps its moments in {', '.join(missing)}")
    start = inspect.getsource(_strategy.Strategy.start)
    for name in ROUND_METHODS:  # Strategy.start calls them on the instance, the round first and positional
        if not re.search(rf"self\.{name}\(\s*current_round\s*,", start):
            problems.append(f"Strategy.start no longer calls self.{name}(current_round, ...)")
        changed = [cls.__name__ for cls in _STRATEGIES
                   if _params(getattr(cls, name, None))[1:2] != ["server_round"]]
        if changed:
            problems.append(f"{name} no longer takes server_round first on {', '.join(changed)}")
    return problems


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters) if callable(fn) else []


_found = _problems()
if _found:
    raise seam_error(_found)


# -- Flower's raw array format: an Array of a numpy array holds its np.save image ----------------------

def as_ndarray(array: Array) -> np.ndarray:
    """The array's values as a read-only view of its bytes (no copy; ``Array.numpy()`` copies twice).

    Flower's arrays are ``np.save`` images; a header we do not handle (another serialisation, object
    dtype) is left to ``Array.numpy()``, which reads — or refuses — it exactly as Flower does.
    """
    data = array.data
    if array.stype == "numpy.ndarray" and data[:6] == _MAGIC and data[6] in (1, 2):
        size = 2 if data[6] == 1 else 4
        end = 8 + size + int.from_bytes(data[8:8 + size], "little")
        layout = _header(bytes(data[:end]))
        if layout is not None:
            shape, fortran_order, dtype = layout
            try:
                flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=end)
                return flat.reshape(shape, order="F" if fortran_order else "C")
            except ValueError:
                pass  # truncated: let Flower's reader raise its own error
    return array.numpy()


_MAGIC = b"\x93NUMPY"


@functools.lru_cache(maxsize=1024)
def _header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, Fortran order, dtype) of an ``np.save`` header; the arrays of a round share a few."""
    stream = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(stream)
    except ValueError:
        return None
    return None if dtype.hasobject else (tuple(shape), bool(fortran_order), dtype)


def to_array(values: np.ndarray) -> Array:
    """``Array(values)`` — the same bytes as Flower's ``np.save`` image — with one copy instead of three."""
    if not values.flags.c_contiguous or values.dtype.hasobject:
        return Array(values)
    header = io.BytesIO()
    layout = np.lib.format.header_data_from_array_1_0(values)
    try:
        np.lib.format.write_array_header_1_0(header, layout)
    except ValueError:  # header too long for format 1.0: np.save moves to 2.0
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, layout)
    try:
        body = memoryview(values).cast("B")
    except (TypeError, ValueError):  # a dtype the buffer protocol does not carry (datetime, ...)
        return Array(values)
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype="numpy.ndarray",
                 data=b"".join([header.getvalue(), body]))
