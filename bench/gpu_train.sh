#!/usr/bin/env bash
# One call on a lent GPU that trains the whole Lip Forcing recipe at small scale (issue 19, "Training plan"), sized to
# the device tool's limits (one command at most 10 minutes; at most 8 files, 16 MiB each, back from $OUT):
#
#   vae      resume the newest committed VAE run (runs/records/vae-*/run, the one at the highest iteration) for
#            VAE_MIN minutes at a GPU batch size, clips rendered by a process pool (config `workers`)
#   syncnet  the world SyncNet for SYNC_MIN minutes; it needs no VAE, so it trains in the background from the start
#            and the sf stage waits for it
#   data     the world latents of the new VAE: TRAIN_CLIPS training clips (DATA_PROCS processes, one seed each,
#            merged into train/data/world) and EVAL_DATA_CLIPS held-out clips (train/data/eval)
#   teacher, df, sf   each from the previous stage's output, each for its own minutes (TEACHER_MIN, DF_MIN, SF_MIN)
#   eval     `lipforcing eval` on held-out clips (on the CPU, as the table's FPS column means): teacher at CFG 1.0 and
#            4.5, the df and sf students, SyncNet LSE; one process per system (the controls in each), merged into
#            train/eval/eval.md; plus the VAE's held-out quality (evaluate_vae) in train/eval/vae_eval.json
#
# Every training stage runs `lipforcing train --max-minutes` (stops after the iteration in progress and saves) under
# a `timeout` safety net, all of it under one deadline (BUDGET_S); a stage with too little time left is skipped and
# says so.  Stage configs are generated copies of configs/<stage>.yaml (the VAE's: its checkpoint's own config) with
# GPU batch sizes, in train/configs/.  After every stage the staging folder (checkpoints: the latest of each run;
# logs, metrics, curves, configs, eval; not the latent data) is packed into $OUT/train.tar.gz (split into
# train.tar.gz.partNN when over 15 MiB); the whole log streams to $OUT/train.log.  No install on the device (no
# internet): PYTHONPATH=<repo>, pure Python.  Attention runs the plain PyTorch reference by default
# (LIPFORCING_BACKEND=$BACKEND): the Triton/CUDA kernels have not run on a GPU yet; BACKEND=auto tries them.
#
#   bash bench/gpu_train.sh                                  # from the repo root on the GPU machine
#   STAGES="vae data" VAE_MIN=4 bash bench/gpu_train.sh      # a subset / other budgets (env, below)
#   SMOKE=1 DEVICE=cpu bash bench/gpu_train.sh               # here: every stage for 2 iterations at tiny sizes (~1 min)
#   bash bench/gpu_train.sh --unpack PATH/train.tar.gz       # here: into runs/gpu-<date>/train/ (or a .part00:
#                                                            #   the parts are joined; UNPACK_TO=DIR for DIR/gpu-<date>)
#
# Env (defaults): BUDGET_S 540, STAGES "syncnet vae data teacher df sf eval", DEVICE cuda, BACKEND reference,
# SPEECH auto (synthetic speech where espeak-ng is missing), VAE_MIN 2, VAE_BATCH 16, VAE_WORKERS nproc-4,
# SYNC_MIN 4.5, SYNC_BATCH 4, TRAIN_CLIPS 256, EVAL_DATA_CLIPS 32, DATA_PROCS 8, FRAMES 21, TEACHER_MIN 1.5,
# TEACHER_BATCH 32, DF_MIN 0.5, DF_BATCH 16, SF_MIN 1, SF_BATCH 8, EVAL_N 2 (clips), EVAL_SECONDS 8,
# TEACHER_STEPS 50.  SMOKE=1 shrinks everything (and uses synthetic speech).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)

if [ "${1:-}" = "--unpack" ]; then
  src=${2:?usage: bash bench/gpu_train.sh --unpack PATH/train.tar.gz}
  base=${src%.part*}
  tmp=$(mktemp -d)
  if [ -f "$base" ]; then cat "$base"; else cat "$base".part*; fi | tar xzf - -C "$tmp" || { rm -rf "$tmp"; exit 1; }
  stamp=$(sed -n 2p "$tmp/train/env.txt" 2>/dev/null | tr -dc '0-9-')
  dest="${UNPACK_TO:-$REPO/runs}/gpu-${stamp:-$(date -u +%Y%m%d-%H%M)}"
  [ -e "$dest" ] && dest="$dest-$(date -u +%H%M%S)"
  mkdir -p "$dest" && cp -r "$tmp"/. "$dest"/ && rm -rf "$tmp"
  echo "unpacked into $dest:"; ls "$dest/train"
  exit 0
