"""POP3 in the configuration: the listener choice, the shipped example, and the server
finding the front end by its protocol name."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from proxy.config import load_config
from proxy.frontends import pop3
from proxy.startup import frontend_module as _frontend_module

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parent.parent


def test_the_commented_pop3_example_is_a_valid_listener(tmp_path: Path) -> None:
    """Uncommenting the shipped pop3s example gives a valid pop3 listener on 995."""
    text = (ROOT / "config/mailward.toml").read_text()
    block = re.search(r"^# \[\[listeners\]\]\n(?:# .*\n)*?# name = \"pop3s\"\n(?:# .*\n)*",
                      text, re.MULTILINE)
    assert block is not None
    uncommented = "".join(line[2:] + "\n" for line in block.group().splitlines())
    (tmp_path / "config").mkdir()
    shutil.copy(ROOT / "config/policy.toml", tmp_path / "config/policy.toml")
    path = tmp_path / "config/mailward.toml"
    path.write_text(text.replace(block.group(), uncommented))
    listeners = {lst.name: lst for lst in load_config(path).listeners}
    lst = listeners["pop3s"]
    assert (lst.protocol, lst.port, lst.tls, lst.upstream_port) == ("pop3", 995, "implicit", 995)


def test_a_stls_pop3_listener_loads_and_the_server_finds_its_front_end(tmp_path: Path) -> None:
    """protocol = "pop3" with tls = "starttls" is accepted, and proxy.server loads
    proxy.frontends.pop3.start for it."""
    (tmp_path / "config").mkdir()
    path = tmp_path / "config/mailward.toml"
    path.write_text('[[listeners]]\nname = "pop3"\nprotocol = "pop3"\n'
                    'listen = "127.0.0.1:1110"\ntls = "starttls"\nupstream = "127.0.0.1:995"\n')
    (lst,) = load_config(path).listeners
    assert (lst.protocol, lst.tls) == ("pop3", "starttls")
    assert _frontend_module(lst.protocol).start is pop3.start
