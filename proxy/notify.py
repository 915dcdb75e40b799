"""Telling users: warnings before a rule's ``enforce_from`` and notices of denies.

The gate decides; a :class:`Notifier` observes its recorded decisions
(``gate.notices``, the :class:`proxy.gate.Notices` protocol) and never delays or
fails one:

* :func:`notices_for` (pure) reads a decision: an enforced deny gives ``deny``
  notices, one per reason; an allow whose violations are only pending (the rule's
  ``enforce_from`` is still ahead, the rule enforces) gives ``warning`` notices;
  report-only findings give nothing unless ``notify_report_only``; temporary denies
  (something unavailable) never give any.
* :meth:`Notifier.alert`: an IMAP login that is allowed with a pending warning is
  shown ``* OK [ALERT] <warning with the date>`` at most once per device per day
  (phones reconnect many times a day, and clients show ALERT as a dialog).
* :meth:`Notifier.decided` queues mail (``[notify] smtp``): warnings (all
  protocols; ActiveSync and SMTP clients cannot show server text) and denies, at
  most ``rate`` per device and reason [1 per day]. Workers render the templates
  (:mod:`proxy.notify_mail`), send through the relay with retries, and write one
  ``notice`` record per notice (delivered or failed, never the message). A failed
  notice still counts against the rate, so a relay that is down does not turn every
  reconnect into a record; the record names who was not told.

The rate memory is :class:`proxy.notify_memory.NoticeMemory` (``state/notices.db``),
so a restart does not send again, shared through Redis when instances share a Redis
posture store. All times are the decision's (the gate's clock).
"""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal, Protocol

from proxy.config.notify import NotifyConfig
from proxy.gate import DecisionSeen, Gate
from proxy.notify_mail import SEND_ERRORS, Relay, TemplateError, Templates, build_message
from proxy.notify_memory import NoticeMemory, SharedClaim
from proxy.oplog import get_logger
from proxy.policy import PROHIBITED_APP, Policy, ProhibitedApp, Reason
from proxy.startup import StartupError

log = get_logger("mailward.notify")

Kind = Literal["warning", "deny"]
#: Mail workers: a slow relay delays notices, never logins.
WORKERS = 4
#: IMAP ALERT warnings: once per device per this window.
ALERT_WINDOW_S = 86400.0
#: ``$why`` of notices whose reason is not a rule with a ``reason`` of its own.
DEFAULT_WHY = "The company's mail access policy requires it."
#: Shutdown waits this long for queued notices to go out.
DRAIN_S = 5.0


@dataclass(frozen=True, slots=True)
class Notice:
    """One thing to tell one user about one device."""

    kind: Kind
    user: str
    device: str  # the resolved device, the id presented, or "user:<address>"
    reason: Reason
    rule: ProhibitedApp | None
    protocol: str
    at: float  # the decision's time
    policy_version: str
    pending: bool  # a warning before the rule's enforce_from (else report-only)

    @property
    def reason_key(self) -> str:
        return f"{self.reason.code}:{self.reason.rule or self.reason.app_id or ''}"

    @property
    def key(self) -> str:
        """The rate-limit key: kind, device and reason."""
        return f"{self.kind}|{self.device}|{self.reason_key}"

    def values(self, sender: str) -> dict[str, str]:
        """What the templates fill in (``notify_mail.FIELDS``)."""
        rule, r = self.rule, self.reason
        when = datetime.fromtimestamp(self.at, UTC)
        start = rule.enforce_from if rule is not None else None
        return {
            "user": self.user, "device": self.device.removeprefix("user:"),
            "app": r.app_name or (rule.name if rule else "") or r.app_id or "",
            "why": rule.reason if rule is not None and rule.reason else DEFAULT_WHY,
            "remediation": rule.remediation if rule is not None else r.text,
            "text": r.text, "time": f"{when:%Y-%m-%d %H:%M} UTC",
            "date": f"{start:%Y-%m-%d}" if start is not None else "",
            "protocol": self.protocol, "code": r.code, "sender": sender,
        }


