"""Signed audit logs for the auditor-report tests, made by bench/report.py's writer
(the audit record module's own sealing and signing)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


def _load() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "bench" / "report.py"
    spec = importlib.util.spec_from_file_location("bench_report", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


def story(start: float) -> list[tuple[float, dict[str, Any]]]:
    """The motivating case in records: TikTok banned by ops-alice, two users denied,
    rolled back by ops-bob, the same users allowed again (times from ``start``)."""
    def decision(at: float, user: str, outcome: str, ip: str) -> tuple[float, dict[str, Any]]:
        reasons = [] if outcome == "allow" else [
            {"code": "prohibited_app", "text": "TikTok is not allowed", "enforced": True,
             "app_id": "com.zhiliaoapp.musically", "app_name": "TikTok", "rule": "tiktok"}]
        return at, {"event": "decision", "decision": outcome, "reasons": reasons,
                    "protocol": "imap", "listener": "imaps", "client_ip": ip,
                    "user": user, "device_id": f"dev-{user[:3]}", "mode": "enforce",
                    "policy_version": "v2" if 3600 < at - start < 7200 else "v1"}

    return [
        decision(start + 60, "ann@corp.example", "allow", "192.0.2.10"),
        (start + 1800, {"event": "policy_preview", "candidate_version": "v2",
                        "newly_denied": 2, "newly_allowed": 0, "actor": "ops-alice"}),
        (start + 3601, {"event": "policy_reload", "result": "applied", "trigger": "sighup",
                        "old_version": "v1", "new_version": "v2", "new_sha256": "ab" * 32,
                        "actor": "ops-alice"}),
        decision(start + 4000, "ann@corp.example", "deny", "192.0.2.10"),
        decision(start + 4100, "bob@corp.example", "deny", "198.51.100.7"),
        decision(start + 4200, "<script>alert(1)</script>", "deny", "203.0.113.9"),
        (start + 7201, {"event": "policy_rollback", "from_version": "v2", "to_version": "v1",
                        "to_sha256": "cd" * 32, "actor": "ops-bob"}),
        decision(start + 7300, "ann@corp.example", "allow", "192.0.2.10"),
        decision(start + 7400, "bob@corp.example", "allow", "198.51.100.7"),
    ]
