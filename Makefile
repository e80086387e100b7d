# The two commands of the README quickstart; both install what they need first.
PYTHON ?= python3
export DS_ACCELERATOR ?= $(shell $(PYTHON) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)

.PHONY: setup demo test test-fast lint bench

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

# The main job: DPO (LoRA) on the embedded SmolLM2-135M-Instruct and the built-in emoji preference
# set; evaluates the held-out split before and after training and prints both.
demo: setup
	$(PYTHON) -m hpalign rlhf --rlhf_type dpo --output_dir output --run_name quickstart-dpo

test: setup lint
	$(PYTHON) -m pytest -q -ra

test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow and not distributed"

lint:
	@echo "[lint] ruff"
	$(PYTHON) -m ruff check hpalign launch tests benchmarks scripts
