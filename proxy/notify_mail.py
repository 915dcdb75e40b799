"""Notice mail: templates -> a MIME message -> the relay (aiosmtplib).

Templates are ``<lang>/<kind>.txt`` (first line ``Subject: ...``, a blank line, the
plain-text body) and ``<lang>/<kind>.html`` (the HTML body, optional) for ``kind`` =
``warning`` and ``deny``. ``[notify] templates`` names a directory laid out the same
way; what it lacks comes from the defaults shipped in ``proxy/samples/notices/``.
The language is ``[notify] languages[<user address>]``, else ``languages[<domain>]``,
else ``[notify] language``; English is the last resort. ``$names`` in templates are
replaced (:data:`FIELDS`); in HTML the values are escaped.
"""

from __future__ import annotations

import html
import ssl
import string
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import aiosmtplib

from proxy.config.notify import NotifyConfig

#: What templates may use (``$name``).
FIELDS = ("user", "device", "app", "why", "remediation", "text", "time", "date",
          "protocol", "code", "sender")
#: What a failed relay conversation raises.
SEND_ERRORS = (aiosmtplib.SMTPException, OSError, TimeoutError, ssl.SSLError)


class TemplateError(Exception):
    """No template for a notice, or one without its ``Subject:`` line."""


class Templates:
    """Finds and fills the notice templates (see the module docstring)."""

    def __init__(self, cfg: NotifyConfig) -> None:
        self.cfg = cfg
        self.shipped: Traversable = resources.files("proxy") / "samples" / "notices"

    def language(self, user: str) -> str:
        langs = self.cfg.languages
        domain = user.rpartition("@")[2]
        return langs.get(user) or langs.get(domain) or self.cfg.language

    def _find(self, lang: str, name: str) -> str | None:
        roots: list[Traversable | Path] = [self.shipped]
        if self.cfg.templates is not None:
            roots.insert(0, self.cfg.templates)
        for language in dict.fromkeys((lang, "en")):
            for root in roots:
                candidate = root / language / name
                if candidate.is_file():
                    return candidate.read_text(encoding="utf-8")
        return None

    def render(self, kind: str, user: str, values: dict[str, str]) -> tuple[str, str, str | None]:
        """(subject, plain text, HTML or None) of a ``kind`` notice to ``user``."""
        lang = self.language(user)
        text = self._find(lang, f"{kind}.txt")
        if text is None:
            raise TemplateError(f"no {kind}.txt template for language {lang!r}")
        head, _, body = text.partition("\n\n")
        if not head.startswith("Subject:"):
            raise TemplateError(f"{lang}/{kind}.txt must start with a Subject: line")
        subject = string.Template(head.removeprefix("Subject:").strip()).safe_substitute(values)
        plain = string.Template(body).safe_substitute(values)
        page = self._find(lang, f"{kind}.html")
        rich = None
        if page is not None:
            escaped = {k: html.escape(v) for k, v in values.items()}
            rich = string.Template(page).safe_substitute(escaped)
        return " ".join(subject.split()), plain, rich


def build_message(cfg: NotifyConfig, to: str, subject: str, plain: str, rich: str | None,
                  kind: str) -> EmailMessage:
    """The notice as a MIME message (plain text, and HTML as an alternative)."""
    msg = EmailMessage()
    msg["From"] = cfg.sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = make_msgid("notice", domain=cfg.sender.rpartition("@")[2] or None)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to it
    msg["X-Mailward-Notice"] = kind
    msg.set_content(plain)
    if rich is not None:
        msg.add_alternative(rich, subtype="html")
    return msg


class Relay:
    """Sends notice mail through ``[notify] smtp`` (one connection per message:
    notices are rare and a pooled connection would sit idle)."""

    def __init__(self, cfg: NotifyConfig) -> None:
        self.cfg = cfg
        self.tls: ssl.SSLContext | None = None
        if cfg.starttls or cfg.smtp_tls:
            cafile = str(cfg.smtp_ca) if cfg.smtp_ca is not None else None
            self.tls = ssl.create_default_context(cafile=cafile)
        self.username, self.password = read_credentials(cfg.credentials_file)

    async def send(self, msg: EmailMessage, recipients: list[str]) -> None:
        """Deliver ``msg`` to ``recipients``; raises one of :data:`SEND_ERRORS`."""
        cfg = self.cfg
        await aiosmtplib.send(
            msg, sender=cfg.sender, recipients=recipients, hostname=cfg.smtp_host,
            port=cfg.smtp_port, username=self.username, password=self.password,
            use_tls=cfg.smtp_tls, start_tls=cfg.starttls,
            tls_context=self.tls, timeout=cfg.timeout_s)


def read_credentials(path: Path | None) -> tuple[str | None, str | None]:
    """``user:password`` (one line) from ``credentials_file``; (None, None) without
    one. Raises OSError or ValueError (the server names the key)."""
    if path is None:
        return None, None
    line = path.read_text(encoding="utf-8").strip()
    user, sep, password = line.partition(":")
    if not sep or not user:
        raise ValueError(f"{path}: expected one line user:password")
    return user, password


__all__ = ["FIELDS", "SEND_ERRORS", "Relay", "TemplateError", "Templates", "build_message",
           "read_credentials"]
