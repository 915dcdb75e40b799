"""Configuration files -> frozen dataclasses.

``load_config`` reads ``config/mailward.toml`` (how the proxy runs,
:mod:`proxy.config.settings`) and ``load_policy`` reads ``config/policy.toml`` (what
it enforces, :mod:`proxy.config.policy_file`). Both reject unknown keys, wrong types,
bad durations and bad globs with one :class:`ConfigError` that names the file, the
key and its line, so ops staff can fix it at once; the typed TOML reading and the
value parsers they share are in :mod:`proxy.config.reading`.

Relative paths resolve against the deployment root: the parent of the ``config/``
directory that holds the file.
"""

from __future__ import annotations

from pathlib import Path

from proxy.config.mdm import MdmConfig
from proxy.config.nginx import NginxConfig
from proxy.config.notify import NotifyConfig
from proxy.config.policy_file import load_policy
from proxy.config.reading import ConfigError, is_loopback, parse_duration, split_hostport
from proxy.config.settings import (
    DEFAULT_CONFIG,
    ApiConfig,
    ApiToken,
    AuditConfig,
    Config,
    LimitsConfig,
    ListenerConfig,
    PolicyGuardConfig,
    PostureConfig,
    ServerConfig,
    TlsConfig,
    TrustConfig,
    load_config,
)
from proxy.policy import Policy


def check_files(config_path: Path | str) -> tuple[Config, Policy]:
    """Load and cross-check everything ``serve`` would need (for check-config)."""
    cfg = load_config(config_path)
    policy = load_policy(cfg.server.policy)
    return cfg, policy


__all__ = [
    "DEFAULT_CONFIG",
    "ApiConfig",
    "ApiToken",
    "AuditConfig",
    "Config",
    "ConfigError",
    "LimitsConfig",
    "ListenerConfig",
    "MdmConfig",
    "NginxConfig",
    "NotifyConfig",
    "PolicyGuardConfig",
    "PostureConfig",
    "ServerConfig",
    "TlsConfig",
    "TrustConfig",
    "check_files",
    "is_loopback",
    "load_config",
    "load_policy",
    "parse_duration",
    "split_hostport",
]
