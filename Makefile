# Every target bootstraps .venv itself from pyproject.toml + constraints.txt,
# so a fresh clone needs nothing but Python >= 3.11 and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test notebooks bench lock clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; sys.exit("refimpl needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,notebooks,peers]'
	touch $(STAMP)

# The Node clients of tests/js (lesson 07), installed exactly as locked.
NODE_STAMP := tests/js/node_modules/.installed-stamp

$(NODE_STAMP): tests/js/package.json tests/js/package-lock.json
	npm ci --prefix tests/js --no-audit --no-fund
	touch $(NODE_STAMP)

test: $(NODE_STAMP)

run: $(STAMP)
	$(BIN)/refimpl serve

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

notebooks: $(STAMP)
	$(BIN)/python -m pytest tests/test_notebooks.py

bench: $(STAMP)
	$(BIN)/refimpl bench

# Re-pin every dependency to what resolves today (commit the result).
lock:
	rm -rf /tmp/refimpl-lock && $(PYTHON) -m venv /tmp/refimpl-lock
	/tmp/refimpl-lock/bin/pip install --quiet -e '.[dev,notebooks,peers]'
	/tmp/refimpl-lock/bin/pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV)
