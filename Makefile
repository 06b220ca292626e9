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

.PHONY: install demo study test test-fast lint bench bench-gpu gpu-wheels lock fashion-mnist clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock requirements-nodeps.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
ifneq ($(TORCH_INDEX_URL),)
	$(PIP) install -q -c constraints.txt --index-url $(TORCH_INDEX_URL) torch==2.13.0
endif
	$(PIP) install -q -c constraints.txt -r requirements.lock
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	$(PIP) install -q --no-deps -e .
	@$(BIN)/python -c "import torch; print('installed; torch', torch.__version__)"
	@touch $@

# The embedded default dataset: Debian's Fashion-MNIST package (60k/10k gzip idx files).
fashion-mnist: $(FASHION_MNIST)/train-images-idx3-ubyte.gz

$(FASHION_MNIST)/train-images-idx3-ubyte.gz:
	@command -v apt-get >/dev/null || { echo "Fashion-MNIST is missing at $(FASHION_MNIST) and apt-get is not available: install Debian's dataset-fashion-mnist package" >&2; exit 1; }
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dataset-fashion-mnist

# Each pretraining method and the fine-tuning recipe that deploys it (recipe:pretrained method).
METHODS := mae nim dmae mimir
RECIPES := standard:mae de3:nim dmae:dmae mimir:mimir dat:mae
DEFENSES := standard de3 dmae mimir dat
RUN := $(BIN)/robustmim