fi

OUT=${OUT:-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
SMOKE=${SMOKE:-0}
BUDGET_S=${BUDGET_S:-540}
STAGES=${STAGES:-"syncnet vae data teacher df sf eval"}
DEVICE=${DEVICE:-cuda}
NPROC=$(nproc)
if [ "$SMOKE" = 1 ]; then
  SPEECH=${SPEECH:-synthetic}; FRAMES=${FRAMES:-9}; SIZE=32
  VAE_BATCH=${VAE_BATCH:-1}; VAE_WORKERS=${VAE_WORKERS:-1}; SYNC_BATCH=${SYNC_BATCH:-1}
  TRAIN_CLIPS=${TRAIN_CLIPS:-2}; EVAL_DATA_CLIPS=${EVAL_DATA_CLIPS:-1}; DATA_PROCS=${DATA_PROCS:-2}
  TEACHER_BATCH=${TEACHER_BATCH:-1}; DF_BATCH=${DF_BATCH:-1}; SF_BATCH=${SF_BATCH:-1}
  EVAL_N=${EVAL_N:-1}; EVAL_SECONDS=${EVAL_SECONDS:-2}; TEACHER_STEPS=${TEACHER_STEPS:-2}
else
  SPEECH=${SPEECH:-auto}; FRAMES=${FRAMES:-21}; SIZE=64
  VAE_BATCH=${VAE_BATCH:-16}; VAE_WORKERS=${VAE_WORKERS:-$(( NPROC > 6 ? NPROC - 4 : 2 ))}; SYNC_BATCH=${SYNC_BATCH:-4}
  TRAIN_CLIPS=${TRAIN_CLIPS:-256}; EVAL_DATA_CLIPS=${EVAL_DATA_CLIPS:-32}; DATA_PROCS=${DATA_PROCS:-8}
  TEACHER_BATCH=${TEACHER_BATCH:-32}; DF_BATCH=${DF_BATCH:-16}; SF_BATCH=${SF_BATCH:-8}
  EVAL_N=${EVAL_N:-2}; EVAL_SECONDS=${EVAL_SECONDS:-8}; TEACHER_STEPS=${TEACHER_STEPS:-50}
fi
VAE_MIN=${VAE_MIN:-2}; SYNC_MIN=${SYNC_MIN:-4.5}; TEACHER_MIN=${TEACHER_MIN:-1.5}; DF_MIN=${DF_MIN:-0.5}
SF_MIN=${SF_MIN:-1}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LIPFORCING_BACKEND=${BACKEND:-reference}
export MPLBACKEND=Agg LIPFORCING_DEFAULT_WEIGHTS=none
PY=${PYTHON:-$(command -v python3 || command -v python)}
# The stages run in ROOT with relative paths train/...: they stay valid once unpacked.  Kept between calls on a warm
# machine (a second call resumes each run that already has a checkpoint; the VAE is copied in once).
if [ "$SMOKE" = 1 ]; then ROOT=${TRAIN_ROOT:-$(mktemp -d)}; else ROOT=${TRAIN_ROOT:-/tmp/lipforcing_gpu_train}; fi
W=train
mkdir -p "$ROOT/$W/configs" "$ROOT/$W/logs" || exit 1
cd "$ROOT" || exit 1
DEADLINE=$(( $(date +%s) + BUDGET_S ))

# pack: the staging folder into $OUT/train.tar.gz (parts when over 15 MiB); runs keep only the checkpoint `latest`
# names; the latent data stays behind (its meta comes back)
pack() {
  local tmp="$ROOT/train.tar.gz"
  tar czf "$tmp" --exclude="$W/data/world/s*-clip-*" --exclude="$W/data/eval/clip-*" \
    --exclude="$W/data/parts" \
    $(for run in "$W"/*/; do [ -f "$run/latest" ] || continue
        for ck in "$run"ckpt-*; do [ "$(basename "$ck")" = "$(cat "$run/latest")" ] || echo "--exclude=${ck%/}"; done
      done) "$W"
  rm -f "$OUT"/train.tar.gz "$OUT"/train.tar.gz.part*
  if [ "$(stat -c %s "$tmp")" -gt $(( 15 * 1024 * 1024 )) ]; then
    split -b 15M -d "$tmp" "$OUT/train.tar.gz.part" && rm -f "$tmp"
  else
    mv "$tmp" "$OUT/train.tar.gz"
  fi
}

left() { echo $(( DEADLINE - $(date +%s) )); }

# minutes MIN ALLOWANCE_S: the --max-minutes of a stage: MIN, or less when its allowance (minus 45 s for start-up,
# the final save and the VAE's export) is shorter
minutes() { awk -v m="$1" -v a="$2" 'BEGIN { x = (a - 45) / 60; if (x < m) m = x; printf "%.3f", m }'; }

# stage NAME CAP_S CMD...: CMD under min(CAP_S, time left) with `timeout` (SIGTERM, then SIGKILL 30 s later), its
# output in logs/NAME.log too; rc and seconds into stages.txt; then pack.
stage() {
  local name=$1 cap=$2; shift 2
  local l=$(( $(left) - 5 ))
  if [ "$l" -lt 30 ]; then
    echo "== $name: skipped, ${l}s of the budget left"; echo "$name skipped 0" >> "$W/stages.txt"; return 1
  fi
  local t=$(( cap < l ? cap : l )) start=$(date +%s)
  echo "== $name (at most ${t}s): $*"
  timeout -k 30 "$t" "$@" 2>&1 | tee "$W/logs/$name.log"
  local rc=${PIPESTATUS[0]} took=$(( $(date +%s) - start ))
  [ "$rc" = 124 ] && echo "== $name: cut off after ${t}s"
  echo "== $name: rc=$rc, ${took}s"
  echo "$name $rc $took" >> "$W/stages.txt"
  pack
  return "$rc"
}

# config STAGE BASE.yaml|BASE.json KEY=YAML...: train/configs/STAGE.yaml = BASE (a YAML config or a checkpoint's
# trainer.json) with the overrides
config() {
  local name=$1 src=$2; shift 2
  "$PY" - "$src" "$W/configs/$name.yaml" "$@" <<'EOF' || return 1
import json, sys, yaml
src, dst, *kv = sys.argv[1:]
d = json.load(open(src))["config"] if src.endswith(".json") else yaml.safe_load(open(src))
for item in kv:
    k, v = item.split("=", 1)
    d[k] = yaml.safe_load(v)
open(dst, "w").write(yaml.safe_dump(d, sort_keys=False))
EOF
  echo "$W/configs/$name.yaml"
}

# train_stage STAGE MIN CAP_S CONFIG [ARGS...]: lipforcing train under the stage's budget
train_stage() {
  local name=$1 min=$2 cap=$3 conf=$4; shift 4
  local l=$(( $(left) - 5 )); local a=$(( cap < l ? cap : l ))
  local m; m=$(minutes "$min" "$a")
  if awk -v m="$m" 'BEGIN { exit !(m <= 0.05) }'; then
    echo "== $name: skipped, ${a}s allowed is too little"; echo "$name skipped 0" >> "$W/stages.txt"; return 1
  fi
  stage "$name" "$cap" "$PY" -m lipforcing train --stage "$name" --config "$conf" --max-minutes "$m" "$@"
}

cap_of() { awk -v m="$1" 'BEGIN { printf "%d", m * 60 + 75 }'; }   # a training stage's timeout: its minutes + 75 s
iters() { [ "$SMOKE" = 1 ] && echo 2 || echo 10000000; }           # training stages: bounded by minutes

latest_vae_record() {  # the committed VAE run at the highest iteration
  local best="" bi=-1
  for run in "$REPO"/runs/records/vae-*/run; do
    [ -f "$run/latest" ] || continue
    local i; i=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['iteration'])" \
      "$run/$(cat "$run/latest")/trainer.json" 2>/dev/null) || continue
    [ "$i" -gt "$bi" ] && { bi=$i; best=$run; }
  done
  echo "$best"
}

run_vae() {
  local rec; rec=$(latest_vae_record)
  [ -n "$rec" ] || { echo "== vae: no committed VAE run under runs/records/vae-*/run"; return 1; }
  if [ -f "$W/vae/latest" ]; then
    echo "== vae: $W/vae has a checkpoint already (an earlier call): resuming it"
  else
    mkdir -p "$W/vae" && cp -r "$rec/$(cat "$rec/latest")" "$rec/latest" "$W/vae/" && \
      { cp "$rec/metrics.jsonl" "$W/vae/" 2>/dev/null; true; } || return 1
    echo "== vae: copied $rec ($(cat "$rec/latest"))"
  fi
  local ck; ck=$(cat "$W/vae/latest")
  local it; it=$("$PY" -c "import json; print(json.load(open('$W/vae/$ck/trainer.json'))['iteration'])")
  echo "== vae: resuming from $W/vae/$ck (iteration $it)"
  local extra=(device="$DEVICE" output_dir="$W/vae" batch_size="$VAE_BATCH" workers="$VAE_WORKERS" resume=true
               iterations=10000000 save_every=500 plot_every=0 log_every=1)
  [ "$SMOKE" = 1 ] && extra+=(size=32 frames=5 warmup_frames=4 stats_clips=1 speech="$SPEECH" iterations=$(( it + 2 )))
  local conf; conf=$(config vae "$W/vae/$ck/trainer.json" "${extra[@]}") || return 1
  train_stage vae "$VAE_MIN" "$(cap_of "$VAE_MIN")" "$conf" --threads 4
}

SYNC_PID=""
start_syncnet() {  # in the background: its log in logs/syncnet.log, recorded when sf waits for it
  local extra=(device="$DEVICE" output_dir="$W/syncnet" batch_size="$SYNC_BATCH" iterations="$(iters)"
               save_every=1000 plot_every=0 speech="$SPEECH")
  [ "$SMOKE" = 1 ] && extra+=(frame_size=16 width=4 embed_dim=8 size=32 frames=20 windows=2 max_offset=2)
  local conf; conf=$(config syncnet "$REPO/configs/syncnet.yaml" "${extra[@]}") || return 1
  local a=$(( $(cap_of "$SYNC_MIN") < $(left) - 5 ? $(cap_of "$SYNC_MIN") : $(left) - 5 ))
  local m; m=$(minutes "$SYNC_MIN" "$a")
  echo "== syncnet: in the background, --max-minutes $m (at most ${a}s)"
  SYNC_START=$(date +%s)
  ( timeout -k 30 "$a" "$PY" -m lipforcing train --stage syncnet --config "$conf" --max-minutes "$m" --threads 2 \
      > "$W/logs/syncnet.log" 2>&1; echo $? > "$W/logs/syncnet.rc" ) &
  SYNC_PID=$!
}

wait_syncnet() {
  [ -n "$SYNC_PID" ] || return 0
  echo "== waiting for syncnet"
  wait "$SYNC_PID"; SYNC_PID=""
  local rc; rc=$(cat "$W/logs/syncnet.rc" 2>/dev/null || echo "?")
  tail -3 "$W/logs/syncnet.log"
  echo "== syncnet: rc=$rc, $(( $(date +%s) - SYNC_START ))s"
  echo "syncnet $rc $(( $(date +%s) - SYNC_START ))" >> "$W/stages.txt"
  pack
}

build_data() {  # DATA_PROCS train builders (seeds 0..N-1) and one held-out builder, in parallel, then merge
  rm -rf "$W/data"
  local per=$(( (TRAIN_CLIPS + DATA_PROCS - 1) / DATA_PROCS )) pids=() i
  for (( i = 0; i < DATA_PROCS; i++ )); do
    OMP_NUM_THREADS=2 "$PY" -m lipforcing data build --vae "$W/vae" --out "$W/data/parts/train-$i" --clips "$per" \
      --frames "$FRAMES" --size "$SIZE" --seed "$i" --speech "$SPEECH" > "$W/logs/data-train-$i.log" 2>&1 &
    pids+=($!)
  done
  OMP_NUM_THREADS=2 "$PY" -m lipforcing data build --vae "$W/vae" --out "$W/data/eval" --clips "$EVAL_DATA_CLIPS" \
    --frames "$FRAMES" --size "$SIZE" --split eval --speech "$SPEECH" > "$W/logs/data-eval.log" 2>&1 &
  pids+=($!)
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  tail -qn1 "$W"/logs/data-*.log
  [ "$rc" = 0 ] || return 1
  mkdir -p "$W/data/world"
  for (( i = 0; i < DATA_PROCS; i++ )); do
    for f in "$W/data/parts/train-$i"/clip-*.safetensors; do mv "$f" "$W/data/world/s$i-$(basename "$f")"; done
  done
  cp -r "$W/data/parts/train-0/meta" "$W/data/world/"
  "$PY" - "$W/data/world" "$DATA_PROCS" <<'EOF'
import json, pathlib, sys
out, n = pathlib.Path(sys.argv[1]), int(sys.argv[2])
meta = json.loads((out / "meta" / "dataset.json").read_text())
meta.update(num_clips=len(list(out.glob("*.safetensors"))), seed=list(range(n)),
            note=f"merged from {n} builders, seeds 0..{n - 1} (files s<seed>-clip-<i>)")
(out / "meta" / "dataset.json").write_text(json.dumps(meta, indent=1))
print(f"data: {meta['num_clips']} training clips in {out}")
EOF
}

FILES="data={kind: files, path: $W/data/world}"
run_teacher() {
  local conf; conf=$(config teacher "$REPO/configs/teacher.yaml" device="$DEVICE" output_dir="$W/teacher" \
    batch_size="$TEACHER_BATCH" iterations="$(iters)" save_every=1000 plot_every=0 "$FILES") || return 1
  train_stage teacher "$TEACHER_MIN" "$(cap_of "$TEACHER_MIN")" "$conf" --threads 4
}
run_df() {
  local conf; conf=$(config df "$REPO/configs/df.yaml" device="$DEVICE" output_dir="$W/df" \
    teacher_path="$W/teacher" batch_size="$DF_BATCH" iterations="$(iters)" save_every=1000 log_every=5 \
    "$FILES") || return 1
  train_stage df "$DF_MIN" "$(cap_of "$DF_MIN")" "$conf" --threads 4
}
run_sf() {
  wait_syncnet
  local vshift=15; [ "$SMOKE" = 1 ] && vshift=2
  local extra=(device="$DEVICE" output_dir="$W/sf" teacher_path="$W/teacher" student_init="$W/df"
               batch_size="$SF_BATCH" iterations="$(iters)" save_every=500 log_every=5 "$FILES"
               "reward={enabled: true, decoder: vae, vae_path: $W/vae, syncnet_path: $W/syncnet, beta: 2.0,
                        vshift: $vshift}")
  [ "$SMOKE" = 1 ] && extra+=(critic_updates_per_student=1)
  local conf; conf=$(config sf "$REPO/configs/sf.yaml" "${extra[@]}") || return 1
  train_stage sf "$SF_MIN" "$(cap_of "$SF_MIN")" "$conf" --threads 4
}

# eval: one `lipforcing eval` per system in parallel (same held-out clips and controls), merged into eval/eval.md
eval_all() {
  mkdir -p "$W/eval"
  local common=(--vae "$W/vae" --clips "$EVAL_N" --seconds "$EVAL_SECONDS" --size "$SIZE" --speech "$SPEECH")
  [ -f "$W/data/world/meta/text.safetensors" ] && common+=(--text "$W/data/world/meta/text.safetensors")
  [ -f "$W/syncnet/latest" ] && common+=(--syncnet "$W/syncnet")
  local pids=() parts=()
  if [ -f "$W/teacher/latest" ]; then
    for g in 1.0 4.5; do
      "$PY" -m lipforcing eval "${common[@]}" --teacher "$W/teacher" --teacher-cfg "$g" \
        --teacher-steps "$TEACHER_STEPS" --no-untrained -o "$W/eval/teacher_cfg$g" \
        > "$W/logs/eval-teacher_cfg$g.log" 2>&1 &
      pids+=($!); parts+=("$W/eval/teacher_cfg$g")
    done
  fi
  local first=1
  for s in df sf; do
    [ -f "$W/$s/latest" ] || continue
    local un=(--no-untrained); [ "$first" = 1 ] && un=(); first=0
    "$PY" -m lipforcing eval "${common[@]}" --checkpoint "$s=$W/$s" "${un[@]}" -o "$W/eval/$s" \
      > "$W/logs/eval-$s.log" 2>&1 &
    pids+=($!); parts+=("$W/eval/$s")
  done
  [ "${#pids[@]}" -gt 0 ] || { echo "eval: nothing trained to evaluate"; return 1; }
  local vn=4 vf=21 vl=60; [ "$SIZE" = 32 ] && { vn=1; vf=5; vl=8; }
  "$PY" - "$W/vae" "$W/eval/vae_eval.json" "$DEVICE" "$SIZE" "$SPEECH" $vn $vf $vl \
    > "$W/logs/eval-vae.log" 2>&1 <<'EOF2' &
import json, sys
import torch
from lipforcing.distill.stages.vae import evaluate_vae, resolve_vae
run, out, dev, size, speech, n, f, late = sys.argv[1:]
dev = dev if dev != "cuda" or torch.cuda.is_available() else "cpu"
q = evaluate_vae(resolve_vae(run, device=dev), clips=int(n), frames=int(f), size=int(size), speech=speech,
                 late_frames=int(late))
q["checkpoint"] = open(run + "/latest").read().strip()
open(out, "w").write(json.dumps(q, indent=1))
print("held-out VAE (evaluate_vae):", json.dumps(q))
EOF2
  local vae_pid=$!
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  wait "$vae_pid" && tail -1 "$W/logs/eval-vae.log" || echo "eval: evaluate_vae failed (logs/eval-vae.log)"
  "$PY" - "$W/eval" "${parts[@]}" <<'EOF'
import json, pathlib, sys
from lipforcing.eval.runner import write_report
out, parts = pathlib.Path(sys.argv[1]), [pathlib.Path(p) for p in sys.argv[2:]]
merged = None
for p in parts:
    if not (p / "eval.json").is_file():
        print(f"eval: {p.name} wrote no eval.json (see logs/eval-{p.name}.log)")
        continue
    r = json.loads((p / "eval.json").read_text())
    if merged is None:
        merged = r
        continue
    for key in ("rows", "per_clip", "stability"):
        for name, v in r.get(key, {}).items():
            merged.setdefault(key, {}).setdefault(name, v)
if merged is None:
    sys.exit(1)
merged["config"]["merged_from"] = [p.name for p in parts]
jp, mp = write_report(merged, out)
print(mp.read_text(), end="")
EOF
  [ $? = 0 ] && return "$rc" || return 1
}
export -f build_data eval_all
export W PY DATA_PROCS TRAIN_CLIPS EVAL_DATA_CLIPS FRAMES SIZE SPEECH EVAL_N EVAL_SECONDS TEACHER_STEPS DEVICE

main() {
  for s in $STAGES; do
    case $s in vae|syncnet|data|teacher|df|sf|eval) ;;
      *) echo "unknown stage '$s' (vae syncnet data teacher df sf eval)"; return 2 ;; esac
  done
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
    date -u +%Y%m%d-%H%M
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda',
torch.cuda.is_available())"
    "$PY" -c "from lipforcing.world.speech import espeak_available as e; print('espeak-ng:', e(),
