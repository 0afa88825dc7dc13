#!/usr/bin/env bash
# One call on a lent GPU, sized to the device tool's limits (one command at most 10 minutes, at most 8 files back
# from $OUT): build the CUDA extension for this GPU, run the GPU test tier, the kernel benchmarks and the 1.3B/14B
# profiles.  Each stage runs under its own cap inside one overall deadline (BUDGET_S), most important first; a
# stage with too little time left is skipped and says so.  What the stages write goes to a staging folder that is
# packed into $OUT/results.tar.gz after every stage, so a run cut off early still returns what it finished; the
# whole log streams to $OUT/session.log.
#
#   bash bench/gpu_session.sh                      # from the repo root on the GPU machine
#   STAGES="profile_14b model" bash bench/gpu_session.sh   # a second call on the same (still warm) machine
#   bash bench/gpu_session.sh --unpack PATH/results.tar.gz # here: into bench/results/<gpu>_<date>/
#
# Stages (default order, most needed first): build gpu profile_1.3b bench profile_14b model interp.
# interp: the interpreter tier (tests/interp: split-KV, qk_norm, the chunk_attention flags, tile shapes, ...)
# compiled and run on the GPU -- those tests pick "cuda" when TRITON_INTERPRET is unset.
set -uo pipefail

if [ "${1:-}" = "--unpack" ]; then
  tarball=${2:?usage: bash bench/gpu_session.sh --unpack PATH/results.tar.gz}
  tmp=$(mktemp -d)
  tar xzf "$tarball" -C "$tmp" || exit 1
  gpu=$(head -1 "$tmp/env.txt" 2>/dev/null | cut -d, -f1 | tr -c 'A-Za-z0-9\n' '_' | tr -s '_' | sed 's/_$//')
  dest="$(dirname "$0")/results/${gpu:-gpu}_$(date +%Y-%m-%d)"
  mkdir -p "$dest" && cp -r "$tmp"/. "$dest"/ && rm -rf "$tmp"
  echo "unpacked into $dest:"; ls "$dest"
  exit 0
fi

OUT=${OUT:-out}
BUDGET_S=${BUDGET_S:-540}
STAGES=${STAGES:-"build gpu profile_1.3b bench profile_14b model interp"}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONUNBUFFERED=1
mkdir -p "$OUT"
WORK=$(mktemp -d)
DEADLINE=$(( $(date +%s) + BUDGET_S ))
PYTEST=(python -m pytest -q -p no:cacheprovider)

pack() { tar czf "$OUT/results.tar.gz" -C "$WORK" . ; }

# stage NAME CAP_S CMD...: run CMD under min(CAP_S, time left), record rc and seconds in stages.txt, pack results.
stage() {
  local name=$1 cap=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) - 5 ))
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped, ${left}s of the budget left"; echo "$name skipped 0" >> "$WORK/stages.txt"; return
  fi
  local t=$(( cap < left ? cap : left )) start=$(date +%s)
  echo "== $name (at most ${t}s)"
  timeout -k 5 "$t" bash -c '"$@"' _ "$@"   # bash -c: the stage may be one of the functions exported below
  local rc=$? took=$(( $(date +%s) - start ))
  [ "$rc" = 124 ] && echo "== $name: cut off after ${t}s"
  echo "== $name: rc=$rc, ${took}s"
  echo "$name $rc $took" >> "$WORK/stages.txt"
  pack
}

build() {
  CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=native" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    pip install --no-build-isolation --no-deps -e . > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; return 1; }
  python -c "from lipforcing.ops import cuda; print('CUDA extension:', cuda.has_extension(), cuda.unavailable_reason())"
}

profile() {  # profile MODEL [ARGS]: bf16 with CUDA graphs
  set -o pipefail
  local model=$1; shift
  lipforcing profile --model "$model" "$@" --device cuda --dtype bf16 --chunks 12 --cuda-graphs --no-progress \
    --json "$WORK/profile_${model}_graphs.json" --plot "$WORK/profile_${model}_graphs.png" 2>&1 \
    | tee "$WORK/profile_${model}_graphs.txt"
}

export -f build profile
export WORK

main() {
  for s in $STAGES; do
    case $s in build|gpu|bench|profile_1.3b|profile_14b|model|interp) ;;
      *) echo "unknown stage '$s' (build gpu bench profile_1.3b profile_14b model interp)"; return 2 ;; esac
  done
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no GPU"
    date -u +%Y-%m-%dT%H:%MZ
    python -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__)"
  } | tee "$WORK/env.txt"
  for s in $STAGES; do
    case $s in
      build) stage build 180 build ;;
      gpu) stage gpu 150 "${PYTEST[@]}" -m gpu tests --junitxml="$WORK/gpu_tests.xml" ;;
      # -o addopts= : the project's default `-m 'not compile and not gpu'` would deselect the benchmarks
      bench) stage bench 150 "${PYTEST[@]}" -o addopts= bench --ignore=bench/test_bench_model.py \
               --bench-json "$WORK/bench_kernels.json" --benchmark-json "$WORK/pytest_benchmark.json" ;;
      profile_1.3b) stage profile_1.3b 100 profile 1.3b --decoder taehv ;;  # + the Wan VAE decoder side by side
      profile_14b) stage profile_14b 150 profile 14b ;;
      interp) stage interp 150 env -u TRITON_INTERPRET "${PYTEST[@]}" -m interp tests --junitxml="$WORK/interp_tests.xml" ;;
      model) stage model 240 "${PYTEST[@]}" -o addopts= bench/test_bench_model.py --bench-json "$WORK/bench_model.json" ;;
    esac
  done
  pack
  echo "== done: stages (name rc seconds):"; cat "$WORK/stages.txt"
}

main 2>&1 | tee "$OUT/session.log"