# shards -> tiny MAE, NIM, DMAE and MIMIR pretraining (2 ranks, ZeRO-2) -> exports -> a VQGAN
# tokenizer for DAT -> each defense's classifier (2 ranks; DAT from the MAE encoder) ->
# classifier exports -> robustness evaluation (2 ranks: clean, PGD with EOT, CERTIFY for DMAE)
# -> one table and plots. Re-running resumes each stage.
demo: install fashion-mnist
	$(RUN) shards build --config configs/shards/fashion_mnist.yaml out_dir=$(DEMO_DIR)/shards
	set -e; for m in $(METHODS); do \
	  $(RUN) pretrain --config configs/pretrain/$${m}_tiny_fmnist.yaml --nproc-per-node 2 \
	    out_dir=$(DEMO_DIR)/pretrain_$$m data.shards=$(DEMO_DIR)/shards; \
	  $(RUN) export $(DEMO_DIR)/pretrain_$$m --out $(DEMO_DIR)/$${m}_tiny.safetensors; \
	done
	$(RUN) tokenizer --config configs/tokenizer/tiny_fmnist.yaml --nproc-per-node 2 \
	  out_dir=$(DEMO_DIR)/tokenizer data.shards=$(DEMO_DIR)/shards
	$(RUN) export $(DEMO_DIR)/tokenizer --out $(DEMO_DIR)/tokenizer.safetensors
	set -e; for pair in $(RECIPES); do r=$${pair%%:*}; m=$${pair##*:}; \
	  $(RUN) finetune --config configs/finetune/$${r}_tiny_fmnist.yaml --nproc-per-node 2 \
	    out_dir=$(DEMO_DIR)/finetune_$$r data.shards=$(DEMO_DIR)/shards init=$(DEMO_DIR)/$${m}_tiny.safetensors \
	    recipe.de3.denoiser=$(DEMO_DIR)/nim_tiny.safetensors recipe.dat.tokenizer=$(DEMO_DIR)/tokenizer.safetensors; \
	  $(RUN) export $(DEMO_DIR)/finetune_$$r --out $(DEMO_DIR)/classifiers/$${r}_tiny.safetensors; \
	done
# fresh=true: a re-run resumes each evaluation, unless its settings (or the records format of
# a newer robustmim) changed; then the old one moves to superseded/ and it starts over.
	set -e; for r in $(DEFENSES); do \
	  $(RUN) eval --config configs/eval/tiny_fmnist.yaml --nproc-per-node 2 fresh=true \
	    --model $(DEMO_DIR)/classifiers/$${r}_tiny.json --data $(DEMO_DIR)/shards --out $(DEMO_DIR)/eval/$$r \
	    certify.enabled=$$([ $$r = dmae ] && echo true || echo false); \
	done
	$(RUN) report $(addprefix $(DEMO_DIR)/eval/,$(DEFENSES)) --out $(DEMO_DIR)/report
	@echo
	@echo "demo outputs:"
	@echo "  shards:       $(DEMO_DIR)/shards/ (manifest.json, skipped.jsonl)"
	@echo "  pretraining:  $(DEMO_DIR)/pretrain_{mae,nim,dmae,mimir}/ (checkpoints/, metrics.jsonl, tensorboard/, config.yaml)"
	@echo "  encoders:     $(DEMO_DIR)/{mae,nim,dmae,mimir}_tiny.safetensors (+ .json with the model config)"
	@echo "  tokenizer:    $(DEMO_DIR)/tokenizer/ (run) and tokenizer.safetensors (+ .json): DAT's VQGAN"
	@echo "  fine-tuning:  $(DEMO_DIR)/finetune_{standard,de3,dmae,mimir,dat}/ (validation top-1 in metrics.jsonl)"
	@echo "  classifiers:  $(DEMO_DIR)/classifiers/*_tiny.safetensors (+ .json: how to rebuild the deployed model)"
	@echo "  evaluations:  $(DEMO_DIR)/eval/*/ (records.jsonl, summary.json; certify.tsv for DMAE)"
	@echo "  report:       $(DEMO_DIR)/report/report.md (the table above) and its PNG plots"

# The papers' claims as controlled pairs on the demo's models (after `make demo`, which it resumes):
# adds the control arms (the DMAE and MIMIR recipes from the MAE encoder), evaluates them, runs
# the APGD cascade on both MIMIR arms, then compares each pair with an exact McNemar test on the
# same test images and writes docs/results.md (+ results.json and the plots in docs/results/).
STUDY_DIR := $(DEMO_DIR)/study
study: demo
	set -e; for r in dmae mimir; do \
	  $(RUN) finetune --config configs/finetune/$${r}_tiny_fmnist.yaml --nproc-per-node 2 \
	    out_dir=$(STUDY_DIR)/finetune_$${r}_from_mae data.shards=$(DEMO_DIR)/shards init=$(DEMO_DIR)/mae_tiny.safetensors; \
	  $(RUN) export $(STUDY_DIR)/finetune_$${r}_from_mae --out $(STUDY_DIR)/classifiers/$${r}_from_mae_tiny.safetensors; \
	done
	$(RUN) eval --config configs/eval/tiny_fmnist.yaml --nproc-per-node 2 fresh=true certify.enabled=true \
	  --model $(STUDY_DIR)/classifiers/dmae_from_mae_tiny.json --data $(DEMO_DIR)/shards --out $(STUDY_DIR)/eval/dmae_from_mae
	set -e; for model in $(DEMO_DIR)/classifiers/mimir_tiny $(STUDY_DIR)/classifiers/mimir_from_mae_tiny; do \
	  name=$$(basename $$model _tiny); \
	  $(RUN) eval --config configs/eval/tiny_fmnist.yaml --nproc-per-node 2 fresh=true autoattack.enabled=true \
	    --model $$model.json --data $(DEMO_DIR)/shards --out $(STUDY_DIR)/eval/$$name; \
	done
	$(RUN) study --config configs/study/tiny_fmnist.yaml runs=$(DEMO_DIR) out=docs/results.md "produced_by=make study"

test: install fashion-mnist
	$(BIN)/python -m pytest -q --durations=20

# The inner loop: every test but the slow, multi-rank and Slurm ones (markers in pyproject.toml).
test-fast: install fashion-mnist
	$(BIN)/python -m pytest -q -m "not slow and not distributed and not slurm"

lint: install
	$(BIN)/ruff check .

bench: install fashion-mnist
	$(BIN)/python -m bench.shards
	$(BIN)/python -m bench.loader
	$(BIN)/python -m bench.step
	$(BIN)/python -m bench.engine
	$(BIN)/python -m bench.certify
	$(BIN)/python -m bench.dat
	$(BIN)/python -m bench.train_step
	$(BIN)/python -m bench.attacks

# Every GPU measurement in one table, in under 9 minutes on one H100/H200 (bench/gpu_check.py).
bench-gpu: install
	bash bench/gpu_check.sh

# For a GPU machine without network whose Python 3.12 has CUDA torch, timm and PyYAML but not
# omegaconf and DeepSpeed: their wheels (versions from requirements.lock) into .whl/, which
# bench/gpu_check.sh installs before it runs. DeepSpeed is an sdist: built here as a pure wheel.
GPU_WHEELS := omegaconf pydantic pydantic_core annotated-types typing-inspection typing_extensions hjson
gpu-wheels: install
	mkdir -p .whl
	set -e; for name in $(GPU_WHEELS); do \
	  spec=$$(grep -i "^$$name==" requirements.lock); \
	  $(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl "$$spec"; \
	done
	$(PIP) wheel -q --no-deps -w .whl "$$(grep -i '^deepspeed==' requirements.lock)"
	@ls -la .whl

# Re-pin every package after a change of pyproject.toml's dependencies.
lock: install
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	{ sed -n '1,3p' requirements.lock; $(PIP) freeze --exclude-editable | grep -v '^torchattacks==' | sed 's/^torch==\(.*\)+.*/torch==\1/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) runs *.egg-info
