#!/usr/bin/env bash
# prepare.sh: run HERE (where pip reaches PyPI) before a GPU session: downloads into .whl/ at the repo root
# the wheels benchmarks/gpu.sh needs on the lent GPU machine, which reaches no registry and lacks them:
#   flexgen 0.1.8  the baseline (pure Python; it imports torch, transformers' AutoTokenizer, numpy, tqdm and
#                  attrs, all in that machine's image: see /work/.library/device/KINDS.md)
#   PuLP 3.3.2     flexrun's planner (its linear programs, with the CBC binary the wheel ships)
# flexgen 0.1.8's code runs on that image's torch 2.11 / transformers 5.17 as it is (checked here on torch
# 2.13 / transformers 5.24: it imports and parses, and its only deprecated call, Tensor.storage(), warns),
# so no older torch or transformers travels. Everything else gpu.sh uses (torch, transformers, accelerate,
# tokenizers, click, psutil, scipy, safetensors) is in that image. The wheels are ~16 MiB; the device tool
# carries at most 64 MiB with the working tree, and this script fails above 48 MiB.
# .whl/ is ignored by git through .git/info/exclude (added here if missing), as the device README asks.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
cd "$ROOT"
mkdir -p .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl flexgen==0.1.8 pulp==3.3.2
ls -l .whl
size=$(du -sm .whl | cut -f1)
echo "total: ${size} MiB in .whl/"
if ((size > 48)); then
  echo "prepare.sh: .whl/ holds ${size} MiB; keep it under 48 MiB (the device carries 64 MiB with the tree)" >&2
  exit 1
fi
