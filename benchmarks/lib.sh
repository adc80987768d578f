# Shared by the benchmark scripts (sourced): the interpreter, flexrun from this checkout, the honesty
# controls (page cache dropped before each run, every side in one memory cgroup of the same limit) and
# the machine description. Settings come from the environment:
#   PYTHON      interpreter with torch, transformers, accelerate (default: ../.venv or /work/main/.venv)
#   REPEAT      runs per case, the median is reported (default 3)
#   MEM_LIMIT   memory cgroup limit for every run, bytes or with a K/M/G suffix (default 4G)
#   OUT         where raw JSON lines, CSVs and PNGs go (default benchmarks/results)
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
if [[ -z "${PYTHON:-}" ]]; then
  for p in "$ROOT/.venv/bin/python" /work/main/.venv/bin/python; do [[ -x $p ]] && PYTHON=$p && break; done
fi
PYTHON=${PYTHON:-python3}
REPEAT=${REPEAT:-3}
MEM_LIMIT=${MEM_LIMIT:-4G}
OUT=${OUT:-$BENCH_DIR/results}
export FLEXRUN_CACHE_DIR=${FLEXRUN_CACHE_DIR:-/tmp/flexrun-bench/cache}
mkdir -p "$OUT"
CGROOT=/sys/fs/cgroup/memory

flexrun() { (cd "$ROOT" && "$PYTHON" -m flexrun "$@"); }

# Whether the page cache is controlled: root can drop it and cgroup v1 memory bounds it during a run.
page_cache_control() {
  if [[ $(id -u) == 0 && -w /proc/sys/vm/drop_caches && -w $CGROOT ]]; then
    echo "yes (dropped before each run; each run in a memory cgroup, page cache included)"
  else
    echo "NO (not root or no cgroup v1 memory controller): figures may be flattered by the page cache"
  fi
}

drop_caches() { if [[ -w /proc/sys/vm/drop_caches ]]; then sync; echo 3 >/proc/sys/vm/drop_caches; fi; }

# limited CMD...: drop the page cache, then run CMD in a fresh memory cgroup of MEM_LIMIT (when allowed).
limited() {
  drop_caches
  if [[ ! -w $CGROOT ]]; then "$@"; return; fi
  local cg="$CGROOT/flexrun-bench-$$-$RANDOM" rc=0
  mkdir "$cg"
  echo "$MEM_LIMIT" >"$cg/memory.limit_in_bytes"
  sh -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' sh "$cg" "$@" || rc=$?
  if [[ $(cat "$cg/memory.failcnt") != 0 ]]; then
    echo "note: the run hit the $MEM_LIMIT cgroup limit $(cat "$cg/memory.failcnt") time(s) (page cache reclaimed)" >&2
  fi
  rmdir "$cg" 2>/dev/null || true
  return $rc
}

# machine: one paragraph describing this machine and the software, with the disk measured by calibrate.
machine() {
  local cpu cores ram
  cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
  cores=$(nproc)
  ram=$(free -g | awk '/Mem:/ {print $2 " GiB"}')
  echo "machine: $cpu, $cores cores, $ram RAM, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  # What decides a 16-bit matmul's speed on a CPU (README "Dtypes"): native bf16/fp16 instructions or not.
  echo "cpu matmul flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512_bf16|avx512_fp16|amx_bf16|amx_fp16)$' | xargs)"
  # This machine's calibration as the planner holds it (measured now on first use; corrected by recorded runs).
  (cd "$ROOT" && "$PYTHON" - "${OFFLOAD_DIR:-/tmp/flexrun-bench/offload}") <<'PY'
import sys
import accelerate, torch, transformers
from flexrun.costmodel.machine import hardware_for
hw = hardware_for(None, sys.argv[1])
f32 = hw.rates_by_dtype.get("float32", {})
print(f"hardware: {hw.source}")
print(f"disk (O_DIRECT): read {hw.disk_to_host_bw / 2**30:.2f} GiB/s, "
      f"write {hw.host_to_disk_bw / 2**30:.2f} GiB/s; matmul {hw.dtype} {hw.mm_flops_prefill / 1e9:.0f} GFLOP/s"
      + (f", float32 {f32['mm_flops_prefill'] / 1e9:.0f} GFLOP/s" if f32 else ""))
print(f"gpu: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; "
      f"torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}")
PY
  echo "page cache controlled: $(page_cache_control)"
}
