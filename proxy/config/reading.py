"""Reading TOML configuration: typed tables that name the file, key and line.

:class:`Table` gives typed access to one TOML table (strings, choices, durations,
positive integers, nested tables) and remembers which keys were read, so
:meth:`Table.done` can refuse unknown keys. Every problem is one
:class:`ConfigError` whose text is ``file:line: key: problem``; :class:`Locator`
finds the line of a key path in the TOML text (``tomllib`` does not keep lines).
The value parsers (:func:`parse_duration`, :func:`split_hostport`) are pure.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from datetime import date, datetime
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration file is invalid. ``str()`` is one line: file:line: key: problem."""

    def __init__(self, file: Path | str, key: str, message: str, line: int | None = None):
        self.file, self.key, self.line, self.message = str(file), key, line, message
        where = f"{self.file}:{line}" if line else self.file
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


class Locator:
    """Finds the line of a key path such as ``listeners[1].tls`` in TOML text."""

    _TABLE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
    _ARRAY = re.compile(r"^\s*\[\[\s*([^\[\]]+?)\s*\]\]\s*(#.*)?$")
    _KEY = re.compile(r"""^\s*("[^"]+"|'[^']+'|[A-Za-z0-9_-]+)\s*=""")

    def __init__(self, text: str) -> None:
        self.lines: dict[str, int] = {}
        table, counts = "", dict[str, int]()
        for n, line in enumerate(text.splitlines(), 1):
            if m := self._ARRAY.match(line):
                name = m.group(1)
                idx = counts.get(name, -1) + 1
                counts[name] = idx
                table = f"{name}[{idx}]"
                self.lines.setdefault(table, n)
            elif m := self._TABLE.match(line):
                table = m.group(1)
                self.lines.setdefault(table, n)
            elif m := self._KEY.match(line):
                key = m.group(1).strip("\"'")
                self.lines.setdefault(f"{table}.{key}" if table else key, n)

    def line(self, path: str) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path.rsplit(".", 1)[0] if "." in path else ""
        return None


class Table:
    """Typed access to one TOML table; remembers which keys were read."""

    def __init__(self, data: dict[str, Any], prefix: str, file: Path, loc: Locator) -> None:
        self.data, self.prefix, self.file, self.loc = data, prefix, file, loc
        self.seen: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, message: str) -> ConfigError:
        p = self.path(key)
        return ConfigError(self.file, p, message, self.loc.line(p))

    def get(self, key: str, kind: type[T] | tuple[type, ...], default: Any = ...) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is ...:
                raise self.error(key, "is required")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; never accept true for a number.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(_type_name(k) for k in kinds)
            raise self.error(key, f"must be {names}, not {_type_name(type(value))}")
        return value

    def text(self, key: str, default: Any = ...) -> str:
        value: str = self.get(key, str, default)
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> Any:
        value = self.get(key, str, default)
        if value is None and default is None:
            return None
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def strings(self, key: str, default: Any = ...) -> tuple[str, ...]:
        value = self.get(key, list, default)
        if any(not isinstance(v, str) for v in value):
            raise self.error(key, "must be a list of strings")
        return tuple(value)

    def duration(self, key: str, default: float) -> float:
        value = self.get(key, (str, int, float), default)
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def positive_duration(self, key: str, default: float) -> float:
        value = self.duration(key, default)
        if value <= 0:
            raise self.error(key, "must be longer than zero")
        return value

    def size(self, key: str, default: int) -> int:
        """A byte count: an integer, or a string such as ``"256KiB"``, ``"100MiB"``."""
        value = self.get(key, (str, int), default)
        try:
            size = parse_size(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None
        if size <= 0:
            raise self.error(key, "must be larger than zero")
        return size

    def positive_number(self, key: str, default: float) -> float:
        value: float = self.get(key, (int, float), default)
        if value <= 0:
            raise self.error(key, "must be larger than zero")
        return float(value)

    def positive_int(self, key: str, default: int) -> int:
        value: int = self.get(key, int, default)
        if value <= 0:
            raise self.error(key, "must be a positive integer")
        return value

    def table(self, key: str) -> Table:
        value = self.get(key, dict, {})
        return Table(value, self.path(key), self.file, self.loc)

    def tables(self, key: str) -> list[Table]:
        value = self.get(key, list, [])
        out = []
        for i, item in enumerate(value):
            p = f"{self.path(key)}[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(self.file, p, "must be a table", self.loc.line(p))
            out.append(Table(item, p, self.file, self.loc))
        return out

    def done(self) -> None:
        for key in self.data:
            if key not in self.seen:
                raise self.error(key, "unknown key")


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "a list", dict: "a table", datetime: "a date-time", date: "a date"}.get(
        t, t.__name__
    )


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
        return tomllib.loads(text), text
    except UnicodeDecodeError:
        raise ConfigError(path, "", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        # "at end of document" carries no line number: that is the last line.
        line = int(m.group(1)) if m else max(1, len(text.splitlines()))
        raise ConfigError(path, "", f"TOML syntax: {exc}", line) from None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: str | int | float) -> float:
    """``"90s"``, ``"5m"``, ``"24h"``, ``"7d"``, ``"250ms"`` or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"bad duration {value!r} (use e.g. 90s, 5m, 24h, 7d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
               "kb": 1000, "mb": 1000**2, "gb": 1000**3, None: 1}


def parse_size(value: str | int) -> int:
    """``"256KiB"``, ``"100MiB"``, ``"10MB"`` or a number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"bad size {value!r} (use e.g. 262144, 256KiB, 100MiB)")
    unit = m.group(2).lower() if m.group(2) else None
    return int(m.group(1)) * _SIZE_UNITS[unit]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_hostport(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not host:port")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port
