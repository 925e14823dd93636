# Magpie's two quickstart commands are `make run` and `make test`; everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch. With a GPU, install your CUDA build first (see README) and run `make install TORCH_SPEC=`.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install run test lint typecheck bench db-upgrade bootstrap clean

$(BIN)/magpie: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip >/dev/null
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	@$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(BIN)/magpie

install: $(BIN)/magpie

run: install
	@$(BIN)/magpie db upgrade --quiet
	@$(BIN)/magpie run

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/generation.py

db-upgrade: install
	$(BIN)/magpie db upgrade

bootstrap: install
	$(BIN)/magpie db upgrade --quiet
	$(BIN)/magpie bootstrap

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The message catalogue (core/i18n.py): re-extract the marked English texts and merge them into every language's
# .po; then translate the entries left empty (tests/test_i18n.py fails until there are none).
.PHONY: messages
messages: install
	@mkdir -p build
	$(BIN)/pybabel -q extract --no-location --omit-header -k _ -k N_ -k ngettext:1,2 -o build/magpie.pot core bot trainer
	$(BIN)/pybabel -q update --ignore-obsolete -w 120 -i build/magpie.pot -d core/locale -D magpie
