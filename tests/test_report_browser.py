"""The auditor's report in a real headless Chromium (Debian ``chromium``), driven over
its DevTools protocol: the page renders without console errors, requests nothing but
the file itself, its filter box and column sorting work, and a screenshot is kept.

``MAILWARD_DOCS_SCREENSHOT=1`` also writes the screenshot to docs/report.png (the one
README shows).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from peers import peer_missing
from report_logs import bench, story

from proxy.audit import load_verify_key
from proxy.audit.report import build_report
from proxy.audit.report_html import render_report

pytestmark = pytest.mark.peer

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
FLAGS = ("--headless=new", "--no-sandbox", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-gpu", "--disable-dev-shm-usage", "--remote-debugging-port=0",
         "--window-size=1280,1900", "--hide-scrollbars")


class Page:
    """One DevTools session (flattened) on a page target, with the events it saw."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.ids = ws, itertools.count(1)
        self.session: str | None = None
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif "method" in data:
                self.events.append(data)

    async def send(self, method: str, session: bool = True, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = future
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        await self.ws.send_str(json.dumps(msg))
        reply = await asyncio.wait_for(future, 30)
        assert "error" not in reply, reply
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def js(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def wait_event(self, method: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if event["method"] == method:
                    return event
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {method} within {timeout} s")


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Page]:
    """A headless Chromium with the flags the issue names, and a page to drive."""
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        peer_missing("Debian chromium is not installed (apt-get install chromium)")
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.1)
        port, path = port_file.read_text().split()[:2]
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0) as ws:
            page = Page(ws)
            target = await page.send("Target.createTarget", url="about:blank")
            attached = await page.send("Target.attachToTarget",
                                       targetId=target["targetId"], flatten=True)
            page.session = attached["sessionId"]
            for domain in ("Network", "Runtime", "Log", "Page"):
                await page.send(f"{domain}.enable")
            try:
                yield page
            finally:
                page.reader.cancel()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _report_file(tmp_path: Path) -> Path:
    """A report of two instances' logs (every other record in each), merged by time."""
    key, pub = bench.write_keys(tmp_path)
    now = time.time()
    records = sorted([*bench.synthetic_records(40_000, start=now - 27 * 86400,
                                               span_s=26 * 86400),
                      *story(now - 12 * 86400)], key=lambda r: r[0])
    logs = [tmp_path / "mail-a.jsonl", tmp_path / "mail-b.jsonl"]
    for n, log in enumerate(logs):
        bench.write_log(log, key, records[n::2], instance=log.stem)
    data = build_report(logs, since=datetime.now(UTC) - timedelta(days=28),
                        until=datetime.now(UTC), keys=[load_verify_key(pub)])
    assert [c.ok for c in data.chains] == [True, True]
    out = tmp_path / "report.html"
    out.write_text(render_report(data), encoding="utf-8")
    return out


def _problems(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Console errors and warnings, uncaught exceptions, and browser log errors."""
    bad = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.exceptionThrown" or (
                e["method"] == "Runtime.consoleAPICalled" and p.get("type") in
                ("error", "warning", "assert")) or (
                e["method"] == "Log.entryAdded" and p["entry"]["level"] in
                ("error", "warning")):
            bad.append(e)
    return bad


async def test_report_renders_filters_sorts_offline(tmp_path: Path) -> None:
    """The report of two instances' logs opens with no console error, requests only
    its own file, filters rows by typed text, sorts by a clicked column, and is
    screenshotted."""
    report = _report_file(tmp_path)
    url = report.as_uri()
    async with chromium(tmp_path / "profile") as page:
        await page.send("Page.navigate", url=url)
        await page.wait_event("Page.loadEventFired")
        await asyncio.sleep(0.5)  # anything the page might still start
        assert (await page.js("document.title")).startswith("mailward audit report")
        assert await page.js("document.querySelectorAll('svg').length") >= 1
        total = await page.js("document.querySelectorAll('#denies tbody tr').length")
        assert total == 5000
        shot = await page.send("Page.captureScreenshot", format="png")
        png = base64.b64decode(shot["data"])
        (tmp_path / "report.png").write_bytes(png)
        if os.environ.get("MAILWARD_DOCS_SCREENSHOT") == "1":
            (ROOT / "docs").mkdir(exist_ok=True)
            (ROOT / "docs" / "report.png").write_bytes(png)
        assert png.startswith(b"\x89PNG") and len(png) > 20_000

        # Filter: type a user into the box like a person would.
        user = await page.js("document.querySelector('#denies tbody tr').cells[3].textContent")
        want = await page.js(f"[...document.querySelectorAll('#denies tbody tr')]"
                             f".filter(r => r.cells[3].textContent === {json.dumps(user)})"
                             ".length")
        await page.js("document.getElementById('filter').focus()")
        await page.send("Input.insertText", text=user)
        visible = await page.js("[...document.querySelectorAll('#denies tbody tr')]"
                                ".filter(r => !r.hidden && r.offsetParent !== null).length")
        assert 1 <= visible == want < total
        assert await page.js("document.getElementById('shown').textContent") == str(want)
        await page.js("const f = document.getElementById('filter'); f.value = ''; "
                      "f.dispatchEvent(new Event('input'))")
        assert await page.js("[...document.querySelectorAll('#denies tbody tr')]"
                             ".filter(r => !r.hidden).length") == total

        # Sort: time descending as rendered (both instances interleaved); one click
        # on time sorts ascending, one more back; seq sorts as numbers.
        column = ("[...document.querySelectorAll('#denies tbody tr')]"
                  ".map(r => r.cells[{}].textContent)")
        head = "document.querySelectorAll('#denies thead th')[{}]"
        assert await page.js(head.format(2) + ".textContent") == "time (UTC)"
        before = await page.js(column.format(2))
        assert before == sorted(before, reverse=True)
        assert set(await page.js(column.format(0))) == {"mail-a", "mail-b"}
        await page.js(head.format(2) + ".click()")
        assert await page.js(column.format(2)) == sorted(before)
        await page.js(head.format(2) + ".click()")
        assert await page.js(column.format(2)) == before
        seqs = await page.js(column.format(1))
        await page.js(head.format(1) + ".click()")
        assert [int(x) for x in await page.js(column.format(1))] == sorted(map(int, seqs))
        await page.js(head.format(3) + ".click()")
        ascending = await page.js(column.format(3))
        assert ascending != await page.js("[]") and len(set(ascending)) > 1
        await page.js(head.format(3) + ".click()")
        assert await page.js(column.format(3)) == ascending[::-1]
        assert await page.js(head.format(3) + ".getAttribute('aria-sort')") == "descending"

        requests = [e["params"]["request"]["url"] for e in page.events
                    if e["method"] == "Network.requestWillBeSent"]
        assert requests == [url], requests
        assert _problems(page.events) == []
