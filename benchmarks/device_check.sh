#!/usr/bin/env bash
# On the GPU machine, from the repo root: build the 8B-shaped pair, profile steady-state decode
# steps (benchmarks/profile_step.py), then the GPU tests; everything lands under $OUT.
#   OUT=<dir> PARSPEC_COMMIT=<sha> bash benchmarks/device_check.sh [profiles|tests|all]
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:?set OUT}
WHAT=${1:-all}
PAIR=${PAIR:-/tmp/parspec-8b}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
if [[ $WHAT == all || $WHAT == profiles ]]; then
  timeout 240 python3 -m parspec.bench.expand --src fixtures/reference --dst "$PAIR" --scale 8b 2>&1 | tail -3
  peagle='{"method":"eagle3","model":"'$PAIR'/p-eagle","num_speculative_tokens":7,"parallel_drafting":true}'
  eagle='{"method":"eagle3","model":"'$PAIR'/eagle3","num_speculative_tokens":7}'
  run() { local name=$1; shift; echo "== $name"; timeout 150 python3 benchmarks/profile_step.py --target "$PAIR/target" \
            --out "$OUT/profile_$name.json" "$@" 2>&1 | grep -v Warning | tail -18; }
  run nospec_b1 --batch 1
  run nospec_b1_eager --batch 1 --enforce-eager
  run peagle7_b1 --batch 1 --spec "$peagle"
  run eagle7_b1 --batch 1 --spec "$eagle"
  run nospec_b64 --batch 64
fi
if [[ $WHAT == all || $WHAT == tests ]]; then
  timeout 400 python3 -m pytest -q -p no:cacheprovider tests/gpu > "$OUT/gpu_tests.log" 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|Error" "$OUT/gpu_tests.log" | tail -15
fi
