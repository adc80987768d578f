#!/usr/bin/env bash
# gpu.sh: flexrun against flexgen 0.1.8 and transformers + accelerate on one GPU held to a T4's 16 GiB
# (FlexGen's setting; issue 16). OPT-6.7B and OPT-30B on dummy weights, float16, prompt 512, gen 32.
# Per model: flexrun with FlexGen's published policy (benchmarks/gpu/policies.py: percentages, micro-batch
# size and count, overlap, host-side attention, compression) and with its own plan (--placement auto
# --device-mem CAP); flexgen with the same published policy; accelerate (device_map as "auto" would make it,
# max_memory, layers offloaded to RAM) at its best batch. Every side starts through gpu/capped.py, which
# caps the process's CUDA allocator at CAP (torch.cuda.set_per_process_memory_fraction) and records its
# peak; flexrun is given --device-mem CAP besides. REPEAT rounds, medians, ratios; the versions, the GPU,
# the machine. Made to fit in 8 minutes: no run starts after BUDGET_S seconds (the table says how many
# ran), none runs past RUN_TIMEOUT.
#
# OPT-30B runs LAYERS_30B (default 8) of its 48 layers, every other dim its own (gpu/models.py): FlexGen's
# 30B policy at 48 x 3 sequences holds 108 GB of KV cache and 48 GB of weights in host RAM, more than a
# 128 GiB machine has, flexrun's dummy store would be 60 GB more, and one run takes minutes. The cap is then
# 16 GiB less what the policy keeps on the GPU for the layers left out (gpu/models.py). LAYERS_30B=48 runs
# the whole model where RAM (~250 GB) and time allow.
#
# Settings: MODELS ("opt-30b opt-6.7b"), LAYERS_30B (8), POLICIES ("fp16"; "fp16 comp" adds FlexGen's
# compressed policies), REPEAT (3), ACC_BATCHES ("auto": the largest batch that leaves accelerate two layers
# on the GPU; or a list), BUDGET_S (420), RUN_TIMEOUT (240), DEVICE_MEM (16, GiB), PROMPT (512), GEN (32),
# WORK (/dev/shm/flexrun-gpu when it has room, else /tmp/flexrun-gpu: config dirs, stores), OFFDIR
# (/tmp/flexrun-gpu-offload: the offload dirs, on a disk).
# flexgen and PuLP come from .whl/ when not installed (benchmarks/gpu/prepare.sh downloads them here).
# WARMUP (1): one short untimed flexrun run per model first, so no timed run compiles Triton kernels.
# NOCAP_RETRY (1): a flexrun run of a published policy refused at the cap (its device ledger) or out of GPU
# memory runs again with the cap lifted (--device-mem the GPU's total), as its own row ("fp16-nocap").
# GPU_SH_SMALL=1: the same pipeline on a CPU, to test it before a GPU sees it: a tiny OPT shape on
# opt-30b's policies, prompt 32, gen 4, one round; flexgen as far as it goes without CUDA
# (flexgen_run.py --dry-run: arguments, tokenizer stand-in, prompts, config, policy); accelerate offloading
# to disk instead of RAM. Results: $OUT/gpu-*.jsonl (runs), gpu-*.md (report + tables), gpu-*.log.
source "$(dirname "$0")/lib.sh"
START=$SECONDS
G="$BENCH_DIR/gpu"
SMALL=${GPU_SH_SMALL:-0}
PROMPT=${PROMPT:-512}
GEN=${GEN:-32}
DEVICE_MEM=${DEVICE_MEM:-16}
BUDGET_S=${BUDGET_S:-420}
RUN_TIMEOUT=${RUN_TIMEOUT:-240}
POLICIES=${POLICIES:-fp16}
ACC_BATCHES=${ACC_BATCHES:-auto}
MODELS=${MODELS:-opt-30b opt-6.7b}
LAYERS_30B=${LAYERS_30B:-8}
if [[ $SMALL == 1 ]]; then
  MODELS=tiny PROMPT=${GPU_SH_PROMPT:-32} GEN=${GPU_SH_GEN:-4} REPEAT=${GPU_SH_REPEAT:-1}
  POLICIES=${GPU_SH_POLICIES:-fp16 comp} ACC_BATCHES=${GPU_SH_ACC_BATCHES:-2}
