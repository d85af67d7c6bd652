#!/usr/bin/env bash
# gpt-oss on the CPU backend against an independent float64 numpy forward
# (tests/tools/gpt_oss_reference.py): attention to position 0 and the learned sink mass per query,
# the sink scores over the queries that see position 0 on sliding layers, residual norms, routing
# and the circuit identity; with the experts in bf16 and in MXFP4. Then bad MXFP4 tensors are
# refused with one line naming the tensor.
# usage: test_gpt_oss.sh SINKSCOPE REPO_ROOT
set -euo pipefail
bin=$1 root=$2
py=/usr/bin/python3
ref="$root/tests/tools/gpt_oss_reference.py"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$bin" synth --config "$root/tests/data/tiny_gpt_oss.json" --out "$work/bf16" --seed 3 2>/dev/null
"$py" "$ref" to-mxfp4 "$work/bf16" "$work/mxfp4"
for m in bf16 mxfp4; do
  "$bin" analyze --quiet --model "$work/$m" --probes random:3:20:1 --per-query --batch 2 --out "$work/$m.h5"
  "$py" "$ref" check "$work/$m" "$work/$m.h5"
done
# Probes longer than a block of 64 queries plus the window: the sliding layers skip the keys before
# the window of the second block.
"$bin" analyze --quiet --model "$work/bf16" --probes random:2:150:2 --per-query --out "$work/long.h5"
"$py" "$ref" check "$work/bf16" "$work/long.h5"

# expect_refusal NAME PYTHON: a copy of the MXFP4 model changed by PYTHON (t: name -> (array,
# dtype)) must be refused by `inspect` with exit 1 and one line naming the tensor.
expect_refusal() {
  local name=$1 edit=$2 dir="$work/bad_$1"
  cp -r "$work/mxfp4" "$dir"
  "$py" - "$dir/model.safetensors" "$ref" <<PY
import importlib.util, sys
spec = importlib.util.spec_from_file_location("ref", sys.argv[2]); r = importlib.util.module_from_spec(spec)
spec.loader.exec_module(r)
t = r.read_safetensors(sys.argv[1])
$edit
r.write_safetensors(sys.argv[1], t)
PY
  set +e
  msg=$("$bin" analyze --model "$dir" --probes random:2:20:1 --out "$work/bad.h5" 2>&1 >/dev/null)
  rc=$?
  set -e
  if [ "$rc" != 1 ] || [ "$(printf '%s\n' "$msg" | wc -l)" != 1 ] || [[ "$msg" != *"$3"* ]] || [ -e "$work/bad.h5" ]; then
    echo "FAIL: $name: rc $rc, message: $msg"
    exit 1
  fi
  echo "refused ($name): $msg"
}
b=model.layers.1.mlp.experts.gate_up_proj_blocks
s=model.layers.1.mlp.experts.gate_up_proj_scales
expect_refusal scales_dtype "t['$s'] = (t['$s'][0].astype('float32'), 'F32')" "'$s' has dtype F32, MXFP4 stores U8"
expect_refusal blocks_shape "t['$b'] = (t['$b'][0][:, :, :, :8].copy(), 'U8')" "'$b' has shape [4, 64, 2, 8]"
expect_refusal scales_missing "del t['$s']" "'$s' is missing"
expect_refusal nan_scale "a = t['$s'][0].copy(); a[2, 5, 1] = 255; t['$s'] = (a, 'U8')" "'$s' holds the e8m0 NaN scale (255) at row 133, block 1"
echo "gpt_oss: CPU backend agrees with the numpy reference (bf16 and MXFP4 experts); bad MXFP4 refused"
