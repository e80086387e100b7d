#!/usr/bin/env bash
# hpalign's GPU check in one command (docs/GPU.md): installs the wheels of .whl/ when the folder is
# there (an offline GPU box; scripts/gpu_wheels.sh fills it on a machine with PyPI), then runs
# scripts/gpu_check.py with every argument given (--out DIR, --budget SECONDS, --stages ..., --dry-run).
#
#   bash scripts/gpu_check.sh                           # all stages, 480 s, benchmarks/results/gpu_check_<date>/
#   bash scripts/gpu_check.sh --out "$OUT" --budget 420
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
SITE="${GPU_CHECK_SITE:-/tmp/site}"
export PYTHONUNBUFFERED=1 GPU_CHECK_WHEELS=no
install=1
for arg in "$@"; do
  case "$arg" in --dry-run|-h|--help) install=0 ;; esac
done
if [ "$install" = 1 ] && compgen -G ".whl/*.whl" > /dev/null; then
  echo "[gpu_check.sh] installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $SITE"
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
    echo "[gpu_check.sh] installing .whl/ failed: going on without it (the env stage shows what is missing)" >&2
    install=0
  fi
fi
if [ "$install" = 1 ] && [ -d "$SITE" ]; then
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH" GPU_CHECK_WHEELS="$SITE"
fi
status=0
"$PY" scripts/gpu_check.py --python "$PY" "$@" || status=$?
exit $status
