# Every target is self-sufficient from a clean clone: the first one that needs
# the virtual environment creates it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Two install modes in one virtual environment: the runtime (what `make demo`
# needs) and the development extras (tests, linters, generators) on top.
STAMP  := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.installed-runtime
PROTO_SRC := proto/ambient/v1/sessions.proto proto/ambient/testing/v1/echo.proto
GEN_FILES := $(foreach p,$(PROTO_SRC),$(patsubst proto/%.proto,ambient_grpc_auth/proto/%,$(p)))

.PHONY: install install-runtime proto proto-check lint test test-min demo bench bench-quick bench-hotpath bench-instructions bench-streams soak soak-quick load buf-lint hadolint clean

install: $(STAMP)

install-runtime: $(RUNTIME_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(RUNTIME_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $(RUNTIME_STAMP)

# The development install includes the runtime one.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $(RUNTIME_STAMP)

# Regenerate the committed stubs. The virtual proto path makes the generated
# modules import each other as ambient_grpc_auth.proto.ambient.v1.*, so they
# need no hand edits.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iambient_grpc_auth/proto=proto \
		--python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_SRC)

# Fails when the committed stubs differ from what proto/ generates.
proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && \
	$(PY) -m grpc_tools.protoc -Iambient_grpc_auth/proto=proto \
		--python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTO_SRC) && \
	for g in $(GEN_FILES); do for f in $${g}_pb2.py $${g}_pb2.pyi $${g}_pb2_grpc.py; do \
		cmp -s $$tmp/$$f $$f || { \
			echo "proto-check: $$f differs from what proto/ generates; run 'make proto'"; \
			rm -rf $$tmp; exit 1; }; \
	done; done; rm -rf $$tmp; echo "proto-check: generated stubs match proto/"

buf-lint: $(STAMP)
	$(VENV)/bin/buf lint proto

# The container image's Dockerfile; warnings fail like errors.
hadolint: $(STAMP)
	$(VENV)/bin/hadolint --failure-threshold warning Dockerfile

lint: $(STAMP) buf-lint hadolint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: $(STAMP)
	$(PY) -m pytest -q

# The tests against the lowest runtime dependency versions pyproject.toml
# allows (pinned in constraints-min.txt), in a second environment.
VENV_MIN  := .venv-min
STAMP_MIN := $(VENV_MIN)/.installed

$(STAMP_MIN): pyproject.toml constraints-min.txt Makefile
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install --quiet --upgrade pip
	# The build requirements too (tests build the wheel without isolation),
	# and the dev extras: the tests run mypy, hadolint and protoc as well.
	$(VENV_MIN)/bin/python -m pip install --quiet 'setuptools>=77' wheel
	$(VENV_MIN)/bin/python -m pip install --quiet -c constraints-min.txt -e '.[dev]'
	touch $(STAMP_MIN)

test-min: $(STAMP_MIN)
	$(VENV_MIN)/bin/python -m pytest -q

demo: $(RUNTIME_STAMP)
	$(VENV)/bin/ambient-grpc-auth demo

bench: $(STAMP)
	$(PY) -m bench

# The harness only, in a few seconds; bench/results.json keeps the last full run.
bench-quick: $(STAMP)
	$(PY) -m bench --quick --out bench/results-quick.json

bench-hotpath: $(STAMP)
	$(PY) -m bench.hotpath

# Instructions per unary call of each side, under valgrind (several minutes).
bench-instructions: $(STAMP)
	$(PY) -m bench.instructions --out bench/instructions.json

# Streams nobody reads: another user's push latency and the server's memory
# growth under the default stream limits (figures printed, not asserted).
bench-streams: $(STAMP)
	$(PY) -m bench.streams

soak: $(STAMP)
	$(PY) -m bench.soak

# The short soak CI runs (about 15 seconds of traffic).
soak-quick: $(STAMP)
	$(PY) -m bench.soak --duration 15 --runners 10 --restart-every 5

load: $(STAMP)
	$(PY) -m bench.load

clean:
	rm -rf $(VENV) $(VENV_MIN) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
