#!/usr/bin/env bash
# Multi-GPU checks on a machine with 2+ GPUs (one MPI rank per GPU, NCCL between them):
#   1. every layout (tp=2, ep=2, and dp=2) on 2 GPUs writes an analysis file for the golden models,
#      the family fixtures (FAMILIES) and a synthetic 16-expert model; the files are collected under
#      OUTDIR for comparison with one GPU (tests/tools/compare_h5.py, bf16 tolerance) by the caller;
#   2. kill -9 of one rank: the other exits within 30 s (NCCL abort on the bounded wait);
#   3. transformers loads a checkpoint written by `sinkscope synth`.
# usage: [NP=2] [LAYOUTS="--tp 2;--ep 2;--tp 1"] [KILL_LAYOUT="--tp 2"] [SKIP_EXTRAS=1] [FAMILIES=...]
#        multi_gpu_run.sh SINKSCOPE REPO_ROOT OUTDIR
set -u
bin=$1 root=$2 out=$3
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
work=$(mktemp -d)
"$bin" synth --config "$root/tests/data/moe_16e.json" --out "$work/m16" --seed 5 2>/dev/null
"$bin" synth --config "$root/tests/data/tiny_moe.json" --out "$work/planted" --plant-circuit --seed 5 2>/dev/null
models=("$work/m16:--probes random:6:64:2" "$work/planted:--probes random:6:32:4 --prepend-bos 1"
        "$root/tests/golden/tiny_random:--tokens $root/tests/golden/tiny_random/probes.npy"
        "$root/tests/golden/tiny_trained:--tokens $root/tests/golden/tiny_trained/probes.npy")
# The transformers fixtures of the other families the CUDA backend runs (FAMILIES="" for none).
for fam in ${FAMILIES-olmoe mixtral qwen2_moe qwen3_moe_fused olmo2 gpt_neox}; do
  models+=("$root/tests/golden/families/$fam:--tokens $root/tests/golden/families/$fam/probes.npy")
done
for entry in "${models[@]}"; do
  model=${entry%%:*} probes=${entry#*:} name=$(basename "${entry%%:*}")
  # shellcheck disable=SC2086
  "$bin" analyze --quiet --device cuda --model "$model" $probes --ablate layers=0-0 --out "$out/$name.gpu1.h5" ||
    echo "FAIL: $name on one GPU"
  # shellcheck disable=SC2086
  "$bin" analyze --quiet --device cpu --model "$model" $probes --ablate layers=0-0 --out "$out/$name.cpu.h5" ||
    echo "FAIL: $name on the CPU"
  IFS=';' read -r -a layouts <<< "${LAYOUTS:---tp 2;--ep 2;--tp 1}"
  for layout in "${layouts[@]}"; do
    tag=$(echo "$layout" | tr -d ' -')
    start=$(date +%s%N)
    # shellcheck disable=SC2086
    timeout 120 mpirun -np "${NP:-2}" -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH "$bin" analyze --quiet --device cuda --model "$model" $probes \
      --ablate layers=0-0 $layout --out "$out/$name.gpu${NP:-2}.$tag.h5" 2>"$out/$name.gpu${NP:-2}.$tag.err" ||
      { echo "FAIL: $name with ${NP:-2} GPUs $layout"; tail -3 "$out/$name.gpu${NP:-2}.$tag.err"; }
    echo "$name ${NP:-2} GPUs $layout: $(( ($(date +%s%N) - start) / 1000000 )) ms"
  done
done

[ "${SKIP_EXTRAS:-0}" = 1 ] && { rm -rf "$work"; exit 0; }
# kill -9 of one rank of a 2-GPU run.
"$bin" synth --config "$root/tests/data/moe_16e.json" --out "$work/big" --seed 6 2>/dev/null
mpirun -np 2 -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH "$bin" analyze --quiet --device cuda --model "$work/big" --probes random:20000:64:1 \
  --batch 1 ${KILL_LAYOUT:---tp 2} --out "$out/killed.h5" 2>"$out/killed.err" &
launcher=$!
sleep 8
victim=$(pgrep -P "$launcher" -f killed.h5 | sed -n 2p)
if [ -n "$victim" ] && kill -0 "$victim" 2>/dev/null; then
  kill -9 "$victim"
  start=$(date +%s)
  wait "$launcher"
  rc=$?
  echo "kill -9 of rank pid $victim: job ended with status $rc after $(( $(date +%s) - start )) s; output left: $( [ -e "$out/killed.h5" ] && echo yes || echo no )"
else
  echo "FAIL: no running rank to kill"; wait "$launcher"
fi
rm -f "$out/killed.h5"

# transformers reads what synth writes.
python3 - "$work/m16" "$work/planted" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM
for d in sys.argv[1:]:
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ids = torch.randint(2, m.config.vocab_size, (2, 16))
    ids[:, 0] = 1
    with torch.no_grad():
        out = m(ids)
    print(f"transformers loaded {d}: {type(m).__name__}, logits {tuple(out.logits.shape)}, finite={bool(torch.isfinite(out.logits).all())}")
PY
rm -rf "$work"
