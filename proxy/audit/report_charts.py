"""The auditor's report, part two: the time chart, drawn by matplotlib's SVG backend
and inlined in the HTML.

One figure: a row per protocol with allows and denies per time bucket, and a last
row with the policy timeline, all on one shared time axis; every policy change is a
vertical line through every row. matplotlib is imported here only (about 0.3 s),
never at CLI start-up; the Agg-free ``FigureCanvasSVG`` is used directly, without
pyplot's global state, so concurrent reports (API threads) do not share figures.

The SVG is made small for e-mail: text stays text (``svg.fonttype = none``), the
XML prolog, DOCTYPE, comments and ``<metadata>`` are removed, ids are prefixed so two
charts in one page cannot clash, and there are at most
:data:`proxy.audit.report.MAX_BUCKETS` points per series.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from proxy.audit.report import ReportData

ALLOW_COLOUR, DENY_COLOUR, POLICY_COLOUR = "#2b8a3e", "#c92a2a", "#5f3dc4"
_TIMELINE_MARKERS = {"policy_reload": "o", "policy_rollback": "X", "policy_push": "^",
                     "policy_preview": "s"}


def timeline_svg(data: ReportData) -> str:
    """Allow/deny over time per protocol plus the policy timeline, as inline SVG."""
    from matplotlib import rcParams
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure

    protocols = data.protocols or ["(no decisions)"]
    rows = len(protocols) + 1
    with _svg_settings(rcParams):
        fig = Figure(figsize=(10, 1.7 * len(protocols) + 1.4), layout="constrained")
        FigureCanvasSVG(fig)
        axes = fig.subplots(rows, 1, sharex=True,
                            height_ratios=[3] * len(protocols) + [1.4])
        edges = [data.bucket_start(i) for i in range(_bucket_count(data) + 1)]
        changes = [datetime.fromisoformat(e.ts) for e in data.timeline
                   if e.event != "policy_preview" and e.result == "applied"]
        for ax, protocol in zip(axes[:-1], protocols, strict=True):
            _protocol_row(ax, data, protocol, edges)
            for moment in changes:
                ax.axvline(moment, color=POLICY_COLOUR, linewidth=0.8, alpha=0.6)
        _policy_row(axes[-1], data, changes)
        axes[-1].set_xlim(data.since, data.until)
        locator = AutoDateLocator()  # type: ignore[no-untyped-call]
        axes[-1].xaxis.set_major_locator(locator)
        axes[-1].xaxis.set_major_formatter(
            ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None,
                                                    "Format": None, "Type": None})
    return slim_svg(buffer.getvalue(), prefix="tl")


def _bucket_count(data: ReportData) -> int:
    span = (data.until - data.since).total_seconds()
    return max(1, -(-int(span) // data.bucket_s))


def _protocol_row(ax: Any, data: ReportData, protocol: str, edges: list[datetime]) -> None:
    for outcome, colour in (("allow", ALLOW_COLOUR), ("deny", DENY_COLOUR)):
        counts: Mapping[int, int] = data.series.get((protocol, outcome), {})
        values = [counts.get(i, 0) for i in range(len(edges) - 1)]
        total = data.decisions.get((protocol, outcome), 0)
        ax.stairs(values, edges, color=colour, fill=outcome == "deny", alpha=0.85
                  if outcome == "allow" else 0.35, linewidth=1.2,
                  label=f"{outcome} ({total:,})")
    ax.set_ylabel(protocol)
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1), ncols=2, fontsize=8, frameon=False,
              borderaxespad=0)


def _policy_row(ax: Any, data: ReportData, changes: list[datetime]) -> None:
    ax.set_yticks([])
    ax.set_ylabel("policy")
    ax.set_ylim(0, 1)
    for moment in changes:
        ax.axvline(moment, color=POLICY_COLOUR, linewidth=0.8, alpha=0.6)
    for i, event in enumerate(data.timeline):
        at = datetime.fromisoformat(event.ts)
        y = 0.2 + 0.3 * (i % 3)
        ax.plot([at], [y], marker=_TIMELINE_MARKERS.get(event.event, "o"),
                color=POLICY_COLOUR, markersize=6)
        if len(data.timeline) <= 40:
            label = f"{event.version or '?'} ({event.actor})"
            ax.annotate(label, (at, y), xytext=(4, 0), textcoords="offset points",
                        fontsize=7, va="center", color=POLICY_COLOUR)


class _svg_settings:
    """rcParams for small SVG, restored afterwards (matplotlib's rc_context, which
    this avoids importing pyplot for)."""

    SETTINGS: ClassVar[dict[str, Any]] = {
        "svg.fonttype": "none", "svg.hashsalt": "mailward-report",
        "font.family": "sans-serif", "font.size": 9, "axes.spines.top": False,
        "axes.spines.right": False,
    }

    def __init__(self, rc: Any) -> None:
        self.rc = rc
        self.saved: dict[str, Any] = {}

    def __enter__(self) -> None:
        self.saved = {k: self.rc[k] for k in self.SETTINGS}
        self.rc.update(self.SETTINGS)

    def __exit__(self, *exc: object) -> None:
        self.rc.update(self.saved)


_PROLOG = re.compile(r"<\?xml[^>]*\?>|<!DOCTYPE[^>]*>|<!--.*?-->|<metadata>.*?</metadata>",
                     re.DOTALL)
_IDS = re.compile(r'(id="|url\(#|href="#)([A-Za-z_][\w.-]*)')


def slim_svg(svg: str, *, prefix: str) -> str:
    """An SVG document made fit to inline: no prolog, DOCTYPE, comments or metadata,
    ids prefixed with ``prefix``, and no fixed size (it scales with the page)."""
    svg = _PROLOG.sub("", svg).strip()
    svg = _IDS.sub(lambda m: f"{m.group(1)}{prefix}-{m.group(2)}", svg)
    svg = re.sub(r'(<svg[^>]*?) width="[^"]*" height="[^"]*"', r"\1", svg, count=1)
    return re.sub(r">\s+<", "><", svg)
