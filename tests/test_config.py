"""Configuration loading: the shipped files are valid; every kind of mistake is one
clear error naming file, key and line; check-config exits 0 / 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.config import ConfigError, load_config, load_policy, parse_duration

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_and_policy_load() -> None:
    """config/mailward.toml and config/policy.toml are valid and resolve paths to the root."""
    cfg = load_config(ROOT / "config/mailward.toml")
    assert cfg.root == ROOT
    assert cfg.audit.path == ROOT / "state/audit.jsonl"
    assert cfg.posture.store == f"sqlite://{ROOT / 'state/posture.db'}"
    assert {lst.protocol for lst in cfg.listeners} == {"imap", "smtp", "activesync"}
    policy = load_policy(cfg.server.policy)
    tiktok = policy.prohibited[0]
    assert tiktok.name == "TikTok" and policy.mode == "enforce"
    assert set(tiktok.ids) == {
        "com.zhiliaoapp.musically", "com.ss.android.ugc.trill", "com.zhiliaoapp.musically.go"
    }
    assert tiktok.enforce_from is None
    assert set(tiktok.platforms) == {"android", "ios", "ipados"}


def _write(tmp_path: Path, name: str, text: str) -> Path:
    (tmp_path / "config").mkdir(exist_ok=True)
    p = tmp_path / "config" / name
    p.write_text(text)
    return p


MINIMAL_LISTENER = """
[[listeners]]
name = "imaps"
protocol = "imap"
listen = "127.0.0.1:1993"
upstream = "127.0.0.1:993"
"""

BAD_CONFIGS = [
    # (text, expected key, expected line, message fragment)
    ("[server]\nstat_dir = 'x'\n", "server.stat_dir", 2, "unknown key"),
    ("[audit]\ncheckpoint_every = 'ten'\n", "audit.checkpoint_every", 2, "integer"),
    ("[audit]\ncheckpoint_interval = '10 parsecs'\n", "audit.checkpoint_interval", 2,
     "bad duration"),
    ("[api]\ntls = 1\n", "api.tls", 2, "true or false"),
    (MINIMAL_LISTENER + "tls = 'maybe'\n", "listeners[0].tls", 7, "one of"),
    (MINIMAL_LISTENER.replace('listen = "127.0.0.1:1993"', 'listen = "0.0.0.0:143"')
     + "tls = 'none'\n", "listeners[0].tls", 7, "loopback"),
    (MINIMAL_LISTENER.replace('upstream = "127.0.0.1:993"\n', ""), "listeners[0].upstream",
     2, "required"),
    (MINIMAL_LISTENER + MINIMAL_LISTENER, "listeners[1].name", 9, "duplicate"),
    ("[posture]\nstore = 'mysql://x'\n", "posture.store", 2, "sqlite"),
    ("[audit]\ncheckpoint_interval = '0s'\n", "audit.checkpoint_interval", 2, "zero"),
    ("[posture]\nstore = 'memcached://localhost:11211'\n", "posture.store", 2, "must start"),
]


@pytest.mark.parametrize(("text", "key", "line", "fragment"), BAD_CONFIGS)
def test_bad_config_names_file_key_line(tmp_path: Path, text: str, key: str, line: int,
                                        fragment: str) -> None:
    """Each mistake gives a ConfigError naming the file, the key and its line."""
    path = _write(tmp_path, "mailward.toml", text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.key == key
    assert e.value.line == line
    assert fragment in str(e.value)
    assert str(e.value).startswith(f"{path}:{line}: {key}:")


BAD_POLICIES = [
    ("mode = 'enforcing'\n", "mode", 1, "one of"),
    ("max_posture_age = 'forever'\n", "max_posture_age", 1, "bad duration"),
    ("platforms = ['android', 'symbian']\n", "platforms", 1, "unknown platform"),
    ("[[prohibited]]\nname = 'x'\nids = ['com.x.[abc']\nreason = 'r'\nremediation = 'f'\n",
     "prohibited[0].ids", 3, "bad pattern"),
    ("[[prohibited]]\nname = 'x'\nids = ['a b']\nreason = 'r'\nremediation = 'f'\n",
     "prohibited[0].ids", 3, "bad pattern"),
    ("[[prohibited]]\nname = 'x'\nids = ['a']\nreason = 'r'\n", "prohibited[0].remediation", 1,
     "required"),
    ("[[prohibited]]\nname = 'x'\nids = ['a']\nreason = 'r'\nremediation = 'f'\n"
     "enforce_from = 'soon'\n", "prohibited[0].enforce_from", 6, "bad date"),
    ("[[prohibited]]\nname = 'x'\nids = ['a']\nreason = 'r'\nremediation = 'f'\n"
     "versions = '~1'\n", "prohibited[0].versions", 6, "must start"),
    ("[[prohibited]]\nname = 'x'\nids = ['a']\nreason = 'r'\nremediation = 'f'\n"
     "groups = ['nobody']\n", "prohibited[0].groups", 6, "unknown group"),
    ("[[exemptions]]\nwhy = 'w'\n", "exemptions[0].users", 1, "users or devices"),
    ("[[exemptions]]\nusers = ['a@b']\nwhy = 'w'\nuntill = 2026-01-01\n",
     "exemptions[0].untill", 4, "unknown key"),
    ("mode = \n", "", 1, "TOML syntax"),
]


@pytest.mark.parametrize(("text", "key", "line", "fragment"), BAD_POLICIES)
def test_bad_policy_names_file_key_line(tmp_path: Path, text: str, key: str, line: int,
                                        fragment: str) -> None:
    """Policy mistakes too: file, key and line, one line of text."""
    path = _write(tmp_path, "policy.toml", text)
    with pytest.raises(ConfigError) as e:
        load_policy(path)
    assert e.value.key == key
    assert e.value.line == line
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is named."""
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "config" / "nope.toml")


