"""Device administration through the gate (a mixin of :class:`proxy.gate.Gate`):
revoke, unrevoke, forget, unbind and alias change the store's trust records, write
their record with the ``actor`` and re-check the affected live sessions; the change
feed brings what other processes changed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from proxy.gate.identity import TrustState
from proxy.gate.interfaces import TrustAdmin
from proxy.gate.records import device_record


class DeviceAdmin:
    """Needs the gate's store, trust state, audit writer and session re-check."""

    _store: Any
    trust: TrustState
    _on_revoked: list[Callable[[str], None]]

    async def _write_quietly(self, fields: dict[str, Any]) -> None:
        raise NotImplementedError

    async def recheck_devices(self, devices: set[str], trigger: str) -> int:
        raise NotImplementedError

    def on_revoked(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(device)`` when a device is revoked (the API's verifier
        drops its cached chain verifications for it)."""
        self._on_revoked.append(callback)

    @property
    def _admin(self) -> TrustAdmin:
        return cast(TrustAdmin, self._store)

    async def revoke(self, device_id: str, *, why: str, actor: str, via: str) -> str:
        """Revoke a device (also an id never seen): refused everywhere from now on,
        its live sessions end. Returns the resolved device."""
        device, new = await self._admin.revoke(device_id, why, actor)
        self.trust.revoked[device] = why
        for callback in self._on_revoked:
            callback(device)
        await self._device_changed("device_revoked", device_id, device, actor, via,
                                   why=why, changed=new)
        return device

    async def unrevoke(self, device_id: str, *, why: str, actor: str, via: str) -> str:
        device, changed = await self._admin.unrevoke(device_id)
        self.trust.revoked.pop(device, None)
        self.trust.revoked.pop(device_id.lower(), None)
        await self._device_changed("device_unrevoked", device_id, device, actor, via,
                                   why=why, changed=changed)
        return device

    async def forget(self, device_id: str, *, actor: str, via: str) -> str:
        device, changed = await self._admin.forget(device_id)
        await self.load_trust()
        await self._device_changed("device_forgotten", device_id, device, actor, via,
                                   changed=changed)
        return device

    async def unbind(self, device_id: str, *, actor: str, via: str) -> str:
        device, changed = await self._admin.unbind(device_id)
        self.trust.bindings.discard(device)
        await self._device_changed("device_unbound", device_id, device, actor, via,
                                   changed=changed)
        return device

    async def alias(self, device_id: str, other: str, *, actor: str, via: str) -> str:
        device = await self._admin.alias(device_id, other)
        await self.load_trust()
        await self._device_changed("device_alias", device_id, device, actor, via, alias=other)
        return device

    async def _device_changed(self, event: str, device_id: str, device: str, actor: str,
                              via: str, **extra: Any) -> None:
        await self._write_quietly(device_record(event, device_id, device, actor, via, **extra))
        await self.recheck_devices({device, device_id.lower()}, event)

    async def load_trust(self) -> None:
        """Read the store's trust records into memory (start-up, and after changes
        that touch several keys at once)."""
        records = await self._admin.trust_records()
        self.trust.replace(records)
        self.trust.seq = max(self.trust.seq, records.change_seq)

    async def sync_changes(self) -> int:
        """Apply what other processes changed (the store's change feed): reload the
        trust records when any changed, drop revoked devices' cached verifications,
        and re-check the affected live sessions. Returns the sessions ended. The
        server calls this every half second; one indexed query when nothing changed."""
        seq, changes = await self._admin.changes_since(self.trust.seq)
        self.trust.seq = seq
        if not changes:
            return 0
        if any(c.kind != "posture" for c in changes):
            self.trust.replace(await self._admin.trust_records())
        for c in changes:
            if c.kind == "revoked":
                for callback in self._on_revoked:
                    callback(c.device)
        return await self.recheck_devices({c.device for c in changes}, "device_changed")
