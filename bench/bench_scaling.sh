#!/usr/bin/env bash
# Multi-GPU scaling of `analyze` (recording on, the real Recorder and output file) with synthetic
# weights made on the devices: Qwen3-30B-A3B shape, probes 8 x 4096, on 1, 2 and 4 GPUs with the
# given splits; prints tokens/s, parallel efficiency against the first split, the share of the
# forward spent communicating (max over ranks) and the GPU memory per rank (--verbose's lines).
#   SPLITS  "NP:OPTIONS;..." (default: 1 GPU; 2 GPUs dp / ep 2 / tp 2; 4 GPUs dp / ep 4 /
#           tp 2 x ep 2 / tp 4 x ep 4). With no tp/ep option the ranks split the probes (dp).
#   PROBES  probe spec (default random:64:4096:1); BATCH probes per micro-batch (default 8), so
#           every rank runs several 8 x 4096 micro-batches and the rate after the first one (which
#           pays for first use: allocations, kernel loading, NCCL connections) is the steady one
#   KEEP    a folder: each split's analysis file and log are kept there
#   MODEL_ARGS="--model DIR" uses a checkpoint on the CPU instead (to try the script anywhere)
# For the 235B shape on one 4-GPU node:
#   CONFIG=bench/qwen3_235b_a22b.json SPLITS="4:--ep 4" bench/bench_scaling.sh BUILD/src/sinkscope
# usage: bench/bench_scaling.sh SINKSCOPE [CONFIG]
set -uo pipefail
bin=$1
config=${2:-${CONFIG:-$(dirname "$0")/qwen3_30b_a3b.json}}
probes=${PROBES:-random:64:4096:1}
IFS=';' read -r -a splits <<< "${SPLITS:-1:;2:;2:--ep 2;2:--tp 2;4:;4:--ep 4;4:--tp 2 --ep 2;4:--tp 4 --ep 4}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
out=$(mktemp -d)
echo "config $(basename "$config"), probes $probes, batch ${BATCH:-8}, $(date -u +%F)"
echo
echo "| GPUs | split | tokens/s, whole job | efficiency | tokens/s after the first micro-batch | efficiency | communication share after it (max over ranks) | GPU memory per rank, weights + scratch (max, MiB) | peak host RSS (max, MiB) |"
echo "|---|---|---|---|---|---|---|---|---|"
base="" base_np=1 sbase=
for s in "${splits[@]}"; do
  np=${s%%:*} opts=${s#*:}
  tag=$(echo "np$np $opts" | tr -d ' -')
  # shellcheck disable=SC2086
  log=$(mpirun --oversubscribe -np "$np" -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH "$bin" analyze --quiet --verbose \
        ${MODEL_ARGS:---device cuda --model-config $config --synthetic-weights 1} --probes "$probes" \
        --batch "${BATCH:-8}" $opts --out "$out/$tag.h5" 2>&1)
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP" && printf '%s\n' "$log" > "$KEEP/$tag.log" && cp "$out/$tag.h5" "$KEEP/" 2>/dev/null
  fi
  rm -f "$out/$tag.h5"
  rate=$(sed -n 's/.*(\([0-9]*\) tokens\/s over the job).*/\1/p' <<< "$log" | sort -g | head -1)
  steady=$(sed -n 's/.*then \([0-9]*\) tokens\/s with.*/\1/p' <<< "$log" | sort -g | head -1)
  comm=$(sed -n 's/.*then [0-9]* tokens\/s with communication \([0-9.]*\)%.*/\1/p' <<< "$log" | sort -g | tail -1)
  rss=$(sed -n 's/.*peak resident memory \([0-9]*\) MiB.*/\1/p' <<< "$log" | sort -g | tail -1)
  gpu=$(sed -n 's/.*weights + scratch \([0-9]*\) MiB.*/\1/p' <<< "$log" | sort -g | tail -1)
  label=${opts:-dp $np}
  [ "$np" = 1 ] && [ -z "$opts" ] && label="one GPU"
  if [ -z "$rate" ]; then
    echo "| $np | $label | failed: $(grep -m1 -i 'error\|failure\|abort' <<< "$log") | | | | | | |"
    continue
  fi
  [ -z "$base" ] && base=$rate base_np=$np sbase=$steady
  eff=$(awk -v r="$rate" -v b="$base" -v n="$np" -v bn="$base_np" 'BEGIN { printf "%.0f%%", 100 * r * bn / (b * n) }')
  seff=n/a
  [ -n "$steady" ] && [ -n "$sbase" ] &&
    seff=$(awk -v r="$steady" -v b="$sbase" -v n="$np" -v bn="$base_np" 'BEGIN { printf "%.0f%%", 100 * r * bn / (b * n) }')
  echo "| $np | $label | $rate | $eff | ${steady:-n/a} | $seff | ${comm:-n/a}% | ${gpu:-n/a} | $rss |"
done
rm -rf "$out"
