# The two commands of the README. Both work on a fresh clone: they create
# .venv and install what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

# requirements-openai.txt too, so the demo's OpenAI path is tested against a local fake server.
$(VENV)/.dev: requirements.txt requirements-dev.txt requirements-celery.txt requirements-rq.txt requirements-dramatiq.txt requirements-openai.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt -r requirements-openai.txt
	touch $@ $(VENV)/.runtime

tests/node/node_modules: tests/node/package.json tests/node/package-lock.json
	@if command -v npm >/dev/null; then npm ci --prefix tests/node --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the node EventSource tests will be skipped"; fi

# A local SECRET_KEY, made once, for `make run` and the `flask` commands
# beside it (tail, prune, jobs worker); production sets SECRET_KEY instead.
instance/config.py:
	mkdir -p instance
	$(PYTHON) -c 'import secrets; print(f"SECRET_KEY = {secrets.token_hex(32)!r}")' > $@

# The demo: SQLite in instance/, Flask's dev server on http://127.0.0.1:5000, and HTTP
# publishing with the key dev-key (the README's curl tour) unless the environment sets one.
run: export FLASK_REALTIME_PUBLISH_KEY ?= dev-key
run: $(VENV)/.runtime instance/config.py
	$(BIN)/flask --app app run --host 127.0.0.1 --port 5000

test: $(VENV)/.dev tests/node/node_modules
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The peers bench/peers.py compares against (flask-sse, sse-starlette), on top of the dev set.
$(VENV)/.bench: requirements.txt requirements-dev.txt requirements-bench.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-bench.txt
	touch $@ $(VENV)/.dev $(VENV)/.runtime

bench: $(VENV)/.bench
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) tests/node/node_modules instance test-artifacts
