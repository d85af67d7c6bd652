#!/usr/bin/env bash
# The main job on the bundled default: installs what is needed, builds, analyses the shipped toy
# training trace (examples/toy_trace_bos: a Qwen3-MoE trained from scratch, 6 checkpoints) as a
# checkpoint sweep over 2 MPI ranks, and writes the report.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$root"
scripts/install-deps.sh
scripts/build.sh
out=${1:-$root/out/toy_trace_bos}
rm -rf "$out"
bin=build/src/sinkscope
args=(sweep --models-glob 'examples/toy_trace_bos/step*' --tokens examples/toy_trace_bos/probes.npy --out "$out" --ablate top=4)
if command -v mpirun >/dev/null; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  mpirun --oversubscribe -np 2 "$bin" "${args[@]}" --tp 2
else
  "$bin" "${args[@]}"
fi
"$bin" report "$out" --out "$out/report"
echo
echo "sinkscope: sweep written to $out/sweep.h5 (one analysis file per checkpoint in $out/checkpoints/)"
echo "sinkscope: report: $out/report/index.html (plots: $out/report/*.png, summary: $out/report/summary.md)"
