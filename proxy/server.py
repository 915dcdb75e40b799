"""``mailward serve``: one asyncio process running every listener in the config.

How the parts fit:

* :func:`run` loads the config and the policy, picks the event loop (uvloop when
  importable, stdlib asyncio otherwise) and runs a :class:`Server`. Start-up errors
  (bad config, missing certificate, unreadable key, port in use) are one line on
  stderr and exit code 2; a clean SIGTERM/SIGINT shutdown is exit code 0.
* :class:`Server` owns the long-lived objects: the posture store, the audit log, the
  :class:`PolicyHolder` (the one place the current policy lives), the metrics
  observer (created once, handed to the gate; everything else reports through
  ``gate.observer``), the :class:`~proxy.gate.Gate`, the listeners (each started
  by its protocol's front end module, ``proxy.frontends.<protocol>.start``) and the
  control-plane API.
* Hot reload: SIGHUP and a change of the policy file (watchfiles) both call
  :meth:`Server.reload`. A valid policy is swapped in atomically (one attribute
  assignment on the event loop), recorded as a ``policy_reload`` audit record, and
  then every live session is re-checked (continuous access evaluation); an invalid
  one is refused, logged with file:line, counted and recorded, and the old policy
  stays.
* A periodic sweep (``[server] recheck_interval``) ends sessions whose posture aged
  past ``max_posture_age``.
* Device trust: the gate's trust records are loaded at start and kept current by a
  poll of the store's change feed every :data:`TRUST_POLL_S` (``mailward device
  revoke`` in another process ends the device's sessions within it); the same loop
  reloads changed CRL files (``[trust] crl``) and re-checks every session when one
  changed. A CRL past nextUpdate is named in ``/readyz``'s ``degraded`` list.
* Limits and health: one :class:`~proxy.net.limits.Limits` (``gate.limits``,
  installed for the accept loops); :class:`~proxy.upkeep.Upkeep` flushes abuse
  summaries, applies ``mailward limits reset``, probes an unhealthy audit log and
  trims memory after bursts.
* Shutdown: stop accepting, give sessions ``[server] shutdown_grace`` to finish, end
  the rest with the protocol's goodbye, close the audit log (final signed checkpoint).
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from proxy import metrics
from proxy.config import Config, ConfigError, load_config, load_policy
from proxy.frontends import FrontendContext, RunningListener
from proxy.gate import Gate
from proxy.net import limits, listener
from proxy.net.limits import Limits
from proxy.net.tls import server_context
from proxy.oplog import configure_logging, get_logger
from proxy.policies.live import LivePolicy
from proxy.policy import Policy
from proxy.startup import (
    StartupError,
    audit_log,
    bind_error,
    build_tls,
    frontend_module,
    require_file,
    settle_heap,
    trust_anchors,
)
from proxy.upkeep import Upkeep, raise_fd_limit

log = get_logger("mailward.server")

EXIT_OK = 0
EXIT_ERROR = 2

#: Time a listener gets beyond ``shutdown_grace`` to say goodbye and close.
CLOSE_MARGIN_S = 5.0
#: How often the store's change feed (CLI revocations) and the CRL files are polled.
TRUST_POLL_S = 0.5
EXPIRY_REFRESH_S = 3600.0

class PolicyHolder:
    """The current policy. ``current`` is what the gate calls on every decision;
    ``swap`` replaces it in one assignment, so a decision sees the old or the new
    policy, never a mix."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy

    def current(self) -> Policy:
        return self._policy

    def swap(self, new: Policy) -> Policy:
        old, self._policy = self._policy, new
        return old


# ------------------------------------------------------------------ server


