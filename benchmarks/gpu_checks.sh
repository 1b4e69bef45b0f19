#!/usr/bin/env bash
# Every GPU check of the open issues in one call (under 8 minutes), for a session with a GPU:
#   1. the CUDA tests: tests/test_gpu.py (bf16/fp16/fp32 training, fp64 exactness, the on-device
#      NaN guard, chunked-loss memory) and the CUDA tests of test_fast_path.py (no sync inside a
#      compiled window, one in its step; fused-loss memory), test_memory.py, test_planner.py;
#   2. bench_frameworks.py on the anchor (GPT-2 small, sequence 1024, bf16, 16 x 4): the Trainer,
#      accumlab eager, a plain compiled loop and accumlab compiled, 2 rounds alternated in one
#      process, then accumlab compiled at 64x1, 16x4, 32x2 and 8x8 (the sweep);
#   3. the table and the targets again from the JSON (bench_targets.py), so that a timeout keeps
#      whatever finished: >= 2.5x the Trainer, >= 40% MFU, 16x4 >= 0.97x 64x1, <= 12 GiB.
# Results: benchmarks/results/gpu_checks/ (gpu.txt, tests.txt, bench.txt, bench_frameworks.json,
# targets.txt), copied to $OUT when it is set (a device machine sends back only $OUT).
# Every Python command runs through benchmarks/bare.py, which hides ipywidgets, plotly and pandas:
# the device machine has torch and transformers but no notebook packages. From the repo root:
#   bash benchmarks/gpu_checks.sh          # on a GPU machine (tests 120 s + bench 320 s at most)
#   bash benchmarks/gpu_checks.sh --dry    # on a CPU: the same commands at toy sizes (~4 min,
#                                          # aot_eager; DRY_BACKEND=inductor compiles for real)
# The Trainer side needs accelerate (+ psutil). A device without them can be given the venv's
# copies: carry .venv/lib/python3.11/site-packages/accelerate and .../psutil (added below).
set -u
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
RES=benchmarks/results/gpu_checks
[ $DRY = 1 ] && RES=${TMPDIR:-/tmp}/accumlab-gpu-checks-dry  # toy numbers: never committed
mkdir -p "$RES"
export PYTHONPATH=.:tests HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/accumlab-inductor-$(id -u)}
PY="python benchmarks/bare.py"
EXTRA=.venv/lib/python3.11/site-packages
if ! python -c "import accelerate" 2>/dev/null && [ -d "$EXTRA/accelerate" ]; then
    export PYTHONPATH="$PYTHONPATH:$EXTRA"
fi
SIDES=accumlab,plain-compile,accumlab-compile
if python -c "import accelerate" 2>/dev/null; then
    SIDES=trainer,$SIDES
else
    echo "accelerate is missing: the Trainer side is left out (its ratio stays unmeasured)"
fi

if [ $DRY = 1 ]; then
    echo "dry run on $(nproc) CPU cores" | tee "$RES/gpu.txt"
    T_TESTS=900; T_BENCH=1500
    BENCH="--size tiny --seq 64 --micro 4 --accum 2 --warmup 1 --steps 2 --rounds 1
           --precision fp32 --backend ${DRY_BACKEND:-aot_eager} --sweep 8x1,4x2,2x4,1x8"
else
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$RES/gpu.txt"
    T_TESTS=120; T_BENCH=320
    BENCH="--sweep 64x1,16x4,32x2,8x8 --sweep-steps 5"
fi
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$RES/gpu.txt"

# -v: a timeout still leaves the name and outcome of every test that finished
timeout $T_TESTS $PY -m pytest -o addopts="" -v -rs -p no:cacheprovider tests/test_gpu.py \
    tests/test_fast_path.py tests/test_memory.py tests/test_planner.py -k "cuda or gpu" \
    > "$RES/tests.txt" 2>&1
echo "== tests exit $? (124: timed out)" | tee -a "$RES/tests.txt"
grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|^E " "$RES/tests.txt" | tail -40
# shellcheck disable=SC2086  # BENCH is a list of words
timeout $T_BENCH $PY benchmarks/bench_frameworks.py --compile --sides "$SIDES" $BENCH \
    --json "$RES/bench_frameworks.json" > "$RES/bench.txt" 2>&1
echo "== bench exit $? (124: timed out; the table below holds what finished)" \
    | tee -a "$RES/bench.txt"
grep -v "Warning\|warn(" "$RES/bench.txt" | tail -40
echo "== table and targets recomputed from $RES/bench_frameworks.json"
timeout 60 $PY benchmarks/bench_targets.py "$RES/bench_frameworks.json" 2>&1 \
    | tee "$RES/targets.txt"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT" && cp "$RES"/* "$OUT"/
fi
