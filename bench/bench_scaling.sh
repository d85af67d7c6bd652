#!/usr/bin/env bash
# Multi-GPU scaling of `analyze` (recording on) with synthetic weights made on the devices:
# Qwen3-30B-A3B shape, probes 8 x 4096, on 1, 2 and 4 GPUs with the given tp/ep splits; prints
# tokens/s, parallel efficiency and the share of time in communication (--verbose's per-rank
# lines). For the 235B shape on one 4-GPU node: CONFIG=bench/qwen3_235b_a22b.json GPUS=4 SPLITS="4:--ep 4"
# usage: bench/bench_scaling.sh SINKSCOPE [CONFIG] (env: PROBES, SPLITS="1:;2:--ep 2;4:--ep 4",
#        MODEL_ARGS="--model DIR" to use a checkpoint on the CPU instead, e.g. to try the script)
set -uo pipefail
bin=$1
config=${2:-${CONFIG:-$(dirname "$0")/qwen3_30b_a3b.json}}
probes=${PROBES:-random:8:4096:1}
IFS=';' read -r -a splits <<< "${SPLITS:-1:;2:--ep 2;2:--tp 2;4:--ep 4;4:--tp 2 --ep 2}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
out=$(mktemp -d)
echo "| GPUs | split | tokens/s | efficiency vs 1 GPU | communication share (max over ranks) | peak host RSS (MiB) |"
echo "|---|---|---|---|---|---|"
base=""
for s in "${splits[@]}"; do
  np=${s%%:*} opts=${s#*:}
  # shellcheck disable=SC2086
  log=$(mpirun --oversubscribe -np "$np" -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH "$bin" analyze --quiet --verbose \
        ${MODEL_ARGS:---device cuda --model-config $config --synthetic-weights 1} --probes "$probes" --batch 8 $opts \
        --out "$out/a.h5" 2>&1)
  rate=$(sed -n 's/.*(\([0-9]*\) tokens\/s over the job).*/\1/p' <<< "$log" | head -1)
  comm=$(sed -n 's/.*communication [0-9.]* s (\([0-9.]*\)%).*/\1/p' <<< "$log" | sort -g | tail -1)
  rss=$(sed -n 's/.*peak resident memory \([0-9]*\) MiB.*/\1/p' <<< "$log" | sort -g | tail -1)
  if [ -z "$rate" ]; then
    echo "| $np | $opts | failed: $(grep -m1 -i 'error\|failure' <<< "$log") | | | |"
    continue
  fi
  [ -z "$base" ] && base=$rate
  eff=$(awk -v r="$rate" -v b="$base" -v n="$np" 'BEGIN { printf "%.0f%%", 100 * r / (b * n) }')
  echo "| $np | ${opts:-(one GPU)} | $rate | $eff | ${comm}% | $rss |"
done
rm -rf "$out"
