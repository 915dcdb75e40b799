"""One sync pass of one MDM connector, and the loop ``mailward serve`` runs.

A pass asks the connector for the devices changed since its cursor (the newest MDM
inventory time it has seen, less :data:`OVERLAP_S`), or for every device when a full
resync is due (``full_interval``) or no cursor exists yet. Page by page:

1. each device becomes MDM posture (:meth:`MdmSync.posture`): ``source``,
   ``issuer`` and ``attested_by`` are ``mdm:<name>``, ``iat`` is the MDM's last
   inventory time (so a phone whose agent stops reporting goes stale), the apps are
   sorted (and, with ``keep_apps = "policy"``, only those a rule could match);
2. the page is stored in one transaction (``mdm_commit``), which tells new and
   changed devices from ones that only checked in again;
3. every new or changed device goes through :meth:`~proxy.gate.Gate.attest_report`,
   exactly like a signed report: its ``attestation`` record, and its live sessions
   re-checked (a TikTok install ends them within the pass);
4. retired or wipe-pending devices lose their posture at once.

After a full listing that completed, devices the store holds for this connector but
the MDM no longer listed lose their posture too. With a :class:`~proxy.mdm.cursor.
CursorFile` (``mailward serve``: ``<state_dir>/mdm-<name>.cursor.json``) the cursor
and the time of the last full pass survive a restart: the first pass after it is
incremental, the full resync stays on its interval. Each pass ends with one
``mdm_sync`` record (counts and the removed devices) and its metrics. A pass that
fails (MDM unreachable, garbage, auth) changes nothing more: the posture already
stored stays until the policy's ``max_posture_age`` makes it stale.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from proxy.config.mdm import MdmConfig
from proxy.mdm import Connector, MdmDevice, Page
from proxy.mdm.cursor import CursorFile, SavedCursor, cursor_path, mdm_identity
from proxy.mdm.http import MdmError, MdmHttp
from proxy.oplog import get_logger
from proxy.posture import Posture, device_key
from proxy.posture.sqlite_mdm import MdmResult, MdmWrite, content

if TYPE_CHECKING:
    from proxy.gate import AuditSink, Gate
    from proxy.policy import Policy

log = get_logger("mailward.mdm")

#: An incremental pass re-reads devices synced this long before the cursor (devices
#: that checked in while the previous pass was listing).
OVERLAP_S = 300.0
#: ``exp`` of connector posture past ``iat`` (freshness is ``max_posture_age``).
EXP_S = 30 * 86400
#: New or changed devices attested at once (each writes an audit record).
ATTEST_CONCURRENCY = 64


class MdmObserver(Protocol):
    """Metrics of the connectors (``proxy.metrics.PrometheusObserver`` has these)."""

    def mdm_synced(self, connector: str, seconds: float, devices: int | None) -> None: ...
    def mdm_error(self, connector: str, kind: str) -> None: ...


class NullMdmObserver:
    def mdm_synced(self, connector: str, seconds: float, devices: int | None) -> None: ...
    def mdm_error(self, connector: str, kind: str) -> None: ...


class MdmStore(Protocol):
    async def mdm_commit(self, writes: list[MdmWrite], now: float) -> list[MdmResult]: ...
    async def mdm_devices(self, authority: str) -> set[str]: ...
    async def mdm_remove(self, devices: list[str], authority: str, now: float) -> list[str]: ...
    async def device_postures(self, device_id: str) -> list[Posture]: ...


@dataclass
class SyncReport:
    """What one pass did (the ``mdm_sync`` record and the CLI summary)."""

    connector: str
    full: bool
    seen: int = 0
    changed: int = 0
    newly_noncompliant: int = 0
    removed: list[str] = field(default_factory=list)
    skipped: int = 0
    malformed: int = 0
    error: str | None = None
    error_kind: str | None = None
    seconds: float = 0.0
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    def record(self) -> dict[str, Any]:
        return {
            "event": "mdm_sync", "connector": self.connector,
            "source": f"mdm:{self.connector}", "full": self.full,
            "result": "ok" if self.ok else "failed", "error": self.error,
            "error_kind": self.error_kind, "seen": self.seen, "changed": self.changed,
            "newly_noncompliant": self.newly_noncompliant, "removed": sorted(self.removed),
            "skipped": self.skipped, "malformed": self.malformed,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        kind = "full" if self.full else "incremental"
        text = (f"{self.connector}: {kind}{' (dry run)' if self.dry_run else ''}: "
                f"{self.seen} devices seen, {self.changed} changed, "
                f"{self.newly_noncompliant} newly non-compliant, {len(self.removed)} removed, "
                f"{self.malformed + self.skipped} skipped, {0 if self.ok else 1} errors "
                f"({self.seconds:.1f} s)")
        return text if self.ok else f"{text}: {self.error}"


@dataclass
class ConnectorState:
    """What ``/readyz`` shows of a connector."""

    last_success: float | None = None  # wall clock of the last pass that completed
    last_error: str | None = None  # None while the last pass succeeded
    cursor: float | None = None  # newest MDM inventory time seen
    last_full: float | None = None  # monotonic time of the last complete full pass
    last_full_at: float | None = None  # the same, wall clock (saved with the cursor)
    devices: int | None = None  # devices listed by the last complete full pass

    def degraded(self, name: str) -> str | None:
        if self.last_error is None:
            return None
        when = "never" if self.last_success is None else \
            datetime.fromtimestamp(self.last_success, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"mdm:{name} failing ({self.last_error}); last success {when}"


class MdmSync:
    """Runs passes of one connector against the gate and the store."""

    def __init__(self, cfg: MdmConfig, connector: Connector, *, store: MdmStore, gate: Gate,
                 audit: AuditSink | None, observer: MdmObserver | None = None,
                 clock: Callable[[], float] = time.time, dry_run: bool = False,
                 cursor_file: CursorFile | None = None) -> None:
        self.cfg, self.connector = cfg, connector
        self.source = cfg.source
        self.state = ConnectorState()
        self._store, self._gate, self._audit = store, gate, audit
        self._observer = observer or NullMdmObserver()
        self._clock = clock
        self._dry_run = dry_run
        self._limit = asyncio.Semaphore(ATTEST_CONCURRENCY)
        self._cursor_file = cursor_file
        self._restored = cursor_file is None

    def full_due(self) -> bool:
        last = self.state.last_full
        return (self.state.cursor is None or last is None
                or time.monotonic() - last >= self.cfg.full_interval_s)

    async def run_once(self, *, full: bool | None = None,
                       progress: Callable[[SyncReport], None] | None = None) -> SyncReport:
        """One pass (full when due, or as asked); never raises for MDM or store
        failures: they are in the report, the record and the metrics."""
        if not self._restored:
            await self._restore()
        started = time.monotonic()
        full = self.full_due() if full is None else full
        state = self.state
        since = None if full or state.cursor is None else max(state.cursor - OVERLAP_S, 0.0)
        report = SyncReport(self.cfg.name, full, dry_run=self._dry_run)
        seen: set[str] = set()
        newest = state.cursor or 0.0
        try:
            async for page in self.connector.devices(since):
                newest = max([newest, *(d.last_seen for d in page.devices)])
                await self._apply(page, report, seen)
                if progress is not None:
                    progress(report)
            if full:
                await self._remove_missing(report, seen)
        except MdmError as exc:
            report.error, report.error_kind = str(exc), exc.kind
        except (sqlite3.Error, OSError) as exc:
            report.error, report.error_kind = f"posture store: {exc}", "store"
        report.seconds = time.monotonic() - started
        self._finish(report, newest, started)
        if self._audit is not None and not self._dry_run:
            await _write_quietly(self._audit, report.record())
        return report

    def _finish(self, report: SyncReport, newest: float, started: float) -> None:
        state = self.state
        if report.ok:
            state.last_success, state.last_error = self._clock(), None
            if not self._dry_run:
                state.cursor = newest or state.cursor or self._clock()
            if report.full:
                state.last_full, state.devices = started, report.seen
                state.last_full_at = self._clock() - (time.monotonic() - started)
            if self._cursor_file is not None and not self._dry_run and state.cursor:
                self._cursor_file.save(SavedCursor(state.cursor, state.last_full_at))
            log.info("mdm sync", connector=self.cfg.name, full=report.full, seen=report.seen,
                     changed=report.changed, removed=len(report.removed),
                     malformed=report.malformed, seconds=round(report.seconds, 3))
        else:
            state.last_error = report.error_kind or "error"
            self._observer.mdm_error(self.cfg.name, state.last_error)
            log.error("mdm sync failed; keeping the posture stored", connector=self.cfg.name,
                      kind=report.error_kind, error=report.error)
        self._observer.mdm_synced(self.cfg.name, report.seconds,
                                  state.devices if report.full and report.ok else None)

    async def _restore(self) -> None:
        """The saved cursor, if it can be trusted (see :mod:`proxy.mdm.cursor`)."""
        self._restored = True
        assert self._cursor_file is not None
        now = self._clock()
        saved = self._cursor_file.load(now)
        try:
            if saved is None or not await self._store.mdm_devices(self.source):
                return
        except (sqlite3.Error, OSError):
            return  # the pass reports the store's state
        state = self.state
        state.cursor = saved.cursor
        if saved.last_full is not None and now - saved.last_full < self.cfg.full_interval_s:
            state.last_full_at = saved.last_full
            state.last_full = time.monotonic() - (now - saved.last_full)
        log.info("mdm cursor restored", connector=self.cfg.name, cursor=saved.cursor,
                 full_due=self.full_due())

    # ------------------------------------------------------------------ one page

    async def _apply(self, page: Page, report: SyncReport, seen: set[str]) -> None:
        for bad in page.malformed:
            self._observer.mdm_error(self.cfg.name, "malformed")
            log.warning("mdm device record skipped", connector=self.cfg.name, why=str(bad))
            seen.update(device_key(i) for i in bad.ids)
        report.malformed += len(page.malformed)
        report.skipped += page.skipped
        report.seen += len(page.devices)
        for d in page.devices:
            seen.update(device_key(i) for i in d.aliases)
        policy = self._gate.policy
        writes = [MdmWrite(self.posture(d, policy), d.aliases)
                  for d in page.devices if not d.gone]
        gone = [d.device_id(self.cfg.device_id) for d in page.devices if d.gone]
        if self._dry_run:
            await self._preview(writes, gone, report)
            return
        now = self._clock()
        results = await self._store.mdm_commit(writes, now) if writes else []
        if any(r.aliased for r in results):
            await self._gate.load_trust()  # re-checks must see the new aliases
        seen.update(r.device for r in results)
        changed = [(w.posture, r) for w, r in zip(writes, results, strict=True)
                   if r.outcome in ("new", "changed")]
        await asyncio.gather(*(self._attest(p, r.previous, report) for p, r in changed))
        if gone:
            await self._remove(gone, report)

    async def _attest(self, posture: Posture, previous: Posture | None,
                      report: SyncReport) -> None:
        from proxy.gate import ReportSource

        async with self._limit:
            decision, _ = await self._gate.attest_report(ReportSource("mdm"), posture)
        report.changed += 1
        was_ok = previous is None or self._gate.assess(previous, "mdm").allow
        if was_ok and not decision.allow:
            report.newly_noncompliant += 1

    async def _remove(self, devices: list[str], report: SyncReport) -> None:
        removed = await self._store.mdm_remove(devices, self.source, self._clock())
        report.removed.extend(removed)
        if removed:
            await self._gate.recheck_devices(set(removed), "mdm_removed")

    async def _remove_missing(self, report: SyncReport, seen: set[str]) -> None:
        """After a complete full listing: devices the MDM no longer lists."""
        missing = sorted(await self._store.mdm_devices(self.source) - seen)
        if not missing:
            return
        if not seen:  # an empty listing while devices are stored is an MDM fault
            raise MdmError("garbage", f"the MDM listed no devices; keeping {len(missing)}")
        if self._dry_run:
            report.removed.extend(missing)
        else:
            await self._remove(missing, report)

    async def _preview(self, writes: list[MdmWrite], gone: list[str],
                       report: SyncReport) -> None:
        """``--dry-run``: count what a pass would change, changing nothing."""
        for w in writes:
            stored = [p for p in await self._store.device_postures(w.posture.device_id)
                      if p.authority == self.source]
            previous = stored[0] if stored else None
            if previous is not None and content(previous.to_json()) == content(w.posture.to_json()):
                continue
            report.changed += 1
            was_ok = previous is None or self._gate.assess(previous, "mdm").allow
            if was_ok and not self._gate.assess(w.posture, "mdm").allow:
                report.newly_noncompliant += 1
        report.removed.extend(device_key(g) for g in gone)

    # ------------------------------------------------------------------ posture

    def posture(self, d: MdmDevice, policy: Policy) -> Posture:
        """The device as MDM posture (see the module docstring)."""
        apps: Iterable[Any] = d.apps
        if self.cfg.keep_apps == "policy":
            apps = (a for a in apps if policy.app_matters(d.platform, a.id, a.name))
        iat = int(d.last_seen)
        source = self.source
        return Posture(
            device_id=d.device_id(self.cfg.device_id), user=d.user, platform=d.platform,
            os_version=d.os_version, managed=d.managed,
            apps=tuple(sorted(set(apps), key=lambda a: (a.id, a.version, a.name))),
            iat=iat, exp=iat + EXP_S, jti=f"{source}:{d.ids['mdm_id']}:{iat}", issuer=source,
            attested_by=source, source=source, signer=source, inventory=d.inventory,
            mdm_compliance=d.compliance)


async def _write_quietly(audit: AuditSink, fields: dict[str, Any]) -> None:
    try:
        await audit.write(fields)
    except Exception as exc:  # the pass stands; readyz shows the audit log's state
        log.error("audit log unavailable", error=str(exc), audit_event=fields["event"])


# ------------------------------------------------------------------ building, looping


def open_connector(cfg: MdmConfig, http: MdmHttp) -> Connector:
    """The connector for ``cfg``; MdmError (kind ``config``) if its secret is unusable."""
    try:
        secret = cfg.secret_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise MdmError("config", f"mdm {cfg.name}: secret_file {cfg.secret_file}: {why}") \
            from None
    if not secret:
        raise MdmError("config", f"mdm {cfg.name}: secret_file {cfg.secret_file} is empty")
    if cfg.kind == "intune":
        from proxy.mdm.intune import IntuneConnector

        return IntuneConnector(cfg, secret, http)
    if cfg.kind == "jamf":
        from proxy.mdm.jamf import JamfConnector

        return JamfConnector(cfg, secret, http)
    from proxy.mdm.google import GoogleConnector

    return GoogleConnector(cfg, secret, http)


async def run_forever(sync: MdmSync) -> None:
    """The serve loop of one connector: a pass every ``interval`` (full every
    ``full_interval``). A bug in one pass is logged; the loop goes on."""
    while True:
        try:
            await sync.run_once()
        except asyncio.CancelledError:
            raise
        except Exception:
            sync.state.last_error = "internal"
            log.exception("mdm sync pass failed", connector=sync.cfg.name)
        await asyncio.sleep(sync.cfg.interval_s)


async def forget_unseen(gate: Gate, store: Any, forget_after_s: float,
                        clock: Callable[[], float] = time.time) -> int:
    """``[posture] forget_after``: forget devices whose newest posture is older
    (each a ``device_forgotten`` record). Returns how many."""
    devices = await store.not_seen_since(clock() - forget_after_s)
    for device in devices:
        await gate.forget(device, actor="mailward", via="forget_after")
    return len(devices)




class MdmRunner:
    """The connectors of ``mailward serve``: one loop each, the ``forget_after``
    sweep, and their part of ``/readyz``."""

    def __init__(self, cfg: Any, *, gate: Gate, store: Any, audit: AuditSink,
                 observer: MdmObserver) -> None:
        """Builds every connector; MdmError (kind ``config``) if one cannot be."""
        self._cfg, self._gate, self._store = cfg, gate, store
        self._http: list[MdmHttp] = []
        self.syncs: list[MdmSync] = []
        for m in cfg.mdm:
            http = MdmHttp(m.name, timeout_s=m.timeout_s)
            self._http.append(http)
            cursor = CursorFile(cursor_path(cfg.server.state_dir, m.name), mdm_identity(m))
            self.syncs.append(MdmSync(m, open_connector(m, http), store=store, gate=gate,
                                      audit=audit, observer=observer, cursor_file=cursor))

    def spawn(self, spawn: Callable[[Any, str], Any]) -> None:
        for sync in self.syncs:
            spawn(run_forever(sync), f"mdm-{sync.cfg.name}")
        spawn(self._forget_loop(), "posture-forget")

    async def _forget_loop(self) -> None:
        while True:
            try:
                forgotten = await forget_unseen(self._gate, self._store,
                                                self._cfg.posture.forget_after_s)
                if forgotten:
                    log.info("devices forgotten (forget_after)", devices=forgotten)
            except Exception as exc:
                log.error("forget_after sweep failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(FORGET_SWEEP_S)

    def degraded(self) -> list[str]:
        return [d for s in self.syncs if (d := s.state.degraded(s.cfg.name)) is not None]

    async def close(self) -> None:
        for http in self._http:
            await http.close()


#: How often ``[posture] forget_after`` is applied.
FORGET_SWEEP_S = 3600.0


__all__ = ["ConnectorState", "MdmError", "MdmObserver", "MdmRunner", "MdmSync", "NullMdmObserver",
           "SyncReport", "forget_unseen", "open_connector", "run_forever"]