def test_durations() -> None:
    """Durations take units, and a bare number is seconds."""
    assert parse_duration("250ms") == 0.25
    assert parse_duration("5m") == 300
    assert parse_duration("24h") == 86400
    assert parse_duration(7) == 7
    with pytest.raises(ValueError):
        parse_duration("-3s")


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config: 2 with file:line for a broken policy, 2 for missing certs, 0 when valid."""
    from proxy.pki import certs_init

    (tmp_path / "config").mkdir()
    shutil.copy(ROOT / "config/mailward.toml", tmp_path / "config/mailward.toml")
    shutil.copy(ROOT / "config/policy.toml", tmp_path / "config/policy.toml")
    cfg = str(tmp_path / "config/mailward.toml")
    assert main(["check-config", "--config", cfg]) == 2
    assert "certs init" in capsys.readouterr().err
    certs_init(tmp_path / "certs")
    assert main(["check-config", "--config", cfg]) == 0
    assert "ok" in capsys.readouterr().out
    policy = tmp_path / "config/policy.toml"
    policy.write_text(policy.read_text().replace('mode = "enforce"', 'mode = "enforced"'))
    assert main(["check-config", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert f"{policy}:" in err and "mode" in err and "Traceback" not in err


def test_readme_policy_example_is_valid(tmp_path: Path) -> None:
    """The policy example ops staff read in README.md loads as it stands."""
    import re

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"### The policy file\s+```toml\n(.*?)```", readme, re.S)
    assert block is not None
    policy = load_policy(_write(tmp_path, "policy.toml", block.group(1)))
    assert policy.prohibited[0].name == "TikTok"
    assert policy.exemptions and policy.approved and "finance" in policy.groups


def test_redis_url_file_parameters_resolve_like_other_paths(tmp_path: Path) -> None:
    """A relative ssl_ca_certs/ssl_certfile/ssl_keyfile in a Redis store URL is resolved
    against the deployment root (as a relative SQLite path is); absolute ones, the
    password and the other parameters are kept as written."""
    root = Path(load_config(_write(tmp_path, "sqlite.toml", "")).posture.store
                .removeprefix("sqlite://")).parent.parent
    url = ("rediss://:p%40ss@redis.corp.example:6380/0?ssl_ca_certs=certs/redis%20ca.pem"
           "&health_check_interval=5&ssl_certfile=/etc/mailward/client.pem")
    cfg = load_config(_write(tmp_path, "redis.toml", f'[posture]\nstore = "{url}"\n'))
    assert cfg.posture.store == (
        f"rediss://:p%40ss@redis.corp.example:6380/0?ssl_ca_certs={root}/certs/redis%20ca.pem"
        "&health_check_interval=5&ssl_certfile=/etc/mailward/client.pem")
    plain = "redis+sentinel://s1:26379,s2:26379/mymaster/0"
    cfg = load_config(_write(tmp_path, "plain.toml", f'[posture]\nstore = "{plain}"\n'))
    assert cfg.posture.store == plain


@pytest.mark.parametrize(("url", "said"), [
    ("redis+sentinel://s1:26379/mymaster/0?socket_timeout=5", "unknown parameter 'socket_timeout'"),
    ("redis+sentinel://s1:26379/mymaster/0?ssl=yes", "ssl must be true or false"),
    ("redis+sentinel://:pw@s1/mymaster", "is not host:port"),
    ("redis+sentinel://s1:26379", "the path must be /<service>[/<db>]"),
])
def test_a_bad_sentinel_url_is_a_config_error(tmp_path: Path, url: str, said: str) -> None:
    """A redis+sentinel:// store URL is read when the config is (so check-config names
    a bad one, in one line, without the password), not first when serve connects."""
    path = _write(tmp_path, "mailward.toml", f'[posture]\nstore = "{url}"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert said in message and "posture.store" in message and "\n" not in message
    assert ":pw@" not in message
