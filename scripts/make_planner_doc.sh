#!/usr/bin/env bash
# Regenerates the plans of docs/planner.md: five models on 1 GPU, 2 x 8 GPUs and 4 x 4 GPUs
# (H200 defaults, 64 probes x 4096 tokens, micro-batch 8, 20 checkpoints, the sweep's causal profile).
# usage: scripts/make_planner_doc.sh [sinkscope binary] > plans.md
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${1:-$root/build/src/sinkscope}
for model in qwen3_30b_a3b qwen3_235b_a22b olmoe_1b_7b gpt_oss_120b deepseek_v3; do
  for alloc in "1 1" "8 2" "4 4"; do
    read -r g n <<<"$alloc"
    echo "### $model on $n x $g GPU(s)"
    echo
    echo '    sinkscope plan --model-config bench/'"$model"'.json --probes random:64:4096:1 --batch 8 \'
    echo "        --checkpoints 20 --device cuda --gpus-per-node $g --nodes $n --node-mem-gib 1000"
    echo
    (cd "$root" && "$bin" plan --model-config "bench/$model.json" --probes random:64:4096:1 --batch 8 \
      --checkpoints 20 --device cuda --gpus-per-node "$g" --nodes "$n" --node-mem-gib 1000) || true
    echo
  done
done
