# Magpie's two quickstart commands are `make run` and `make test`; everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed before Magpie, from PyTorch's CPU wheel index when it answers within TORCH_INDEX_TIMEOUT
# seconds. Otherwise it comes from pip's usual index, and that is a CPU build only where the index has one: on
# Linux x86-64 plain PyPI's torch is the CUDA build (several GB); the install says which build it got.
# With a GPU, install your CUDA build first (see README) and run `make install TORCH_SPEC=` (skips this step).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX_TIMEOUT ?= 5
PYTEST_ARGS ?=
# Everything else comes pinned, with hashes, from a lock file (`make lock` writes them from pyproject.toml): pip
# installs exactly those files or nothing (--require-hashes), then Magpie itself without dependencies or a build
# environment of its own (the lock pins the build backend), and `pip check` proves the whole set is consistent.
LOCK ?= requirements-dev.lock

.PHONY: install install-torch install-locked lock run test lint typecheck bench db-upgrade bootstrap clean

$(BIN)/magpie: pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip >/dev/null
	@$(MAKE) --no-print-directory install-torch VENV=$(VENV)
	@$(MAKE) --no-print-directory install-locked VENV=$(VENV) LOCK=$(LOCK) EDITABLE=-e
	@touch $(BIN)/magpie

# The locked dependencies, then Magpie (EDITABLE=-e for a working tree), into an existing venv that has torch.
install-locked:
	@$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	@$(BIN)/python -m pip install -q --no-deps --no-build-isolation $(EDITABLE) .
	@$(BIN)/python -m pip check >/dev/null || { $(BIN)/python -m pip check; exit 1; }

# Rewrites both lock files from pyproject.toml (after changing a dependency): the newest versions that satisfy it,
# for every platform and Python Magpie supports, with every file's hash; torch is left to install-torch.
LOCK_OPTIONS = --universal --generate-hashes --python-version 3.11 --override requirements-lock-overrides.txt \
	--custom-compile-command "make lock" --quiet
lock: install
	$(BIN)/uv pip compile pyproject.toml requirements-lock.in $(LOCK_OPTIONS) -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml requirements-lock.in --extra dev $(LOCK_OPTIONS) -o requirements-dev.lock

# Into an existing venv ($(VENV), e.g. CI's scratch one). The probe is one HTTP request with a short timeout, so an
# unreachable CPU index costs seconds, not pip's retries for every package.
install-torch:
	@if [ -z "$(TORCH_SPEC)" ]; then exit 0; fi; \
	if $(BIN)/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))" \
	     "$(TORCH_INDEX)/torch/" "$(TORCH_INDEX_TIMEOUT)" 2>/dev/null \
	   && $(BIN)/python -m pip install -q --index-url "$(TORCH_INDEX)" "$(TORCH_SPEC)"; then :; \
	else \
	  echo "No $(TORCH_SPEC) from the CPU wheel index $(TORCH_INDEX) (unreachable?): using pip's usual index." >&2; \
	  $(BIN)/python -m pip install -q "$(TORCH_SPEC)" || exit 1; \
	fi; \
	$(BIN)/python -W ignore -c "import torch; print('Installed torch', torch.__version__, \
	  '(CUDA build: a GPU install, several GB)' if torch.version.cuda else '(CPU build)')"

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