fi
if [[ -z ${WORK:-} ]]; then
  WORK=/tmp/flexrun-gpu
  shm=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print int($4 / 1048576)}')
  [[ ${shm:-0} -ge 40 ]] && WORK=/dev/shm/flexrun-gpu
fi
STAMP=$(date +%Y%m%d-%H%M%S)
RUNS="$OUT/gpu-$STAMP.jsonl" REPORT="$OUT/gpu-$STAMP.md" LOG="$OUT/gpu-$STAMP.log"
MODELS_DIR=$WORK/models STORES=$WORK/stores
# The offload dirs (flexrun's disk tier, calibrated; flexgen's TorchDisk) stay on a disk even when WORK is
# in RAM: a tmpfs "disk" would be host memory by another name. Neither published policy puts anything there.
OFFDIR=${OFFDIR:-/tmp/flexrun-gpu-offload}
rm -rf "$OFFDIR"
mkdir -p "$MODELS_DIR" "$STORES" "$OFFDIR/flexrun" "$OFFDIR/flexgen"
: >"$LOG"
say() { echo "[gpu.sh $((SECONDS - START))s] $*" | tee -a "$LOG" >&2; }

# flexgen and PuLP (flexrun's planner) from the carried wheels when this Python lacks them.
if ! "$PYTHON" -c 'import flexgen, pulp' 2>/dev/null; then
  if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      "$ROOT"/.whl/*.whl >>"$LOG" 2>&1
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PYTHON" -c 'import flexgen' 2>/dev/null || say "flexgen is not importable: its runs will fail (run benchmarks/gpu/prepare.sh here and carry .whl)"
fi
read -r CUDA GPU_TOTAL < <("$PYTHON" -c 'import torch; c = torch.cuda.is_available()
print(int(c), torch.cuda.get_device_properties(0).total_memory if c else 0)')
[[ $CUDA == 1 || $SMALL == 1 ]] || { echo "gpu.sh: no CUDA device here; GPU_SH_SMALL=1 runs the CPU dry run" >&2; exit 1; }

# Config dirs, the tokenizer stand-in and the cap of each model; flexrun's stores, several built at once.
declare -A NAME CAP CAP_COMP POLICY_OF REFUSED
for model in $MODELS; do
  depth=()
  [[ $model == opt-30b ]] && depth=(--layers "$LAYERS_30B")
  read -r name layers full_layers cap cap_comp < <("$PYTHON" "$G/models.py" "$MODELS_DIR" "$model" "${depth[@]}" \
    --device-mem "$DEVICE_MEM" | tail -n 1)
  [[ -n ${cap_comp:-} ]] || { echo "gpu.sh: benchmarks/gpu/models.py failed for $model" >&2; exit 1; }
  NAME[$model]=$name CAP[$model]=$cap CAP_COMP[$model]=$cap_comp
  POLICY_OF[$model]=$model
  [[ $model == tiny ]] && POLICY_OF[$model]=opt-30b
  say "$model: $name ($layers of $full_layers layers), GPU cap $cap bytes ($cap_comp for the comp policy)"
done
export OFFLOAD_DIR=$OFFDIR/flexrun  # lib.sh's machine() reads the calibration of this dir
(cd "$ROOT" && "$PYTHON" -m flexrun calibrate --offload-dir "$OFFLOAD_DIR") >>"$LOG" 2>&1 ||
  say "flexrun calibrate failed (see the log)"
pids=()
for model in $MODELS; do
  dir=$MODELS_DIR/${NAME[$model]}
  kinds=(none)
  # The compression flexrun's own plan takes (the planner says before any store exists).
  own=$(cd "$ROOT" && "$PYTHON" -m flexrun plan --model "$dir" --dtype float16 --device-mem "${CAP[$model]}" \
    --prompt-len "$PROMPT" --gen-len "$GEN" --json 2>>"$LOG" |
    "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["placement"]["compress_weight"] or "none")' \
      2>>"$LOG") || own=none
  kinds+=("$own")
  [[ " $POLICIES " == *" comp "* && ${POLICY_OF[$model]} == opt-6.7b ]] && kinds+=(int4)
  for kind in $(printf '%s\n' "${kinds[@]}" | sort -u); do
    (cd "$ROOT" && "$PYTHON" "$G/models.py" --store-root "$STORES" --compress "$kind" "$dir") >>"$LOG" 2>&1 &
    pids+=($!)
  done
done
for pid in "${pids[@]}"; do wait "$pid" || say "building a store failed (see the log); its runs will build it"; done
# flexgen times a generate after a warm-up one; flexrun bench has no warm-up, and its first run in a
# process would include compiling its Triton kernels: one short untimed run per model compiles them into
# Triton's on-disk cache, which every timed run then reads.
if [[ $CUDA == 1 && ${WARMUP:-1} == 1 ]]; then
  for model in $MODELS; do
    p=${POLICIES%% *}
    mapfile -t extra < <("$PYTHON" "$G/policies.py" flexrun "${POLICY_OF[$model]}" "$p" 2>/dev/null)
    (cd "$ROOT" && timeout -k 10 "$RUN_TIMEOUT" "$PYTHON" -m flexrun bench --model "$MODELS_DIR/${NAME[$model]}" \
      --dummy-weights --store-dir "$STORES" --dtype float16 --prompt-len 32 --gen-len 2 --device-mem "$GPU_TOTAL" \
      --offload-dir "$OFFLOAD_DIR" "${extra[@]}") >>"$LOG" 2>&1 || say "the warm-up run of $model failed (see the log)"
  done
fi
say "setup done"

# One run: SIDE POLICY MODEL. Its stdout and stderr go to files, then record.py appends it to RUNS.
run() {
  local side=$1 policy=$2 model=$3 left timeout_s status=0 dir peak=$WORK/peak.json
  dir=$MODELS_DIR/${NAME[$model]}
  left=$((BUDGET_S - (SECONDS - START)))
  if ((left <= 0)); then
    say "skipped (past BUDGET_S=$BUDGET_S s): $model $side $policy"
    return
  fi
  timeout_s=$((left + 60 < RUN_TIMEOUT ? left + 60 : RUN_TIMEOUT))
  local cap=${CAP[$model]} published=${policy%-nocap} cmd=()
  [[ $published == comp ]] && cap=${CAP_COMP[$model]}
  [[ $policy == *-nocap && $CUDA == 1 ]] && cap=$GPU_TOTAL
  case $side in
    flexrun)
      cmd=(-m flexrun bench --model "$dir" --dummy-weights --store-dir "$STORES" --dtype float16
        --prompt-len "$PROMPT" --gen-len "$GEN" --device-mem "$cap" --offload-dir "$OFFLOAD_DIR" --json)
      if [[ $policy == own ]]; then
        cmd+=(--placement auto)
      else
        mapfile -t extra < <("$PYTHON" "$G/policies.py" flexrun "${POLICY_OF[$model]}" "$published" 2>>"$LOG")
        cmd+=("${extra[@]}")
      fi ;;
    flexgen)
      mapfile -t extra < <("$PYTHON" "$G/policies.py" flexgen "${POLICY_OF[$model]}" "$policy" --prompt-len "$PROMPT" \
        --gen-len "$GEN" --offload-dir "$OFFDIR/flexgen" --log-file "$WORK/flexgen.log")
      cmd=("$G/flexgen_run.py" --config-dir "$dir" --tokenizer "$MODELS_DIR/tokenizer")
      [[ $CUDA == 1 ]] || cmd+=(--dry-run)
      cmd+=(-- "${extra[@]}") ;;
    accelerate)
      cmd=("$G/accelerate_run.py" --config-dir "$dir" --batch "${policy#b=}" --gpu-mem "$cap" --prompt-len "$PROMPT"
        --gen-len "$GEN" --offload-dir "$OFFDIR/accelerate")
      [[ $CUDA == 1 ]] || cmd+=(--share 400000) ;;  # the tiny shape: part in RAM, the rest on disk
  esac
  rm -f "$peak"
  echo "=== $model $side $policy: ${cmd[*]}" >>"$LOG"
  (cd "$ROOT" && timeout -k 10 "$timeout_s" "$PYTHON" "$G/capped.py" "$cap" "$peak" "${cmd[@]}") \
    >"$WORK/stdout" 2>"$WORK/stderr" || status=$?
  cat "$WORK/stderr" >>"$LOG"
  if [[ $side == flexgen && $CUDA != 1 ]]; then  # the dry run: its JSON line, then the row it would be
    grep '^{' "$WORK/stdout" | tee -a "$LOG" >&2
    say "flexgen dry run: exit $status"
    return
  fi
  "$PYTHON" "$G/record.py" "$RUNS" "${NAME[$model]}" "$side" "$policy" "$status" "$WORK/stdout" "$WORK/stderr" \
    "$peak" | tee -a "$LOG" >&2
  # flexrun refusing a published policy at the cap (its ledger) or running out of GPU memory under it: the
  # same policy once more with the cap lifted, a row of its own, so the run still says how fast it goes.
  if [[ $side == flexrun && $policy != own && $policy != *-nocap && $status != 0 && ${NOCAP_RETRY:-1} == 1 ]] &&
    grep -qE 'placement does not fit: the device tier|OutOfMemoryError|CUDA out of memory' "$WORK/stderr"; then
    REFUSED["$model $policy"]=1  # later rounds go straight to the cap-lifted run
    run flexrun "$policy-nocap" "$model"
  fi
}

# Round 1 runs every side of the first model before the next model (accelerate once, in round 1 only: its
# target is a 20x ratio); later rounds repeat flexgen and flexrun for the medians while the budget lasts.
for ((r = 1; r <= REPEAT; r++)); do
  say "round $r of $REPEAT"
  for model in $MODELS; do
    for policy in $POLICIES; do
      run flexgen "$policy" "$model"
      if [[ -n ${REFUSED["$model $policy"]:-} ]]; then run flexrun "$policy-nocap" "$model"; else run flexrun "$policy" "$model"; fi
    done
    run flexrun own "$model"
    if ((r == 1)); then
      for b in $ACC_BATCHES; do run accelerate "b=$b" "$model"; done
    fi
  done
done

{
  echo "## gpu.sh, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  machine 2>/dev/null | grep -v '^page cache' | sed 's/^/    /'
  if [[ $CUDA == 1 ]]; then
    echo "    nvidia-smi: $(nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader 2>/dev/null)"
  fi
  echo "    flexgen $("$PYTHON" -c 'import importlib.metadata as m; print(m.version("flexgen"))' 2>/dev/null || echo 'not installed');" \
    "flexrun $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '(no git here)')"
  echo
  echo "Models: $(for m in $MODELS; do awk -v n="${NAME[$m]}" -v c="${CAP[$m]}" 'BEGIN {printf "%s (cap %.2f GiB) ", n, c / 2^30}'; done)"
  echo "float16, dummy weights, prompt $PROMPT, gen $GEN; policies: $POLICIES; rounds: $REPEAT (no run started after ${BUDGET_S} s); took $((SECONDS - START)) s"
  echo
  if [[ -s $RUNS ]]; then "$PYTHON" "$G/gpu_table.py" "$RUNS"; else echo "(no runs recorded)"; fi
  echo
  echo "Raw runs: $(basename "$RUNS"); log: $(basename "$LOG")"
} | tee "$REPORT"