def notices_for(seen: DecisionSeen, *, report_only: bool = False) -> list[Notice]:
    """What this decision calls for telling the user (pure; see the module
    docstring). One notice per reason key."""
    decision, policy = seen.decision, seen.policy
    if decision.temporary:
        return []
    identity = seen.identity
    device = seen.device or identity.device_id or f"user:{identity.user_key}"
    now = datetime.fromtimestamp(seen.now, UTC)
    found: dict[str, Notice] = {}
    for reason in decision.reasons:
        rule = _rule(policy, reason)
        if not decision.allow:
            if not reason.enforced:
                continue
            kind: Kind = "deny"
            pending = False
        else:
            pending = _pending(rule, policy, now)
            if not pending and not report_only:
                continue
            kind = "warning"
        n = Notice(kind, identity.user_key, device, reason, rule, seen.origin.protocol,
                   seen.now, decision.policy_version, pending)
        found.setdefault(n.reason_key, n)
    return list(found.values())


def _rule(policy: Policy, reason: Reason) -> ProhibitedApp | None:
    if reason.code != PROHIBITED_APP or reason.rule is None:
        return None
    return next((r for r in policy.prohibited if r.name == reason.rule), None)


def _pending(rule: ProhibitedApp | None, policy: Policy, now: datetime) -> bool:
    """The rule enforces, from a date still ahead (a warning, not report-only)."""
    return (rule is not None and rule.enforce_from is not None and now < rule.enforce_from
            and (rule.mode or policy.mode) == "enforce")


class Sender(Protocol):
    async def send(self, msg: EmailMessage, recipients: list[str]) -> None: ...


RecordNotice = Callable[..., Awaitable[None]]


