"""Operator commands: ``mailward --version``, ``mailward init [DIR]`` and
``mailward backup DIR``.

``init`` lays out a deployment root from the samples shipped inside the package
(``proxy/samples/``, byte-identical to the repository's ``config/``), so a wheel alone
is enough to start: ``config/mailward.toml`` as shipped, ``config/policy.toml`` with the
policy-wide mode switched to ``report-only`` (a new deployment never cuts off every
phone on its first day), ``certs/`` from :func:`proxy.pki.certs_init` and an empty
``state/`` (0700). It writes nothing when any of those files exists, unless ``--force``,
and even then leaves ``state/`` alone.

``backup`` takes an online copy of ``state/``: the SQLite posture store through
SQLite's backup API (consistent while the server writes), the policies in force and
every audit file (rotated ones and ``.head`` included), each copied whole under the
audit log's append lock so the copy ends on a complete record.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: The policy-wide mode line of the shipped policy, which ``init`` turns to report-only.
_ENFORCE_LINE = re.compile(r'^mode = "enforce"( *)#.*$', re.MULTILINE)
REPORT_ONLY_LINE = ('mode = "report-only"                # enforce | report-only (per rule too);'
                    ' init sets it')


def installed_version() -> str:
    """The installed distribution's version (``importlib.metadata``); a source tree
    that was never installed falls back to ``proxy.__version__`` (the same number:
    pyproject.toml reads its version from there)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mailward")
    except PackageNotFoundError:
        from proxy import __version__

        return __version__


class VersionAction(argparse.Action):
    """``--version``: print ``mailward X.Y.Z`` and exit 0, looking the version up only
    when asked (``importlib.metadata`` is not free at every start)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"mailward {installed_version()}")
        parser.exit(0)


# ------------------------------------------------------------------ init


def sample_text(name: str) -> str:
    """A file shipped in ``proxy/samples/`` (``mailward.toml`` or ``policy.toml``)."""
    from importlib.resources import files

    return (files("proxy") / "samples" / name).read_text(encoding="utf-8")


def report_only_policy(text: str) -> str:
    """The shipped policy with its policy-wide ``mode = "enforce"`` line made
    report-only; every other byte unchanged."""
    out, count = _ENFORCE_LINE.subn(REPORT_ONLY_LINE, text, count=1)
    if count != 1:
        raise ValueError('the shipped policy has no policy-wide mode = "enforce" line')
    return out


def init_deployment(root: Path, *, force: bool = False,
                    hostnames: Sequence[str] = ()) -> list[Path]:
    """Write a deployment under ``root`` and return the paths written. Refuses
    (``UserError`` naming the first existing file) before writing anything when a
    file it would write exists, unless ``force``."""
    from proxy.cli import UserError
    from proxy.pki import TRIAL_FILES, certs_init, trial_path

    config = root / "config"
    samples = {config / "mailward.toml": sample_text("mailward.toml"),
               config / "policy.toml": report_only_policy(sample_text("policy.toml"))}
    targets = [*samples, *(trial_path(root / "certs", n) for n in TRIAL_FILES)]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]} already exists; refusing to overwrite it "
                        f"({len(existing)} existing file(s); use --force)")
    config.mkdir(parents=True, exist_ok=True)
    written = []
    for path, text in samples.items():
        path.write_text(text, encoding="utf-8")
        written.append(path)
    written += certs_init(root / "certs", force=force, hostnames=hostnames)
    state = root / "state"
    if not state.exists():
        state.mkdir(mode=0o700)
        written.append(state)
    return written


def next_steps(root: Path) -> str:
    """What to do after ``init``, in order."""
    here = "" if root.resolve() == Path.cwd().resolve() else f"cd {root} && "
    return f"""\
Next steps:
  1. Edit {root / 'config/mailward.toml'}: point each listener's upstream at your mail
     server (imap.corp.example, smtp.corp.example, exchange.corp.example are examples),
     and replace certs/ with your server certificate and your MDM's device CA and
     attester certificates when you leave the trial. Keep certs/offline/ off the server.
  2. Check:   {here}mailward check-config
  3. Run:     mailward serve            (or deploy/systemd, the container, deploy/kubernetes)
  4. Watch what the policy would refuse (it starts in report-only mode):
              mailward audit query --decision deny --since 24h
  5. Enforce: set mode = "enforce" in config/policy.toml (reloaded on change or SIGHUP);
              `mailward explain --user U --device D` shows one device's decision first."""


