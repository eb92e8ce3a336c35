# Metering gateway — every target installs what it needs into .venv/ first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8080
EMULATOR_PORT ?= 8090

.DEFAULT_GOAL := help
.PHONY: help install browser run test lint bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,test]'
	# the anthropic SDK's previous major version, beside the current one, for the compatibility tests
	$(BIN)/pip install --quiet --no-deps --upgrade --target $(VENV)/sdk/anthropic-1 'anthropic==1.17.0'
	touch $(STAMP)

install: $(STAMP) ## build .venv/ with the gateway and its test tools

run: $(STAMP) ## the demo: the gateway on embedded Redis, the provider emulator, config/demo/ (EMULATOR_PORT=8090)
	$(BIN)/gateway serve --host $(HOST) --port $(PORT) --with-emulator --emulator-port $(EMULATOR_PORT)

browser: ## Debian's chromium, for the dashboard test (apt-get, as root; that test is skipped without it)
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the dashboard test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "chromium could not be installed: the dashboard test will be skipped"; \
	  else echo "chromium is not installed (needs root for apt-get): the dashboard test will be skipped"; fi; }

test: $(STAMP) browser ## run the whole test suite (starts its own redis-server)
	$(BIN)/pytest -q

lint: $(STAMP) ## ruff and strict mypy
	$(BIN)/ruff check gateway tests bench
	$(BIN)/mypy

bench: $(STAMP) ## measure gateway overhead against the emulator and a bare pass-through proxy
	$(BIN)/python bench/bench.py

clean: ## remove the virtualenv and runtime data
	rm -rf $(VENV) var/
