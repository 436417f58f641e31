"""Structured logging: JSON lines for machines (journald, log shippers), text for a person at a terminal.

Every record carries ``ts``, ``level``, ``logger`` and ``msg`` plus whatever the caller put in
``extra``: ``logger.info("task completed", extra={"task_id": ..., "phase": ..., "bytes": ...,
"duration": ...})``, ``extra={"request_id": ..., "action": ..., "code": ...}`` on API lines. The JSON
form keeps each record on one line (a traceback goes into ``exc``), so a grep or ``jq`` over the
journal finds one task's lines by its id.

:func:`setup_logging` is idempotent and is called again on SIGHUP to apply a new level or format.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

from .config import LogConfig

#: The attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime",
                                                                                 "taskName"}
_HANDLER_NAME = "vmied"


def extras(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD and not key.startswith("_")}


def timestamp(record: logging.LogRecord) -> str:
    moment = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"ts": timestamp(record), "level": record.levelname.lower(),
                                "logger": record.name, "msg": record.getMessage()}
        for key, value in extras(record).items():
            line.setdefault(key, value)  # an extra never hides a standard field
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{key}={value}" for key, value in extras(record).items())
        text = f"{timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if fields:
            text += f" [{fields}]"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def use_json(log_format: str, stream: TextIO) -> bool:
    if log_format != "auto":
        return log_format == "json"
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


def setup_logging(config: LogConfig, stream: TextIO | None = None) -> None:
    """Route every logger to ``stream`` (stderr) in the configured format and level; safe to repeat."""
    stream = stream or sys.stderr
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler(stream)
        handler.set_name(_HANDLER_NAME)
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter() if use_json(config.format, stream) else TextFormatter())
    root.setLevel(config.level.upper())
    # The S3 SDK logs every request body at DEBUG; keep it out unless asked for by name.
    for noisy in ("botocore", "aiobotocore", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
