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
cat > "$work/config.json" <<'JSON'
{"model_type": "qwen3_moe", "vocab_size": 8192, "hidden_size": 512, "num_hidden_layers": 8,
 "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "moe_intermediate_size": 512,
 "num_experts": 32, "num_experts_per_tok": 4, "norm_topk_prob": true, "rms_norm_eps": 1e-6,
 "rope_theta": 10000.0, "intermediate_size": 1024}
JSON
"$bin" synth --config "$work/config.json" --out "$work/model" --seed 1 2>/dev/null
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
