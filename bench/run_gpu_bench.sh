#!/usr/bin/env bash
# The single-GPU benchmark of the CUDA backend, side by side with Hugging Face transformers on the
# same GPU in the same job (docs/gpu-backend.md, "Benchmark"): builds sinkscope with CUDA if BUILD
# has no benchmark program yet, then prints
#   1. sinkscope, Qwen3-30B-A3B shape with random bf16 weights made on the device, recording off
#      (plain), on with a no-op observer (record) and with the real Recorder (recorder):
#      8 x 4096 and 1 x 4096 (per-layer phases included), 1 x 32768, 1 x 131072 (longest T tried);
#   2. transformers Qwen3MoeForCausalLM of the same config: eager attention with
#      output_attentions=True at 1 x 4096 and 1 x 8192, sdpa (plain forward) at 1 x 4096 and 8 x 4096
#      (bench/hf_reference.py; needs python3 with torch and transformers).
# usage: bench/run_gpu_bench.sh [BUILD]        (BUILD defaults to build-cuda)
#   env: CONFIG (default bench/qwen3_30b_a3b.json), LAYERS (0: the config's; fewer for a quick try),
#        COMMIT (the commit to print, for a folder of copied binaries; default: git HEAD),
#        LONG="32768 131072" (the single-probe lengths), SKIP_HF=1
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build-cuda}
config=${CONFIG:-$root/bench/qwen3_30b_a3b.json}
layers=${LAYERS:-0}
bench=$build/bench/sinkscope_bench_gpu
[ -x "$bench" ] || bench=$build/sinkscope_bench_gpu  # a folder of copied binaries
if [ ! -x "$bench" ]; then
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DSINKSCOPE_CUDA=ON
  cmake --build "$build" -j "$(nproc)" --target sinkscope_bench_gpu
  bench=$build/bench/sinkscope_bench_gpu
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv,noheader || true
echo "commit ${COMMIT:-$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)}, $(date -u +%FT%TZ)"
run() { sampled "$bench" --config "$config" --layers "$layers" "$@"; }
# Runs "$@" while nvidia-smi samples the SM clock, the power draw and the utilisation every 100
# ms, then prints the medians over the samples with the GPU busy (utilisation >= 90%: the weights'
# making and other setup left out). A long forward on an H200 runs at its power cap, well below
# the clocks of a kernel timed alone (docs/results/2026-12-01-recording-h200-3.md), so the clocks
# say how far two runs, or two machines, compare. Without nvidia-smi it only runs "$@".
sampled() {
  command -v nvidia-smi > /dev/null || { "$@"; return; }
  local log smi rc=0
  log=$(mktemp)
  nvidia-smi --query-gpu=clocks.sm,power.draw,utilization.gpu --format=csv,noheader,nounits -lms 100 \
    > "$log" 2> /dev/null &
  smi=$!
  "$@" || rc=$?
  kill "$smi" 2> /dev/null || true
  wait "$smi" 2> /dev/null || true
  local busy n clk p10 pwr
  busy=$(awk -F, '$1 + 0 > 0 && $3 + 0 >= 90 {print $1 + 0, $2 + 0}' "$log")
  n=$(printf '%s' "$busy" | grep -c . || true)
  if [ "$n" -gt 0 ]; then
    clk=$(printf '%s\n' "$busy" | cut -d' ' -f1 | sort -n | sed -n "$(((n + 1) / 2))p")
    p10=$(printf '%s\n' "$busy" | cut -d' ' -f1 | sort -n | sed -n "$((n / 10 + 1))p")
    pwr=$(printf '%s\n' "$busy" | cut -d' ' -f2 | sort -n | sed -n "$(((n + 1) / 2))p")
    echo "clocks while busy: SM median $clk MHz (10th percentile $p10), power median $pwr W" \
      "($n samples of 100 ms)"
  fi
  rm -f "$log"
  return "$rc"
}
echo
echo "## sinkscope"
run --probes 8 --seq 4096 --batch 8 --iters 3 --phase-timing true
run --probes 1 --seq 4096 --batch 1 --iters 10 --modes plain,record --phase-timing true
for t in ${LONG:-32768 131072}; do
  # One timed forward each: at 131072 one forward of the 48-layer model takes about half a minute.
  modes=plain,record
  [ "$t" -gt 65536 ] && modes=record
  run --probes 1 --seq "$t" --batch 1 --warmup 1 --iters 1 --modes "$modes" --phase-timing true ||
    echo "1 x $t: failed (exit $?)"
done
if [ "${SKIP_HF:-0}" != 1 ]; then
  echo
  echo "## Hugging Face transformers, same GPU"
  PYTHONUNBUFFERED=1 sampled python3 "$root/bench/hf_reference.py" --config "$config" \
    --layers "$layers" --run eager:1:4096 --run eager:1:8192 --run sdpa:1:4096 --run sdpa:8:4096
fi
