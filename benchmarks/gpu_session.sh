#!/usr/bin/env bash
# One lent-GPU session (about 15 device minutes, this script stays under 10): the gpu-marked tests,
# then benchmarks/attention_gpu.py at the shapes that matter (S = 1k..16k, D = 64/128, bf16, causal
# and not, fwd and fwd+bwd, SSMax on and off) against SDPA flash/cuDNN and compiled FlexAttention.
#
# Everything lands in $OUT (the device runner's output folder) or ./out/: device.txt, gpu_tests.txt,
# attention_gpu.txt (table + summary, rewritten after every problem, so a cut-short run keeps its
# rows) and attention_gpu.log (progress).  Limits, in seconds, can be overridden from the environment:
#   TEST_BUDGET (default 150)  hard limit on the pytest run
#   BENCH_BUDGET (default 300) no new benchmark problem starts after this; BENCH_GRACE (60) more to finish one
# Run from anywhere: bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-./out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
TEST_BUDGET="${TEST_BUDGET:-150}"
BENCH_BUDGET="${BENCH_BUDGET:-300}"
BENCH_GRACE="${BENCH_GRACE:-60}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
start=$(date +%s)

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi unavailable"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
} > "$OUT_DIR/device.txt"
cat "$OUT_DIR/device.txt"

echo "== gpu-marked tests (limit ${TEST_BUDGET}s)"
timeout -k 10 "$TEST_BUDGET" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests >"$OUT_DIR/gpu_tests.txt" 2>&1
tests_rc=$?
tail -n 25 "$OUT_DIR/gpu_tests.txt"
[ "$tests_rc" -eq 124 ] && echo "gpu tests: stopped at the ${TEST_BUDGET}s limit"

echo "== attention benchmark (new problems until ${BENCH_BUDGET}s, hard stop $((BENCH_BUDGET + BENCH_GRACE))s)"
# Sizes in priority order: if the budget runs out, the shapes that matter most are already measured.
timeout -k 10 "$((BENCH_BUDGET + BENCH_GRACE))" "$PY" benchmarks/attention_gpu.py \
  --sizes 4096,16384,1024,8192,2048 --head-dims 128,64 --causal both --ssmax both --modes fwd,fwd+bwd \
  --warmup 10 --rep 40 --budget "$BENCH_BUDGET" --out "$OUT_DIR/attention_gpu.txt" \
  2>"$OUT_DIR/attention_gpu.log"
bench_rc=$?
[ "$bench_rc" -eq 124 ] && echo "benchmark: stopped at the hard limit; the table holds every finished problem"
cat "$OUT_DIR/attention_gpu.txt" 2>/dev/null || tail -n 30 "$OUT_DIR/attention_gpu.log"

echo "== done in $(( $(date +%s) - start ))s (tests rc=$tests_rc, benchmark rc=$bench_rc); files in $OUT_DIR"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
