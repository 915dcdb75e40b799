"""A trial deployment's certificates on disk (``mailward certs init`` plus enrolled
devices) and the TLS client context a phone builds from them."""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from proxy.pki import certs_init, enroll_device


def client_context(ca: Path, device_dir: Path | None = None) -> ssl.SSLContext:
    """A phone's TLS client: trusts ``ca``; with ``device_dir`` (a ``device enroll``
    output folder) it presents that device certificate."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if device_dir is not None:
        ctx.load_cert_chain(device_dir / "device.pem", device_dir / "device.key")
    return ctx


@dataclass
class Pki:
    """``certs init`` output in ``dir``, devices enrolled under ``dir/devices/<id>/``."""

    dir: Path

    def device(self, name: str) -> tuple[Path, Path]:
        """The device's certificate and key files."""
        d = self.dir / "devices" / name
        return d / "device.pem", d / "device.key"

    def client_ctx(self, device: str | None = None) -> ssl.SSLContext:
        """A client trusting the local CA, with ``device``'s certificate if given."""
        return client_context(self.dir / "ca.pem",
                              self.dir / "devices" / device if device else None)


def enrolled_pki(d: Path, devices: Iterable[tuple[str, str]]) -> Pki:
    """``certs init`` in ``d`` and one enrolled certificate per ``(device_id, user)``."""
    certs_init(d)
    for device, user in devices:
        enroll_device(device_ca_cert=d / "device-ca.pem",
                      device_ca_key=d / "offline" / "device-ca.key",
                      device_id=device, user=user, out_dir=d / "devices" / device)
    return Pki(d)
