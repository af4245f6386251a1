# Every target bootstraps .venv itself from pyproject.toml + constraints.txt,
# so a fresh clone needs nothing but Python >= 3.11 and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test notebooks bench lock clean exercise check-laptop proto cluster

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; sys.exit("refimpl needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,notebooks,peers,grpc]'
	touch $(STAMP)

# The Node clients of tests/js (lesson 07), installed exactly as locked.
NODE_STAMP := tests/js/node_modules/.installed-stamp

$(NODE_STAMP): tests/js/package.json tests/js/package-lock.json
	npm ci --prefix tests/js --no-audit --no-fund
	touch $(NODE_STAMP)

test: $(NODE_STAMP)

run: $(STAMP)
	$(BIN)/refimpl serve

# Two pytest workers, each taking whole files (module fixtures such as the
# server on port 8000 in test_commands.py start once), except the notebooks,
# which go one by one (a test class each in tests/test_notebooks.py).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 --dist loadscope

# Resumable streams across processes (issue 13, lesson 11): Redis on 6390, two
# `refimpl serve --store redis://127.0.0.1:6390/0` workers on free ports, and
# nginx round-robin in front on 8080 (HTTP/1.1) and 8081 (h2c).  It prints
# every URL and pid: `kill -9` one worker and resume on the other.  Ctrl-C
# stops all of it.  `ARGS=...` goes to the command (`--workers 3`, or any
# `refimpl serve` flag such as `--resume-grace 30`).
cluster: $(STAMP)
	$(BIN)/python -m refimpl.examples.cluster --port 8080 --h2c-port 8081 --redis-port 6390 --workers 2 $(ARGS)

notebooks: $(STAMP)
	$(BIN)/python -m pytest tests/test_notebooks.py

bench: $(STAMP)
	$(BIN)/refimpl bench

# The workshop (lessons/WORKSHOP.md).  `make exercise N=01` checks your
# exercises/01-*/exercise.py and says PASS or FAIL; SOLUTION=1 checks the
# reference solution instead; no N lists the exercises.
exercise: $(STAMP)
	@$(BIN)/python exercises/check.py $(N) $(if $(SOLUTION),--solution)

# Is this laptop ready for the workshop?  Starts a server on a free port,
# streams over SSE, WebSocket and curl, runs an exercise and a notebook.
check-laptop: $(STAMP)
	@$(BIN)/python exercises/laptop.py

# Regenerate refimpl/v1/ from proto/refimpl/v1/chat.proto (lesson 05): the
# protobuf messages, the grpcio stubs, and the connectrpc server and clients.
# Commit the result; tests/test_grpc_codegen.py fails when they drift apart.
proto: $(STAMP)
	$(BIN)/python -m refimpl.protogen

# Re-pin every dependency to what resolves today (commit the result).
lock:
	rm -rf /tmp/refimpl-lock && $(PYTHON) -m venv /tmp/refimpl-lock
	/tmp/refimpl-lock/bin/pip install --quiet -e '.[dev,notebooks,peers,grpc]'
	/tmp/refimpl-lock/bin/pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV)
