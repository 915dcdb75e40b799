"""The sans-IO ActiveSync query decoder: both MS-ASHTTP forms, tables of bad input, and
the invariant that arbitrary input either decodes or raises QueryError (HTTP 400)."""

from __future__ import annotations

import base64
import contextlib
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.frontends.eas_query import (
    COMMAND_CODES,
    PARAM_TAGS,
    PROTOCOL_VERSIONS,
    EasQuery,
    QueryError,
    decode_binary,
    encode_binary,
    parse_query,
)

# --------------------------------------------------------------- known answers


def test_spec_example_base64() -> None:
    """The example of MS-ASHTTP 2.2.1.1.1.1 decodes to its plain-text twin."""
    q = parse_query("jAAJBAp2MTQwRGV2aWNlAApTbWFydFBob25l")
    assert q == EasQuery(
        "base64", "Sync", "v140Device", "SmartPhone", None, "14.0", None, 0x0409, {}
    )


def test_spec_example_plain() -> None:
    """The plain-text example of MS-ASHTTP 2.2.1.1.1.2 gives the same identity."""
    q = parse_query("Cmd=Sync&User=rmjones&DeviceId=v140Device&DeviceType=SmartPhone")
    assert (q.form, q.command, q.user, q.device_id, q.device_type) == (
        "plain", "Sync", "rmjones", "v140Device", "SmartPhone"
    )


def test_plain_keys_case_insensitive_and_params_kept() -> None:
    """Identity keys are matched case-insensitively; command parameters are kept."""
    q = parse_query("cmd=SmartReply&user=a%40b.example&deviceid=D1&devicetype=iPhone"
                    "&ItemId=5%3A1&CollectionId=7&SaveInSent=T")
    assert q.user == "a@b.example"
    assert q.params == {"ItemId": "5:1", "CollectionId": "7", "SaveInSent": "T"}


def test_base64_round_trip_with_everything() -> None:
    """Policy key, user and parameters survive encode/decode; a binary GUID becomes hex."""
    guid = bytes(range(16))
    text = encode_binary(command="Ping", device_id=guid, device_type="iPhone",
                         protocol_version="16.1", policy_key=0xDEADBEEF,
                         user="alice@corp.example",
                         params={"Options": "2", "CollectionId": "5"})
    q = parse_query(quote(text, safe=""))  # clients may percent-encode + / =
    assert q.device_id == guid.hex().upper()
    assert (q.command, q.protocol_version, q.policy_key, q.user) == (
        "Ping", "16.1", 0xDEADBEEF, "alice@corp.example"
    )
    assert q.params == {"Options": "2", "CollectionId": "5"}


def test_base64_without_padding() -> None:
    """Some clients drop the base64 padding; it is restored."""
    text = encode_binary(command="Sync", device_id="ABC", device_type="x")
    assert parse_query(text.rstrip("=")).device_id == "ABC"


def test_tables_cover_spec() -> None:
    """Command codes, parameter tags and versions are the MS-ASHTTP tables."""
    assert COMMAND_CODES[0] == "Sync" and COMMAND_CODES[18] == "Ping"
    assert COMMAND_CODES[20] == "Provision" and 5 not in COMMAND_CODES
    assert PARAM_TAGS[8] == "User" and 2 not in PARAM_TAGS
    assert set(PROTOCOL_VERSIONS) == {121, 140, 141, 160, 161}


# ------------------------------------------------------------------ refusals


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GOOD = bytes([141, 0, 9, 4, 3]) + b"DEV" + b"\x00" + b"\x02" + b"PC"


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("", "no query"),
        ("Cmd=Sync&User=u&DeviceType=x", "no DeviceId"),
        ("Cmd=Sync&User=u&DeviceId=&DeviceType=x", "no DeviceId"),
        ("User=u&DeviceId=d", "no Cmd"),
        ("Cmd=Bogus&DeviceId=d", "unknown command"),
        ("Cmd=Sync&DeviceId=d&User=a&user=b", "twice"),
        ("Cmd=Sync&DeviceId=d&DeviceId=e", "twice"),
        ("Cmd=Sync&DeviceId=bad%20id", "DeviceId"),
        ("Cmd=Sync&DeviceId=d&User=a%0Ab", "User"),
        ("Cmd=Sync&DeviceId=d&X", "no value"),
        ("Cmd=Sync&DeviceId=%FF", "UTF-8"),
        ("Cmd=Sync&DeviceId=d&a-b=1", "not valid"),
        ("x" * 5000, "longer"),
        (_b64(bytes([99]) + GOOD[1:]), "protocol version"),
        (_b64(GOOD[:1] + bytes([5]) + GOOD[2:]), "command code"),
        (_b64(GOOD[:4] + b"\x00" + GOOD[8:]), "device id is empty"),
        (_b64(GOOD[:8] + b"\x02ab" + GOOD[9:]), "policy key length"),
        (_b64(GOOD[:6]), "ends inside the device id"),
        (_b64(GOOD + b"\x02\x01a"), "unknown command parameter tag"),
        (_b64(GOOD + b"\x08\x05ab"), "ends inside the User"),
        (_b64(GOOD + b"\x08\x01a\x08\x01b"), "twice"),
        (_b64(GOOD + b"\x07\x02ab"), "Options"),
        (_b64(GOOD + b"\x08\x02\xff\xfe"), "not UTF-8"),
        (_b64(GOOD[:-3] + b"\x02\xff\xfe"), "not ASCII"),
        ("abcde", "does not decode"),
    ],
)
def test_refusals(query: str, fragment: str) -> None:
    """Each kind of bad query is refused with QueryError naming the problem."""
    with pytest.raises(QueryError) as info:
        parse_query(query)
    assert fragment in info.value.detail
    assert info.value.status == 400


def test_binary_device_id_too_long_as_hex() -> None:
    """A binary id whose hex form exceeds the device id limit is refused."""
    raw = bytes([141, 0, 9, 4, 100]) + bytes(range(100)) + b"\x00\x00"
    with pytest.raises(QueryError):
        decode_binary(raw)


# ------------------------------------------------------------------- fuzzing


def _only_query_error(query: str) -> None:
    try:
        q = parse_query(query)
    except QueryError:
        return
    assert q.device_id and q.command  # a decoded query always has both


@settings(max_examples=2000, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_text(query: str) -> None:
    """Arbitrary text decodes or raises QueryError, never anything else."""
    _only_query_error(query)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_base64_of_bytes(data: bytes) -> None:
    """Arbitrary bytes in the base64 form decode or raise QueryError."""
    _only_query_error(_b64(data))
    with contextlib.suppress(QueryError):
        decode_binary(data)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_mutated_valid_prefix(tail: bytes) -> None:
    """A valid header followed by arbitrary parameter bytes never escapes QueryError."""
    _only_query_error(_b64(GOOD + tail))


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["Cmd", "User", "DeviceId", "DeviceType", "ItemId", "%", ""]),
                  st.text(max_size=20)),
        max_size=6,
    )
)
def test_fuzz_plain_pairs(pairs: list[tuple[str, str]]) -> None:
    """Plain queries assembled from (partly) valid names decode or raise QueryError."""
    _only_query_error("&".join(f"{k}={v}" for k, v in pairs))
