"""What ``mailward serve`` builds from the configuration before it listens: TLS
contexts per listener, the front-end modules, the audit log and the trust anchors.
Every failure is a :class:`StartupError` naming the setting and the file, so the
server exits 2 with one line instead of a traceback.
"""

from __future__ import annotations

import gc
import importlib
import os
import ssl
from pathlib import Path
from typing import Any, Final

from proxy.config import Config, ConfigError, ListenerConfig
from proxy.net.listener import bind_failure
from proxy.net.tls import server_context, upstream_context


class StartupError(Exception):
    """The server cannot start; ``str()`` is the one line shown to the operator."""


# ------------------------------------------------------------------ policy


def require_file(path: Path | None, key: str) -> None:
    if path is None:
        return
    if not path.exists():
        raise StartupError(f"{key}: file not found: {path} (mailward certs init creates it)")
    if not os.access(path, os.R_OK):
        raise StartupError(f"{key}: cannot read {path}: permission denied")


def build_tls(cfg: Config, lc: ListenerConfig) -> tuple[ssl.SSLContext | None,
                                                        ssl.SSLContext | None]:
    """(server context, upstream context) for one listener; StartupError if a file is
    missing or unusable."""
    server_tls = None
    if lc.tls != "none":
        require_file(cfg.tls.cert, "tls.cert")
        require_file(cfg.tls.key, "tls.key")
        client_ca = cfg.tls.client_ca if lc.client_cert != "none" else None
        require_file(client_ca, "tls.client_ca")
        try:
            server_tls = server_context(
                cfg.tls.cert, cfg.tls.key, client_ca=client_ca, client_cert=lc.client_cert
            )
        except ssl.SSLError as exc:
            raise StartupError(
                f"tls.cert/tls.key: cannot load {cfg.tls.cert} with {cfg.tls.key}: "
                f"{exc.reason or exc}"
            ) from None
        except OSError as exc:
            raise StartupError(f"tls: {exc.filename or cfg.tls.cert}: {exc.strerror}") from None
    upstream_tls = None
    plain_http = lc.protocol == "activesync" and lc.upstream.startswith("http://")
    if lc.upstream_tls != "none" and not plain_http:
        require_file(lc.upstream_ca, f"listeners.{lc.name}.upstream_ca")
        try:
            upstream_tls = upstream_context(lc.upstream_ca)
        except (ssl.SSLError, OSError) as exc:
            raise StartupError(
                f"listeners.{lc.name}.upstream_ca: cannot load {lc.upstream_ca}: {exc}"
            ) from None
    return server_tls, upstream_tls


def frontend_module(protocol: str) -> Any:
    """``proxy.frontends.<protocol>``, imported only when a listener needs it."""
    name = f"proxy.frontends.{protocol}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:  # the module exists but one of its imports is missing
            raise StartupError(f"{protocol} front end cannot load: {exc}") from None
        raise StartupError(
            f"no {protocol} front end in this build (proxy/frontends/{protocol}.py missing)"
        ) from None
    if not callable(getattr(module, "start", None)):
        raise StartupError(f"{name} has no start(ctx) function")
    return module


def bind_error(what: str, host: str, port: int, exc: OSError) -> StartupError:
    return StartupError(f"{what}: cannot listen on {host}:{port}: {bind_failure(exc)}")


def audit_log(cfg: Config) -> Any:
    from proxy.audit import open_audit_log

    try:
        return open_audit_log(cfg)
    except ConfigError as exc:
        raise StartupError(str(exc)) from None


def trust_anchors(cfg: Config) -> tuple[Any, Any]:
    """The report verifier and the CRL set it shares with the gate (client
    certificates are checked against the same CRLs: their CAs are the device CA and
    ``[tls] client_ca``)."""
    from cryptography import x509

    from proxy.attestation import Verifier
    from proxy.crl import CrlSet

    require_file(cfg.trust.device_ca, "trust.device_ca")
    for i, p in enumerate(cfg.trust.attesters):
        require_file(p, f"trust.attesters[{i}]")
    for i, p in enumerate(cfg.trust.crl):
        require_file(p, f"trust.crl[{i}]")
    try:
        verifier = Verifier.from_files(cfg.trust.device_ca, list(cfg.trust.attesters),
                                       device_reports=cfg.trust.device_reports == "allow")
        anchors = verifier.anchors
        if cfg.tls.client_ca is not None and cfg.tls.client_ca.exists():
            anchors += x509.load_pem_x509_certificates(cfg.tls.client_ca.read_bytes())
        crl = CrlSet(list(cfg.trust.crl), anchors)
    except Exception as exc:
        raise StartupError(f"trust: cannot load trust anchors: {exc}") from None
    verifier.crl = crl or None
    return verifier, crl


# ------------------------------------------------------------------ heap

#: Net new container objects before a young garbage collection while serving
#: (CPython's default is 700; 3.13 raised it to 2,000).
GC_YOUNG_THRESHOLD: Final = 2000


def settle_heap() -> None:
    """Once start-up is done, before serving: what start-up made (modules, config,
    policy, caches) is collected once and frozen out of the cycle collector's sight
    (``gc.freeze``), and the young generation holds :data:`GC_YOUNG_THRESHOLD`
    objects. With 64 busy ActiveSync connections the collector otherwise ran every
    ~70 requests, each time walking the objects of the requests in flight, and every
    full collection walked the whole start-up heap (``bench/activesync_calls.py``)."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(GC_YOUNG_THRESHOLD, young), middle, old)

