# The two commands of the README: `make demo` and `make test`. Each sets everything up first
# (a virtualenv with migbed and its test tools; Debian's prometheus package when it can).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test setup system-deps lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed system-deps

# Prometheus (and promtool) for the metrics and dashboard tests: Debian's package.
system-deps:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus; \
	  else \
	    echo "prometheus is missing: install it with 'sudo apt-get install prometheus'"; \
	  fi; \
	fi

demo: $(BIN)/.installed
	$(BIN)/migbed demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check .

clean:
	-$(BIN)/migbed down
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
