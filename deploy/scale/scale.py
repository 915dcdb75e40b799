#!/usr/bin/env python3
"""Two ``mailward serve`` instances behind nginx ``stream`` with PROXY protocol, sharing
posture, replay memory, revocations and the policy through Redis, on one host.

    python deploy/scale/scale.py --root /tmp/mw-scale --imap-upstream imap.corp.example:993

writes ``<root>/config/{a,b}.toml``, ``<root>/nginx.conf`` and ``<root>/redis/redis.conf``
(certificates from ``mailward certs init`` when ``<root>/certs`` is missing), starts
redis-server, both instances and nginx, prints the addresses and waits for Ctrl-C.
tests/test_scale.py drives the same functions. In production Redis runs on its own
host(s) with AOF persistence (``appendonly yes``) and Sentinel (``redis+sentinel://``).

nginx: ``mailward_imaps`` balances both instances on the public port; the pinned
ports reach one instance each (operations, and the tests); ``--eas-upstream`` adds
an ActiveSync listener to each instance, balanced the same way. ``proxy_protocol on``
sends the phone's address; each listener sets ``proxy_protocol = true`` and trusts
only the balancer's address (``[server] trusted_proxies``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
INSTANCES = ("a", "b")

NGINX_CONF = """\
load_module {stream_module};
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log info;
events {{ worker_connections 1024; }}
stream {{
{services}}}
"""

#: One service balanced over both instances on ``lb``, and pinned to each.
NGINX_SERVICE = """\
    upstream mailward_{name} {{
        server 127.0.0.1:{a};
        server 127.0.0.1:{b};
    }}
    server {{ listen 127.0.0.1:{lb}; proxy_pass mailward_{name}; proxy_protocol on; }}
    server {{ listen 127.0.0.1:{pin_a}; proxy_pass 127.0.0.1:{a}; proxy_protocol on; }}
    server {{ listen 127.0.0.1:{pin_b}; proxy_pass 127.0.0.1:{b}; proxy_protocol on; }}
"""

INSTANCE_CONF = """\
[server]
state_dir = "state-{name}"
policy = "config/policy-{name}.toml"
instance = "{name}"
trusted_proxies = ["127.0.0.1/32"]
shutdown_grace = "1s"
recheck_interval = "5s"

[posture]
store = "{redis_url}"
cache_max_age = "5m"

[audit]
path = "state-{name}/audit.jsonl"
checkpoint_interval = "5s"

[api]
listen = "127.0.0.1:{api}"
tls = true

