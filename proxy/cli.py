"""``mailward`` command line: one function per sub-command.

Exit codes (fixed interface, see DESIGN.md): 0 success / allow / intact; 1 a report
refused or the audit log broken; 2 usage, configuration or other error; 3 explain
says deny. User errors are one line on stderr, never a traceback.

Imports are deferred into the sub-commands so that start-up stays as quick as
``mailward --help``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    from proxy.config import Config

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1  # a report refused, the audit log broken
EXIT_ERROR = 2
EXIT_DENY = 3


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


# ------------------------------------------------------------------ helpers


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("MAILWARD_CONFIG") or "config/mailward.toml")


def _load(args: argparse.Namespace) -> Config:
    from proxy.config import load_config

    return load_config(_config_path(args))


def _audit_log(cfg: Config) -> Any:
    from proxy.audit import open_audit_log

    _private_dir(cfg.server.state_dir)
    _private_dir(cfg.audit.path.parent)
    return open_audit_log(cfg, witnessed=False)  # the server's next head witnesses it


def _private_dir(path: Path) -> None:
    """Create a state directory 0700 (posture and audit data are personal data);
    an existing one is left as the operator made it."""
    if not path.exists():
        path.mkdir(mode=0o700, parents=True)


def _policy(cfg: Config) -> Any:
    """The policy in force (the pointer, proxy.policies.pointer), else the file."""
    from proxy.policies import in_force

    return in_force(cfg)


# ------------------------------------------------------------------ commands


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.server import run

    return run(_config_path(args))


def cmd_check_config(args: argparse.Namespace) -> int:
    from proxy.config import check_files

    cfg, policy = check_files(_config_path(args))
    missing = [
        (name, p)
        for name, p in (
            ("tls.cert", cfg.tls.cert),
            ("tls.key", cfg.tls.key),
            ("tls.client_ca", cfg.tls.client_ca),
            ("trust.device_ca", cfg.trust.device_ca),
            ("audit.signing_key", cfg.audit.signing_key),
            ("audit.verify_key", cfg.audit.verify_key),
            ("api.admin_token_file", cfg.api.admin_token_file),
            *((f"api.tokens.{t.name}.file", t.file) for t in cfg.api.tokens),
            *((f"trust.attesters[{i}]", p) for i, p in enumerate(cfg.trust.attesters)),
            *((f"trust.crl[{i}]", p) for i, p in enumerate(cfg.trust.crl)),
            *((f"listeners.{lst.name}.upstream_ca", lst.upstream_ca) for lst in cfg.listeners),
        )
        if p is not None and not p.exists()
    ]
    for name, p in missing:
        print(f"{cfg.source}: {name}: file not found: {p} (mailward certs init creates it)",
              file=sys.stderr)
    if missing:
        return EXIT_ERROR
    from proxy.audit import signing_key_from_config, signing_key_warnings

    signing_key_from_config(cfg)  # ConfigError (one line, exit 2) unless it is Ed25519
    for warning in signing_key_warnings(cfg.audit.signing_key):
        print(f"warning: {cfg.source}: audit.signing_key: {warning}", file=sys.stderr)
    _check_crls(cfg)
    if cfg.nginx is not None:
        from proxy.nginx.app import read_secret

        try:
            read_secret(cfg.nginx)  # serve refuses to start on the same error
        except ValueError as exc:
            print(f"{cfg.source}: {exc}", file=sys.stderr)
            return EXIT_ERROR
    from proxy.cli_policy import guard_warnings

    for warning in guard_warnings(cfg, policy):
        print(f"warning: {warning}")
    _check_expiry(cfg)
    print(
        f"{cfg.source}: ok ({len(cfg.listeners)} listeners); "
        f"{policy.source}: ok (version {policy.version}, {len(policy.prohibited)} prohibited-app "
        f"rules, mode {policy.mode})"
    )
    return EXIT_OK


def _check_expiry(cfg: Config) -> None:
    """A ``warning:`` line for each certificate or CRL ending within 30 days."""
    import time

    from proxy.expiry import warnings

    for line in warnings(cfg, time.time()):
        print(f"warning: {line}")


def _check_crls(cfg: Config) -> None:
    """Each CRL loads and verifies (else exit 2 naming the file); a ``warning:`` line
    when its nextUpdate is less than 7 days away or past."""
    if not cfg.trust.crl:
        return
    import time

    from cryptography import x509

    from proxy.crl import CrlError, CrlSet

    anchors = x509.load_pem_x509_certificates(cfg.trust.device_ca.read_bytes())
    if cfg.tls.client_ca is not None and cfg.tls.client_ca.exists():
        anchors += x509.load_pem_x509_certificates(cfg.tls.client_ca.read_bytes())
    try:
        crls = CrlSet(list(cfg.trust.crl), anchors)
    except CrlError as exc:
        raise UserError(f"{cfg.source}: trust.crl: {exc}") from None
    now = time.time()
    for path, next_update in crls.expiring(now):
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(next_update))
        state = "is past" if next_update < now else "is near"
        print(f"warning: {path}: CRL nextUpdate {when} {state}; certificate-identified "
              "sessions are refused once it has passed. Publish a new CRL.")


def cmd_explain(args: argparse.Namespace) -> int:
    """Asks the gate (:meth:`proxy.gate.Gate.explain`), which evaluates and writes the
    ``explain`` record, but without an event loop: the store (posture and trust
    records: revocations, bindings, aliases) is read and the record appended
    synchronously (see :func:`_complete`), so start-up stays close to
    ``mailward --help``."""
    import getpass

    from proxy.gate import AUDIT_UNAVAILABLE, Gate, Identity, NullObserver, Origin, TrustState
    from proxy.ids import ClientCert
    from proxy.posture.sqlite import read_trust

    cfg = _load(args)
    policy = _policy(cfg)
    if not cfg.posture.store.startswith("sqlite://"):
        raise UserError(f"explain reads the sqlite posture store; {cfg.posture.store} is not")
    path = cfg.posture.store.removeprefix("sqlite://")
    trust = TrustState()
    trust.replace(read_trust(path))
    origin = Origin(args.protocol, "cli", "", "deny")
    if args.listener:
        listener = next((lc for lc in cfg.listeners if lc.name == args.listener), None)
        if listener is None:
            raise UserError(f"no listener named {args.listener!r} in {cfg.source}")
        from proxy.gate import origin_for

        origin = origin_for(listener)
    if args.client_cert or origin.protocol != "activesync":
        identity = Identity(args.user, args.device, "client_cert",
                            cert=ClientCert(args.device) if args.client_cert else None)
    else:
        identity = Identity(args.user, args.device, "claim")
    with _audit_log(cfg) as log:  # closing seals the record with a signed checkpoint
        gate = Gate(store=_SqliteReader(path), audit=_AppendingSink(log),
                    policy=lambda: policy, observer=NullObserver(), trust=trust)
        decision = _complete(gate.explain(identity, origin, actor=getpass.getuser()))
    if decision.temporary:
        code = decision.reasons[0].code
        if code == AUDIT_UNAVAILABLE:
            raise UserError("not answering: the audit log cannot be written"
                            + (f" ({log.last_error})" if log.last_error else ""))
        raise UserError(f"cannot decide: {code}")
    _print_decision(args, decision)
    return EXIT_OK if decision.allow else EXIT_DENY


def _print_decision(args: argparse.Namespace, decision: Any) -> None:
    if args.json:
        import json

        out = {
            "decision": decision.decision,
            "mode": decision.mode,
            "policy_version": decision.policy_version,
            "policy_sha256": decision.policy_sha256,
            "reasons": [r.to_dict() for r in decision.reasons],
        }
        print(json.dumps(out, indent=2))
        return
    print(f"{decision.decision} ({args.user}, device {args.device}, {args.protocol}; "
          f"policy {decision.policy_version}, {decision.mode})")
    for r in decision.reasons:
        flag = "" if r.enforced else " [not enforced]"
        print(f"  - {r.code}{flag}: {r.text}")


class _SqliteReader:
    """The gate's posture reader for one-shot commands: reads the sqlite store
    through a read-only connection, synchronously (no worker thread, no loop)."""

    def __init__(self, path: str) -> None:
        self._path = path

    async def get(self, device_id: str) -> Any:
        from proxy.posture.sqlite import read_posture

        return read_posture(self._path, device_id)

    async def device_postures(self, device_id: str) -> list[Any]:
        from proxy.posture.sqlite import read_postures

        return read_postures(self._path, device_id)

    async def devices_for_user(self, user: str) -> list[Any]:
        raise UserError("explain does not evaluate all-user-devices listeners")


class _AppendingSink:
    """The gate's audit sink for one-shot commands: ``AuditLog.append`` (writes
    and fsyncs before returning), without an event loop."""

    def __init__(self, log: Any) -> None:
        self._log = log

    async def write(self, fields: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = self._log.append(fields)
        return record


def _complete(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (its awaits reach only the synchronous
    reader and sink above) to its result, without importing asyncio (~35 ms)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coro.close()
    raise RuntimeError("a one-shot command awaited real I/O; use asyncio.run")


def cmd_posture_ingest(args: argparse.Namespace) -> int:
    """Verify and store each file's report; the gate records each one (the same
    ``attestation`` record as ``POST /v1/attestations``)."""
    import asyncio

    from proxy.attestation import Verifier
    from proxy.gate import Gate, NullObserver
    from proxy.posture import open_store

    cfg = _load(args)
    policy = _policy(cfg)
    verifier = Verifier.from_files(cfg.trust.device_ca, list(cfg.trust.attesters),
                                   device_reports=cfg.trust.device_reports == "allow",
                                   crl_paths=cfg.trust.crl)
    log = _audit_log(cfg)
    if not log.healthy:  # an accepted report changes access: never without its record
        log.close_sync()
        raise UserError(f"not ingesting: the audit log cannot be written ({log.last_error})")

    async def go() -> int:
        store = open_store(cfg.posture.store)
        gate = Gate(store=store, audit=_AppendingSink(log), policy=lambda: policy,
                    observer=NullObserver())
        try:
            refused = [name for name in args.files
                       if not await _ingest_file(verifier, policy, store, gate, name)]
        finally:
            await store.close()
        return EXIT_FAILED if refused else EXIT_OK

    with log:  # closing seals the new records with a signed checkpoint
        return asyncio.run(go())


async def _ingest_file(verifier: Any, policy: Any, store: Any, gate: Any, name: str) -> bool:
    """One file: print its line, let the gate record it; True if accepted."""
    import time

    from proxy.attestation import AttestationError, ingest
    from proxy.gate import ReportSource

    source = ReportSource("cli", file=name)
    try:
        token = Path(name).read_bytes()
    except OSError as exc:
        print(f"{name}: refused unreadable: {exc.strerror}")
        return False
    try:
        posture = await ingest(verifier, store, token, now=time.time(),
                               max_age_s=policy.max_posture_age_s,
                               require_nonce=policy.require_nonce)
    except AttestationError as exc:
        print(f"{name}: refused {exc.code}: {exc.detail}")
        await gate.attest_refused(source, exc.code)
        return False
    decision, in_force = await gate.attest_report(source, posture)
    state = "compliant" if decision.allow else "noncompliant"  # the posture in force
    print(f"{name}: accepted {posture.device_id} {state} source={in_force.authority}")
    return True


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from proxy.audit.command import run_verify

    logs = [Path(p) for p in args.log or ()]
    keys = [Path(k) for k in args.key or ()]
    if not logs or not keys:
        try:
            cfg = _load(args)
        except Exception:
            if not logs:
                raise
        else:
            logs = logs or [cfg.audit.path]
            if not keys and cfg.audit.verify_key and cfg.audit.verify_key.exists():
                keys = [cfg.audit.verify_key]
    return run_verify(logs, keys, pins=args.key_fingerprint or (), strict=args.strict,
                      from_checkpoint=args.from_checkpoint,
                      witness_files=[Path(w) for w in args.witness or ()],
                      out=sys.stdout, err=sys.stderr)


def cmd_audit_query(args: argparse.Namespace) -> int:
    from proxy.audit import format_records, parse_time
    from proxy.audit.query import query_logs

    logs = _given_logs(args.log) or [_load(args).audit.path]
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    records = query_logs(
        logs, user=args.user, device=args.device, decision=args.decision,
        protocol=args.protocol, event=args.event, since=since, until=until,
    )
    format_records(records, args.format, sys.stdout, instance=len(logs) > 1)
    return EXIT_OK


def _given_logs(given: Sequence[str] | None) -> list[Path]:
    """The ``--log`` paths, each once; with several, each must exist (a missing one
    would silently drop an instance from the merge)."""
    from proxy.audit.query import log_exists

    logs = [Path(p) for p in given or ()]
    seen: set[Path] = set()
    for log in logs:
        if log.resolve() in seen:
            raise UserError(f"{log}: --log given twice")
        seen.add(log.resolve())
        if len(logs) > 1 and not log_exists(log):
            raise UserError(f"{log}: no such audit log")
    return logs


def cmd_certs_init(args: argparse.Namespace) -> int:
    from proxy.pki import OFFLINE_DIR, certs_init

    directory = Path(args.dir)
    written = certs_init(directory, force=args.force, hostnames=args.hostname or ())
    for p in written:
        print(p)
    print(f"The CA keys (ca.key, device-ca.key, mdm-attester.key) are in "
          f"{directory / OFFLINE_DIR}/: the server never needs them and no setting names "
          "that directory; keep it offline (device enroll/attest read it with --ca-dir).")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo.run import main as demo_main

    return demo_main()


# ------------------------------------------------------------------ parser


_Add = Callable[..., argparse.ArgumentParser]


def _explain_command(add: _Add) -> None:
    sp = add("explain", cmd_explain, "what would the policy decide for this user and device")
    sp.add_argument("--user", required=True)
    sp.add_argument("--device", required=True)
    sp.add_argument("--protocol", choices=("imap", "pop3", "smtp", "activesync"), default="imap")
    sp.add_argument("--listener", help="judge as on this listener (its client_cert, "
                    "eas_claims, unidentified settings)")
    sp.add_argument("--client-cert", action="store_true",
                    help="the device presents its certificate (ActiveSync)")
    sp.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mailward",
        description="Conditional-access proxy for corporate mail (IMAP, SMTP, ActiveSync).",
    )
    from proxy.cli_ops import VersionAction, ops_commands

    p.add_argument("--version", action=VersionAction, nargs=0, help="print the version")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="mailward.toml (default: config/mailward.toml "
                        "or $MAILWARD_CONFIG)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str,
            parent: Any = sub) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, parents=[common], help=help,
                                                        description=help)
        sp.set_defaults(func=func)
        return sp

    def group(name: str, help: str) -> Any:
        return sub.add_parser(name, help=help).add_subparsers(
            dest=f"{name}_command", required=True, metavar="COMMAND")

    add("serve", cmd_serve, "run the proxy")
    add("check-config", cmd_check_config, "validate mailward.toml and the policy (exit 2 if not)")
    _explain_command(add)
    sp = add("ingest", cmd_posture_ingest, "verify and store posture reports (JWS files)",
             group("posture", "device posture reports"))
    sp.add_argument("files", nargs="+", metavar="FILE")
    _audit_commands(add, group("audit", "the decision log"))
    sp = add("init", cmd_certs_init, "create a local CA, server, device CA, attester, audit key",
             group("certs", "certificates and keys"))
    sp.add_argument("--dir", default="certs")
    sp.add_argument("--hostname", action="append", help="extra server host name (repeatable)")
    sp.add_argument("--force", action="store_true", help="overwrite existing keys")
    from proxy.cli_device import device_commands

    device_commands(add, group("device", "device certificates, trust and test reports"))
    sp = add("reset", cmd_limits_reset, "clear the failed-login throttle of a user or "
             "client address (the running server applies it within a second)",
             group("limits", "abuse limits"))
    who = sp.add_mutually_exclusive_group(required=True)
    who.add_argument("--user")
    who.add_argument("--ip")
    ops_commands(add)
    from proxy.cli_mdm import mdm_commands

    mdm_commands(add, group("mdm", "MDM connectors (Intune, Jamf Pro, Google Workspace)"))
    from proxy.cli_policy import policy_commands

    policy_commands(add, group("policy", "policy changes: preview, history, diff, rollback"))
    add("demo", cmd_demo, "self-contained demonstration (see README)")
    return p


def cmd_limits_reset(args: argparse.Namespace) -> int:
    """Append a reset request to the state directory's feed (proxy.net.limits_reset)."""
    import getpass
    import ipaddress

    from proxy.net.limits_reset import request_reset

    cfg = _load(args)
    if args.ip is not None:
        try:
            ipaddress.ip_address(args.ip)
        except ValueError:
            raise UserError(f"--ip: {args.ip!r} is not an IP address") from None
    request_reset(cfg.server.state_dir, user=args.user, ip=args.ip, actor=getpass.getuser())
    print(f"limits reset requested for {'user ' + args.user if args.user else args.ip}")
    return EXIT_OK


