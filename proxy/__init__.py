"""mailward: a conditional-access proxy for corporate mail.

Protocols live at the edge (``proxy.frontends``), one decision point sits in the
middle (``proxy.gate``), policy evaluation is pure (``proxy.policy``), and one writer
owns the tamper-evident decision log (``proxy.audit``). Device posture arrives as
signed reports (``proxy.attestation``) and is kept in a ``proxy.posture`` store.
"""

__version__ = "0.1.0"
