"""The SASL decoders and exchanges of ``imap_sasl``: tables and property tests, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.frontends.imap_sasl import (
    Challenge,
    Credentials,
    SaslExchange,
    SaslRefused,
    decode_oauthbearer,
    decode_xoauth2,
)
from proxy.frontends.imap_syntax import SUPPORTED_MECHANISMS, RemoteProtocolError

pytestmark = pytest.mark.pure

ALICE, TOKEN = "alice@corp.example", "ya29.a0-secret-token"
XOAUTH2 = f"user={ALICE}\x01auth=Bearer {TOKEN}\x01\x01".encode()
OAUTHBEARER = f"n,a={ALICE},\x01host=mail\x01port=993\x01auth=Bearer {TOKEN}\x01\x01".encode()


def test_plain_and_login_give_the_user_and_password():
    """PLAIN in one step; LOGIN prompts Username: then Password:; both go upstream as
    the LOGIN command (no mechanism)."""
    assert SaslExchange("PLAIN").step(f"\0{ALICE}\0pw".encode()) == Credentials(ALICE, "pw")
    ex = SaslExchange("LOGIN")
    assert ex.start() == Challenge(b"Username:")
    assert ex.step(ALICE.encode()) == Challenge(b"Password:")
    assert ex.step(b"pw") == Credentials(ALICE, "pw")


def test_token_mechanisms_relay_the_message_with_the_claimed_user():
    """XOAUTH2 reads user=, OAUTHBEARER the GS2 a= (escapes undone); the message goes
    upstream unchanged for the upstream to validate."""
    assert SaslExchange("XOAUTH2").step(XOAUTH2) == Credentials(
        ALICE, mechanism="XOAUTH2", response=XOAUTH2)
    assert SaslExchange("OAUTHBEARER").step(OAUTHBEARER) == Credentials(
        ALICE, mechanism="OAUTHBEARER", response=OAUTHBEARER)
    assert decode_oauthbearer(b"n,a=o=3Dd=2Cx,\x01auth=Bearer t\x01\x01") == "o=d,x"
    assert decode_xoauth2(b"auth=bearer t\x01user=bob\x01\x01") == "bob"


@pytest.mark.parametrize("message", [
    b"", b"\x01\x01", b"user=alice\x01\x01", b"user=alice\x01auth=Bearer t\x01",
    b"user=\x01auth=Bearer t\x01\x01", b"user=alice\x01auth=Basic dXNlcg==\x01\x01",
    b"user=alice\x01auth=Bearer \x01\x01", b"user=a\x01user=b\x01auth=Bearer t\x01\x01",
    b"user=al\x00ice\x01auth=Bearer t\x01\x01", b"user=\xff\x01auth=Bearer t\x01\x01",
    b"user=a\nb\x01auth=Bearer t\x01\x01", b"noequals\x01auth=Bearer t\x01\x01",
])
def test_malformed_xoauth2_is_bad(message: bytes):
    """Malformed XOAUTH2 messages raise the protocol error with reply BAD."""
    with pytest.raises(RemoteProtocolError) as err:
        SaslExchange("XOAUTH2").step(message)
    assert err.value.reply == "BAD"


@pytest.mark.parametrize("message", [
    b"", b"n,,", b"n,a=alice,auth=Bearer t\x01\x01", b"x,a=alice,\x01auth=Bearer t\x01\x01",
    b"p=tls-unique,a=alice,\x01auth=Bearer t\x01\x01", b"n,a=al=2Xice,\x01auth=Bearer t\x01\x01",
    b"n,b=alice,\x01auth=Bearer t\x01\x01", b"n,a=,\x01auth=Bearer t\x01\x01",
    b"n,a=alice,\x01host=x\x01\x01", b"n,a=alice,\x01\x01",
    b"n,a=alice,\x01auth=Bearer t\x01",
])
def test_malformed_oauthbearer_is_bad(message: bytes):
    """Malformed OAUTHBEARER messages raise the protocol error with reply BAD."""
    with pytest.raises(RemoteProtocolError) as err:
        SaslExchange("OAUTHBEARER").step(message)
    assert err.value.reply == "BAD"


def test_unrelayable_messages_are_refused_no_cannot():
    """OAUTHBEARER without a= names no user, PLAIN with another authzid would log in
    as someone else: both NO [CANNOT], with their session_end reasons."""
    with pytest.raises(SaslRefused) as err:
        SaslExchange("OAUTHBEARER").step(b"n,,\x01auth=Bearer t\x01\x01")
    assert (err.value.reply, err.value.code, err.value.reason) == ("NO", "CANNOT",
                                                                   "sasl_no_user")
    with pytest.raises(SaslRefused) as err:
        SaslExchange("PLAIN").step(f"bob\0{ALICE}\0pw".encode())
    assert err.value.reason == "authzid_refused"


def test_tokens_never_in_repr():
    """Credentials and exchanges never show a token or password."""
    cred = SaslExchange("XOAUTH2").step(XOAUTH2)
    assert TOKEN not in repr(cred)
    assert "pw" not in repr(Credentials(ALICE, "pw"))
    ex = SaslExchange("LOGIN")
    ex.step(ALICE.encode())
    assert "secret" not in repr(ex.step(b"secret"))


@settings(max_examples=400)
@given(st.sampled_from(SUPPORTED_MECHANISMS), st.lists(st.binary(max_size=200), max_size=3))
def test_any_response_gives_a_challenge_credentials_or_the_protocol_error(
        mechanism: str, responses: list[bytes]):
    """Any client responses either progress or raise RemoteProtocolError, nothing else."""
    ex = SaslExchange(mechanism)
    try:
        for response in responses:
            if isinstance(ex.step(response), Credentials):
                break
    except RemoteProtocolError:
        pass


@settings(max_examples=300)
@given(st.lists(st.sampled_from([b"n", b"y", b",", b"a=", b"=2C", b"=3D", b"=", b"\x01",
                                 b"auth=", b"Bearer ", b"tok", b"host=", b"user=", b"\x00",
                                 b"\xc3", b" "]), max_size=20))
def test_structured_token_messages_decode_or_raise_the_protocol_error(parts: list[bytes]):
    """Messages built from the grammar's own pieces decode to a non-empty user without
    control characters, or raise RemoteProtocolError."""
    message = b"".join(parts)
    for decode in (decode_xoauth2, decode_oauthbearer):
        try:
            user = decode(message)
        except RemoteProtocolError:
            continue
        assert user and user.isprintable()
