# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU development pins; pyproject.toml admits the GPU images' torch 2.11 / torchvision 0.26 too.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint install clean

# The package and its runtime dependencies: all `make demo` needs (the dev tools add about a minute of set-up).
$(BIN)/ssltrain: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e .
	touch $@

# The test and lint tools, DALI, the store clients and servers, Optuna: `make test` and `make lint`.
$(VENV)/.dev: $(BIN)/ssltrain pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/ssltrain

# The main job on the embedded data: make shards, pretrain, evaluate against a random-init backbone.
demo: install
	$(BIN)/ssltrain shards shapes --out data/shapes --train 6000 --val 1000 --shard-size 1000
	$(BIN)/ssltrain train configs/demo.yaml
	$(BIN)/ssltrain eval runs/demo

# video_setup.sh installs Debian's ffmpeg when it is missing (the video tests decode real clips with it);
# servers_setup.sh installs Debian's nginx (the HTTP shard store of tests/test_store.py).
# Lint, format, types and the import layering (.importlinter); `make test` runs it first. mypy and import-linter
# run on a copy of the package laid out as installed (tools/lint_package.py).
lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tools/lint_package.py

test: $(VENV)/.dev lint
	bash tests/video_setup.sh
	bash tests/servers_setup.sh
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs data .pytest_cache
