# Two commands a newcomer types on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test install lint

$(BIN)/fleetlm: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 is the CPU build; pin it first so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,semantic]'
	# Compile the CPU kernels (paged attention, fused rotary + K/V store) once now (cached), not
	# on the first request.
	$(BIN)/python -c "from engine.cpu_kernels import paged_decode_kernel as a, fused_ops_kernel as b; print('CPU kernels:', 'ready' if a() and b() else 'unavailable (torch fallback)')"
	touch $(BIN)/fleetlm

install: $(BIN)/fleetlm

serve: install
	$(BIN)/fleetlm up

test: install
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
