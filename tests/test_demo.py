"""``mailward demo`` runs on its own, tells the story and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path


def test_demo_prints_the_decisions_and_a_verified_audit_log() -> None:
    """The demo exits 0 within a minute: Bob's TikTok phone is refused on IMAP and
    SMTP, Alice's IDLE session is ended by the policy edit, the decision table and
    "audit log verified" are printed, and no process or directory is left behind."""
    started = time.monotonic()
    r = subprocess.run([str(Path(sys.executable).with_name("mailward")), "demo"],
                       capture_output=True, text=True, timeout=90,
                       env={k: v for k, v in os.environ.items() if k != "MAILWARD_DEMO_KEEP"})
    elapsed = time.monotonic() - started
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert elapsed < 60
    assert re.search(r"bob-iphone +IMAP +refused: .*TikTok is installed", out)
    assert re.search(r"bob-iphone +SMTP +refused at MAIL FROM: 550 5\.7\.1 .*TikTok", out)
    assert re.search(r"alice-pixel +IMAP +login OK", out)
    assert re.search(r"ended the session after \d+\.\d s: \* BYE .*Telegram", out)
    table = out.split("read back from the audit log", 1)[1]
    assert re.search(r"decision +bob@corp\.example +bob-iphone +imap +deny +prohibited_app", table)
    assert re.search(r"policy_reload .* applied +demo-1 -> demo-2", table)
    assert re.search(r"session_end +alice@corp\.example +alice-pixel +imap +policy_changed", table)
    assert "audit log verified" in out

    pid = int(re.search(r"mailward serve \(pid (\d+)\)", out).group(1))  # type: ignore[union-attr]
    assert not Path(f"/proc/{pid}").exists(), "the demo left mailward serve running"
    root = re.search(r"throw-away deployment in (\S+)", out).group(1)  # type: ignore[union-attr]
    assert not Path(root).exists(), "the demo left its directory behind"
