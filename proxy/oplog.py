"""The operational log (structlog), separate from the audit log.

Modules get their logger with :func:`get_logger`, which defers importing structlog
(and, through it, asyncio) until the first message: one-shot CLI commands such as
``mailward explain`` then start as quickly as ``mailward --help``.
:func:`configure_logging` (called by ``mailward serve``) sets the processors: JSON or
console, secrets redacted.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

# Keys whose values never reach the operational log, whoever logs them.
_SECRET_KEYS = frozenset({"password", "passwd", "pass", "secret", "token", "authorization"})


class _LazyLogger:
    __slots__ = ("_logger", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def __getattr__(self, method: str) -> Any:
        if self._logger is None:
            import structlog

            self._logger = structlog.get_logger(self._name)
        return getattr(self._logger, method)


def get_logger(name: str) -> Any:
    """A structlog logger for ``name``, created on first use."""
    return _LazyLogger(name)


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event.keys() & _SECRET_KEYS:
        event[key] = "[redacted]"
    return event


def configure_logging(fmt: str | None = None, level: int = logging.INFO) -> None:
    """Structlog to stderr: JSON lines (default when stderr is not a terminal) or
    console. ``MAILWARD_LOG_FORMAT=json|console`` overrides."""
    fmt = fmt or os.environ.get("MAILWARD_LOG_FORMAT") or (
        "console" if sys.stderr.isatty() else "json"
    )
    import structlog

    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries (aiohttp, asyncio) log through stdlib logging: warnings and up only.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s: %(message)s")
