#!/usr/bin/env bash
# A venv for benchmarks/trl_ppo.py: TRL 1.12.0, the last release with a PPO trainer
# (trl.experimental.ppo, removed in 1.13), over this environment's torch / transformers / accelerate /
# peft / datasets (--system-site-packages; the wheel goes in with --no-deps, so nothing else changes).
# Idempotent; prints the venv's python on stdout (all else goes to stderr).
#
#   PY=$(scripts/trl_ppo_env.sh) && "$PY" benchmarks/trl_ppo.py --spec spec.json
#   scripts/trl_ppo_env.sh --check     # print the python if the venv is ready, else exit 1; creates nothing
#
# The venv lives in $HPALIGN_TRL_PPO_VENV, else <hpalign cache>/trl-ppo-venv (the cache as
# hpalign.models.source.cache_root: $HPALIGN_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/hpalign).
# $PYTHON (default: python) is the interpreter whose packages the venv sees.
set -euo pipefail

TRL_PPO_VERSION=1.12.0
VENV=${HPALIGN_TRL_PPO_VENV:-${HPALIGN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpalign}/trl-ppo-venv}
PY="$VENV/bin/python"

ready() {
    [[ -x "$PY" ]] && "$PY" - "$TRL_PPO_VERSION" <<'PYEOF' 2>/dev/null
import importlib.metadata, importlib.util, sys
assert importlib.metadata.version("trl") == sys.argv[1]
assert importlib.util.find_spec("trl.experimental.ppo") is not None
PYEOF
}

if ! ready; then
    if [[ "${1:-}" == "--check" ]]; then
        echo "no TRL $TRL_PPO_VERSION venv at $VENV: run scripts/trl_ppo_env.sh" >&2
        exit 1
    fi
    "${PYTHON:-python}" -m venv --system-site-packages "$VENV" >&2
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --ignore-installed \
        "trl==$TRL_PPO_VERSION" >&2
    ready || { echo "TRL $TRL_PPO_VERSION did not install into $VENV" >&2; exit 1; }
fi
echo "$PY"
