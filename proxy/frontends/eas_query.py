"""Sans-IO decoder of the Exchange ActiveSync request query (MS-ASHTTP 2.2.1.1.1).

No networking here: :func:`parse_query` takes the raw query string of a
``/Microsoft-Server-ActiveSync`` request and returns an :class:`EasQuery`, or raises
:class:`QueryError` (the peer sent something bad; answer HTTP 400). No other exception
escapes, whatever the input: a hypothesis test states that invariant.

Two forms exist and both are accepted:

* plain text (all protocol versions): ``Cmd=Sync&User=u&DeviceId=d&DeviceType=t``
  plus command parameters (``CollectionId``, ``ItemId``, ``SaveInSent``, ...). The
  protocol version and policy key then travel in the ``MS-ASProtocolVersion`` and
  ``X-MS-PolicyKey`` headers, which the front end reads.
* base64 (12.1 and later): one base64 value encoding a byte sequence::

    protocol version (1)  command code (1)  locale (2, little-endian)
    device id length (1, > 0)   device id
    policy key length (1, 0 or 4)   policy key (uint32, little-endian)
    device type length (1)   device type
    command parameters: { tag (1)  length (1)  value } ...

  The device id is "a string or a GUID": an id made only of the characters allowed in
  a mailward device id is taken as text; any other byte string (a binary GUID) becomes
  upper-case hex, the form Z-Push and others log, so it can be attested.

Identity parameters (``User``, ``DeviceId``, ...) given twice are refused rather than
guessed at: the upstream might read the other copy than we did.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import unquote

from proxy.ids import DEVICE_ID_RE

#: Longest query accepted, in characters (a full base64 query is well under 1 KiB).
MAX_QUERY_CHARS: Final = 4 * 1024
_DEVICE_TYPE_RE: Final = re.compile(r"[\x21-\x7e]{0,128}")
_B64_RE: Final = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_MAX_PARAM_CHARS: Final = 1024

#: MS-ASHTTP 2.2.1.1.1.1.2: command codes of the base64 form.
COMMAND_CODES: Final[dict[int, str]] = {
    0: "Sync",
    1: "SendMail",
    2: "SmartForward",
    3: "SmartReply",
    4: "GetAttachment",
    9: "FolderSync",
    10: "FolderCreate",
    11: "FolderDelete",
    12: "FolderUpdate",
    13: "MoveItems",
    14: "GetItemEstimate",
    15: "MeetingResponse",
    16: "Search",
    17: "Settings",
    18: "Ping",
    19: "ItemOperations",
    20: "Provision",
    21: "ResolveRecipients",
    22: "ValidateCert",
    23: "Find",
}
COMMANDS: Final = frozenset(COMMAND_CODES.values())

#: MS-ASHTTP 2.2.1.1.1.1.3: command parameter tags of the base64 form.
PARAM_TAGS: Final[dict[int, str]] = {
    0: "AttachmentName",
    1: "CollectionId",
    3: "ItemId",
    4: "LongId",
    6: "Occurrence",
    7: "Options",
    8: "User",
}
#: Protocol version byte -> version string; MS-ASHTTP allows only these in base64 form.
PROTOCOL_VERSIONS: Final[dict[int, str]] = {
    121: "12.1",
    140: "14.0",
    141: "14.1",
    160: "16.0",
    161: "16.1",
}
# Plain-form keys that identify the request (compared case-insensitively).
_IDENTITY_KEYS: Final = {"cmd": "Cmd", "user": "User", "deviceid": "DeviceId",
                         "devicetype": "DeviceType"}


class QueryError(ValueError):
    """The client sent a query we cannot use. Answer HTTP ``status`` (400)."""

    status = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class EasQuery:
    """What the query says about one request. ``user`` is the query's claim only;
    the front end checks it against HTTP Basic auth."""

    form: Literal["plain", "base64"]
    command: str
    device_id: str
    device_type: str = ""
    user: str | None = None
    protocol_version: str | None = None  # base64 form only (plain: header)
    policy_key: int | None = None  # base64 form only (plain: header)
    locale: int | None = None
    params: dict[str, str] = field(default_factory=dict)


def parse_query(query: str) -> EasQuery:
    """Decode a raw (still percent-encoded) query string. Raises QueryError only."""
    if not isinstance(query, str):
        raise QueryError("the query is not text")
    if len(query) > MAX_QUERY_CHARS:
        raise QueryError(f"the query is longer than {MAX_QUERY_CHARS} characters")
    if not query:
        raise QueryError("the request has no query (Cmd, User, DeviceId, DeviceType)")
    # The base64 form is one value with at most trailing '=' padding; a plain query
    # always has name=value pairs (at least Cmd and DeviceId).
    if "&" not in query and _B64_RE.fullmatch(unquote(query, errors="replace")):
        return _parse_base64(query)
    return _parse_plain(query)


# ------------------------------------------------------------------ plain text


def _parse_plain(query: str) -> EasQuery:
    values: dict[str, str] = {}
    params: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        key, sep, raw = part.partition("=")
        if not sep:
            raise QueryError(f"query parameter {_show(key)} has no value")
        name, value = _unquote(key), _unquote(raw)
        canonical = _IDENTITY_KEYS.get(name.lower())
        if canonical is not None:
            if canonical in values:
                raise QueryError(f"query parameter {canonical} is given twice")
            values[canonical] = value
        else:
            if not name or len(name) > 64 or not name.isascii() or not name.isalnum():
                raise QueryError(f"query parameter name {_show(name)} is not valid")
            if name in params:
                raise QueryError(f"query parameter {_show(name)} is given twice")
            if len(value) > _MAX_PARAM_CHARS:
                raise QueryError(f"query parameter {_show(name)} is too long")
            params[name] = value
    command = values.get("Cmd")
    if command is None:
        raise QueryError("the query has no Cmd")
    if command not in COMMANDS:
        raise QueryError(f"unknown command {_show(command)}")
    device_id = values.get("DeviceId")
    if not device_id:
        raise QueryError("the query has no DeviceId")
    _check_device_id(device_id)
    device_type = values.get("DeviceType", "")
    _check_device_type(device_type)
    user = values.get("User")
    if user is not None:
        _check_user(user)
    return EasQuery("plain", command, device_id, device_type, user or None, params=params)


def _unquote(text: str) -> str:
    # '+' stays '+': EAS clients percent-encode spaces, and '+' is literal in base64.
    try:
        return unquote(text, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise QueryError("the query is not UTF-8 after percent-decoding") from None


# --------------------------------------------------------------------- base64


def _parse_base64(query: str) -> EasQuery:
    text = _unquote(query).rstrip("=")  # some clients omit the padding; re-pad below
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise QueryError("the base64 query does not decode") from None
    return decode_binary(data)


class _Reader:
    """Cursor over the decoded bytes; every read is bounds-checked."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self, what: str) -> int:
        if self.pos >= len(self.data):
            raise QueryError(f"the base64 query ends before the {what}")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise QueryError(f"the base64 query ends inside the {what}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)


def decode_binary(data: bytes) -> EasQuery:
    """Decode the byte sequence of the base64 form (already base64-decoded)."""
    r = _Reader(data)
    version_byte = r.byte("protocol version")
    version = PROTOCOL_VERSIONS.get(version_byte)
    if version is None:
        raise QueryError(f"protocol version {version_byte} is not one of 121, 140, 141, "
                         "160, 161")
    code = r.byte("command code")
    command = COMMAND_CODES.get(code)
    if command is None:
        raise QueryError(f"unknown command code {code}")
    locale = int.from_bytes(r.take(2, "locale"), "little")
    id_len = r.byte("device id length")
    if id_len == 0:
        raise QueryError("the device id is empty")
    device_id = _binary_device_id(r.take(id_len, "device id"))
    key_len = r.byte("policy key length")
    if key_len not in (0, 4):
        raise QueryError(f"the policy key length is {key_len}, not 0 or 4")
    policy_key = int.from_bytes(r.take(4, "policy key"), "little") if key_len else None
    type_len = r.byte("device type length")
    device_type = _ascii(r.take(type_len, "device type"), "device type")
    _check_device_type(device_type)
    params: dict[str, str] = {}
    user: str | None = None
    while not r.done:
        tag = r.byte("parameter tag")
        name = PARAM_TAGS.get(tag)
        if name is None:
            raise QueryError(f"unknown command parameter tag {tag}")
        length = r.byte("parameter length")
        value = r.take(length, f"{name} parameter")
        if name in params or (name == "User" and user is not None):
            raise QueryError(f"command parameter {name} is given twice")
        if name == "Options":
            if length != 1:
                raise QueryError("the Options parameter is not one byte")
            params[name] = str(value[0])
            continue
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise QueryError(f"the {name} parameter is not UTF-8") from None
        if name == "User":
            _check_user(text)
            user = text or None
        else:
            params[name] = text
    return EasQuery("base64", command, device_id, device_type, user, version, policy_key,
                    locale, params)


def _binary_device_id(raw: bytes) -> str:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if text and DEVICE_ID_RE.fullmatch(text):
        return text
    hexed = raw.hex().upper()  # a binary GUID
    _check_device_id(hexed)
    return hexed


def _ascii(raw: bytes, what: str) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise QueryError(f"the {what} is not ASCII") from None


# ----------------------------------------------------------------- validation


def _check_device_id(device_id: str) -> None:
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise QueryError("the DeviceId is not 1-128 characters of A-Z a-z 0-9 . _ : -")


def _check_device_type(device_type: str) -> None:
    if not _DEVICE_TYPE_RE.fullmatch(device_type):
        raise QueryError("the DeviceType is not up to 128 printable ASCII characters")


def _check_user(user: str) -> None:
    if len(user) > 320 or any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in user):
        raise QueryError("the User is not a valid user name")


