"""Logging to stderr, as text or as one JSON object per line.

Under systemd's journal (``$JOURNAL_STREAM`` set) every line starts with a
``<N>`` syslog priority prefix (sd-daemon(3)) so journalctl shows levels,
whatever the format; the journal stamps time and pid itself.

JSON lines carry ``pool`` (set once by :func:`setup`) and ``slot``,
``generation`` and ``step`` where the code knows them: given per call as
``log.info(..., extra={"slot": 3})`` or for a stretch of code with
:func:`context` (a worker running a step).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
FIELDS = ("pool", "slot", "generation", "step")
_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("noodle_log_context", default={})  # noqa: B039 - never mutated
_pool = ""
_JOURNAL_TEXT = "%(name)s: %(message)s"
_PLAIN_TEXT = "%(asctime)s %(levelname)s %(processName)s[%(process)d] %(message)s"


@contextlib.contextmanager
def context(**fields: Any) -> Iterator[None]:
    """Attach ``slot``/``generation``/``step`` to every record logged inside."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def _prefix(record: logging.LogRecord, journal: bool) -> str:
    return f"<{_PRIORITY.get(record.levelno, 6)}>" if journal else ""


class TextFormatter(logging.Formatter):
    def __init__(self, journal: bool) -> None:
        super().__init__(_JOURNAL_TEXT if journal else _PLAIN_TEXT)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        return _prefix(record, self.journal) + super().format(record)


class JsonFormatter(logging.Formatter):
    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {}
        if not self.journal:
            obj["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
                f".{int(record.msecs):03d}Z"
            )
        obj.update(level=record.levelname.lower(), logger=record.name, pid=record.process,
                   process=record.processName, message=record.getMessage())  # fmt: skip
        if _pool:
            obj["pool"] = _pool
        obj.update(_context.get())
        for key in FIELDS:
            if key in record.__dict__:
                obj[key] = record.__dict__[key]
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return _prefix(record, self.journal) + json.dumps(obj, default=str)


def setup(level: str = "INFO", fmt: str = "text", pool: str = "") -> None:
    global _pool
    _pool = pool
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(journal) if fmt == "json" else TextFormatter(journal))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
