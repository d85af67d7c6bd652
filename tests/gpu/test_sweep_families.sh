#!/usr/bin/env bash
# Every family sweeps on the CUDA backend (label `gpu`): three checkpoints per family written by
# `synth` (seeds as steps 100, 200, 400) at its golden fixture's shape, swept with --device cuda
# and with --device cpu; both sweeps must finish with every checkpoint and give the same sink
# scores per checkpoint within the GPU tolerance (2e-2, docs/metrics.md section 7), and the CUDA
# sweep's sweep.h5 must carry the learned sink mass exactly where the family has learned sinks.
#   tests/gpu/test_sweep_families.sh BIN SOURCE_DIR
set -euo pipefail
bin=$1
src=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
other=${SINKSCOPE_SWEEP_DEVICE:-cuda}  # the backend compared with the CPU (cuda; cpu checks the script)
python=
for p in python3 /usr/bin/python3; do
  if "$p" -c "import h5py, numpy" 2>/dev/null; then python=$p; break; fi
done
[ -n "$python" ] || { echo "test_sweep_families: no python3 with h5py and numpy" >&2; exit 1; }
for fam in qwen3_moe_fused mixtral qwen2_moe olmoe olmo2 gpt_neox llama qwen3 gpt_oss deepseek_v3; do
  for step in 100 200 400; do
    "$bin" synth --config "$src/tests/golden/families/$fam/config.json" \
      --out "$work/$fam/step$step" --seed "$step" >/dev/null 2>&1
  done
  for dev in cpu "$other"; do
    "$bin" sweep --models-glob "$work/$fam/step*" --out "$work/out-$fam-$dev" \
      --probes random:3:48:1 --device "$dev" --bootstrap 10 --quiet
  done
  "$python" - "$work/out-$fam-cpu" "$work/out-$fam-$other" "$fam" "$other" <<'PY'
import sys
import h5py
import numpy as np
cpu_dir, gpu_dir, fam, other = sys.argv[1:5]
cpu, gpu = h5py.File(cpu_dir + "/sweep.h5", "r"), h5py.File(gpu_dir + "/sweep.h5", "r")
a, b = cpu["sink_score"][...], gpu["sink_score"][...]
assert a.shape == b.shape and a.shape[0] == 3, (fam, a.shape, b.shape)
worst = float(np.max(np.abs(a - b)))
first = h5py.File(gpu_dir + "/checkpoints/step100.h5", "r")
has_sinks = "attention/learned_sink_mass" in first
assert has_sinks == (fam == "gpt_oss"), (fam, "learned sink mass written", has_sinks)
print(f"{fam}: 3 checkpoints swept on cpu and {other}, "
      f"worst |sink score difference| {worst:.4f}")
assert worst < 2e-2, (fam, worst)
PY
done
