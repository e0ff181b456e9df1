#!/usr/bin/env bash
# On the GPU machine, from the repo root: the GPU tests (Triton kernels == references, engine
# lossless on the GPU), then the throughput benchmark, results under $OUT.
#   OUT=<dir> PROMPTS=<humaneval.jsonl> PARSPEC_COMMIT=<sha> bash benchmarks/device_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
PROMPTS=${PROMPTS:-.device/humaneval.jsonl}
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/gpu tests/test_draft_inputs.py tests/test_attention.py -s \
    > "$OUT/gpu_tests.log" 2>&1; echo "pytest rc=$?"; tail -3 "$OUT/gpu_tests.log"
python3 benchmarks/throughput.py --out "$OUT/throughput_h100.json" --prompts "$PROMPTS" --batch-sizes 1 8 \
    > "$OUT/throughput_h100.log" 2>&1; echo "throughput rc=$?"; tail -25 "$OUT/throughput_h100.log"
