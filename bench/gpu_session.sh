#!/usr/bin/env bash
# One call on a lent GPU: build the CUDA extension, run the GPU test tier and every benchmark, and leave JSON
# results under $OUT (default ./out).  Usage (from the repo root): bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
start=$(date +%s)
CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=native" pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
python -m pytest -m gpu -q -x --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
python -m pytest bench -q --bench-json "$OUT/bench.json" --benchmark-json "$OUT/pytest_benchmark.json" 2>&1 \
  | tail -30 | tee "$OUT/bench.txt"
for model in 1.3b 14b; do
  timeout 300 lipforcing profile --model "$model" --device cuda --dtype bf16 --chunks 12 --cuda-graphs \
    --json "$OUT/profile_${model}_graphs.json" --plot "$OUT/profile_${model}_graphs.png" 2>&1 | tail -25 \
    | tee "$OUT/profile_${model}_graphs.txt"
done
timeout 300 lipforcing profile --model 1.3b --device cuda --dtype bf16 --chunks 12 --compile \
  --json "$OUT/profile_1.3b_compile.json" --plot "$OUT/profile_1.3b_compile.png" 2>&1 | tail -25 \
  | tee "$OUT/profile_1.3b_compile.txt"
