#!/bin/bash
# After run.sh: teacher, df, sf, eval on the short-run data (report numbers).
set -e
cd /work/main
export OMP_NUM_THREADS=1
R=runs/short
while pgrep -f "runs/short/run.sh" > /dev/null; do sleep 10; done
t() { local s=$(date +%s.%N); "$@"; echo "WALL $1 $2 $3 $4 $5: $(echo "$(date +%s.%N) - $s" | bc) s" >> $R/walls.txt; }
N="nice -n 15"
t $N lipforcing train --stage teacher --config $R/teacher.yaml --threads 1 --iterations 300 --output-dir $R/teacher
t $N lipforcing train --stage df --config $R/df.yaml --threads 1 --iterations 100 --output-dir $R/df
t $N lipforcing train --stage sf --config $R/sf.yaml --threads 1 --iterations 20 --output-dir $R/sf
t $N lipforcing eval --checkpoint $R/sf --vae runs/vae --syncnet $R/syncnet --text $R/data/meta/text.safetensors --clips 4 --seconds 8 --long-seconds 60 -o $R/eval
