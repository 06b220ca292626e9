# robustmim: the two set-up commands are `make demo` and `make test`; both install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A GPU machine installs torch 2.13.0's CUDA build first from PyTorch's wheel index for its
# CUDA version: `make install TORCH_INDEX_URL=<that index>`. The lock's torch==2.13.0 is then
# already satisfied (the local version +cu12x is ignored by the pin), so nothing replaces it.
TORCH_INDEX_URL ?=
PIP := $(BIN)/python -m pip --disable-pip-version-check
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_DIR ?= runs/demo

.PHONY: install demo test bench lock fashion-mnist clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
ifneq ($(TORCH_INDEX_URL),)
	$(PIP) install -q -c constraints.txt --index-url $(TORCH_INDEX_URL) torch==2.13.0
endif
	$(PIP) install -q -c constraints.txt -r requirements.lock
	$(PIP) install -q --no-deps -e .
	@$(BIN)/python -c "import torch; print('installed; torch', torch.__version__)"
	@touch $@

# The embedded default dataset: Debian's Fashion-MNIST package (60k/10k gzip idx files).
fashion-mnist: $(FASHION_MNIST)/train-images-idx3-ubyte.gz

$(FASHION_MNIST)/train-images-idx3-ubyte.gz:
	@command -v apt-get >/dev/null || { echo "Fashion-MNIST is missing at $(FASHION_MNIST) and apt-get is not available: install Debian's dataset-fashion-mnist package" >&2; exit 1; }
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dataset-fashion-mnist

# shards -> a tiny DMAE pretraining on 2 ranks with ZeRO-2 -> export. Re-running resumes each stage.
demo: install fashion-mnist
	$(BIN)/robustmim shards build --config configs/shards/fashion_mnist.yaml out=$(DEMO_DIR)/shards
	$(BIN)/robustmim pretrain --config configs/pretrain/dmae_tiny_fmnist.yaml --nproc-per-node 2 \
		run_dir=$(DEMO_DIR)/pretrain_dmae data.shards=$(DEMO_DIR)/shards
	$(BIN)/robustmim export $(DEMO_DIR)/pretrain_dmae --out $(DEMO_DIR)/dmae_tiny.safetensors
	@echo
	@echo "demo outputs:"
	@echo "  shards:          $(DEMO_DIR)/shards/ (manifest.json, skipped.jsonl)"
	@echo "  pretraining:     $(DEMO_DIR)/pretrain_dmae/ (checkpoints/, metrics.jsonl, tensorboard/, config.yaml)"
	@echo "  exported model:  $(DEMO_DIR)/dmae_tiny.safetensors (+ .json with the model config)"

test: install fashion-mnist
	$(BIN)/python -m pytest -q

bench: install fashion-mnist
	$(BIN)/python -m bench.shards
	$(BIN)/python -m bench.loader
	$(BIN)/python -m bench.step
	$(BIN)/python -m bench.engine

# Re-pin every package after a change of pyproject.toml's dependencies.
lock: install
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	{ sed -n '1,3p' requirements.lock; $(PIP) freeze --exclude-editable | sed 's/^torch==\(.*\)+.*/torch==\1/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) runs *.egg-info
