"""``mailward audit report``: the auditor's report as one self-contained HTML file
(:mod:`proxy.audit.report`, :mod:`proxy.audit.report_html`).

Exit codes: 0 the report is written and the chain holds; 1 the report is written but
the chain does not hold (its first fault is named in the report and on stderr);
2 usage or configuration error. Without a verify key the report is written with its
signatures marked unchecked and a ``warning:`` line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from proxy.cli import (
    EXIT_FAILED,
    EXIT_OK,
    UserError,
    _Add,
    _given_logs,
    _load,
    add_log_options,
)


def cmd_audit_report(args: argparse.Namespace) -> int:
    from proxy.audit import load_verify_key, read_witness_file
    from proxy.audit.command import shared_instances
    from proxy.audit.report import build_report, report_window
    from proxy.audit.report_html import render_report

    logs = _given_logs(args.log)
    keys = [Path(k) for k in args.key or ()]
    if not logs or not keys:
        cfg = _load(args) if not logs or args.config else _try_load(args)
        if cfg is not None:
            logs = logs or [cfg.audit.path]
            if not keys and cfg.audit.verify_key and cfg.audit.verify_key.exists():
                keys = [cfg.audit.verify_key]
    try:
        since, until = report_window(args.since, args.until)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    witness = None
    if args.witness:
        witness = [w for f in args.witness for w in read_witness_file(Path(f))]
    data = build_report(logs, since=since, until=until,
                        keys=[load_verify_key(k) for k in keys], witness=witness,
                        no_client_ip=args.no_client_ip,
                        export_dir=Path(args.export_dir) if args.export_dir else None)
    out = Path(args.output)
    out.write_text(render_report(data), encoding="utf-8")
    print(f"{out}: {data.selected:,} records from {since.isoformat()} to {until.isoformat()}"
          f"{f' merged from {len(logs)} logs' if len(logs) > 1 else ''}, "
          f"{data.deny_total:,} denies ({len(data.denies):,} listed), "
          f"{out.stat().st_size:,} bytes")
    for exported in data.exported:
        print(exported)
    for warning in shared_instances([(c.log, c.instances) for c in data.chains]):
        print(f"warning: {warning}", file=sys.stderr)
    broken = [c for c in data.chains if not c.ok]
    for chain in broken:
        print(f"mailward: the audit log does not verify: {chain.error}", file=sys.stderr)
    if broken:
        return EXIT_FAILED
    if not all(c.signatures_checked for c in data.chains):
        print("warning: checkpoint signatures not checked: no verify key ([audit] "
              "verify_key or --key)", file=sys.stderr)
    return EXIT_OK


def _try_load(args: argparse.Namespace) -> Any:
    """The config if there is one (``--log`` given: the config only supplies the key)."""
    try:
        return _load(args)
    except Exception:
        return None


def report_command(add: _Add, audit: Any) -> None:
    """Register ``audit report`` with :func:`proxy.cli.build_parser`'s ``add``."""
    sp = add("report", cmd_audit_report, "the auditor's report: one self-contained HTML "
             "file (chain verification, totals, charts, policy timeline, newest denies)",
             audit)
    sp.add_argument("-o", "--output", required=True, metavar="FILE.html")
    sp.add_argument("--since", help="RFC 3339 time, a date, or 30d / 24h ago (default 30d)")
    sp.add_argument("--until", help="end of the period, exclusive (default: now)")
    sp.add_argument("--export-dir", metavar="DIR",
                    help="also write every record of the period as CSV and JSON lines")
    sp.add_argument("--no-client-ip", action="store_true",
                    help="leave client addresses out of the report and the exports")
    add_log_options(sp, merged=True, checked=True)
