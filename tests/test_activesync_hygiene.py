"""ActiveSync request hygiene without sockets (``proxy.frontends.activesync.hygiene``):
which requests are refused with 400 and which target goes upstream."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.frontends.activesync.hygiene import NOT_FORWARDED, refusal, upstream_target
from proxy.frontends.activesync.wire import forwarded_headers

pytestmark = pytest.mark.pure

EAS = "/Microsoft-Server-ActiveSync"
Q = f"{EAS}?Cmd=Sync&User=alice&DeviceId=d1&DeviceType=iPhone"
AUTH = (b"Authorization", b"Basic YWxpY2U6cHc=")


@pytest.mark.parametrize(("target", "headers", "reason"), [
    (Q, [AUTH, (b"Host", b"mail")], None),
    (Q, [(b"Connection", b"keep-alive, X-Hop"), AUTH], None),
    (EAS, [], None),
    (Q, [AUTH, (b"authorization", b"Basic Ym9iOnB3")], "duplicate_authorization"),
    (Q, [AUTH, (b"Authorization", b"")], "duplicate_authorization"),
    ("https://other.example" + Q, [AUTH], "absolute_form"),
    ("http://mail" + EAS, [AUTH], "absolute_form"),
    (Q + "#frag", [AUTH], "fragment"),
    (EAS + "#x", [AUTH], "fragment"),
    (Q, [(b"Connection", b"Authorization"), AUTH], "connection_names_end_to_end"),
    (Q, [(b"Connection", b"close, host"), AUTH], "connection_names_end_to_end"),
    (Q, [(b"connection", b" Content-Length "), AUTH], "connection_names_end_to_end"),
    (Q, [(b"Connection", b"MS-ASProtocolVersion"), AUTH], "connection_names_end_to_end"),
])
def test_refusal(target: str, headers: list[tuple[bytes, bytes]], reason: str | None) -> None:
    """Two Authorization headers, an absolute-form target, a fragment, or a Connection
    header naming a header mailward reads are refused; ordinary requests are not."""
    assert refusal(target, CIMultiDict((k.decode(), v.decode()) for k, v in headers)) == reason


@pytest.mark.parametrize(("raw", "target"), [
    (Q, Q),
    (EAS, EAS),
    (EAS + "?", EAS + "?"),
    ("/x/../Microsoft-Server-ActiveSync?Cmd=Ping", EAS + "?Cmd=Ping"),
    ("/Microsoft%2DServer-ActiveSync?jAAJBAp2MTQwRGV2aWNlAApTbWFydFBob25l",
     EAS + "?jAAJBAp2MTQwRGV2aWNlAApTbWFydFBob25l"),
])
def test_upstream_target_is_the_served_path_and_the_query_as_sent(raw: str, target: str
                                                                  ) -> None:
    """The upstream target is the one served path plus the client's query, byte for byte,
    whatever spelling of the path the client used."""
    assert upstream_target(raw) == target


def test_forwarding_and_method_override_headers_are_not_forwarded() -> None:
    """A client's X-Forwarded-*, Forwarded and method-override headers never reach the
    upstream; mailward's own X-Forwarded-* name the address and scheme it saw."""
    sent = [(b"Host", b"mail.corp.example"), (b"X-Forwarded-For", b"10.9.9.9"),
            (b"Forwarded", b"for=10.9.9.9"), (b"X-HTTP-Method-Override", b"DELETE"),
            (b"X-HTTP-Method", b"DELETE"), (b"x-method-override", b"PUT"), AUTH,
            (b"X-Forwarded-Host", b"evil"), (b"X-Forwarded-Proto", b"http")]
    assert forwarded_headers(sent, "198.51.100.7", "https", NOT_FORWARDED) == [
        AUTH, (b"X-Forwarded-For", b"198.51.100.7"), (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"mail.corp.example")]
