"""``[notify]`` of ``mailward.toml``: notices to users (DESIGN "Policy changes, notices,
auditor report").

The table is optional: without it (or with ``smtp`` empty) nothing is mailed, and
IMAP users still see the ``* OK [ALERT]`` warning before a rule's ``enforce_from``.
Secrets are never in this file: ``credentials_file`` names a file holding
``user:password`` for the relay's AUTH.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.config.reading import Table, parse_duration, split_hostport

#: ``rate = "1/1d"``: at most this many notices per device and reason per duration.
_RATE = re.compile(r"^\s*(\d+)\s*(?:/|per)\s*(\S+)\s*$")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})?$")


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    """``[notify]``: the relay notices go through, who they come from, how often."""

    smtp_host: str = ""  # empty: no mail (IMAP ALERT warnings only)
    smtp_port: int = 587
    starttls: bool = True  # STARTTLS on the relay (required when true)
    smtp_tls: bool = False  # implicit TLS (port 465)
    smtp_ca: Path | None = None  # the relay's CA bundle; None = system trust store
    credentials_file: Path | None = None  # "user:password" for AUTH
    sender: str = ""
    admin_copy: str = ""  # an address that gets a copy of every notice mail
    templates: Path | None = None  # overrides proxy/samples/notices/<lang>/<kind>.*
    language: str = "en"  # of users whose domain is not in ``languages``
    languages: dict[str, str] = field(default_factory=dict)  # domain or address -> lang
    user_domain: str = ""  # appended to logins without "@" to address the notice
    rate_count: int = 1  # notices per device and reason ...
    rate_window_s: float = 86400.0  # ... per this window
    warnings: bool = True  # mail warnings before a rule's enforce_from
    notify_report_only: bool = False  # mail report-only ("would deny") findings too
    retries: int = 3  # further attempts after a failed delivery
    retry_delay_s: float = 5.0  # before the first retry; doubles each time
    timeout_s: float = 30.0  # per relay conversation
    queue_max: int = 10_000  # notices waiting; beyond it new ones are dropped (logged)

    @property
    def mail(self) -> bool:
        """Notices are mailed (a relay is configured)."""
        return bool(self.smtp_host)


def read_notify(t: Table, resolve_path: Any) -> NotifyConfig:
    """The ``[notify]`` table; ``resolve_path(str) -> Path`` resolves relative paths
    against the deployment root."""
    d = NotifyConfig()
    smtp = t.text("smtp", "")
    host, port = "", d.smtp_port
    if smtp:
        try:
            host, port = split_hostport(smtp)
        except ValueError as exc:
            raise t.error("smtp", str(exc)) from None
    sender = t.text("sender", "")
    if host and "@" not in sender:
        raise t.error("sender", "must be an address (the notices' From) when smtp is set")
    count, window = _rate(t)
    languages = t.get("languages", dict, {})
    for key, lang in languages.items():
        if not isinstance(lang, str) or not _LANGUAGE.match(lang):
            raise t.error("languages", f"{key!r}: use a language tag such as \"fr\"")
    language = t.text("language", d.language)
    if not _LANGUAGE.match(language):
        raise t.error("language", 'use a language tag such as "en"')
    starttls = t.get("starttls", bool, d.starttls)
    smtp_tls = t.get("tls", bool, d.smtp_tls)
    if starttls and smtp_tls:
        raise t.error("tls", "implicit TLS and starttls exclude each other")
    cfg = NotifyConfig(
        smtp_host=host, smtp_port=port, starttls=starttls, smtp_tls=smtp_tls,
        smtp_ca=_path(t, "smtp_ca", resolve_path),
        credentials_file=_path(t, "credentials_file", resolve_path),
        sender=sender, admin_copy=t.text("admin_copy", ""),
        templates=_path(t, "templates", resolve_path),
        language=language, languages={k.lower(): v for k, v in languages.items()},
        user_domain=t.text("user_domain", "").lstrip("@").lower(),
        rate_count=count, rate_window_s=window,
        warnings=t.get("warnings", bool, d.warnings),
        notify_report_only=t.get("notify_report_only", bool, d.notify_report_only),
        retries=t.get("retries", int, d.retries),
        retry_delay_s=t.positive_duration("retry_delay", d.retry_delay_s),
        timeout_s=t.positive_duration("timeout", d.timeout_s),
        queue_max=t.positive_int("queue_max", d.queue_max),
    )
    if cfg.retries < 0:
        raise t.error("retries", "must not be negative")
    if cfg.admin_copy and "@" not in cfg.admin_copy:
        raise t.error("admin_copy", "must be an address")
    return cfg


def _rate(t: Table) -> tuple[int, float]:
    text = t.text("rate", "1/1d")
    m = _RATE.match(text)
    try:
        if not m or int(m.group(1)) < 1:
            raise ValueError
        return int(m.group(1)), parse_duration(m.group(2))
    except ValueError:
        raise t.error("rate", 'use "<count>/<duration>", e.g. "1/1d"') from None


def _path(t: Table, key: str, resolve_path: Any) -> Path | None:
    value = t.text(key, "")
    return resolve_path(value) if value else None


__all__ = ["NotifyConfig", "read_notify"]
