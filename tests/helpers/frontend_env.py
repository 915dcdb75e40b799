"""The in-process world of a front-end test: the real gate over a SQLite posture store
and an audit log in a temporary folder, with the shipped policy, and the front end's
listeners started on it with the test PKI's certificates."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from audit_records import read_records, wait_records

from helpers.tls import Pki
from proxy.audit import AuditLog
from proxy.config import ListenerConfig, load_policy
from proxy.frontends import FrontendContext
from proxy.gate import Gate
from proxy.net.tls import server_context, upstream_context
from proxy.posture import Posture
from proxy.posture.sqlite import SqlitePostureStore

ROOT = Path(__file__).resolve().parents[2]


class FrontendEnv:
    """Gate, store and audit log in ``tmp``; ``start`` runs a listener, ``close`` ends
    them all (each with ``close_grace_s``) and then the log and the store."""

    close_grace_s = 0.5

    def __init__(self, pki: Pki, tmp: Path, signing_key: Any = None) -> None:
        self.pki, self.tmp = pki, tmp
        self.store = SqlitePostureStore(tmp / "posture.db")
        self.audit = AuditLog(tmp / "audit.jsonl", signing_key=signing_key)
        policy = load_policy(ROOT / "config" / "policy.toml")
        self.gate = Gate(store=self.store, audit=self.audit, policy=lambda: policy)
        self.listeners: list[Any] = []

    async def start(self, cfg: ListenerConfig,
                    start: Callable[[FrontendContext], Awaitable[Any]], *,
                    server_tls: bool = True) -> int:
        """Start a listener for ``cfg`` (server certificate and device CA from the PKI,
        unless ``server_tls`` is false; the upstream's CA from ``cfg``); its port."""
        tls = None
        if server_tls:
            tls = server_context(self.pki.dir / "server.pem", self.pki.dir / "server.key",
                                 client_ca=self.pki.dir / "device-ca.pem",
                                 client_cert=cfg.client_cert)
        up_tls = upstream_context(cfg.upstream_ca) if cfg.upstream_tls != "none" else None
        listener = await start(FrontendContext(cfg, self.gate, tls, up_tls))
        self.listeners.append(listener)
        port: int = listener.port
        return port

    async def put(self, p: Posture) -> None:
        """Store ``p`` as if its device had just attested."""
        assert await self.store.commit_attestation(p, None, time.time()) == "ok"

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        """The audit records so far (of ``event`` only, if given)."""
        return read_records(self.tmp / "audit.jsonl", event)

    async def wait_records(self, n: int, event: str | None = None,
                           timeout: float = 5) -> list[dict[str, Any]]:
        """The records once at least ``n`` (of ``event``) are there, or what there is
        at ``timeout``."""
        return await wait_records(self.tmp / "audit.jsonl", n, event, timeout)

    async def close(self) -> None:
        for listener in self.listeners:
            await listener.close(self.close_grace_s)
        await self.audit.close()
        await self.store.close()
