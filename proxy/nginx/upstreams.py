"""Checking a password nginx received against the real upstream, with the front ends'
own upstream login code.

mailward never stores passwords: as for its own listeners, the listener's upstream
(``[[listeners]] upstream``, with its TLS settings) checks them first. IMAP and POP3
run the front ends' sans-IO logins (``imap_upstream.UpstreamLogin``,
``pop3_upstream.UpstreamLogin``) through their executor
(``preauth_exec.converse_upstream``) and then log out; SMTP uses the submission front
end's :class:`~proxy.frontends.smtp_upstream.UpstreamSession` (connect, XCLIENT with
the phone's address when offered, AUTH) and quits. nginx then logs in to
``nginx_upstream`` itself, so the upstream sees two logins per accepted attempt.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Literal, cast

from proxy.config import ListenerConfig
from proxy.frontends import imap_upstream, pop3_upstream
from proxy.frontends.imap_transport import UpstreamConnection
from proxy.frontends.preauth_exec import UPSTREAM_ERRORS, converse_upstream
from proxy.frontends.smtp_upstream import ClientInfo, UpstreamSession, UpstreamUnavailable
from proxy.nginx.protocol import MailRequest

#: The tag of mailward's LOGIN on an IMAP upstream.
LOGIN_TAG = "mw.login"
_Answer = imap_upstream.LoginAnswered | pop3_upstream.LoginAnswered | None


@dataclass(frozen=True, slots=True)
class Checked:
    """The upstream's verdict on the credentials: ``ok``; ``refused`` (its text, and
    for SMTP its reply code); ``temporary`` (it could not check them now: an SMTP
    4xx); ``unavailable`` (not reached, or no answer: ``text`` says why)."""

    outcome: Literal["ok", "refused", "temporary", "unavailable"]
    text: str = ""
    smtp_code: str | None = None


def _line_text(line: bytes, skip: int) -> str:
    """The human part of an answer line after its first ``skip`` words."""
    words = line.decode("utf-8", "replace").strip().split(" ", skip)
    return words[skip] if len(words) > skip else ""


async def check_password(lc: ListenerConfig, tls: ssl.SSLContext | None,
                         req: MailRequest, hostname: str) -> Checked:
    """Ask ``lc``'s upstream whether ``req``'s credentials are right."""
    if req.protocol == "smtp":
        return await _smtp(lc, tls, req, hostname)
    up = UpstreamConnection()
    starttls = lc.upstream_tls == "starttls"
    login: imap_upstream.UpstreamLogin | pop3_upstream.UpstreamLogin
    if req.protocol == "imap":
        login = imap_upstream.UpstreamLogin(tag=LOGIN_TAG, user=req.user,
                                            password=req.password, starttls=starttls,
                                            client_ip=req.client_ip)
        goodbye = imap_upstream.logout_command()
    else:
        login = pop3_upstream.UpstreamLogin(user=req.user, password=req.password,
                                            starttls=starttls, client_ip=req.client_ip)
        goodbye = pop3_upstream.quit_command()
    try:
        answer = cast(_Answer, await converse_upstream(lc, tls, up, login,
                                                       lambda _caps: None))
    except (*UPSTREAM_ERRORS, UnicodeEncodeError) as exc:
        return Checked("unavailable", str(exc)[:200] or type(exc).__name__)
    finally:  # both are no-ops on a connection never made or already gone
        up.pipe.write(goodbye)
        up.pipe.close()
    if answer is None:
        return Checked("unavailable", "the upstream ended the login without an answer")
    if answer.ok:
        return Checked("ok")
    if isinstance(answer, imap_upstream.LoginAnswered):
        return Checked("refused", _line_text(answer.tagged, 2))
    return Checked("refused", _line_text(answer.line, 1))


async def _smtp(lc: ListenerConfig, tls: ssl.SSLContext | None, req: MailRequest,
                hostname: str) -> Checked:
    session = UpstreamSession(lc, tls, hostname, ClientInfo(req.client_ip, None,
                                                            req.smtp_helo))
    try:
        await session.connect()
        answer = await session.authenticate(req.user.encode(), req.password.encode())
    except UpstreamUnavailable as exc:
        return Checked("unavailable", str(exc)[:200])
    except LookupError as exc:  # the upstream offers no PLAIN or LOGIN
        await session.quit()
        return Checked("unavailable", str(exc)[:200])
    await session.quit()
    if answer.code == 235:
        return Checked("ok")
    enhanced, _, text = answer.message.partition(" ")
    if not enhanced[:1].isdigit():
        enhanced, text = "", answer.message
    code = f"{answer.code} {enhanced}".strip()
    return Checked("temporary" if answer.code < 500 else "refused", text, code)


__all__ = ["LOGIN_TAG", "Checked", "check_password"]
