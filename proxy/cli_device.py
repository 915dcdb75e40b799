"""``mailward device ...``: certificates and test reports (``enroll``, ``attest``), and
the device trust records (``revoke``, ``unrevoke``, ``forget``, ``unbind``, ``alias``,
``list``). Changes go through the gate, which writes their audit record with the OS
user as ``actor``; a running server applies them from the store's change feed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, cast

from proxy.cli import EXIT_OK, UserError, _Add, _load
from proxy.cli_gate import audit_sink, offline_gate
from proxy.cli_policy import _appending


def _device_ca(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(device CA cert, its key, deployment root) from the config, or ./certs. The
    key is in ``--ca-dir`` (default ``certs/offline`` under the deployment root)."""
    try:
        cfg = _load(args)
        ca, root = cfg.trust.device_ca, cfg.root
    except Exception:
        if args.config:
            raise
        ca, root = Path("certs/device-ca.pem"), Path(".")
    ca_dir = Path(args.ca_dir) if args.ca_dir else root / "certs" / "offline"
    return ca, ca_dir / "device-ca.key", root


def cmd_device_enroll(args: argparse.Namespace) -> int:
    from proxy.pki import enroll_device

    ca, ca_key, root = _device_ca(args)
    out = Path(args.out) if args.out else root / "certs" / "devices" / args.id
    key, cert = enroll_device(
        device_ca_cert=ca, device_ca_key=ca_key, device_id=args.id, user=args.user,
        out_dir=out, force=args.force,
    )
    print(key)
    print(cert)
    return EXIT_OK


def cmd_device_attest(args: argparse.Namespace) -> int:
    from proxy.pki import load_certs, load_private_key, make_claims, sign_report

    _, _, root = _device_ca(args)
    base = root / "certs" / "devices" / args.id
    key = load_private_key(Path(args.key) if args.key else base / "device.key")
    chain = load_certs(Path(args.cert) if args.cert else base / "device.pem")
    apps = [a for a in (args.apps or "").split(",") if a]
    claims = make_claims(
        device_id=args.id, user=args.user, platform=args.platform, apps=apps,
        os_version=args.os_version, managed=args.managed, nonce=args.nonce,
        ttl_s=args.ttl,
    )
    token = sign_report(claims, key, chain)
    if args.out:
        Path(args.out).write_text(token + "\n")
        print(args.out)
    else:
        print(token)
    return EXIT_OK


def cmd_device(args: argparse.Namespace) -> int:
    """``device revoke | unrevoke | forget | unbind | alias``: through the gate, which
    changes the store's trust records and writes the audit record (``actor`` = the OS
    user). A running server notices the change through the store's change feed and
    ends the device's live sessions within a second."""
    import asyncio
    import getpass

    from proxy.posture import open_store

    cfg = _load(args)
    log = _appending(cfg, "changing devices")
    actor = getpass.getuser()
    op = args.device_command

    async def go() -> str:
        store = open_store(cfg.posture.store)
        try:
            # The policy is never read (no live sessions here to re-check): a broken
            # policy file must not stop a lost phone from being cut off.
            gate = await offline_gate(cfg, store, audit_sink(log))
            if op == "revoke":
                return await gate.revoke(args.id, why=args.why or "", actor=actor, via="cli")
            if op == "unrevoke":
                return await gate.unrevoke(args.id, why=args.why, actor=actor, via="cli")
            if op == "alias":
                return await gate.alias(args.id, args.other, actor=actor, via="cli")
            change = gate.forget if op == "forget" else gate.unbind
            return await change(args.id, actor=actor, via="cli")
        finally:
            await store.close()

    _check_ids(args.id, getattr(args, "other", None))
    with log:  # closing seals the record with a signed checkpoint
        device = asyncio.run(go())
    done = {"revoke": "revoked", "unrevoke": "unrevoked", "forget": "forgotten",
            "unbind": "unbound", "alias": f"also known as {getattr(args, 'other', '')}"}[op]
    print(f"{args.id}: {done} (device {device})")
    return EXIT_OK


