#!/usr/bin/env bash
# Every GPU check of the open issues in one call, for a session that has a GPU lent:
#   the CUDA tests (training in bf16/fp16/fp32, fp64 exactness, the on-device NaN guard, chunked
#   loss memory, planner vs measured peak) and the framework benchmark (accumlab, Trainer and a
#   plain loop, eager and compiled, alternated in one process).
# The device machine has torch and transformers but no notebook packages; run from the repo root:
#   bash benchmarks/gpu_checks.sh        (results in $OUT, or /tmp/accumlab-gpu)
set -u
OUT=${OUT:-/tmp/accumlab-gpu}
mkdir -p "$OUT"
export PYTHONPATH=.:tests HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 240 python -m pytest -o addopts="" -q -rs tests/test_gpu.py tests/test_memory.py \
    tests/test_planner.py -k "cuda or gpu" 2>&1 | tail -25 | tee "$OUT/tests.txt"
timeout "${BENCH_TIMEOUT:-300}" python benchmarks/bench_frameworks.py --compile \
    --sides trainer,plain,accumlab,plain-compile,accumlab-compile --rounds 2 \
    --json "$OUT/bench_frameworks.json" 2>&1 | tail -30 | tee "$OUT/bench.txt"