'(speech $SPEECH)')"
    echo "repo commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)" \
      "$(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) changed files"
    echo "smoke=$SMOKE device=$DEVICE backend=$LIPFORCING_BACKEND budget=${BUDGET_S}s nproc=$NPROC stages: $STAGES"
    echo "vae ${VAE_MIN}min b$VAE_BATCH w$VAE_WORKERS | syncnet ${SYNC_MIN}min b$SYNC_BATCH |" \
      "data $TRAIN_CLIPS+$EVAL_DATA_CLIPS clips x $FRAMES frames, $DATA_PROCS procs | teacher ${TEACHER_MIN}min" \
      "b$TEACHER_BATCH | df ${DF_MIN}min b$DF_BATCH | sf ${SF_MIN}min b$SF_BATCH | eval $EVAL_N x ${EVAL_SECONDS}s," \
      "teacher $TEACHER_STEPS steps"
  } | tee "$W/env.txt"
  echo "# call at $(date -u +%H:%M:%S), stages: $STAGES" >> "$W/stages.txt"
  for s in $STAGES; do
    case $s in
      vae) run_vae ;;
      syncnet) start_syncnet ;;
      data) stage data 150 bash -c build_data ;;
      teacher) run_teacher ;;
      df) run_df ;;
      sf) run_sf ;;
      eval) wait_syncnet; stage eval $(( $(left) - 10 )) bash -c eval_all ;;
    esac
  done
  wait_syncnet
  pack
  echo "== done: stages (name rc seconds):"; cat "$W/stages.txt"
  echo "== returned: $(ls "$OUT" | grep '^train' | tr '\n' ' ')"
}

main 2>&1 | tee "$OUT/train.log"
