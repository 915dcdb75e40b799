# mailward: conditional-access proxy for corporate mail.
#
#   docker build -t mailward .
#   docker run -d --name mailward \
#     -v "$PWD/config:/srv/mailward/config:ro" -v "$PWD/certs:/srv/mailward/certs:ro" \
#     -v mailward-state:/srv/mailward/state \
#     -p 993:993 -p 143:143 -p 587:587 -p 465:465 -p 443:443 mailward
#
# Reload the policy:  docker kill -s HUP mailward   (editing the mounted file also works)
# Stop cleanly:       docker stop mailward          (SIGTERM: sessions get shutdown_grace)

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The dependencies exactly as CI tested them (requirements-runtime.lock: the pins and
# hashes of requirements.lock without the test extras; `make lock` writes both), then
# the package itself without resolving anything again (no tests, no certificates: see
# .dockerignore).
WORKDIR /src
COPY requirements-runtime.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements-runtime.lock
COPY pyproject.toml README.md LICENSE ./
COPY proxy ./proxy
RUN pip install --no-cache-dir --no-deps . \
 && rm -rf /src

# The deployment root: relative paths in mailward.toml resolve against it, so the
# shipped config's certs/... and state/... land in the volumes below.
RUN groupadd --system --gid 10001 mailward \
 && useradd --system --uid 10001 --gid mailward --home-dir /srv/mailward \
            --shell /usr/sbin/nologin mailward \
 && mkdir -p /srv/mailward/config /srv/mailward/certs /srv/mailward/state \
 && chown mailward:mailward /srv/mailward/state
# The repository's config/ (= the packaged samples; its policy enforces, where `mailward
# init` writes report-only): mount your own config/ over it.
COPY config/ /srv/mailward/config/

WORKDIR /srv/mailward
ENV MAILWARD_CONFIG=/srv/mailward/config/mailward.toml \
    MAILWARD_LOG_FORMAT=json \
    MAILWARD_HEALTH_URL=https://127.0.0.1:8443/healthz

# config and certs are read-only inputs; state holds the posture db and the audit log.
VOLUME ["/srv/mailward/config", "/srv/mailward/certs", "/srv/mailward/state"]

# Non-root. Docker 20.10+ lets unprivileged processes bind ports below 1024 inside the
# container (net.ipv4.ip_unprivileged_port_start=0); elsewhere add NET_BIND_SERVICE.
USER 10001:10001

# IMAPS, IMAP+STARTTLS, submission, submissions, ActiveSync (HTTPS), control API.
EXPOSE 993 143 587 465 443 8443

# Liveness of the control API on loopback. The certificate is not verified here: the
# probe only asks whether this process answers, and the server name may not be
# 127.0.0.1. tests/test_server.py runs this exact command against `mailward serve`.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import os, ssl, sys, urllib.request as u; c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE; r = u.urlopen(os.environ['MAILWARD_HEALTH_URL'], context=c, timeout=4); sys.exit(0 if r.status == 200 else 1)"]

ENTRYPOINT ["mailward"]
CMD ["serve"]