def cmd_init(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    for path in init_deployment(root, force=args.force, hostnames=args.hostname or ()):
        print(path)
    print(next_steps(root))
    return 0


# ------------------------------------------------------------------ backup


def cmd_backup(args: argparse.Namespace) -> int:
    """``mailward backup DIR``: the configuration's state into DIR (a new or empty
    directory), printing each file copied."""
    from proxy.cli import UserError, _load

    cfg = _load(args)
    dest = Path(args.dir)
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{dest} is not empty; back up into a new directory")
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    copied = backup_state(cfg, dest)
    for path in copied:
        print(path)
    print(f"{len(copied)} files backed up to {dest}; check it with "
          f"mailward audit verify --log {dest / cfg.audit.path.name} --key "
          f"{cfg.audit.verify_key or 'AUDIT.pub'}")
    return 0


def backup_state(cfg: Any, dest: Path) -> list[Path]:
    """Copy the posture store (sqlite only: Redis has its own persistence), the
    policies in force and the audit files into ``dest``; return the files written."""
    copied: list[Path] = []
    store = cfg.posture.store
    if store.startswith("sqlite://"):
        source = Path(store.removeprefix("sqlite://"))
        if source.exists():
            copied.append(sqlite_backup(source, dest / source.name))
    policies = cfg.server.state_dir / "policies"
    if policies.is_dir():
        copied += _copy_tree(policies, dest / "policies")
    copied += copy_audit_files(cfg.audit.path, dest)
    return copied


def sqlite_backup(source: Path, target: Path) -> Path:
    """An online, consistent copy of a SQLite database (``sqlite3.Connection.backup``:
    pages copied while writers go on; the result is one committed state)."""
    import sqlite3

    src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    target.chmod(0o600)
    return target


def copy_audit_files(path: Path, dest: Path) -> list[Path]:
    """``.head``, then the rotated audit files and the live one, each copied up to the
    size it had under the log's shared lock (``open_snapshot``, read as ``verify``
    reads), so the copy ends on a record boundary while the server appends. ``.head``
    is written after its checkpoint line, so read first it never seals past the copy."""
    import shutil

    from proxy.audit.files import head_path, open_snapshot

    copied = []
    if head_path(path).exists():  # first, as verify reads it: never ahead of the snapshot
        copied.append(_copy(head_path(path), dest / head_path(path).name))
    handles = open_snapshot(path, standalone=False)
    try:
        for name, handle, size in handles:
            target = dest / name.name
            with open(target, "wb") as out:
                shutil.copyfileobj(_Limited(handle, size), out)
            target.chmod(0o600)
            copied.append(target)
    finally:
        for _, handle, _ in handles:
            handle.close()
    return copied


class _Limited:
    """The first ``limit`` bytes of a binary file, for ``shutil.copyfileobj``."""

    def __init__(self, handle: Any, limit: int) -> None:
        self._handle, self._left = handle, limit

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data: bytes = self._handle.read(n)
        self._left -= len(data)
        return data


def _copy(source: Path, target: Path) -> Path:
    import shutil

    shutil.copyfile(source, target)
    target.chmod(0o600)
    return target


def _copy_tree(source: Path, target: Path) -> list[Path]:
    target.mkdir(mode=0o700, exist_ok=True)
    return [_copy(p, target / p.name) for p in sorted(source.iterdir()) if p.is_file()]


# ------------------------------------------------------------------ parser


def ops_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``init`` and ``backup`` with :func:`proxy.cli.build_parser`'s ``add``."""
    sp = add("init", cmd_init, "write a deployment: config/ (policy in report-only mode), "
             "certs/, state/")
    sp.add_argument("dir", nargs="?", default=".", metavar="DIR",
                    help="deployment root (default: the current directory)")
    sp.add_argument("--hostname", action="append", help="extra server host name (repeatable)")
    sp.add_argument("--force", action="store_true",
                    help="overwrite existing config and certificate files (state/ is kept)")
    sp = add("backup", cmd_backup, "online copy of the posture store, policies and audit files")
    sp.add_argument("dir", metavar="DIR", help="a new or empty directory")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the mailward command")
