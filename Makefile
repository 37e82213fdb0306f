# Two commands do all the set-up:  `make chat`  and  `make test`.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
MSG    ?=

.PHONY: setup chat test test-slow data-deps bench-data clean

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

test: setup data-deps
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# Debian packages with the offline text the data-pipeline tests read (root or sudo; CI runs it).
data-deps:
	bash .ci/data-deps

bench-data: setup data-deps
	$(BIN)/python -m pip install --quiet --disable-pip-version-check datatrove 'xxhash<4' orjson spacy
	$(BIN)/python bench/data.py

clean:
	rm -rf $(VENV) .pytest_cache
