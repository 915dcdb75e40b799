"""Who is connecting, and the identity binding rules (DESIGN "Device identity on each
protocol", "Revocation").

Front ends supply *facts* only, in an :class:`Identity`:

* ``user``: the login user (the upstream verified the password);
* ``device_id``: the device id as presented: the ActiveSync ``DeviceId``, or for
  IMAP/SMTP the id in the client certificate;
* ``device_source``: ``"client_cert"`` (IMAP/SMTP, the id came from the verified
  certificate), ``"claim"`` (ActiveSync: the DeviceId of the request), or ``""``
  (unidentified);
* ``cert``: the verified client certificate's facts
  (:func:`proxy.net.tls.client_cert_from_ssl` or :func:`proxy.ids.client_cert_from_der`):
  its device id, its rfc822 SAN user, and what a CRL lists it by.

and an :class:`Origin` that carries the listener's settings (``client_cert``,
``eas_claims``; :func:`origin_for` builds it from a listener config).

:func:`check_identity` applies the rules, in this order, and names the first broken
one (every check is a dictionary lookup in the in-memory :class:`TrustState`):

1. the certificate is on a CRL -> ``revoked``; its issuer's CRL is past nextUpdate
   -> temporary refusal ``crl_expired``;
2. the device (any id it is known by, resolved through aliases) is revoked ->
   ``revoked``;
3. the certificate names another device than the DeviceId claimed (compared after
   alias resolution, so case-insensitively) -> ``device_mismatch``;
4. the certificate's rfc822 SAN names another user than the login -> ``user_mismatch``;
5. no device certificate, and the listener requires one (``client_cert =
   "required"``), or the claimed device was seen before with a certificate naming it
   (sticky binding: recorded when an ActiveSync request carries a DeviceId *and* a
   verified certificate naming that device) -> ``certificate_required``;
6. a bare claim on a listener with ``eas_claims = "deny"`` -> ``device_claim_refused``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from proxy.ids import ClientCert
from proxy.policy import USER_MISMATCH, Reason
from proxy.posture import TrustRecords, device_key

if TYPE_CHECKING:
    from proxy.crl import CrlSet

Unidentified = Literal["deny", "allow", "all-user-devices"]

REVOKED = "revoked"
DEVICE_MISMATCH = "device_mismatch"
CERTIFICATE_REQUIRED = "certificate_required"
DEVICE_CLAIM_REFUSED = "device_claim_refused"
CRL_EXPIRED = "crl_expired"

REVOKED_TEXT = ("This device has been blocked from company mail by your administrator. "
                "Contact IT support.")
CERT_REVOKED_TEXT = ("This device's company certificate has been revoked. Contact IT "
                     "support to enrol the device again.")
MISMATCH_TEXT = ("The device certificate belongs to another device. Reinstall the company "
                 "mail profile from the device management app.")
USER_MISMATCH_TEXT = ("This device is registered to a different mailbox. Use the device "
                      "enrolled for your account, or enrol this one.")
CERT_REQUIRED_TEXT = ("This device must connect with its company certificate. Install the "
                      "company mail profile from the device management app.")
CLAIM_REFUSED_TEXT = ("This mail service accepts only devices with a company certificate. "
                      "Install the company mail profile from the device management app.")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is connecting: the login user and, when known, the device (see module)."""

    user: str
    device_id: str | None = None
    device_source: str = ""  # "client_cert" | "claim" | "" (unidentified)
    cert: ClientCert | None = None

    def __post_init__(self) -> None:
        if self.device_source == "eas":  # the name before issue 12
            object.__setattr__(self, "device_source", "claim")

    @property
    def user_key(self) -> str:
        # backslashreplace: a user name smuggled in with undecodable bytes still
        # makes a writable (UTF-8) audit record instead of silently none.
        return self.user.strip().lower().encode("utf-8", "backslashreplace").decode("utf-8")

    @property
    def cert_device_id(self) -> str | None:
        """The device the verified certificate names (IMAP/SMTP front ends that pass
        only ``device_id`` with source ``client_cert`` mean their certificate's)."""
        if self.cert is not None:
            return self.cert.device_id
        return self.device_id if self.device_source == "client_cert" else None


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a session comes from and its listener's identity settings."""

    protocol: str  # imap | pop3 | smtp | activesync | cli | api
    listener: str
    client_ip: str = ""
    unidentified: Unidentified = "deny"
    client_cert: Literal["none", "optional", "required"] = "optional"
    eas_claims: Literal["allow", "deny"] = "allow"