[[listeners]]
name = "imaps"
protocol = "imap"
listen = "127.0.0.1:{imaps}"
tls = "implicit"
client_cert = "optional"
unidentified = "deny"
proxy_protocol = true
upstream = "{imap_upstream}"
upstream_tls = "implicit"
upstream_ca = "{upstream_ca}"
"""

#: ActiveSync (HTTPS) on each instance, when an ActiveSync upstream is given; nginx
#: balances it too (port ``lb_eas``) and pins it (``pin_a_eas``, ``pin_b_eas``).
EAS_LISTENER = """
[[listeners]]
name = "activesync"
protocol = "activesync"
listen = "127.0.0.1:{eas}"
proxy_protocol = true
upstream = "{eas_upstream}"
upstream_ca = "{upstream_ca}"
"""

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Layout:
    """Where everything listens."""

    root: Path
    redis_url: str
    ports: dict[str, int] = field(default_factory=dict)

    def config(self, name: str) -> Path:
        return self.root / "config" / f"{name}.toml"


def write_configs(root: Path, redis_url: str, imap_upstream: str, upstream_ca: str,
                  policy: str, eas_upstream: str = "") -> Layout:
    """Config files for both instances and nginx under ``root`` (ActiveSync too when
    ``eas_upstream``, an https:// URL, is given)."""
    layout = Layout(root, redis_url)
    kinds = ("imaps", "api", "eas") if eas_upstream else ("imaps", "api")
    pins = ("lb_eas", "pin_a_eas", "pin_b_eas") if eas_upstream else ()
    for key in ("lb", "pin_a", "pin_b", *pins, *(f"{n}_{p}" for n in INSTANCES
                                                 for p in kinds)):
        layout.ports[key] = free_port()
    (root / "config").mkdir(parents=True, exist_ok=True)
    for name in INSTANCES:
        (root / "config" / f"policy-{name}.toml").write_text(policy)
        layout.config(name).write_text(INSTANCE_CONF.format(
            name=name, redis_url=redis_url, api=layout.ports[f"{name}_api"],
            imaps=layout.ports[f"{name}_imaps"], imap_upstream=imap_upstream,
            upstream_ca=upstream_ca) + (EAS_LISTENER.format(
                eas=layout.ports[f"{name}_eas"], eas_upstream=eas_upstream,
                upstream_ca=upstream_ca) if eas_upstream else ""))
    ports = layout.ports
    services = NGINX_SERVICE.format(name="imaps", a=ports["a_imaps"], b=ports["b_imaps"],
                                    lb=ports["lb"], pin_a=ports["pin_a"], pin_b=ports["pin_b"])
    if eas_upstream:
        services += NGINX_SERVICE.format(name="eas", a=ports["a_eas"], b=ports["b_eas"],
                                         lb=ports["lb_eas"], pin_a=ports["pin_a_eas"],
                                         pin_b=ports["pin_b_eas"])
    (root / "nginx.conf").write_text(NGINX_CONF.format(
        stream_module=STREAM_MODULE, root=root, services=services))
    return layout


def start_instance(layout: Layout, name: str) -> subprocess.Popen[bytes]:
    mailward = Path(sys.executable).with_name("mailward")
    with open(layout.root / f"serve-{name}.log", "ab") as log:
        return subprocess.Popen(
            [str(mailward), "serve"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env={**os.environ, "MAILWARD_CONFIG": str(layout.config(name)),
                 "MAILWARD_LOG_FORMAT": "json"})


def start_nginx(layout: Layout) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([NGINX, "-p", str(layout.root), "-e",
                             str(layout.root / "nginx-error.log"), "-c",
                             str(layout.root / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("nginx exited: "
                               + (layout.root / "nginx-error.log").read_text()[-2000:])
        try:  # a pinned port: a probe of the balanced one while the instances are
            # still starting would have nginx set both aside for 10 s (max_fails)
            socket.create_connection(("127.0.0.1", layout.ports["pin_a"]), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("nginx did not listen")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--imap-upstream", required=True, help="host:port (implicit TLS)")
    ap.add_argument("--eas-upstream", default="", help="https://host[:port] (ActiveSync)")
    ap.add_argument("--upstream-ca", default="", help="PEM bundle for the upstream")
    ap.add_argument("--policy", type=Path, default=Path("config/policy.toml"))
    args = ap.parse_args()
    root = args.root.resolve()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from peers.redis import RedisServer  # the same throw-away Redis the tests use

    if not (root / "certs").exists():
        subprocess.run([str(Path(sys.executable).with_name("mailward")), "certs", "init",
                        "--dir", str(root / "certs")], check=True)
    redis = RedisServer(root / "redis").start()
    layout = write_configs(root, redis.url, args.imap_upstream, args.upstream_ca,
                           args.policy.read_text(), args.eas_upstream)
    procs = [start_instance(layout, n) for n in INSTANCES]
    nginx = start_nginx(layout)
    print(f"imaps via nginx: 127.0.0.1:{layout.ports['lb']}; redis: {redis.url}")
    if "lb_eas" in layout.ports:
        print(f"activesync via nginx: https://127.0.0.1:{layout.ports['lb_eas']}")
    for n in INSTANCES:
        print(f"instance {n}: api https://127.0.0.1:{layout.ports[n + '_api']}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for p in [nginx, *procs]:
            stop(p)
        redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
