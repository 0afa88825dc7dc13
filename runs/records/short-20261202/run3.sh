#!/bin/bash
# After run2.sh: the same teacher run with audio_injection "add" (the cross_attn one is runs/short/teacher).
cd /work/main
export OMP_NUM_THREADS=1
R=runs/short
sleep 30
while pgrep -f "runs/short/run2.sh" > /dev/null; do sleep 10; done
s=$(date +%s.%N)
nice -n 15 lipforcing train --stage teacher --config $R/teacher_add.yaml --threads 1 --iterations 300 --output-dir $R/teacher_add
echo "WALL teacher_add: $(echo "$(date +%s.%N) - $s" | bc) s" >> $R/walls.txt
