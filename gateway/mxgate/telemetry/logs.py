"""Structured logs: one JSON object per line, with the queue ID of the message being handled.

The queue ID travels in a context variable, set by ingress once a message is queued and by the
delivery engine around each job, so every line about a message carries ``qid`` without threading it
through every call. Fields passed with ``extra={...}`` are added to the object.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

queue_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("mxgate_queue_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
# kopf's object loggers attach its whole settings object and an Event-posting flag to every record: noise
# in a log line. Its object reference becomes "object": "<namespace>/<name>".
_DROPPED = {"settings", "k8s_skip", "k8s_ref"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        qid = queue_id_var.get()
        if qid is not None:
            entry["qid"] = qid
        ref = record.__dict__.get("k8s_ref")
        if isinstance(ref, dict):
            entry["object"] = "/".join(filter(None, (ref.get("namespace"), ref.get("name"))))
        extra = record.__dict__.keys() - _STANDARD - _DROPPED
        for key in extra:
            if not key.startswith("_"):
                value = record.__dict__[key]
                entry[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(*, level: str = "info", json_format: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command line at INFO: far too chatty for a relay, and it would log AUTH data.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