class Server:
    """Everything ``mailward serve`` runs, with an explicit start and stop."""

    def __init__(self, cfg: Config, policy: Policy) -> None:
        self.cfg = cfg
        self.holder = PolicyHolder(policy)
        self._reload_lock = asyncio.Lock()
        self.store: Any = None
        self.audit: Any = None
        self.gate: Gate | None = None
        self.observer = metrics.PrometheusObserver()
        self.limits: Limits | None = None
        self.upkeep: Upkeep | None = None
        self.listeners: list[RunningListener] = []
        self.api: Any = None  # proxy.api.RunningApi
        self.nginx: Any = None  # proxy.nginx.RunningNginxListener ([nginx])
        self.verifier: Any = None  # proxy.attestation.Verifier
        self.crl: Any = None  # proxy.crl.CrlSet
        self.mdm: Any = None  # proxy.mdm.sync.MdmRunner
        self.notifier: Any = None  # proxy.notify.Notifier (gate.notices)
        self.policies = LivePolicy(cfg, self.holder, self.observer, self._reload_lock,
                                   self._audit_write)
        self.draining = False
        self.started = False
        self._stop = asyncio.Event()
        self._stop_watch = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -------------------------------------------------------------- start

    async def start(self) -> None:
        cfg = self.cfg
        contexts = [build_tls(cfg, lc) for lc in cfg.listeners]  # fail before binding
        modules = [frontend_module(lc.protocol) for lc in cfg.listeners]
        await self._open_state()
        gate = await self._build_gate()
        await self._start_listeners(gate, contexts, modules)
        if cfg.nginx is not None:  # plain-HTTP loopback listener for nginx's auth_http
            from proxy.nginx import start as start_nginx

            self.nginx = await start_nginx(cfg, gate, {
                lc.name: up for lc, (_, up) in zip(cfg.listeners, contexts, strict=True)})
        await self._start_api()
        if not self.audit.healthy:  # sessions are refused (fail closed) until it recovers
            log.error("audit log not writable; new sessions will be refused",
                      path=str(cfg.audit.path), error=self.audit.last_error)
        self.started = True
        policy = self.holder.current()
        log.info("started", listeners=len(self.listeners), policy_version=policy.version,
                 policy_sha256=policy.sha256, loop=type(asyncio.get_running_loop()).__module__)

    async def _open_state(self) -> None:
        """The state directory, the posture store and the audit log."""
        cfg = self.cfg
        try:
            if not cfg.server.state_dir.exists():
                cfg.server.state_dir.mkdir(mode=0o700, parents=True)
            cfg.audit.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"server.state_dir: cannot create {exc.filename}: "
                               f"{exc.strerror}") from None

        from proxy.posture import open_store

        try:
            self.store = open_store(cfg.posture.store, state_dir=cfg.server.state_dir,
                                    cache_max_age_s=cfg.posture.cache_max_age_s)
            await self.store.ping()
        except Exception as exc:
            raise StartupError(f"posture.store: cannot open {cfg.posture.store}: {exc}") from None
        self.audit = audit_log(cfg)
        try:
            await self.audit.start(self.observer)  # reports the witness queue
        except OSError as exc:
            raise StartupError(f"audit.path: cannot open {cfg.audit.path}: {exc.strerror}") \
                from None

    async def _build_gate(self) -> Gate:
        """Trust anchors, limits, the gate and what feeds it: device trust, the policy
        in force, notices and the MDM connectors."""
        cfg = self.cfg
        self.verifier, self.crl = trust_anchors(cfg)
        raise_fd_limit()
        self.limits = Limits(cfg.limits, on_hit=self.observer.limit_hit)
        limits.install(self.limits)  # accept loops the front ends start count through it
        self.gate = Gate(store=self.store, audit=metrics.TimedAuditSink(self.audit),
                         policy=self.holder.current, observer=self.observer,
                         crl=lambda: self.crl, limits=self.limits)
        self.upkeep = Upkeep(self.gate, self.audit, cfg.server.state_dir)
        self.gate.on_revoked(self.verifier.forget_device)
        try:
            await self.gate.load_trust()
        except Exception as exc:
            raise StartupError(f"posture.store: cannot read device trust records: {exc}") \
                from None
        self.policies.use_pointer(self.store)  # state/, or Redis when scaled out
        await self.policies.at_start()  # the pointer's policy, or the file (proxy.policies)
        self.observer.policy_loaded(self.holder.current())
        from proxy.notify import start_notifier  # [notify]: warnings and deny notices

        self.notifier = await start_notifier(self.gate, cfg.notify, cfg.server.state_dir,
                                             self.store)  # Redis: the rate is shared
        from proxy.mdm.sync import MdmError, MdmRunner  # the [[mdm]] connectors
        try:
            self.mdm = MdmRunner(cfg, gate=self.gate, store=self.store, observer=self.observer,
                                 audit=metrics.TimedAuditSink(self.audit))
        except MdmError as exc:
            raise StartupError(str(exc)) from None
        return self.gate

    async def _start_listeners(
        self, gate: Gate, contexts: list[tuple[ssl.SSLContext | None, ssl.SSLContext | None]],
        modules: list[Any],
    ) -> None:
        """Each ``[[listeners]]`` entry bound by its front end (PROXY protocol expected
        from ``trusted_proxies`` where the listener says so)."""
        cfg = self.cfg
        for lc, (server_tls, upstream_tls), module in zip(
            cfg.listeners, contexts, modules, strict=True
        ):
            ctx = FrontendContext(
                listener=lc, gate=gate, server_tls=server_tls, upstream_tls=upstream_tls
            )
            listener.expect_proxy_protocol(lc.host, lc.port, listener.ProxyProtocol.of(
                cfg.server.trusted_proxies) if lc.proxy_protocol else None)
            try:
                running = await module.start(ctx)
            except OSError as exc:
                raise bind_error(f"listeners.{lc.name}", lc.host, lc.port, exc) from None
            finally:
                listener.expect_proxy_protocol(lc.host, lc.port, None)
            self.listeners.append(running)
            gate.limits.names[running.port] = lc.name
            log.info("listening", listener=lc.name, protocol=lc.protocol,
                     address=f"{lc.host}:{running.port}", tls=lc.tls, upstream=lc.upstream)

    async def _start_api(self) -> None:
        try:
            from proxy import api
        except ModuleNotFoundError as exc:
            if exc.name != "proxy.api":
                raise StartupError(f"api cannot load: {exc}") from None
            log.warning("no control-plane API in this build; /healthz is not served")
            return
        cfg = self.cfg
        ssl_ctx = None
        if cfg.api.tls:
            require_file(cfg.tls.cert, "tls.cert")
            require_file(cfg.tls.key, "tls.key")
            ssl_ctx = server_context(cfg.tls.cert, cfg.tls.key, client_ca=None,
                                     client_cert="none")
        try:
            tokens = api.load_tokens(cfg.api)
        except (OSError, ValueError) as exc:
            raise StartupError(f"api tokens: {exc}") from None
        assert self.gate is not None
        app = api.make_app(
            gate=self.gate,
            store=self.store,
            policy=self.holder.current,
            audit=self.audit,
            verifier=self.verifier,
            tokens=tokens,
            report=api.AuditReports(cfg.audit.path, tuple(filter(None, [cfg.audit.verify_key]))),
            readiness=self.readiness,
            max_body_bytes=cfg.api.max_body_bytes,
            degraded=self.degraded,
        )
        api.add_policy_preview(app, self.policies.preview)
        from proxy.policies.routes import add_policy_changes  # rollback, push (operate)

        add_policy_changes(app, self.policies, self.gate)
        try:
            self.api = await api.start_api(cfg.api, app, ssl_ctx)
        except OSError as exc:
            raise bind_error("api.listen", cfg.api.host, cfg.api.port, exc) from None
        log.info("api listening", address=f"{cfg.api.host}:{self.api.port}", tls=cfg.api.tls)

    # -------------------------------------------------------------- health

    def readiness(self) -> dict[str, bool]:
        """The server's part of /readyz (the API adds the store ping and the audit
        log's health itself)."""
        return {
            "listeners_bound": len(self.listeners) == len(self.cfg.listeners),
            "accepting": not self.draining,
            "audit_writable": bool(self.audit is not None and self.audit.healthy),
            "policy_loaded": self.holder.current() is not None,
        }

    def degraded(self) -> list[str]:
        """What ``/readyz`` names without failing: CRLs past their nextUpdate, Redis
        unreachable (decisions from the cache), a policy other instances use that this
        one could not load, MDM connectors whose last pass failed, a policy file the
        policy guard refused."""
        store_says = getattr(self.store, "degraded", None)
        names = list(store_says()) if store_says is not None else []
        names += self.mdm.degraded() if self.mdm else []
        names += self.policies.degraded()
        if self.crl:
            names += [f"crl_past_next_update:{p}" for p in self.crl.stale(time.time())]
        return names

    # -------------------------------------------------------------- running

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("background task failed", task=task.get_name(),
                      error=f"{type(exc).__name__}: {exc}")

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            log.warning("already shutting down", signal=sig.name)
            return
        log.info("shutting down", signal=sig.name, grace_s=self.cfg.server.shutdown_grace_s)
        self._stop.set()

    def _on_sighup(self) -> None:
        self._spawn(self.reload("sighup"), "reload")

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT (or :meth:`stop`)."""
        self._spawn(self._watch_policy(), "watch-policy")
        self._spawn(self._recheck_loop(), "recheck")
        self._spawn(self._trust_loop(), "trust")
        assert self.upkeep is not None
        self._spawn(self.policies.watch(self.upkeep.gate), "policy-pointer")  # rollback, push
        self._spawn(self.upkeep.run(), "upkeep")
        if self.mdm is not None:
            self.mdm.spawn(self._spawn)
        self._spawn(self._expiry_loop(), "cert-expiry")
        await self._stop.wait()

    async def _expiry_loop(self) -> None:
        """``mailward_cert_expiry_seconds``, refreshed hourly (files may be renewed)."""
        from proxy import expiry

        while True:
            for key, _path, left in expiry.remaining(self.cfg, time.time()):
                self.observer.cert_expiry(key, left)
            await asyncio.sleep(EXPIRY_REFRESH_S)

    def stop(self) -> None:
        self._stop.set()

    async def _recheck_loop(self) -> None:
        assert self.gate is not None
        await self._every(max(self.cfg.server.recheck_interval_s, 0.1), self.gate.recheck_all,
                          failed="posture sweep failed",
                          ended="sessions ended by posture sweep")

    async def _trust_loop(self) -> None:
        await self._every(TRUST_POLL_S, self._sync_trust, failed="device trust sync failed",
                          ended="sessions ended by device trust changes")

    @staticmethod
    async def _every(interval_s: float, sweep: Callable[[], Awaitable[int]], *,
                     failed: str, ended: str) -> None:
        """Run ``sweep`` (it returns how many sessions it ended) every ``interval_s``
        seconds, for ever; a failure is logged as ``failed`` and the next round comes."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                count = await sweep()
            except Exception as exc:
                log.error(failed, error=f"{type(exc).__name__}: {exc}")
                continue
            if count:
                log.info(ended, ended=count)

    async def _sync_trust(self) -> int:
        """Apply the store's change feed (revocations, bindings, aliases and posture
        written by other processes) and reload changed CRL files; returns the sessions
        ended."""
        assert self.gate is not None
        ended = await self.gate.sync_changes()
        if self.crl and self.crl.reload_if_changed():
            ended += await self.gate.recheck_all("crl_reload")
        return ended

    async def _watch_policy(self) -> None:
        """Reload when the policy file changes. The directory is watched, not the
        file: editors and ConfigMaps replace files by rename, which a watch on the
        old inode would miss. Content hashing filters out unrelated events."""
        from watchfiles import awatch

        directory = Path(self.cfg.server.policy).resolve().parent
        try:
            async for _ in awatch(directory, stop_event=self._stop_watch, recursive=False,
                                  debounce=400, step=50, rust_timeout=500):
                await self.reload("file_change")
        except Exception as exc:  # inotify limits, vanished directory: SIGHUP still works
            log.warning("policy file watch stopped; reload with SIGHUP",
                        directory=str(directory), error=str(exc))

    # -------------------------------------------------------------- reload

    async def reload(self, trigger: str) -> bool:
        """Load the policy file again; True if a new policy was applied
        (:meth:`proxy.policies.live.LivePolicy.reload`)."""
        assert self.gate is not None
        return await self.policies.reload(self.gate, trigger)

    async def _audit_write(self, fields: dict[str, Any]) -> None:
        try:
            await self.audit.write(fields)
        except Exception as exc:  # the reload itself stands; the log reports the gap
            log.error("audit log unavailable", error=str(exc), audit_event=fields["event"])

    # -------------------------------------------------------------- shutdown

    async def close(self) -> None:
        """Stop accepting, end sessions after the grace period, seal the audit log."""
        self.draining = True
        self._stop_watch.set()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        grace = self.cfg.server.shutdown_grace_s
        closing = {
            asyncio.ensure_future(lst.close(grace)): lst.name for lst in self.listeners
        }
        if closing:
            # A listener that overstays its grace must not keep the process (and the
            # final checkpoint) hostage: the orchestrator would SIGKILL us anyway.
            done, late = await asyncio.wait(closing, timeout=grace + CLOSE_MARGIN_S)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error("listener did not close cleanly", listener=closing[task],
                              error=str(task.exception()))
            for task in late:
                log.error("listener still closing after the grace period; abandoning it",
                          listener=closing[task], grace_s=grace)
                task.cancel()
        self.listeners.clear()
        if self.upkeep is not None:  # re-checks still running, then the abuse counts
            await self.upkeep.gate.settle(timeout=CLOSE_MARGIN_S)
            await self.upkeep.flush_abuse()
            limits.install(None)
        if self.api is not None:
            await _quietly(lambda: self.api.close(1.0), "api")
            self.api = None
        if self.nginx is not None:
            await _quietly(lambda: self.nginx.close(1.0), "nginx listener")
            self.nginx = None
        if self.mdm is not None:
            await _quietly(self.mdm.close, "mdm connectors")
        if self.notifier is not None:  # queued notices get a moment, then their records
            await _quietly(self.notifier.close, "notifier")
        if self.audit is not None:
            await _quietly(self.audit.close, "audit log")  # writes the final checkpoint
        if self.store is not None:
            await _quietly(self.store.close, "posture store")
        if self.started:  # a failed start-up says one line only (the error)
            log.info("stopped")


