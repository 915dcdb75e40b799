# mailward — make demo, make test, make bench.
# `make test` works on a fresh Debian machine: it installs the peer servers the tests
# drive (Dovecot, Postfix, swaks, mbsync, nginx, fetchmail, redis; systemd-analyze for
# the unit file check; Chromium and a font for the auditor report's browser test) when
# missing, creates .venv from the locked, hash-checked dependency set (requirements.lock)
# and installs the package itself on top, editable, without deps.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
LOCK    := requirements.lock
# The container's subset of LOCK: the same pins and hashes without the test extras.
RUNTIME_LOCK := requirements-runtime.lock
PIP_COMPILE = $(BIN)/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe \
              --no-emit-index-url --no-emit-find-links
APT_PKGS := dovecot-imapd dovecot-submissiond dovecot-lmtpd postfix swaks isync msmtp \
            libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl \
            nginx libnginx-mod-mail libnginx-mod-stream dovecot-pop3d fetchmail systemd \
            redis-server chromium fonts-dejavu-core
PEER_BINS := /usr/sbin/dovecot /usr/sbin/postfix /usr/bin/swaks /usr/bin/mbsync /usr/bin/msmtp \
             /usr/sbin/nginx /usr/lib/nginx/modules/ngx_mail_module.so \
             /usr/lib/dovecot/pop3-login /usr/bin/fetchmail /usr/bin/systemd-analyze \
             /usr/lib/nginx/modules/ngx_stream_module.so /usr/bin/redis-server \
             /usr/bin/chromium /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf

.PHONY: all venv lock peers test test-fast lint demo bench bench-compare clean

all: test

$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# Re-resolve pyproject.toml's dependencies (runtime + test extras) to the newest allowed
# versions, with hashes; then the container's runtime subset under the same pins.
lock: venv
	$(BIN)/pip install -q 'pip-tools>=7.4'
	$(PIP_COMPILE) --upgrade --extra test --output-file $(LOCK) pyproject.toml
	$(PIP_COMPILE) --upgrade --constraint $(LOCK) --output-file $(RUNTIME_LOCK) pyproject.toml

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

# The fast loop: pure and conversation tests, no peer servers, in parallel (pytest-xdist;
# two workers a core, since many conversation tests wait on timers rather than compute).
FAST_WORKERS ?= $(shell echo $$(( $$(nproc) * 2 )))
test-fast: venv
	$(BIN)/pytest -q -m "not peer and not slow" -n $(FAST_WORKERS)

demo: venv
	$(BIN)/mailward demo

# Every benchmark (bench/*.py, each printing ratios against peers measured in the same
# run, and bench/load.py, the 2,000-session mixed load with its correctness checks),
# collected into one markdown table, bench/RESULTS.md, which README links; then the
# slow tests, the long load/soak runs kept out of `make test`.
bench: venv peers
	$(BIN)/python bench/results.py --out bench/RESULTS.md
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