def _show(text: str) -> str:
    """A short, safe rendering of client input for error messages."""
    return repr(text[:40])


# ------------------------------------------------------------------- encoding


def encode_binary(
    *,
    command: str,
    device_id: str | bytes,
    device_type: str,
    protocol_version: str = "14.1",
    locale: int = 0x0409,
    policy_key: int | None = None,
    user: str | None = None,
    params: dict[str, str] | None = None,
) -> str:
    """The base64 query for these values (the client side; tests and benchmarks).

    Raises ValueError for values the form cannot carry."""
    versions = {v: k for k, v in PROTOCOL_VERSIONS.items()}
    codes = {v: k for k, v in COMMAND_CODES.items()}
    tags = {v: k for k, v in PARAM_TAGS.items()}
    dev = device_id.encode("ascii") if isinstance(device_id, str) else device_id
    kind = device_type.encode("ascii")
    if not 0 < len(dev) < 256 or len(kind) > 255:
        raise ValueError("device id or type too long")
    out = bytearray([versions[protocol_version], codes[command]])
    out += locale.to_bytes(2, "little")
    out += bytes([len(dev)]) + dev
    out += b"\x04" + policy_key.to_bytes(4, "little") if policy_key is not None else b"\x00"
    out += bytes([len(kind)]) + kind
    items = list((params or {}).items()) + ([("User", user)] if user is not None else [])
    for name, value in items:
        raw = bytes([int(value)]) if name == "Options" else value.encode("utf-8")
        if len(raw) > 255:
            raise ValueError(f"parameter {name} too long")
        out += bytes([tags[name], len(raw)]) + raw
    return base64.b64encode(bytes(out)).decode("ascii")
