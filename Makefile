# Set-up and entry points. `make demo` and `make test` each create the environment first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck check clean emulation-tools wheel

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fundus-edge demo --out demo-out

# qemu-user (static qemu-aarch64) + debootstrap for the emulated-device tests; fails loudly when they cannot be
# installed (the emulated Pi 4 run must fail in CI, never skip). Needs root + apt on a fresh CI machine.
emulation-tools:
	sh devices/install-emulation-tools.sh

test: $(STAMP) emulation-tools
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy .

# The installable wheel in dist/ (built from a clean copy of the tree, so no stale build/ leaks in): device
# profiles, templates, deploy/ files and the manifest schema; not the torch training weights (see pyproject.toml).
wheel: $(STAMP)
	rm -rf dist/fundus_edge-*.whl
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir dist .
	rm -rf build
	@ls -l dist/fundus_edge-*.whl

clean:
	rm -rf demo-out dist build .pytest_cache .mypy_cache .ruff_cache
