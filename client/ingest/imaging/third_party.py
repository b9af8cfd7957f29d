"""pydicom's and highdicom's warnings and log records, turned into carefl log records without the values they
quote: their messages can carry header values (a patient's name in an "invalid value" warning), which must
never reach stderr or a log. Every DICOM read in client/ingest/imaging runs inside ``third_party_messages``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.valuerep import VR

log = logging.getLogger("carefl.imaging")

THIRD_PARTY_LOGGERS = ("pydicom", "highdicom")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|<[^>]*>|`[^`]*`")  # quoted values (and pydicom's <URL> hints)
_TAG = re.compile(r"\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)")
_WORD = re.compile(r"\b[A-Z][A-Za-z0-9]{2,63}\b")
_VR_NAMED = re.compile(r"\bVR\s*:?\s*([A-Z]{2})\b")
_VRS = frozenset(str(vr.value) for vr in VR)
# (phrase in the lower-cased message, what carefl says): a fixed vocabulary, no text of the message is copied
_GISTS = (
    ("exceeds the maximum length", "a value longer than its VR allows"),
    ("invalid value", "an invalid value"),
    ("not valid", "an invalid value"),
    ("could not convert", "a value that is not a number"),
    ("character set", "the character set"),
    ("encoding", "the text encoding"),
    ("implicit vr", "the VR encoding (implicit / explicit)"),
    ("explicit vr", "the VR encoding (implicit / explicit)"),
    ("vr", "a value representation (VR)"),
    ("decod", "decoding the pixel data"),
    ("pixel", "the pixel data"),
    ("deprecat", "a deprecated feature"),
)


def value_free(message: object) -> str:
    """What a third-party message is about, without any value it quotes: a fixed description of the
    problem plus the DICOM keywords, tags and VRs it names. Quoted text is dropped before any of this
    is looked for, and nothing else of the message is kept."""
    text = _QUOTED.sub(" ", str(message))
    lowered = text.lower()
    gist = next((said for phrase, said in _GISTS if phrase in lowered), "a problem it did not classify")
    named = []
    for group, element in _TAG.findall(text):
        tag = int(group + element, 16)
        named.append(keyword_for_tag(tag) or f"({group.upper()},{element.upper()})")
    named += [word for word in _WORD.findall(text) if tag_for_keyword(word) is not None]
    named += [f"VR {vr}" for vr in _VR_NAMED.findall(text) if vr in _VRS]
    named = list(dict.fromkeys(named))
    return gist + (f" ({', '.join(named)})" if named else "")


class _Heard(logging.Handler):
    """Collects what the third-party loggers say (WARNING and above) while a read is in progress."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_active: list[_Heard] = []  # the collector of the outermost third_party_messages block, if one is open


@contextlib.contextmanager
def third_party_messages(case: str | None = None, path: Path | None = None) -> Iterator[_Heard]:
    """Run a DICOM read with pydicom's / highdicom's warnings and log records captured: none of
    them reaches stderr or the application's log handlers as written (they quote header values).
    When the outermost block closes, each distinct message becomes one WARNING of the
    ``carefl.imaging`` logger saying which library warned, about what kind of problem and which
    keywords / VRs (``value_free``), and how often; the case and file are attached to the record
    as ``carefl_case`` / ``carefl_file`` (for a site-local handler), never put in its message.

    Re-entrant: nested blocks share the outermost one (one summary per read). Not thread-safe
    (``warnings.catch_warnings`` is process-global); carefl reads images in one thread.
    """
    if _active:
        yield _active[-1]
        return
    heard = _Heard()
    saved = []
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate, logger.level))
        logger.handlers, logger.propagate = [heard], False
        logger.setLevel(logging.WARNING)  # pydicom's debug mode logs every element's value
    caught: list[warnings.WarningMessage] = []
    _active.append(heard)
    try:
        with warnings.catch_warnings(record=True) as caught:  # the application's filters still apply
            yield heard
    finally:
        _active.pop()
        for logger, handlers, propagate, level in saved:
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
        _report(heard.records, caught, case, path)


def _library(filename: str) -> str:
    parts = Path(filename or "").parts
    return next((name for name in THIRD_PARTY_LOGGERS if name in parts), "a library")


def _report(records: list[logging.LogRecord], caught: list[warnings.WarningMessage],
            case: str | None, path: Path | None) -> None:
    summaries: dict[tuple[str, str], tuple[set[str], int]] = {}
    heard = [(record.name.split(".")[0], f"logged {record.levelname}", record.getMessage())
             for record in records]
    heard += [(_library(w.filename), w.category.__name__, w.message) for w in caught]
    for library, kind, message in heard:
        kinds, count = summaries.get((library, value_free(message)), (set(), 0))
        summaries[(library, value_free(message))] = (kinds | {kind}, count + 1)
    extra = {"carefl_case": case, "carefl_file": str(path) if path is not None else None}
    for (library, about), (kinds, count) in summaries.items():
        log.warning("%s warned about %s while reading DICOM (%s; %d message(s); the messages themselves are "
                    "withheld: they can quote header values)", library, about, ", ".join(sorted(kinds)), count,
                    extra=extra)