async def _quietly(fn: Callable[[], Awaitable[Any]], what: str) -> None:
    try:
        await fn()
    except Exception as exc:
        log.error(f"closing {what} failed", error=f"{type(exc).__name__}: {exc}")


# ------------------------------------------------------------------ entry point


async def _main(cfg: Config, policy: Policy) -> int:
    server = Server(cfg, policy)
    server.install_signal_handlers()
    try:
        await server.start()
    except StartupError as exc:
        await server.close()
        _say(str(exc))
        return EXIT_ERROR
    settle_heap()
    try:
        await server.serve()
    finally:
        await server.close()
    return EXIT_OK


def _say(message: str) -> None:
    print(f"mailward: {message}", file=sys.stderr, flush=True)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop (~10x less memory per idle TLS session) unless unavailable or
    ``MAILWARD_LOOP=asyncio``."""
    if os.environ.get("MAILWARD_LOOP", "").lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(config_path: Path | str) -> int:
    """``mailward serve``: exit 0 after a clean shutdown, 2 if it cannot start."""
    configure_logging()
    try:
        cfg = load_config(config_path)
        policy = load_policy(cfg.server.policy)
    except ConfigError as exc:
        _say(str(exc))
        return EXIT_ERROR
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_main(cfg, policy))
    except StartupError as exc:
        _say(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return EXIT_OK


__all__ = ["PolicyHolder", "Server", "StartupError", "configure_logging", "run"]
