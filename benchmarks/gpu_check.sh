#!/usr/bin/env bash
# One GPU session's checks, in one go: the Triton kernels compiled and run on the GPU against the
# reference, the whole-model Triton parity, then the kernel and model benchmarks. Results land in
# $OUT (or ./gpu-results): the pytest logs and the benchmark JSON to turn into benchmarks/RESULTS.md.
#
# The lent H200 image has torch, triton, transformers, safetensors and pytest-benchmark but not
# open_clip; carry it as wheels (prepared on the CPU machine, see the device tool's README):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl open_clip_torch ftfy wcwidth
# and run:  bash benchmarks/gpu_check.sh   (with .whl carried)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:$PWD/tests:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

# Kernels on the GPU (TRITON_INTERPRET=0 compiles them), then MuGCP with kernels=triton vs reference.
TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_mutual_attention.py \
    tests/test_kernels_fuse_prompts.py 2>&1 | tee "$OUT/tests_kernels.log"
python3 -m pytest -q -p no:cacheprovider tests/test_backbone.py -k "open_clip or naive" 2>&1 | tee "$OUT/tests_backbone.log"

# Benchmarks: reference vs Triton, attention backends, the training step (bf16 autocast on CUDA).
TRITON_INTERPRET=0 timeout 420 python3 -m pytest -q -p no:cacheprovider benchmarks/test_bench_kernels.py \
    benchmarks/test_bench_model.py --benchmark-only --benchmark-json="$OUT/bench.json" 2>&1 | tail -60 | tee "$OUT/bench.log"
# Last, as they are the first to drop when time runs short: the bucketed text path (buckets, shared
# prefix, EOT-only block, recomputed chunks) equals the single pass on CUDA, and its benchmark.
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_text_path.py 2>&1 | tail -20 | tee "$OUT/tests_text_path.log"
timeout 150 python3 -m pytest -q -p no:cacheprovider benchmarks/test_bench_text.py --benchmark-only \
    --benchmark-json="$OUT/bench_text.json" 2>&1 | tail -30 | tee "$OUT/bench_text.log"
