"""``mailward mdm sync [--name N] [--dry-run]``: one full pass of the configured MDM
connectors from the command line (DESIGN "MDM connectors").

Posture goes through the gate as in ``mailward serve`` (``attestation`` records, one
``mdm_sync`` record per connector; a running server applies the changes from the
store's change feed and ends the affected sessions). ``--dry-run`` reads the MDM and
the store and writes nothing. Progress goes to stderr when it is a terminal; the
summary per connector to stdout. Exit 0 when every connector synced, 1 when any
failed, 2 for a configuration error.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from proxy.cli import EXIT_FAILED, EXIT_OK, UserError, _Add, _load, _policy
from proxy.cli_gate import audit_sink, offline_gate
from proxy.cli_policy import _appending


def cmd_mdm_sync(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from proxy.oplog import configure_logging

    configure_logging(level=logging.WARNING)  # stdout is the summary
    cfg = _load(args)
    chosen = [m for m in cfg.mdm if args.name in (None, m.name)]
    if not cfg.mdm:
        raise UserError(f"{cfg.source}: no [[mdm]] connector is configured")
    if not chosen:
        names = ", ".join(m.name for m in cfg.mdm)
        raise UserError(f"{cfg.source}: no [[mdm]] named {args.name!r} (configured: {names})")
    policy = _policy(cfg)
    log = None if args.dry_run else _appending(cfg, "syncing")

    async def go() -> int:
        return await _sync_all(cfg, policy, chosen, log, dry_run=args.dry_run)

    if log is None:
        return asyncio.run(go())
    with log:  # closing seals the new records with a signed checkpoint
        return asyncio.run(go())


async def _sync_all(cfg: Any, policy: Any, chosen: list[Any], log: Any, *,
                    dry_run: bool) -> int:
    from proxy.mdm.http import MdmError, MdmHttp
    from proxy.mdm.sync import MdmSync, open_connector
    from proxy.posture import open_store

    store: Any = open_store(cfg.posture.store)
    sink = audit_sink(log)
    failed = False
    try:
        gate = await offline_gate(cfg, store, sink, policy=lambda: policy)
        for mcfg in chosen:
            http = MdmHttp(mcfg.name, timeout_s=mcfg.timeout_s)
            try:
                connector = open_connector(mcfg, http)
            except MdmError as exc:
                raise UserError(str(exc)) from None
            sync = MdmSync(mcfg, connector, store=store, gate=gate,
                           audit=None if dry_run else sink, dry_run=dry_run)
            try:
                report = await sync.run_once(full=True, progress=_progress())
            finally:
                await http.close()
            if sys.stderr.isatty():
                print(file=sys.stderr)
            print(report.summary())
            failed |= not report.ok
    finally:
        await store.close()
    return EXIT_FAILED if failed else EXIT_OK


def _progress() -> Any:
    if not sys.stderr.isatty():
        return None

    def show(report: Any) -> None:
        print(f"\r{report.connector}: {report.seen} devices read, {report.changed} changed",
              end="", file=sys.stderr, flush=True)

    return show


def mdm_commands(add: _Add, group: Any) -> None:
    sp = add("sync", cmd_mdm_sync, "one full sync pass of the MDM connectors "
             "(exit 1 if any failed)", group)
    sp.add_argument("--name", help="only this [[mdm]] connector")
    sp.add_argument("--dry-run", action="store_true",
                    help="read the MDM and report what would change; write nothing")
