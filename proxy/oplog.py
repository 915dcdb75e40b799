"""The operational log (structlog), separate from the audit log.

Modules get their logger with :func:`get_logger`, which defers importing structlog
(and, through it, asyncio) until the first message: one-shot CLI commands such as
``mailward explain`` then start as quickly as ``mailward --help``. ``proxy.server``
configures the processors (JSON or console, secrets redacted).
"""

from __future__ import annotations

from typing import Any


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
