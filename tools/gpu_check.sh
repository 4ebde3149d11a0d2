#!/usr/bin/env bash
# The GPU check, in one run: what a machine with a CUDA GPU can tell that this project's CPU machines cannot.
#
#   1. the card (nvidia-smi);
#   2. tools/bench_decode.py --device cuda: tvm_paged's CUDA decode against torch (gather + SDPA) and TVM/MLC's
#      CUDA decode kernel, each checked against the float64 reference first, with the card's measured read and
#      copy bandwidth;
#   3. the correctness grids (tests/test_decode.py, test_prefill.py, test_page_ops.py) with every pool and query
#      on the GPU (TVM_PAGED_TEST_DEVICE=cuda);
#   4. a short `tvm-paged tune` of the benchmark config for the card (knob space, measured on the GPU), its
#      logs and schedule packed into tuned.tgz;
#   5. a short MetaSchedule search over the CUDA paged decode space (--space paged) on the same config;
#   6. "variants": the attention-variant, 8-bit KV and batch-invariance grids (tests/test_variants.py,
#      test_batch_invariance.py) on the GPU;
#   7. "kvbench": tools/bench_decode.py --kv --device cuda: e4m3 and e5m2 caches against float16, and a 4K window
#      over 8 x 16K against the full and a plain 4K context.
#
# Each step has its own time limit (the first five fit in about nine minutes, the last two in about five more), so a hang in one still leaves the
# others' results. Results go to $OUT (or ./gpu_out). TVM comes from .devkit/ when present (a packed copy of
# the installed TVM with an activate.sh, for a machine without a package registry: `bash tools/pack_tvm.sh`,
# which also reports what a copy of the tree and kit weighs), else from python3's own site; python3 must have
# torch with CUDA, numpy and pytest.
#
#   bash tools/gpu_check.sh                       # on the GPU machine, repository root
#   STEPS="bench tests" bash tools/gpu_check.sh   # a subset
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
steps=${STEPS:-"bench tests variants kvbench tune paged"}
py=${PYTHON:-python3}
if [ -f .devkit/activate.sh ]; then
  # shellcheck disable=SC1091
  source .devkit/activate.sh
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# nvcc is on every CUDA machine; TVM's default (NVRTC) needs a matching cuda-python.
export TVM_CUDA_COMPILE_MODE=${TVM_CUDA_COMPILE_MODE:-nvcc}
export TVM_PAGED_CACHE_DIR=${TVM_PAGED_CACHE_DIR:-/tmp/tvm_paged_cache}

log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$out/summary.txt"; }

log "gpu_check: steps [$steps]"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 \
  | tee -a "$out/summary.txt"
"$py" -c 'import torch, tvm; print("torch", torch.__version__, "cuda", torch.version.cuda, "| tvm", tvm.__version__)' \
  2>&1 | tee -a "$out/summary.txt"
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  log "gpu_check: $py sees no CUDA device; nothing to check"
  exit 1
fi

for step in $steps; do
  case $step in
    bench)
      log "bench: tools/bench_decode.py --device cuda"
      timeout "${BENCH_TIMEOUT:-150}" "$py" tools/bench_decode.py --device cuda --cases b8,b1x16k,b64x4k \
        --rounds "${BENCH_ROUNDS:-3}" > "$out/bench.txt" 2>&1
      log "bench: exit $?"
      tail -n 40 "$out/bench.txt"
      ;;
    tests)
      log "tests: decode, prefill and page-op grids on the GPU"
      xdist=()
      "$py" -c 'import xdist' 2>/dev/null && xdist=(-n 8)
      TVM_PAGED_TEST_DEVICE=cuda timeout "${TESTS_TIMEOUT:-200}" "$py" -m pytest -q -p no:cacheprovider \
        "${xdist[@]}" -rfE tests/test_decode.py tests/test_prefill.py tests/test_page_ops.py > "$out/tests.txt" 2>&1
      log "tests: exit $?"
      tail -n 25 "$out/tests.txt"
      ;;
    variants)
      log "variants: attention variants, 8-bit KV and batch invariance on the GPU"
      xdist=()
      "$py" -c 'import xdist' 2>/dev/null && xdist=(-n 8)
      TVM_PAGED_TEST_DEVICE=cuda timeout "${VARIANTS_TIMEOUT:-200}" "$py" -m pytest -q -p no:cacheprovider \
        "${xdist[@]}" -rfE tests/test_variants.py tests/test_batch_invariance.py > "$out/variants.txt" 2>&1
      log "variants: exit $?"
      tail -n 25 "$out/variants.txt"
      ;;
    kvbench)
      log "kvbench: tools/bench_decode.py --kv --device cuda"
      timeout "${KVBENCH_TIMEOUT:-120}" "$py" tools/bench_decode.py --kv --device cuda \
        --rounds "${BENCH_ROUNDS:-3}" > "$out/kvbench.txt" 2>&1
      log "kvbench: exit $?"
      tail -n 30 "$out/kvbench.txt"
      ;;
    tune)
      log "tune: benchmark config, fp16, buckets 8x64 and 1x1024"
      work=/tmp/gpu_tune
      timeout "${TUNE_TIMEOUT:-100}" "$py" -m tvm_paged.cli tune --target nvidia/nvidia-h100 --kernel decode \
        --dtype float16 --buckets 8x64,1x1024 --trials "${TUNE_TRIALS:-16}" --strategy mutate --no-progress \
        --work-dir "$work/logs" --schedules-dir "$work/schedules" > "$out/tune.txt" 2>&1
      log "tune: exit $?"
      tail -n 15 "$out/tune.txt"
      [ -d "$work" ] && tar -C "$work" -czf "$out/tuned.tgz" .
      ;;
    paged)
      log "paged: MetaSchedule over the CUDA paged decode space, fp16, bucket 8x64"
      timeout "${PAGED_TIMEOUT:-80}" "$py" -m tvm_paged.cli tune --target nvidia/nvidia-h100 --kernel decode \
        --dtype float16 --buckets 8x64 --space paged --trials "${PAGED_TRIALS:-16}" --population 64 \
        --no-progress --work-dir /tmp/gpu_paged > "$out/paged.txt" 2>&1
      log "paged: exit $?"
      tail -n 8 "$out/paged.txt"
      ;;
    *) log "unknown step $step" ;;
  esac
done
log "gpu_check: done"