def add_log_options(sp: argparse.ArgumentParser, *, merged: bool, checked: bool) -> None:
    """The options that choose the audit logs an ``audit`` command reads: ``--log``
    (several logs are ``merged`` by time, or, for ``verify``, checked one by one) and,
    when the command verifies the chains (``checked``), ``--key`` and ``--witness``."""
    how = ", merged by time" if merged else ""
    sp.add_argument("--log", action="append", help="audit log, repeatable: one per "
                    f"instance{how} (default: [audit] path)")
    if not checked:
        return
    sp.add_argument("--key", action="append", help="checkpoint public key, repeatable for "
                    "rotated keys (default: [audit] verify_key)")
    sp.add_argument("--witness", action="append", metavar="FILE", help="audit_checkpoint/"
                    "audit_head log lines as a SIEM collected them: the log must hold them")


def _audit_commands(add: _Add, audit: Any) -> None:
    sp = add("verify", cmd_audit_verify, "check the hash chain and signed checkpoints", audit)
    add_log_options(sp, merged=False, checked=True)
    sp.add_argument("--key-fingerprint", action="append", metavar="HEX",
                    help="use only the key with this SHA-256 fingerprint (or key_id)")
    sp.add_argument("--from-checkpoint", type=int, metavar="SEQ",
                    help="start at this signed checkpoint (older files deleted)")
    sp.add_argument("--strict", action="store_true",
                    help="fail on records sealed after a crash (unwitnessed)")
    sp = add("query", cmd_audit_query, "filter decisions; several logs merge by time",
             audit)
    add_log_options(sp, merged=True, checked=False)
    sp.add_argument("--user")
    sp.add_argument("--device")
    sp.add_argument("--decision", choices=("allow", "deny"))
    sp.add_argument("--protocol", choices=("imap", "pop3", "smtp", "activesync", "cli"))
    sp.add_argument("--event", help="decision, explain, attestation, session_end, ...")
    sp.add_argument("--since", help="RFC 3339 time, a date, or 7d / 24h / 30m ago")
    sp.add_argument("--until")
    sp.add_argument("--format", choices=("table", "json", "csv"), default="table")
    from proxy.cli_report import report_command

    report_command(add, audit)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        print(f"mailward: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        return _report(exc)


def _report(exc: Exception) -> int:
    """Every error is one line; MAILWARD_DEBUG=1 shows the traceback of unexpected ones."""
    from proxy.config import ConfigError

    known: tuple[type[BaseException], ...] = (ConfigError, OSError, ValueError)
    try:
        from proxy.pki import PkiError
        from proxy.posture.redis import StoreUnavailable  # Redis down, or refusing us

        known += (PkiError, StoreUnavailable)
    except ImportError:
        pass
    if isinstance(exc, known):
        if isinstance(exc, OSError) and exc.filename:
            msg = f"{exc.filename}: {exc.strerror}"
        else:
            msg = str(exc)
        print(f"mailward: {msg}", file=sys.stderr)
        return EXIT_ERROR
    if os.environ.get("MAILWARD_DEBUG"):
        raise exc
    print(f"mailward: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
