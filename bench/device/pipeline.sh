#!/bin/bash
# Device pipeline (started by bench/device/run.sh): GPU lanes (training + torch rows + export, --stage prepare) and one CPU lane for ORT rows
# (--stage ort) that takes the first ready job in ORT_JOBS order. Runs detached; results in /root/res.
# env: GPU_A, GPU_B, GPU_C ("variant[:ort] ..."; lane C on cores 14-15), ORT_JOBS ("variant ..."), ORT_CORES (default 4-15),
# ORT_LIMITS ("variant=N ...": score that job's ORT row on the first N test windows only; default all 148)
R=/root/repo; M=/root/m/smollm2.gguf; RES=/root/res; EXP=/root/exp
export PYTHONPATH=/tmp/site:$R PYTHONUNBUFFERED=1 QCOMPILE_DATA_DIR=/root/data QCOMPILE_CACHE=/root/cache
export TOKENIZERS_PARALLELISM=false
cd $R
limit_of() {  # $1 job name -> its ORT_LIMITS window count, or nothing
  echo " ${ORT_LIMITS:-} " | grep -o " $1=[0-9]*" | head -1 | cut -d= -f2
}
lane() {  # $1 cores, rest jobs
  local cores=$1; shift
  for job in "$@"; do
    name=${job%%:*}; ort=""; [ "$job" != "$name" ] && ort="--ort $name"
    lim=$(limit_of $name)
    [ -n "$ort" ] && [ -n "$lim" ] && ort="$ort --ort-limit $lim"  # the torch row on the ORT row's windows too
    echo "$(date +%T) start $name" >> $RES/lanes.log
    OMP_NUM_THREADS=2 taskset -c $cores python3 bench/spine_quality.py --model $M --device cuda --variants $name $ort \
      --stage prepare --export-dir $EXP --out $RES/gpu_$name.json > $RES/gpu_$name.log 2>&1
    rc=$?  # before the echo: inside "$(date)" $? would be date's status
    echo "$(date +%T) end $name rc=$rc" >> $RES/lanes.log
    touch $RES/done_$name
  done
}
ortlane() {
  local left="$ORT_JOBS"
  while [ -n "$(echo $left)" ]; do
    pick=""
    for n in $left; do [ -f $RES/done_$n ] && { pick=$n; break; }; done
    if [ -z "$pick" ]; then
      [ -f $RES/gpu_lanes_done ] && break
      sleep 5; continue
    fi
    left=$(echo " $left " | sed "s/ $pick / /")
    lim=$(limit_of $pick)
    echo "$(date +%T) ort start $pick ${lim:+(first $lim windows)}" >> $RES/lanes.log
    OMP_NUM_THREADS=12 taskset -c ${ORT_CORES:-4-15} python3 bench/spine_quality.py --model $M --variants $pick --ort $pick \
      --stage ort --export-dir $EXP --out $RES/ort_$pick.json --threads 12 --ort-sessions 2 --accuracy-levels 1 \
      ${lim:+--ort-limit $lim} > $RES/ort_$pick.log 2>&1
    rc=$?
    echo "$(date +%T) ort end $pick rc=$rc" >> $RES/lanes.log
  done
  touch $RES/ort_done
}
( lane 0-1 $GPU_A ) & a=$!
( [ -n "$GPU_B" ] && lane 2-3 $GPU_B ) & b=$!
( [ -n "${GPU_C:-}" ] && lane 14-15 $GPU_C ) & c=$!
ortlane & o=$!
wait $a $b $c; touch $RES/gpu_lanes_done
wait $o
touch $RES/all_done
