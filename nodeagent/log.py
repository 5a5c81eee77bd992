"""Structured logging: JSON lines in production, a readable console format on request.

Every component takes a named logger (`get_logger("proxy.outbound")`) and emits one event per
connection or request, named `<op>.started|complete|failed` where that helps.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _Stderr:
    """Looks sys.stderr up at every write, so a replaced stderr (tests, daemons) is honoured."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


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
        logger_factory=structlog.PrintLoggerFactory(_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def set_level(level: str) -> None:
    """Change the level at run time (the admin socket's /logging)."""
    if level not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}; one of {', '.join(_LEVELS)}")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]))


def get_logger(component: str) -> Any:
    return structlog.get_logger(component=component)
