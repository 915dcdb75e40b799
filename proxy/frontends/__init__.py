"""Protocol front ends: IMAP, SMTP submission and Exchange ActiveSync.

Front ends know protocols, not policy: they parse the pre-auth conversation, obtain
the user's identity (verified by the upstream) and the device identity, ask
``proxy.gate.Gate.decide`` and then splice or refuse.
"""
