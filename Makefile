# mailward — make demo, make test, make bench.
# `make test` works on a fresh Debian machine: it installs the peer servers the tests
# drive (Dovecot, Postfix, swaks, mbsync, nginx, fetchmail, redis) when missing, creates .venv and
# installs the package with its test extras.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
APT_PKGS := dovecot-imapd dovecot-submissiond dovecot-lmtpd postfix swaks isync msmtp \
            libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl \
            nginx libnginx-mod-mail libnginx-mod-stream dovecot-pop3d fetchmail \
            redis-server
PEER_BINS := /usr/sbin/dovecot /usr/sbin/postfix /usr/bin/swaks /usr/bin/mbsync /usr/bin/msmtp \
             /usr/sbin/nginx /usr/lib/nginx/modules/ngx_mail_module.so \
             /usr/lib/dovecot/pop3-login /usr/bin/fetchmail \
             /usr/lib/nginx/modules/ngx_stream_module.so /usr/bin/redis-server

.PHONY: all venv peers test test-fast lint demo bench bench-compare clean

all: test

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages of the real peer servers, installed only when one is missing.
peers:
	@missing=0; for b in $(PEER_BINS); do [ -e $$b ] || missing=1; done; \
	perl -MNet::SSLeay -MIO::Socket::SSL -MAuthen::SASL -e1 2>/dev/null || missing=1; \
	if [ $$missing = 1 ]; then \
	  echo "installing peer servers: $(APT_PKGS)"; \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	  apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_PKGS); \
	fi

test: lint peers
	$(BIN)/pytest -q

# ruff on everything, mypy --strict on proxy/ (settings in pyproject.toml).
lint: venv
	$(BIN)/ruff check proxy tests bench
	$(BIN)/mypy

# The fast loop: pure and conversation tests, no peer servers.
test-fast: venv
	$(BIN)/pytest -q -m "not peer and not slow"

demo: venv
	$(BIN)/mailward demo

# Benchmarks print ratios against peers measured in the same run; slow tests are the
# long load/soak runs kept out of `make test`.
bench: venv peers
	$(BIN)/python bench/decide.py
	$(BIN)/python bench/startup.py
	@for b in bench/imap.py bench/smtp.py bench/activesync.py bench/tls_memory.py; do \
	  echo "== $$b"; $(BIN)/python $$b || exit 1; done
	$(BIN)/pytest -q -m slow -o addopts=""

# One benchmark on a base revision and on this tree, in alternating rounds (fresh
# processes), with medians, ratios and spreads: make bench-compare BASE=1fb88ba BENCH=bench/startup.py
BASE   ?= main
BENCH  ?= bench/decide.py
ROUNDS ?= 5
bench-compare: venv
	$(BIN)/python bench/compare.py $(BENCH) --base $(BASE) --rounds $(ROUNDS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis
