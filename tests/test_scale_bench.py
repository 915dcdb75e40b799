"""A short run of bench/scale.py (real Redis, nginx stream and two ``mailward serve``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from peers import peer_missing
from peers.redis import require_redis

pytestmark = pytest.mark.peer

ROOT = Path(__file__).resolve().parent.parent


def test_bench_scale_smoke() -> None:
    """bench/scale.py runs all three phases without a failed login or a missing audit
    record, prints its figures, a decision costs exactly one Redis round trip, and
    the requests of a decided ActiveSync device-session none."""
    require_redis()
    if not (os.path.exists("/usr/sbin/nginx")
            and os.path.exists("/usr/lib/nginx/modules/ngx_stream_module.so")):
        peer_missing("nginx with the stream module is not installed (`make peers`)")
    done = subprocess.run([sys.executable, str(ROOT / "bench/scale.py"), "--seconds", "0.5",
                           "--devices", "3", "--concurrency", "2"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-3000:]
    assert "failed logins: 0; audit decision records match the logins: yes" in out
    for phase in ("one instance, SQLite", "one instance, Redis", "two instances, Redis"):
        m = re.search(rf"^{phase}: +([\d,]+) decisions/s +CPU per decision ([\d.]+) ms", out,
                      re.M)
        assert m and float(m.group(2)) > 0, (phase, out)
    trips = re.findall(r"^Redis round trips per decision, .*: ([\d.]+)$", out, re.M)
    scripts = re.findall(r"^Redis round trips per decision by script, .*: (.*)$", out, re.M)
    assert trips == ["1.00"] * 2 and scripts == ["postures 1.00"] * 2, out
    assert "not linear scaling" in out
    assert re.search(r"^ActiveSync, Redis round trips per request of a live device-session: "
                     r"0\.00 ", out, re.M), out  # decided once per device-session
