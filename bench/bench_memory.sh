#!/usr/bin/env bash
# Peak resident memory per rank: one rank vs tp=2 ep=2 on 4 ranks, for a synthetic model whose
# weights dominate (about 520 MB of fp32 weights). Prints a table (docs/benchmarks.md).
# usage: bench/bench_memory.sh [build dir]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${1:-$root/build}/src/sinkscope
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" synth --config "$(cd "$(dirname "$0")/.." && pwd)/bench/moe_208m.json" --out "$work/model" --seed 1 2>/dev/null
args=(analyze --model "$work/model" --probes random:8:128:1 --batch 2 --verbose --quiet)
one=$("$bin" "${args[@]}" --out "$work/a1.h5" 2>&1 | sed -n 's/.*peak resident memory \([0-9]*\) MiB.*/\1/p')
four=$(mpirun --oversubscribe -np 4 "$bin" "${args[@]}" --tp 2 --ep 2 --out "$work/a4.h5" 2>&1 |
       sed -n 's/.*rank \([0-9]\).*peak resident memory \([0-9]*\) MiB.*/\1 \2/p')
echo "| run | rank | peak RSS (MiB) | fraction of one rank |"
echo "|---|---|---|---|"
echo "| 1 rank | 0 | $one | 1.00 |"
while read -r rank mib; do
  printf "| 4 ranks, tp=2 ep=2 | %s | %s | %.2f |\n" "$rank" "$mib" "$(echo "$mib / $one" | bc -l)"
done <<< "$four"
