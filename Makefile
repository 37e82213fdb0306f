# Two commands do all the set-up:  `make chat`  and  `make test`.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
MSG    ?=

.PHONY: setup chat serve test test-slow test-browser data-deps browser-deps bench-data bench-serve clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

setup: $(BIN)/.installed
	$(BIN)/phi3 fetch >/dev/null

# Chat with the embedded default model (SmolLM2-135M-Instruct). `make chat MSG="Hello"` for one reply.
chat: setup
	$(BIN)/phi3 chat $(if $(MSG),"$(MSG)",)

# The OpenAI-compatible server with the chat page on http://127.0.0.1:8000/
serve: setup
	$(BIN)/phi3 serve

# Everything but the long checks (marker `slow`), the chat page in headless chromium included.
test: setup data-deps browser-deps
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# Debian packages with the offline text the data-pipeline tests read (root or sudo; CI runs it).
data-deps:
	bash .ci/data-deps

bench-data: setup data-deps
	$(BIN)/python -m pip install --quiet --disable-pip-version-check datatrove 'xxhash<4' orjson spacy
	$(BIN)/python bench/data.py

# Debian's chromium for the chat page's test (never a browser download; root or sudo).
browser-deps:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# The chat page in headless chromium (Debian: apt-get install chromium).
test-browser: setup
	$(BIN)/python -m pytest -q -m browser

# llama.cpp's server, built from llama-cpp-python's PyPI source in its own venv (several minutes),
# then the load test of `phi3 serve` against it (bench/serve_load.py; writes BENCHMARKS.md).
.venv-llama/bin/.installed:
	$(PYTHON) -m venv .venv-llama
	.venv-llama/bin/python -m pip install --quiet --no-binary llama-cpp-python 'llama-cpp-python[server]'
	touch $@

bench-serve: setup .venv-llama/bin/.installed
	$(BIN)/python bench/serve_load.py

clean:
	rm -rf $(VENV) .pytest_cache
