#!/usr/bin/env bash
# The planner against measurement on this GPU (docs/benchmarks.md, "Planner on one H200"): calibrates
# the CUDA coefficients into a site file (`sinkscope plan --calibrate --device cuda`), then for each
# shape predicts one pass (forward + recording, no ablations) and the device memory with
# `sinkscope plan`, and measures both with bench_gpu (record mode, synthetic weights) in the same job.
#   bench/plan_validation_gpu.sh BUILD_DIR [OUT_DIR]
set -euo pipefail
build=${1:?usage: plan_validation_gpu.sh BUILD_DIR [OUT_DIR]}
out=${2:-$(mktemp -d)}
mkdir -p "$out"
site="$out/site.env"
: >"$site"
"$build/src/sinkscope" plan --calibrate --device cuda --cluster "$site" --calibrate-dir "$out" \
  >"$out/calibrate.txt" 2>&1
echo "calibration ($site):"
grep '^SINKSCOPE_PLAN_CUDA_' "$site" | sed 's/^/  /'
echo
echo "| shape | layers | probes | predicted pass s | measured pass s | ratio | predicted device GiB | measured device GiB | ratio |"
echo "|---|---|---|---|---|---|---|---|---|"
row() {
  local cfg=$1 layers=$2 n=$3 t=$4 b=$5
  local cut="$out/$(basename "$cfg" .json)-$layers.json"
  python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); L=int(sys.argv[2]); c["num_hidden_layers"]=L; c["mlp_only_layers"]=[l for l in c.get("mlp_only_layers",[]) if l<L]; json.dump(c,open(sys.argv[3],"w"))' \
    "$cfg" "$layers" "$cut"
  local plan
  plan=$("$build/src/sinkscope" plan --model-config "$cut" --probes "random:$n:$t:0" --batch "$b" \
    --device cuda --cluster "$site" --gpus-per-node 1 --nodes 1 --no-causal-profile --shell)
  local pass mib
  pass=$(sed -n 's/^PLAN_PASS_S=//p' <<<"$plan")
  mib=$(sed -n 's/^PLAN_RANK_MIB=//p' <<<"$plan")
  "$build/bench/sinkscope_bench_gpu" --config "$cut" --probes "$n" --seq "$t" --batch "$b" \
    --iters 3 --modes record --phase-timing false >"$out/bench-$(basename "$cut" .json)-$n-$t.txt" 2>&1
  local ms used
  ms=$(awk '$1 == "record" {print $2}' "$out/bench-$(basename "$cut" .json)-$n-$t.txt")
  used=$(sed -n 's/.*device in use \([0-9.]*\) of.*/\1/p' "$out/bench-$(basename "$cut" .json)-$n-$t.txt")
  python3 -c 'import sys; n,L,N,T,p,ms,mib,used=sys.argv[1:]; p=float(p); m=float(ms)/1e3; g=float(mib)/1024; u=float(used); print(f"| {n} | {L} | {N} x {T} | {p:.3f} | {m:.3f} | {p/m:.2f} | {g:.1f} | {u:.1f} | {g/u:.2f} |")' \
    "$(basename "$cfg" .json)" "$layers" "$n" "$t" "$pass" "$ms" "$mib" "$used"
}
row bench/qwen3_30b_a3b.json 48 8 4096 8
row bench/qwen3_30b_a3b.json 48 1 32768 1
row bench/qwen3_30b_a3b.json 48 1 4096 1
row bench/olmoe_1b_7b.json 16 8 4096 8
row bench/qwen3_235b_a22b.json 12 8 4096 8
row bench/gpt_oss_120b_approx.json 12 8 4096 8
