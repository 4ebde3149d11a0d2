#!/usr/bin/env bash
# Tune the project's CPU configurations for this machine's CPU kind and write the results into the project:
# schedules/<target_key>/ (shipped in the wheel) and tuning_logs/<target_key>/ (resumable: a rerun continues).
#
#   bash tools/tune_cpu.sh              # every configuration below, about 20-30 minutes on 2 cores
#   TRIALS=8 bash tools/tune_cpu.sh     # fewer trials per bucket
#
# The configurations: the benchmark's (32 query heads, 8 KV heads, head_dim 128, page 16; float32 and float16),
# the served model's (SmolLM2-135M: 9 x 3 heads, head_dim 64, float32), a group of 7 (Qwen2-7B-like), MQA with
# head_dim 256, the synthetic demo model's (8 x 2, head_dim 64), and prefill of the benchmark's and the demo's.
# Run it on a quiet machine: the tuner times kernels, and a busy core makes every ranking noise.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
trials=${TRIALS:-16}
key=$("$py" -c 'from tvm_paged import targets; print(targets.target_key(targets.local_target()))')
echo "tune_cpu: target $key, $trials trials per bucket"

tune() {  # tune <config flags...> -- <tune flags...>
  local name
  name=$("$py" - "$@" <<'EOF'
import sys
from tvm_paged.tune import add_arguments, tune_config
import argparse
p = argparse.ArgumentParser(); add_arguments(p)
print(tune_config(p.parse_args(sys.argv[1:])).name)
EOF
  )
  echo "tune_cpu: $name"
  "$py" -m tvm_paged.cli tune --target local "$@" --trials "$trials" --no-progress \
    --schedules-dir schedules --work-dir "tuning_logs/$key/$name"
}

tune --kernel decode --dtype float32 --num-qo-heads 32 --num-kv-heads 8 --head-dim 128 --buckets 8x64,1x1024,8x8
tune --kernel decode --dtype float16 --num-qo-heads 32 --num-kv-heads 8 --head-dim 128 --buckets 8x64,1x1024,8x8
tune --kernel decode --dtype float32 --num-qo-heads 9 --num-kv-heads 3 --head-dim 64 --buckets 8x8,1x64
tune --kernel decode --dtype float32 --num-qo-heads 8 --num-kv-heads 2 --head-dim 64 --buckets 16x8,4x32
tune --kernel decode --dtype float16 --num-qo-heads 28 --num-kv-heads 4 --head-dim 128 --buckets 8x64,1x1024
tune --kernel decode --dtype float16 --num-qo-heads 8 --num-kv-heads 1 --head-dim 256 --buckets 8x64
tune --kernel prefill --dtype float16 --num-qo-heads 32 --num-kv-heads 8 --head-dim 128 --buckets 4x64 --q-len 256
tune --kernel prefill --dtype float32 --num-qo-heads 8 --num-kv-heads 2 --head-dim 64 --buckets 4x32 --q-len 128
echo "tune_cpu: done; schedules/$key/ and tuning_logs/$key/ are ready to commit"
