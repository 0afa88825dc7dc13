#!/bin/bash
# Short run of every stage (report numbers); one process at a time, one thread, niced.
set -e
cd /work/main
export OMP_NUM_THREADS=1
R=runs/short
t() { local s=$(date +%s.%N); "$@"; echo "WALL $1 $2 $3 $4: $(echo "$(date +%s.%N) - $s" | bc) s" >> $R/walls.txt; }
N="nice -n 15"
t $N lipforcing train --stage syncnet --config configs/syncnet.yaml --threads 1 --iterations 200 --output-dir $R/syncnet
t $N lipforcing data build --vae runs/vae --out $R/data --clips 48 --frames 21 --size 64
t $N lipforcing data build --vae runs/vae --out $R/data_eval --clips 8 --frames 21 --size 64 --split eval
