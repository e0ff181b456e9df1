#!/usr/bin/env bash
# On the GPU machine, from the repo root; results under $OUT. Parts, in this order, as named:
#   tests     the GPU tests ($GPU_TESTS, default all of tests/gpu)
#   bench     parspec bench on the 8B-shaped pair ($BENCH_ARGS), HumanEval prompts from .device/
#   profiles  benchmarks/profile_step.py on the 8B-shaped target: steady-state decode steps
#   spd-tests (nvidia-h200-x2) the 2-GPU SPD tests (5 cases, ~100 s each: a call of its own)
#   spd       (nvidia-h200-x2) benchmarks/spd.py on the 8B-shaped pair with each of $SPD_DRAFTERS
#             (default: module eagle3; ~200 s each)
#   OUT=<dir> PARSPEC_COMMIT=<sha> bash benchmarks/device_check.sh tests bench profiles
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:?set OUT}
PAIR=${PAIR:-/tmp/parspec-8b}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
for part in "$@"; do
  case $part in
  tests)
    timeout "${TESTS_TIMEOUT:-400}" python3 -m pytest -q -p no:cacheprovider ${GPU_TESTS:-tests/gpu} \
      > "$OUT/gpu_tests.log" 2>&1
    echo "pytest rc=$?"; grep -E "passed|failed|Error" "$OUT/gpu_tests.log" | tail -15 ;;
  bench)
    timeout "${BENCH_TIMEOUT:-400}" python3 -m parspec.cli bench --expand 8b --expand-dir "$PAIR" --dtype bfloat16 \
      --device cuda --prompts .device/humaneval.jsonl --no-progress --out "$OUT/${BENCH_NAME:-bench_8b_h200}.json" \
      ${BENCH_ARGS:-} 2>&1 | grep -v -i -E "warn|it/s|B/s" | tail -40 ;;
  profiles)
    [[ -d $PAIR/target ]] || python3 -m parspec.bench.expand --src fixtures/reference --dst "$PAIR" --scale 8b 2>&1 | tail -1
    peagle='{"method":"eagle3","model":"'$PAIR'/p-eagle","num_speculative_tokens":7,"parallel_drafting":true}'
    for spec in "nospec_b1 --batch 1" "nospec_b1_sync --batch 1 --no-async" "nospec_b64 --batch 64" \
                "peagle7_b1 --batch 1 --spec $peagle"; do
      set -- $spec; name=$1; shift
      echo "== $name"
      timeout 120 python3 benchmarks/profile_step.py --target "$PAIR/target" --out "$OUT/profile_$name.json" "$@" \
        2>&1 | grep -v -i warn | grep -v "_C\._" | tail -8
    done ;;
  spd-tests)
    timeout "${TESTS_TIMEOUT:-560}" python3 -m pytest -v -p no:cacheprovider tests/gpu/test_spd_gpu.py \
      > "$OUT/gpu_tests_spd.log" 2>&1
    echo "spd tests rc=$?"; grep -E "PASSED|FAILED|passed|failed|Error" "$OUT/gpu_tests_spd.log" | tail -12 ;;
  spd)
    # SPD_DRAFTERS: module (the spd-n module) and/or eagle3 (the EAGLE-3 head chained from each exit);
    # about 200 s each at c=1 and 8 with one repeat
    for drafter in ${SPD_DRAFTERS:-module eagle3}; do
      name=spd_8b_h200; [[ $drafter == eagle3 ]] && name=spd_eagle3_8b_h200
      timeout "${SPD_TIMEOUT:-300}" python3 benchmarks/spd.py --expand-dir "$PAIR" --prompts-file .device/humaneval.jsonl \
        --drafter $drafter --out "$OUT/$name.json" ${SPD_ARGS:-} 2>&1 | grep -v -E "^\[rank|Warning" | tail -14
    done ;;
  esac
done
