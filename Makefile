# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEB_STAMP := $(VENV)/.debian
BENCH_DEB_STAMP := $(VENV)/.debian-bench
# Debian packages the project uses: the default English corpus (fortunes),
# headless Chromium for the dashboard test, clang (bpfel) to build the Solana program,
# nftables for the WAN testbed (random loss, link down).
DEB_PACKAGES := fortunes chromium clang nftables
# Only for `make bench`: Python's documentation sources, a corpus of bench/convergence_matrix.py.
BENCH_DEB_PACKAGES := python3-doc

.PHONY: demo test check install debian bench clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

# $(call apt_install,PACKAGES): install those of PACKAGES that are missing (sudo unless root).
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

$(DEB_STAMP): | $(VENV)/bin/python
	$(call apt_install,$(DEB_PACKAGES))
	touch $@

$(BENCH_DEB_STAMP): | $(VENV)/bin/python
	$(call apt_install,$(BENCH_DEB_PACKAGES))
	touch $@

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q --upgrade pip
	# A CPU build of torch for this machine; pyproject.toml stays liberal for GPU users.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,solana]'
	touch $@

install: $(STAMP) $(DEB_STAMP)
	@# The on-chain program, built from source (cached under build/solana by source hash).
	@$(BIN)/python -m psyche.ledger.solana.build >/dev/null

# The architecture and the types, without the test suite (half a minute): every import points
# down (import-linter contracts in pyproject.toml) and src/ type-checks (mypy).
check: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

demo: install
	$(BIN)/psyche demo

# The architecture and the types are checked before the tests (see check).
test: check
	$(BIN)/python -m pytest -q --durations=25

bench: install $(BENCH_DEB_STAMP)
	$(BIN)/python bench/distro_codec.py
	$(BIN)/python bench/coordinator.py
	$(BIN)/python bench/p2p.py
	$(BIN)/python bench/solana.py
	$(BIN)/python bench/dashboard.py
	$(BIN)/python bench/load.py --quick
	$(BIN)/python bench/convergence.py --quick
	$(BIN)/python bench/convergence_matrix.py --quick
	$(BIN)/python bench/adversary.py --quick
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/node.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
