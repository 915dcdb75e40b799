"""The auditor's report, part three: one self-contained HTML file.

Everything is inline (CSS, the chart as SVG, a small script to filter and sort the
table), and the page's Content-Security-Policy forbids every fetch (``default-src
'none'``; the script is allowed by its SHA-256 only), so the file works offline and
as an e-mail attachment and cannot make a request of its own, even if a record's
text tried to smuggle markup in (every value is escaped as well). Without script
(many mail readers) the tables still show, unsorted and unfiltered.
"""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from html import escape

from proxy import __version__
from proxy.audit.report import MAX_DENIES, TOP, ChainSummary, ReportData

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI","DejaVu Sans",sans-serif;
 margin:0 auto;max-width:1200px;padding:1em 1.5em;color:#212529}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.2em;margin:1.6em 0 .4em;
 border-bottom:1px solid #dee2e6}
.meta{color:#495057}.ok{background:#ebfbee;border-left:5px solid #2b8a3e}
.bad{background:#fff5f5;border-left:5px solid #c92a2a}.box{padding:.6em 1em;margin:1em 0}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;text-align:left;
 border-bottom:1px solid #e9ecef;vertical-align:top}th{background:#f1f3f5}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:2em}.grid>div{flex:1 1 300px}
.bar{display:inline-block;height:.7em;background:#c92a2a;opacity:.6}
.chart svg{width:100%;height:auto}code,.h{font-family:"DejaVu Sans Mono",monospace;
 font-size:11px}#denies th{cursor:pointer;user-select:none;position:sticky;top:0}
#denies th[aria-sort=ascending]::after{content:" \\25B2"}
#denies th[aria-sort=descending]::after{content:" \\25BC"}
#filter{font-size:14px;padding:4px 8px;width:24em;margin:.4em 0}
.scroll{max-height:70vh;overflow:auto;border:1px solid #dee2e6}
""".strip()

_SCRIPT = """
(function(){
var t=document.getElementById("denies");if(!t)return;
var body=t.tBodies[0],box=document.getElementById("filter"),
shown=document.getElementById("shown"),rows=[].slice.call(body.rows);
rows.forEach(function(r){r._t=r.textContent.toLowerCase();});
function filter(){var words=box.value.toLowerCase().split(/\\s+/).filter(Boolean),n=0;
rows.forEach(function(r){var hit=words.every(function(w){return r._t.indexOf(w)>=0;});
r.hidden=!hit;if(hit)n++;});shown.textContent=n;}
box.addEventListener("input",filter);
[].forEach.call(t.tHead.rows[0].cells,function(th,col){
th.addEventListener("click",function(){
var up=th.getAttribute("aria-sort")!=="ascending",num=th.classList.contains("n");
[].forEach.call(t.tHead.rows[0].cells,function(c){c.removeAttribute("aria-sort");});
th.setAttribute("aria-sort",up?"ascending":"descending");
rows.sort(function(a,b){var x=a.cells[col].textContent,y=b.cells[col].textContent;
var c=num?(parseFloat(x)||0)-(parseFloat(y)||0):x.localeCompare(y);return up?c:-c;});
rows.forEach(function(r){body.appendChild(r);});});});
filter();})();
""".strip()

_DENY_COLUMNS = (("instance", ""), ("seq", "n"), ("time (UTC)", ""), ("user", ""), ("device", ""),
                 ("protocol", ""), ("listener", ""), ("client ip", ""), ("reasons", ""),
                 ("app", ""), ("mode", ""), ("policy", ""), ("record hash", ""))


def render_html(data: ReportData, chart_svg: str) -> str:
    """The whole report as one HTML document (see the module docstring)."""
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    csp = (f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
           f"script-src 'sha256-{script_hash}'; form-action 'none'; base-uri 'none'")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>mailward audit report {_day(data.since)} to {_day(data.until)}</title>",
        f"<style>{_CSS}</style></head><body>",
        _header(data),
        _chains(data.chains),
        _totals(data),
        f'<h2>Allow and deny over time, with policy changes</h2><div class="chart">'
        f"{chart_svg}</div><p class=meta>One bucket = {_width(data.bucket_s)}. "
        "Vertical lines: policy versions taking effect.</p>",
        _top_lists(data),
        _timeline(data),
        _denies(data),
        f"<script>{_SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts)


def _day(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M")


def _width(seconds: int) -> str:
    for unit, size in (("week", 604800), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            n = seconds // size
            return f"{n} {unit}{'s' if n > 1 else ''}"
    return f"{seconds} s"


def _header(data: ReportData) -> str:
    ips = " Client addresses are left out of this report." if data.no_client_ip else ""
    seqs = (f", seq {data.first_seq} to {data.last_seq}"
            if data.first_seq is not None and len(data.logs) == 1 else "")
    logs = ", ".join(f"<code>{escape(str(p))}</code>" for p in data.logs)
    logs = (f"Log {logs}" if len(data.logs) == 1 else
            f"{len(data.logs)} logs merged by time ({logs})")
    exported = "".join(f" <code>{escape(str(p))}</code>" for p in data.exported)
    return (
        "<h1>mailward audit report</h1>"
        f"<p class=meta>Period <b>{_day(data.since)}</b> to <b>{_day(data.until)}</b> UTC "
        f"(from {data.since.isoformat()} inclusive to {data.until.isoformat()} exclusive). "
        f"{logs}: {data.selected:,} records in the "
        f"period{seqs}. Generated {data.generated.strftime('%Y-%m-%d %H:%M:%S')} UTC by "
        f"mailward {escape(__version__)}.{ips}"
        + (f" Exported:{exported}." if exported else "")
        + (f" {data.unreadable} unreadable lines were skipped." if data.unreadable else "")
        + "</p>"
    )


def _chains(chains: Sequence[ChainSummary]) -> str:
    """The verdict over all logs, then one column per log (each verified on its own)."""
    if not chains:
        return ""
    several = len(chains) > 1
    failed = [c for c in chains if not c.ok]
    if failed:
        verdict = "<br>".join(f"<b>Chain verification FAILED</b>"
                              f"{' for ' + escape(_name(c)) if several else ''}: "
                              f"{escape(c.error or '')}" for c in failed)
        if several and len(failed) < len(chains):
            verdict += "<br>Verified on their own: " + \
                escape("; ".join(_name(c) for c in chains if c.ok)) + "."
    elif not all(c.signatures_checked for c in chains):
        verdict = ("<b>Chain links and hashes hold, but signatures were NOT checked</b> "
                   "(no verify key given)")
    else:
        verdict = ("<b>Chain verified</b>: every link, hash and checkpoint signature holds"
                   + (f" in each of the {len(chains)} logs" if several else ""))
    rows = [(label, [cell(c) for c in chains]) for label, cell in _CHAIN_ROWS]
    if several:
        rows.insert(0, ("log", [f"<code>{escape(str(c.log))}</code>" for c in chains]))
    cls = "ok" if not failed and all(c.signatures_checked for c in chains) else "bad"
    return (f'<h2>Chain verification at generation</h2><div class="box {cls}">{verdict}'
            f"</div>{_kv_table(rows)}")


def _name(chain: ChainSummary) -> str:
    """The log's path, and its instance when its checkpoints named one."""
    named = ", ".join(chain.instances)
    return f"{chain.log} (instance {named})" if named else str(chain.log)


def _witness(chain: ChainSummary) -> str:
    if chain.witness_given and not chain.witnessed:
        return escape("witness file given, but it names no head of this log")
    return escape(f"{chain.witnessed} witnessed heads match" if chain.witness_given
                  else "not witnessed (no witness file given)")


_CHAIN_ROWS: tuple[tuple[str, Callable[[ChainSummary], str]], ...] = (
    ("verified", lambda c: "yes" if c.ok else "<b>FAILED</b>"),
    ("instances", lambda c: escape(", ".join(c.instances) or "-")),
    ("records (checkpoints included)", lambda c: f"{c.records:,}"),
    ("signed checkpoints", lambda c: f"{c.checkpoints:,}"),
    ("first and last seq", lambda c: f"{c.first_seq} to {c.last_seq}"),
    ("after the last checkpoint (unsealed)", lambda c: f"{c.unsealed:,}"),
    ("key fingerprint (SHA-256)",
     lambda c: "<br>".join(f"<code>{escape(f)}</code>" for f in c.fingerprints) or "none"),
    ("checkpoints signed by key_id", lambda c: escape(", ".join(c.keys_used) or "none")),
    ("witness", _witness),
    ("sealed after a crash, unwitnessed (seq ranges)",
     lambda c: escape(", ".join(f"{a} to {b}" for a, b in c.recovered) or "none")),
)


def _kv_table(rows: Iterable[tuple[str, Sequence[str]]]) -> str:
    return "<table>" + "".join(
        f"<tr><th>{k}</th>{''.join(f'<td>{v}</td>' for v in values)}</tr>"
        for k, values in rows) + "</table>"


def _totals(data: ReportData) -> str:
    head = "<tr><th>protocol</th><th class=n>allow</th><th class=n>deny</th>" \
           "<th class=n>total</th></tr>"
    body = []
    for protocol in data.protocols:
        allow = data.decisions.get((protocol, "allow"), 0)
        deny = data.decisions.get((protocol, "deny"), 0)
        other = sum(v for (p, o), v in data.decisions.items()
                    if p == protocol and o not in ("allow", "deny"))
        body.append(f"<tr><td>{escape(protocol)}</td><td class=n>{allow:,}</td>"
                    f"<td class=n>{deny:,}</td><td class=n>{allow + deny + other:,}</td></tr>")
    allow = sum(v for (_, o), v in data.decisions.items() if o == "allow")
    deny = sum(v for (_, o), v in data.decisions.items() if o == "deny")
    body.append(f"<tr><th>all</th><th class=n>{allow:,}</th><th class=n>{deny:,}</th>"
                f"<th class=n>{sum(data.decisions.values()):,}</th></tr>")
    events = _count_table("event", data.events.most_common(), bar=False)
    return ("<h2>Exact totals</h2><div class=grid><div><h3>Access decisions</h3>"
            f"<table>{head}{''.join(body)}</table></div><div><h3>Records by event</h3>"
            f"{events}</div></div>")


def _count_table(label: str, items: Sequence[tuple[str, int]], *, bar: bool = True) -> str:
    if not items:
        return "<p class=meta>none</p>"
    top = max(n for _, n in items) or 1
    rows = "".join(
        f"<tr><td>{escape(k)}</td><td class=n>{n:,}</td>"
        + (f'<td><span class=bar style="width:{max(1, round(120 * n / top))}px"></span></td>'
           if bar else "") + "</tr>"
        for k, n in items)
    return f"<table><tr><th>{label}</th><th class=n>count</th>{'<th></th>' if bar else ''}" \
           f"</tr>{rows}</table>"


def _top(counter: Counter[str]) -> list[tuple[str, int]]:
    return counter.most_common(TOP)


def _top_lists(data: ReportData) -> str:
    return (
        "<h2>Denies: reasons, apps, users and devices</h2>"
        f"<p>{data.deny_total:,} denies affected <b>{len(data.deny_users):,}</b> users and "
        f"<b>{len(data.deny_devices):,}</b> devices (of {len(data.users):,} users and "
        f"{len(data.devices):,} devices with a decision in the period).</p>"
        "<div class=grid>"
        f"<div><h3>Top deny reasons</h3>{_count_table('reason', _top(data.deny_reasons))}"
        "</div>"
        f"<div><h3>Top prohibited apps</h3>{_count_table('app', _top(data.deny_apps))}</div>"
        f"<div><h3>Users denied most</h3>{_count_table('user', _top(data.deny_users))}</div>"
        f"<div><h3>Devices denied most</h3>"
        f"{_count_table('device', _top(data.deny_devices))}</div>"
        f"<div><h3>Actions by person (actor)</h3>{_count_table('actor', _top(data.actors))}"
        "</div></div>"
    )


def _timeline(data: ReportData) -> str:
    if not data.timeline:
        return "<h2>Policy timeline</h2><p class=meta>No policy change in the period.</p>"
    rows = "".join(
        f"<tr><td>{escape(e.ts)}</td><td>{escape(e.event)}</td><td>{escape(e.result)}</td>"
        f"<td>{escape(e.previous or '-')} &rarr; <b>{escape(e.version or '-')}</b></td>"
        f"<td><code>{escape(e.sha256)}</code></td><td>{escape(e.actor)}</td>"
        f"<td>{escape(e.detail)}</td></tr>"
        for e in data.timeline)
    more = (f"<p class=meta>The newest {len(data.timeline):,} of {data.timeline_total:,} "
            "policy events are listed.</p>" if data.timeline_total > len(data.timeline) else "")
    return ("<h2>Policy timeline</h2><table><tr><th>time (UTC)</th><th>event</th>"
            "<th>result</th><th>version</th><th>sha256</th><th>actor</th><th>detail</th></tr>"
            f"{rows}</table>{more}")


def _denies(data: ReportData) -> str:
    columns = [c for c in _DENY_COLUMNS if not (data.no_client_ip and c[0] == "client ip")]
    head = "".join(f"<th{' class=n' if cls else ''}>{name}</th>" for name, cls in columns)
    rows = []
    for d in reversed(data.denies):  # newest first
        cells = [d.instance, str(d.seq), d.ts, d.user, d.device, d.protocol, d.listener,
                 d.client_ip, d.reasons, d.app, d.mode, d.policy_version]
        if data.no_client_ip:
            del cells[7]
        row = "".join(f"<td>{escape(c)}</td>" for c in cells)
        rows.append(f"<tr>{row}<td class=h>{escape(d.hash)}</td></tr>")
    listed = len(data.denies)
    note = (f"the newest {listed:,} of {data.deny_total:,} (at most {MAX_DENIES:,} are listed; "
            "the totals above are exact)" if data.deny_total > listed else f"all {listed:,}")
    return (
        f"<h2>Denies, newest first</h2><p>Showing {note}. Filter (every word must match): "
        '<input id=filter type=search placeholder="user, device, reason, hash..." '
        f'aria-label="filter denies"> <span id=shown>{listed}</span> shown. '
        "Click a column to sort.</p>"
        f'<div class=scroll><table id=denies><thead><tr>{head}</tr></thead><tbody>'
        f"{''.join(rows)}</tbody></table></div>"
    )


def render_report(data: ReportData) -> str:
    """The HTML of ``data`` with its chart (matplotlib is imported here, lazily)."""
    from proxy.audit.report_charts import timeline_svg

    return render_html(data, timeline_svg(data))