def _check_ids(*ids: str | None) -> None:
    from proxy.ids import DEVICE_ID_RE

    for i in ids:
        if i is not None and not DEVICE_ID_RE.fullmatch(i):
            raise UserError(f"{i!r} is not a device id (1-128 of A-Z a-z 0-9 . _ : -)")


def cmd_device_list(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from proxy.posture import open_store

    cfg = _load(args)

    async def go() -> list[dict[str, Any]]:
        store = open_store(cfg.posture.store)
        try:
            return cast(list[dict[str, Any]],
                        await store.list_devices(revoked_only=args.revoked))  # type: ignore[attr-defined]
        finally:
            await store.close()

    devices = asyncio.run(go())
    if args.format == "json":
        for d in devices:
            print(json.dumps(d, sort_keys=True))
        return EXIT_OK
    print(f"{'DEVICE':<28} {'USER':<28} {'PLATFORM':<9} {'BOUND':<5} {'REVOKED':<8} "
          "SOURCES / ALIASES")
    for d in devices:
        revoked = "yes" if d["revoked"] else ""
        extra = ",".join(d["sources"]) + (" aka " + ",".join(d["aliases"]) if d["aliases"]
                                          else "")
        print(f"{d['device']:<28} {d['user'] or '-':<28} {d['platform'] or '-':<9} "
              f"{'yes' if d['bound'] else '':<5} {revoked:<8} {extra}")
    return EXIT_OK


def device_commands(add: _Add, device: Any) -> None:
    sp = add("enroll", cmd_device_enroll, "issue a device certificate", device)
    sp.add_argument("--id", required=True)
    sp.add_argument("--user", required=True)
    sp.add_argument("--out", help="directory (default: certs/devices/<id>)")
    sp.add_argument("--force", action="store_true")
    sp.add_argument("--ca-dir", help="where device-ca.key is (default: certs/offline)")
    sp = add("revoke", cmd_device, "refuse a device everywhere and end its sessions", device)
    sp.add_argument("id", metavar="ID")
    sp.add_argument("--why", help="recorded with the revocation")
    sp = add("unrevoke", cmd_device, "undo a revocation", device)
    sp.add_argument("id", metavar="ID")
    sp.add_argument("--why", required=True, help="recorded with the change")
    sp = add("forget", cmd_device, "remove a device's posture, bindings and aliases", device)
    sp.add_argument("id", metavar="ID")
    sp = add("unbind", cmd_device, "let a device's DeviceId be claimed without its "
             "certificate again", device)
    sp.add_argument("id", metavar="ID")
    sp = add("alias", cmd_device, "OTHER is another id of device ID", device)
    sp.add_argument("id", metavar="ID")
    sp.add_argument("other", metavar="OTHER")
    sp = add("list", cmd_device_list, "devices known to the posture store", device)
    sp.add_argument("--revoked", action="store_true", help="only revoked devices")
    sp.add_argument("--format", choices=("table", "json"), default="table")
    sp = add("attest", cmd_device_attest, "sign a posture report for a device", device)
    sp.add_argument("--id", required=True)
    sp.add_argument("--user", required=True)
    sp.add_argument("--platform", required=True,
                    choices=("android", "ios", "ipados", "windows", "macos", "linux"))
    sp.add_argument("--apps", default="", help="comma-separated app ids")
    sp.add_argument("--os-version", default="")
    sp.add_argument("--managed", action="store_true")
    sp.add_argument("--key")
    sp.add_argument("--cert")
    sp.add_argument("--nonce")
    sp.add_argument("--ttl", type=int, default=3600, help="seconds until exp (default 3600)")
    sp.add_argument("--out")
    sp.add_argument("--ca-dir", help="CA keys directory (default: certs/offline)")