def origin_for(listener: Any, client_ip: str = "") -> Origin:
    """The :class:`Origin` of a session on ``listener`` (a ``ListenerConfig``)."""
    return Origin(listener.protocol, listener.name, client_ip, listener.unidentified,
                  listener.client_cert, getattr(listener, "eas_claims", "allow"))


@dataclass(slots=True)
class TrustState:
    """The store's trust records in memory (refreshed from its change feed), so
    deciding never waits for I/O to apply them."""

    aliases: dict[str, str] = field(default_factory=dict)
    bindings: set[str] = field(default_factory=set)
    revoked: dict[str, str] = field(default_factory=dict)
    seq: int = 0

    def replace(self, records: TrustRecords) -> None:
        self.aliases = dict(records.aliases)
        self.bindings = set(records.bindings)
        self.revoked = dict(records.revoked)

    def resolve(self, device_id: str) -> str:
        """The device (lower-cased key) an id names."""
        key = device_id.lower()
        return self.aliases.get(key, key)

    def store_id(self, device_id: str) -> str:
        """The id to look posture up by: the alias target, or the id as presented."""
        return self.aliases.get(device_key(device_id), device_id)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What :func:`check_identity` found: the resolved ``device`` (None when
    unidentified), the first broken rule (``reason``; ``temporary`` for a stale CRL)
    and a device to record as certificate-bound (``bind``)."""

    device: str | None
    reason: Reason | None = None
    temporary: bool = False
    bind: str | None = None


def check_identity(identity: Identity, origin: Origin, trust: TrustState,
                   crl: CrlSet | None, now: float) -> Verdict:
    """The binding rules (see module docstring), pure but for the CRL's log line.
    Dictionary lookups only: this runs before every decision."""
    cert, presented = identity.cert, identity.device_id
    cert_dev = identity.cert_device_id
    aliases = trust.aliases
    presented_key = presented.lower() if presented else None
    cert_key = cert_dev.lower() if cert_dev else None
    device = aliases.get(presented_key, presented_key) if presented_key else None
    cert_device = aliases.get(cert_key, cert_key) if cert_key else None
    if device is None:
        device = cert_device
    if cert is not None and crl:
        status = crl.check(cert.issuer, cert.serial, now)
        if status == "revoked":
            return Verdict(device, Reason(REVOKED, CERT_REVOKED_TEXT))
        if status == "stale":
            from proxy.gate.records import TEMPORARY_TEXT

            return Verdict(device, Reason(CRL_EXPIRED, TEMPORARY_TEXT), temporary=True)
    revoked = trust.revoked
    if revoked and any(k in revoked for k in (device, presented_key, cert_device, cert_key)
                       if k is not None):
        return Verdict(device, Reason(REVOKED, REVOKED_TEXT))
    if presented_key is not None and cert_device is not None and cert_device != device:
        return Verdict(device, Reason(DEVICE_MISMATCH, MISMATCH_TEXT))
    if cert is not None and cert.user is not None and cert.user != identity.user_key:
        return Verdict(device, Reason(USER_MISMATCH, USER_MISMATCH_TEXT))
    if cert_device is None:
        if origin.client_cert == "required" or (device is not None and device in trust.bindings):
            return Verdict(device, Reason(CERTIFICATE_REQUIRED, CERT_REQUIRED_TEXT))
        if device is not None and origin.eas_claims == "deny":
            return Verdict(device, Reason(DEVICE_CLAIM_REFUSED, CLAIM_REFUSED_TEXT))
        return Verdict(device)
    # A binding is a DeviceId seen with its certificate: an ActiveSync request that
    # carried both (IMAP and SMTP have no DeviceId to claim).
    claimed = identity.device_source == "claim" and presented is not None
    bind = cert_device if claimed and cert_device not in trust.bindings else None
    return Verdict(device, bind=bind)


def session_devices(identity: Identity, trust: TrustState) -> set[str]:
    """Every device key a live session stands for (for re-checks after a change)."""
    keys: set[str] = set()
    for i in (identity.device_id, identity.cert_device_id):
        if i:
            keys.update((i.lower(), trust.resolve(i)))
    return keys
