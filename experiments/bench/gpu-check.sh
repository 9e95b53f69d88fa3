#!/usr/bin/env bash
# The GPU check behind experiments/bench/bench-gpu.{json,md}: one call on the lent GPU machine, parts in
# order of importance, each under its own time limit so one slow part cannot take the others down.
#   bash experiments/bench/gpu-check.sh DATA_ROOT OUT_DIR
# 1. the CUDA tests (a replayed whole-step graph trains as the eager step does);
# 2. make bench: reference vs fast (eager; whole step as one CUDA graph; compiled trunk inside that graph),
#    profiles, data pipeline, 4 concurrent runs of the fastest path;
# 3. real training of `ours` (fold 0, 224 px) through the CLI, two epochs each (the second is steady-state):
#    the default fast path (CUDA graph on), then with callbacks.fast_path.compile=true.
# BENCH_ARGS / RUN_ARGS add arguments (a CPU dry run uses small sizes).
set -uo pipefail
data=${1:?usage: gpu-check.sh DATA_ROOT OUT_DIR}
out=${2:?usage: gpu-check.sh DATA_ROOT OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=disabled
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/covidct-inductor} COVIDCT_CACHE=${COVIDCT_CACHE:-/tmp/covidct-cache}
runs=$(mktemp -d)
python=${PYTHON:-python3}
section() { echo; echo "== $(date +%T) $*"; }

section environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$python -c "import os, torch, pytorch_lightning as pl; print('torch', torch.__version__, '| lightning', pl.__version__, '| cpus', os.cpu_count())"

section "1. CUDA tests"
timeout "${TEST_TIMEOUT:-120}" $python -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py 2>&1 | tail -15

section "2. bench"
timeout "${BENCH_TIMEOUT:-240}" $python -m covidct.bench --variants "${VARIANTS:-eager,graph,compile:default+graph}" --data-root "$data" \
  --concurrent "${CONCURRENT:-4}" --profile --json "$out/bench-gpu.json" ${BENCH_ARGS:-} 2>"$out/bench.log"
echo "exit $?"; grep -iE "error|warn" "$out/bench.log" | sort | uniq -c | head -5

train() {  # name timeout overrides...
  local name=$1 limit=$2; shift 2
  section "$name"
  timeout "$limit" $python -m covidct.run experiment=ours fold=0 data.root="$data" logger=csv \
    trainer.enable_progress_bar=false paths.log_dir="$runs" name="$name" ${RUN_ARGS:-} "$@" >"$out/$name.log" 2>&1
  echo "exit $?"; grep -E "epoch [0-9]+:|test [AB]:|rror" "$out/$name.log" | head -8
  cat "$runs/$name"/*/timing.json 2>/dev/null
}
train train-default "${TRAIN_TIMEOUT:-120}" trainer.max_epochs=2
train train-compiled "${TRAIN_TIMEOUT:-180}" trainer.max_epochs=2 callbacks.fast_path.compile=true
section done