class Notifier:
    """The gate's :class:`~proxy.gate.Notices` observer (see the module docstring).

    ``record`` is :meth:`proxy.gate.Gate.record_notice`; ``sender`` defaults to a
    :class:`~proxy.notify_mail.Relay` when ``[notify] smtp`` is set."""

    def __init__(self, cfg: NotifyConfig, *, record: RecordNotice, state_dir: Path | None,
                 sender: Sender | None = None, shared: SharedClaim | None = None) -> None:
        self.cfg = cfg
        self._record = record
        self.memory = NoticeMemory(state_dir / "notices.db" if state_dir else None, shared)
        self.templates = Templates(cfg)
        self._sender = sender if sender is not None or not cfg.mail else Relay(cfg)
        self._queue: asyncio.Queue[Notice] = asyncio.Queue(cfg.queue_max)
        self._queued: set[str] = set()  # keys waiting in the queue
        self._workers: list[asyncio.Task[None]] = []
        self._records: set[asyncio.Task[Any]] = set()

    @property
    def mails(self) -> bool:
        return self._sender is not None

    async def start(self) -> None:
        """Load the rate memory and start the mail workers."""
        await asyncio.to_thread(self.memory.load, time.time())
        if self.mails:
            loop = asyncio.get_running_loop()
            self._workers = [loop.create_task(self._work(), name=f"notify-{i}")
                             for i in range(WORKERS)]

    async def close(self, drain_s: float = DRAIN_S) -> None:
        """Give queued notices ``drain_s`` to go out, then stop; keep the memory."""
        if self._workers:  # queued, and taken but not yet sent
            try:
                async with asyncio.timeout(drain_s):
                    await self._queue.join()
            except TimeoutError:
                log.warning("notices not sent at shutdown", queued=self._queue.qsize())
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, *self._records, return_exceptions=True)
        self._workers = []
        await self.memory.close()

    # ------------------------------------------------------------ observing

    def decided(self, seen: DecisionSeen) -> None:
        """Queue the mail this decision calls for (``Notices.decided``)."""
        if not self.mails:
            return
        try:
            for n in notices_for(seen, report_only=self.cfg.notify_report_only):
                if n.kind == "warning" and not self.cfg.warnings:
                    continue
                if n.key in self._queued or not self._allows(n):
                    continue
                self._queue.put_nowait(n)
                self._queued.add(n.key)
        except asyncio.QueueFull:
            log.warning("notice queue full; notice dropped", user=seen.identity.user_key,
                        queued=self._queue.qsize())
        except Exception as exc:  # never fail a decision
            log.error("queueing a notice failed", error=f"{type(exc).__name__}: {exc}")

    async def alert(self, seen: DecisionSeen) -> str | None:
        """The pending warnings to show an IMAP login now, once per device per day
        (``Notices.alert``; across instances when shared); each shown alert is a
        ``notice`` record."""
        try:
            warnings = [n for n in notices_for(seen) if n.pending]
            if not warnings:
                return None
            key = f"alert|{warnings[0].device}"
            if not await self.memory.claim(key, seen.now, 1, ALERT_WINDOW_S):
                return None
            for n in warnings:
                self._spawn_record(n, "imap_alert", "delivered")
            return " ".join(dict.fromkeys(n.reason.text for n in warnings))
        except Exception as exc:  # never fail a login
            log.error("IMAP alert failed", error=f"{type(exc).__name__}: {exc}")
            return None

    def _allows(self, n: Notice) -> bool:
        return self.memory.allows(n.key, n.at, self.cfg.rate_count, self.cfg.rate_window_s)

    def _spawn_record(self, n: Notice, channel: str, result: str, **extra: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._write(n, channel, result, **extra))
        self._records.add(task)
        task.add_done_callback(self._records.discard)

    async def _write(self, n: Notice, channel: str, result: str, **extra: Any) -> None:
        fields = {"protocol": n.protocol, "policy_version": n.policy_version,
                  "rule": n.reason.rule, "app_id": n.reason.app_id, **extra}
        await self._record(n.user, n.device, n.reason.code, n.kind, channel, result,
                           **{k: v for k, v in fields.items() if v is not None})

    # -------------------------------------------------------------- sending

    async def _work(self) -> None:
        while True:
            n = await self._queue.get()
            try:
                self._queued.discard(n.key)
                if await self.memory.claim(n.key, n.at, self.cfg.rate_count,
                                           self.cfg.rate_window_s):  # a twin may have gone
                    await self._deliver(n)
            except Exception as exc:
                log.error("notice failed", error=f"{type(exc).__name__}: {exc}")
            finally:
                self._queue.task_done()

    async def _deliver(self, n: Notice) -> None:
        """Render, send (retrying), and record the outcome."""
        to = self.address(n.user)
        if to is None:
            await self._write(n, "mail", "failed", error="no address for this user",
                              attempts=0)
            return
        try:
            subject, plain, rich = self.templates.render(n.kind, to, n.values(self.cfg.sender))
        except (TemplateError, OSError, UnicodeError) as exc:
            await self._write(n, "mail", "failed", error=str(exc)[:200], attempts=0)
            return
        msg = build_message(self.cfg, to, subject, plain, rich, n.kind)
        recipients = [to, self.cfg.admin_copy] if self.cfg.admin_copy else [to]
        error, attempts = await self._send(msg, recipients)
        extra: dict[str, Any] = {"attempts": attempts, "admin_copy": bool(self.cfg.admin_copy)}
        if error:
            log.warning("notice not delivered", user=n.user, kind=n.kind, error=error)
            await self._write(n, "mail", "failed", error=error, **extra)
        else:
            await self._write(n, "mail", "delivered", **extra)

    async def _send(self, msg: EmailMessage, recipients: list[str]) -> tuple[str, int]:
        """Up to ``1 + retries`` attempts, the delay doubling; ("", attempts) once
        sent, else (the last error, attempts)."""
        assert self._sender is not None
        delay, error = self.cfg.retry_delay_s, ""
        for attempt in range(1, self.cfg.retries + 2):
            try:
                await self._sender.send(msg, recipients)
                return "", attempt
            except SEND_ERRORS as exc:
                error = f"{type(exc).__name__}: {exc}"[:200]
            if attempt <= self.cfg.retries:
                await asyncio.sleep(delay)
                delay *= 2
        return error, self.cfg.retries + 1

    def address(self, user: str) -> str | None:
        """Where a login's notices go: the login if it is an address, else the login
        at ``[notify] user_domain``."""
        if "@" in user:
            return user
        return f"{user}@{self.cfg.user_domain}" if self.cfg.user_domain and user else None


async def start_notifier(gate: Gate, cfg: NotifyConfig, state_dir: Path,
                         store: Any = None) -> Notifier:
    """The server's notifier, started and observing ``gate``; a relay set-up that
    cannot work (unreadable credentials or CA file) is a :class:`StartupError`. A
    posture ``store`` that can (Redis) shares the notice rate between instances."""
    try:
        notifier = Notifier(cfg, record=gate.record_notice, state_dir=state_dir,
                            shared=getattr(store, "claim_notice", None))
        await notifier.start()
    except (OSError, ValueError, sqlite3.Error, ssl.SSLError) as exc:
        raise StartupError(f"notify: {exc}") from None
    gate.notices = notifier
    return notifier


__all__ = ["ALERT_WINDOW_S", "Notice", "Notifier", "Sender", "notices_for", "start_notifier"]
