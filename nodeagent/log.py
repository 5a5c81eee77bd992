"""Structured logging: JSON lines in production, a readable console format on request.

Every component takes a named logger (`get_logger("proxy.outbound")`) and emits one event per
connection or request, named `<op>.started|complete|failed` where that helps.

The process has one writer of its log stream, `STDERR`: structlog's events and the access log's
batches (written from a worker thread) both go through it, each as whole lines in one write
under one lock, so concurrent writers never split or merge lines.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Literal

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class LineWriter:
    """Whole lines to sys.stderr, one writer at a time.

    `write(text)` takes complete lines (each ending in a newline) and writes them with one call
    and a flush under a lock shared by every thread. sys.stderr is looked up at each write, so a
    replaced stderr (tests, daemons) is honoured.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def write(self, text: str, /) -> int:
        with self._lock:
            written = sys.stderr.write(text)
            sys.stderr.flush()
        return written

    def flush(self) -> None:
        """Nothing left to do: `write` flushes before it lets the next writer in."""


STDERR = LineWriter()


def configure(level: str = "info", fmt: Literal["json", "console"] = "json") -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # WriteLogger writes message + newline in one call (PrintLogger's print() makes two,
        # which another thread's write could land between).
        logger_factory=structlog.WriteLoggerFactory(STDERR),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def set_level(level: str) -> None:
    """Change the level at run time (the admin socket's /logging)."""
    if level not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}; one of {', '.join(_LEVELS)}")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]))


def get_logger(component: str) -> Any:
    return structlog.get_logger(component=component)
