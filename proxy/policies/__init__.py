"""Changing the policy safely: the policy in force (content-addressed copies and an
active-version pointer, :mod:`~proxy.policies.store`), impact preview and the policy
guard (:mod:`~proxy.policies.preview`, :mod:`~proxy.policies.ops`), rule-by-rule
diff (:mod:`~proxy.policies.diff`) and what the running server does with them
(:mod:`~proxy.policies.live`)."""

from proxy.policies.store import (
    PolicyStore,
    PolicyStoreError,
    confirm_line,
    confirm_token,
    in_force,
    is_confirmed,
    policy_in_force,
)

__all__ = ["PolicyStore", "PolicyStoreError", "confirm_line", "confirm_token",
           "in_force", "is_confirmed", "policy_in_force"]
