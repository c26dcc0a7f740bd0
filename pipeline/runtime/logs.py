"""One log format for every role: time, level, [role], [request id], logger, message; JSON
lines with LIPSYNC_LOG_JSON=1. The request id is a context variable, so every line of the
task or thread that handles a request carries it."""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator

from pipeline.config import env_flag

LOG_FORMAT = "%(asctime)s %(levelname)s [%(role)s] [%(request)s] %(name)s: %(message)s"

# The request (or stream client) a line is about; set where a request is handled, read by
# every log line of that task or thread ("-" when none).
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


@contextlib.contextmanager
def logging_request(request: int) -> Iterator[None]:
    """Log lines inside the block carry this request's id (a worker's or compositor's
    thread handles one request after another, so the id is put back after it)."""
    token = request_id.set(f"{request:x}")
    try:
        yield
    finally:
        request_id.reset(token)


class _RoleFilter(logging.Filter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        record.request = request_id.get()
        return True


class JsonLines(logging.Formatter):
    """One JSON object per line, for log shippers (LIPSYNC_LOG_JSON=1)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname,
                 "role": getattr(record, "role", ""), "request": getattr(record, "request", "-"),
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(role: str, level: int = logging.INFO) -> None:
    """One log setup for every role: time, level, [role], [request id], logger, message;
    JSON lines instead when LIPSYNC_LOG_JSON=1."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RoleFilter(role))
    json_lines = env_flag("LIPSYNC_LOG_JSON")
    handler.setFormatter(JsonLines() if json_lines else logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
