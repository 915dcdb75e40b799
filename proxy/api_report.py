"""``GET /v1/report``: the auditor's report (:mod:`proxy.audit.report`) over HTTP.

Query parameters: ``since`` and ``until`` (as ``mailward audit report`` takes them:
RFC 3339, a date, or an age such as ``30d``; default the last 30 days) and
``no_client_ip`` (``1``/``true``). The answer is the same self-contained HTML file,
built in a worker thread (it reads the whole log: seconds for millions of records),
one report at a time per server. The route needs a token with scope ``read``
(:mod:`proxy.api_tokens`); exports (``--export-dir``) are the CLI's only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from aiohttp import web

from proxy.api_forms import ApiError


@dataclass
class AuditReports:
    """Where the API's reports come from: the audit log and its verify keys."""

    log: Path
    verify_keys: tuple[Path, ...] = ()
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


async def report_response(source: AuditReports | None, query: Mapping[str, str]
                          ) -> web.Response:
    """The report as ``text/html`` (400 for an unreadable period, 404 when the server
    has no report source)."""
    from proxy.audit.report import report_window

    if source is None:
        raise ApiError(404, "not_found", "This server has no audit log to report on.")
    try:
        since, until = report_window(query.get("since"), query.get("until"))
    except ValueError as exc:
        raise ApiError(400, "malformed", str(exc)) from None
    no_ip = _flag(query.get("no_client_ip"))
    async with source.busy:
        html = await asyncio.to_thread(_render, source, since, until, no_ip)
    name = f"mailward-report-{since:%Y%m%d}-{until:%Y%m%d}.html"
    return web.Response(text=html, content_type="text/html", charset="utf-8", headers={
        "Cache-Control": "no-store",
        "Content-Disposition": f'inline; filename="{name}"',
        "X-Content-Type-Options": "nosniff",
    })


def _render(source: AuditReports, since: datetime, until: datetime, no_ip: bool) -> str:
    from proxy.audit import load_verify_key
    from proxy.audit.report import build_report
    from proxy.audit.report_html import render_report

    keys = [load_verify_key(k) for k in source.verify_keys if k.exists()]
    try:
        data = build_report(source.log, since=since, until=until, keys=keys,
                            no_client_ip=no_ip)
    except ValueError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    return render_report(data)
