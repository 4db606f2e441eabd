# The two commands of the README: `make demo` and `make test`. Each sets everything up first
# (a virtualenv with migbed and its test tools; Debian's prometheus and tmux packages when it
# can).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test test-quick setup system-deps native lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed system-deps native

# migbed's native libraries, each built by `cluster/native/cc` (gcc or cc when there is one;
# else zig's C compiler from PyPI, `ziglang`, into the venv: no root needed; else, as root on
# Debian, build-essential from apt). Without a compiler only what needs a library is missing,
# and it says how to get it. The trace recorder's LD_PRELOAD allocator (`migbed trace record`):
NATIVE_LIBS := cluster/native/libmigbedtrace.so
NATIVE_LIBS += nodes/host/native/libmigbedpaced.so
NATIVE_LIBS += nodes/host/native/libmigbedfault.so

native: $(NATIVE_LIBS)

cluster/native/libmigbedtrace.so: cluster/native/tracealloc.c | $(BIN)/.installed
	@sh cluster/native/cc $@ $< $(BIN)
nodes/host/native/libmigbedpaced.so: nodes/host/native/pacedloop.c | $(BIN)/.installed
	@sh cluster/native/cc $@ $< $(BIN)

nodes/host/native/libmigbedfault.so: nodes/host/native/faultpath.c nodes/host/native/faultserve.h nodes/host/native/faultwire.h | $(BIN)/.installed
	@sh cluster/native/cc $@ $< $(BIN)

# Prometheus (and promtool) for the metrics and dashboard tests, tmux for the test that drives
# `migbed top` in a real terminal: Debian's packages.
SYSTEM_PACKAGES := prometheus tmux

system-deps:
	@missing=""; \
	command -v prometheus >/dev/null && command -v promtool >/dev/null || missing="prometheus"; \
	command -v tmux >/dev/null || missing="$$missing tmux"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else \
	    echo "missing:$$missing; install with 'sudo apt-get install $(SYSTEM_PACKAGES)'"; \
	  fi; \
	fi

demo: $(BIN)/.installed native
	$(BIN)/migbed demo

# The whole suite, in parallel (pyproject.toml's addopts); the Python of every host process and
# CLI call reads migbed's own modules compiled once here, even where PYTHONDONTWRITEBYTECODE is set.
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m compileall -q cluster nodes workloads
	$(BIN)/pytest -q

# The quick loop: every tier but Ray's (unit and in-process), on four workers even on two
# cores, since its slowest tests wait on paced links (tests/conftest.py says why): 71 s here.
test-quick: $(BIN)/.installed
	$(BIN)/pytest -q -m "not ray"

lint: $(BIN)/.installed
	$(BIN)/ruff check .

clean:
	-$(BIN)/migbed down
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
