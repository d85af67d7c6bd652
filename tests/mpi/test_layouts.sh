#!/usr/bin/env bash
# Every tensor/expert/data-parallel layout gives the numbers of one rank (docs/metrics.md section 7:
# within 1e-5 relative on CPU), on synthetic models and on the golden models when present.
# usage: test_layouts.sh SINKSCOPE REPO_ROOT [MPIEXEC]
set -euo pipefail
bin=$1 root=$2 mpiexec=${3:-mpirun}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
py=/usr/bin/python3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$bin" synth --config "$root/tests/data/moe_8e_4kv.json" --out "$work/m8" --seed 11 2>/dev/null
"$bin" synth --config "$root/tests/data/tiny_moe.json" --out "$work/planted" --plant-circuit --seed 5 2>/dev/null
models=("$work/m8:--probes random:5:20:3" "$work/planted:--probes random:5:20:4 --prepend-bos 1")
for g in "$root"/tests/golden/*/; do
  [ -f "$g/config.json" ] && models+=("$g:--tokens $g/probes.npy")
done
# Other families, on the layouts that exercise what they change: full-width q/k norms over tp
# ranks (olmoe, olmo2; tp 4 replicates their KV heads), a shared expert under ep (qwen2_moe),
# top-k-then-softmax routing under ep (mixtral), LayerNorm and the parallel residual (gpt_neox),
# multi-head latent attention sharded by head with the latent projections replicated, sigmoid
# group routing and the ungated shared expert (deepseek_v3: a synthetic one always, the golden
# fixtures when present).
"$bin" synth --config "$root/tests/data/tiny_deepseek_v3.json" --out "$work/deepseek_v3_synth" --seed 4 2>/dev/null
family_models=("$work/deepseek_v3_synth:--probes random:5:20:6")
for f in olmoe qwen2_moe mixtral olmo2 gpt_neox deepseek_v3 deepseek_v3_fp8; do
  g="$root/tests/golden/families/$f"
  [ -f "$g/config.json" ] && family_models+=("$g:--tokens $g/probes.npy")
done
# gpt-oss (metrics 1.3): learned sinks sharded with their heads, per-layer sliding windows (probes
# of 20 against a window of 8), biased experts with interleaved gate/up split by etp, in bf16 and
# in MXFP4 (tests/tools/gpt_oss_reference.py writes that form); the transformers fixtures too.
"$bin" synth --config "$root/tests/data/tiny_gpt_oss.json" --out "$work/gpt_oss" --seed 4 2>/dev/null
"$py" "$root/tests/tools/gpt_oss_reference.py" to-mxfp4 "$work/gpt_oss" "$work/gpt_oss_mxfp4"
family_models+=("$work/gpt_oss:--probes random:4:20:2" "$work/gpt_oss_mxfp4:--probes random:4:20:2")
for f in gpt_oss gpt_oss_mxfp4; do
  g="$root/tests/golden/families/$f"
  [ -f "$g/config.json" ] && family_models+=("$g:--tokens $g/probes.npy")
done
family_layouts=("2:--tp 2" "2:--ep 2" "4:--tp 4" "4:--tp 2 --ep 2" "4:--ep 2 --etp 2")

layouts=("1:" "2:--tp 2" "2:--ep 2" "2:" "4:--tp 2 --ep 2" "4:--tp 2 --ep 2 --etp 1" "4:--tp 4" "4:--ep 4" "4:--ep 2" "4:--ep 2 --etp 2")
fail=0
# run_layout MODEL NAME NP OPTS OUT PROBES...: the layout's run, compared with the one-rank file.
run_layout() {
  local model=$1 name=$2 np=$3 opts=$4 out=$5
  shift 5
  # shellcheck disable=SC2086
  "$mpiexec" --oversubscribe -np "$np" "$bin" analyze --quiet --model "$model" "$@" --per-query --batch 2 \
    --ablate layers=0-0 $opts --out "$out"
  if ! "$py" "$root/tests/tools/compare_h5.py" "$work/$name.ref.h5" "$out" --rtol 1e-5 \
      --ignore-attrs created_utc,layout,tp,ep,etp,dp,world_size,circuit_identity_max_rel_err; then
    echo "FAIL: $name with np=$np $opts differs from one rank"
    fail=1
  fi
}
for entry in "${models[@]}"; do
  model=${entry%%:*} probes=${entry#*:}
  name=$(basename "$model")
  # shellcheck disable=SC2086
  "$bin" analyze --quiet --model "$model" $probes --per-query --batch 2 --ablate layers=0-0 --out "$work/$name.ref.h5"
  for layout in "${layouts[@]}"; do
    np=${layout%%:*} opts=${layout#*:}
    # shellcheck disable=SC2086
    if [[ "$name" == m8 || ( "$opts" != *"--tp 4"* ) ]]; then
      out="$work/$name.np$np.$(echo "$opts" | tr -d ' -').h5"
      run_layout "$model" "$name" "$np" "$opts" "$out" $probes
      "$py" - "$out" "$np" <<'PY'
import sys, h5py
f = h5py.File(sys.argv[1], "r")
assert f.attrs["world_size"] == int(sys.argv[2]), "world_size attribute"
assert f.attrs["tp"] * f.attrs["dp"] == f.attrs["world_size"], "tp x dp = world"
PY
    fi
  done
done
for entry in "${family_models[@]}"; do
  model=${entry%%:*} probes=${entry#*:}
  name=family_$(basename "$model")
  # shellcheck disable=SC2086
  "$bin" analyze --quiet --model "$model" $probes --per-query --batch 2 --ablate layers=0-0 --out "$work/$name.ref.h5"
  experts=$("$py" -c 'import json,sys; c=json.load(open(sys.argv[1])); print(c.get("num_experts") or c.get("num_local_experts") or c.get("n_routed_experts") or 0)' "$model/config.json")
  for layout in "${family_layouts[@]}"; do
    np=${layout%%:*} opts=${layout#*:}
    [[ "$experts" == 0 && "$opts" == *"--ep"* ]] && opts=${opts/--ep 2/}  # dense: the ranks split probes
    [[ "$opts" == *"--etp"* && "$name" != *gpt_oss* ]] && continue  # etp: gpt-oss's expert layout only
    # shellcheck disable=SC2086
    run_layout "$model" "$name" "$np" "$opts" "$work/$name.np$np.$(echo "$opts" | tr -d ' -').h5" $probes
  done
done
[ "$fail" = 0 ] && echo "all layouts agree with one rank"
exit "$fail"
