"""The gate for one-shot commands that change posture or trust records
(``mailward device revoke ...``, ``mailward mdm sync``), without a server.

Both run the gate over the configured store with the trust records loaded and no
metrics; the audit records go straight to the log (``AuditLog.append``), or nowhere
for a dry run. (Both first open the log with ``cli_policy._appending``, which refuses
when it cannot be written: a change without its record is not auditable.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from proxy.cli import _AppendingSink, _policy

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.gate import Gate


def audit_sink(log: Any) -> Any:
    """The gate's audit sink: straight to ``log`` (None: nowhere, a dry run)."""
    return _AppendingSink(log) if log is not None else _Discard()


async def offline_gate(cfg: Config, store: Any, sink: Any,
                       policy: Callable[[], Any] | None = None) -> Gate:
    """A gate over ``store`` with the trust records loaded, writing to ``sink``;
    ``policy`` defaults to the policy in force, read only when a decision needs it."""
    from proxy.gate import Gate, NullObserver

    gate = Gate(store=store, audit=sink, policy=policy or (lambda: _policy(cfg)),
                observer=NullObserver())
    await gate.load_trust()
    return gate


class _Discard:
    async def write(self, fields: dict[str, Any]) -> dict[str, Any]:
        return fields


__all__ = ["audit_sink", "offline_gate"]
