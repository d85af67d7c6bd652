#!/usr/bin/env bash
# Loading benchmark (issue 16): warm and cold load GB/s of the CPU backend (and CUDA where built and
# a GPU is present), the `cat` rate of the same files in the same run, transformers'
# from_pretrained where torch + transformers are installed, a sweep of 4 checkpoints with and
# without read-ahead (wall/read/compute/overlap), and `synth` MB/s. Prints a Markdown table.
#
#   bench/bench_load.sh [BIN] [CONFIG] [LAYERS] [WORKDIR]
#     BIN      sinkscope binary (default build/src/sinkscope)
#     CONFIG   shape (default bench/qwen3_30b_a3b.json), cut to LAYERS layers (default 1)
#     WORKDIR  where the checkpoints go (default a temporary folder, removed at the end)
#   DEVICES="cpu cuda" (default: cpu, plus cuda when nvidia-smi sees a GPU and BIN has it)
#   PROBES (default random:4:32:1) THREADS (default nproc)
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${1:-$root/build/src/sinkscope}
config=${2:-$root/bench/qwen3_30b_a3b.json}
layers=${3:-1}
work=${4:-}
probes=${PROBES:-random:4:32:1}
threads=${THREADS:-$(nproc)}
if [ -z "$work" ]; then work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; fi
mkdir -p "$work"
devices=${DEVICES:-cpu}
if [ -z "${DEVICES:-}" ] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 &&
   "$bin" analyze --help 2>/dev/null | grep -q cuda; then
  devices="cpu cuda"
fi
now() { date +%s.%N; }
rate() { awk -v b="$1" -v t="$2" 'BEGIN { printf "%.2f", b / 1e9 / t }'; }
rows=()
row() { rows+=("| $1 | $2 | $3 |"); }

python3 - "$config" "$layers" "$work/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); c["num_hidden_layers"] = int(sys.argv[2])
json.dump(c, open(sys.argv[3], "w"), indent=1)
PY

# ---- synth: the first checkpoint timed, three more for the sweep.
t0=$(now)
"$bin" synth --config "$work/config.json" --out "$work/run/step0" --seed 1 || exit 1
t1=$(now)
bytes=$(stat -c %s "$work"/run/step0/*.safetensors | awk '{ s += $1 } END { print s }')
synth_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
row "synth (whole command: random draws + write)" "$(awk -v b="$bytes" -v t="$synth_s" 'BEGIN { printf "%.0f MB/s", b / 1e6 / t }')" "$(printf '%.1f s for %.2f GB' "$synth_s" "$(awk -v b="$bytes" 'BEGIN{print b/1e9}')")"
for s in 100 200 400; do "$bin" synth --config "$work/config.json" --out "$work/run/step$s" --seed $((s + 1)) || exit 1; done
files=("$work"/run/step0/*.safetensors)

drop_caches() {
  sync
  if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then return 0; fi
  return 1
}
cold_ok=1
if ! drop_caches; then cold_ok=0; cold_why="cannot write /proc/sys/vm/drop_caches (not root or read-only /proc)"; fi

load_rate() {  # device, label
  local out
  out=$("$bin" analyze --model "$work/run/step0" --probes "$probes" --device "$1" --threads "$threads" \
        --verbose --quiet --out "$work/a.h5" 2>&1 | grep "sinkscope: load ")
  echo "$out" | sed -E 's/.*load ([0-9.]+) s \(([0-9.]+) GB, ([0-9.]+) GB\/s\).*/\3 GB\/s (\2 GB in \1 s)/'
}
cat_rate() {
  local a b
  a=$(now); cat "${files[@]}" > /dev/null; b=$(now)
  echo "$(rate "$bytes" "$(awk -v a="$a" -v b="$b" 'BEGIN { print b - a }')") GB/s"
}

for dev in $devices; do
  if [ "$cold_ok" = 1 ]; then
    drop_caches; row "cat, cold" "$(cat_rate)" "same files"
    drop_caches; row "load --device $dev, cold" "$(load_rate "$dev")" "checkpoint open + this rank's weights"
  else
    row "load --device $dev, cold" "skipped" "$cold_why"
  fi
  cat "${files[@]}" > /dev/null
  row "cat, warm" "$(cat_rate)" "page cache"
  row "load --device $dev, warm" "$(load_rate "$dev")" "checkpoint open + this rank's weights"
done

# ---- transformers' from_pretrained (weights only, CPU, bf16)
if python3 -c "import torch, transformers" 2>/dev/null; then
  [ "$cold_ok" = 1 ] && drop_caches
  hf=$(python3 - "$work/run/step0" <<'PY'
import sys, time, torch, transformers
t = time.time()
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16)
print(f"{time.time() - t:.2f}")
PY
  )
  row "transformers from_pretrained$([ "$cold_ok" = 1 ] && echo ', cold')" "$(rate "$bytes" "$hf") GB/s" "$hf s"
else
  row "transformers from_pretrained" "skipped" "python3 has no torch + transformers"
fi

# ---- a sweep of 4 checkpoints, with and without read-ahead
for pf in 0 default; do
  [ "$cold_ok" = 1 ] && drop_caches
  opt=(); [ "$pf" = 0 ] && opt=(--prefetch-gb 0)
  line=$("$bin" sweep --models-glob "$work/run/step*" --probes "$probes" --threads "$threads" \
         --bootstrap 20 --verbose --quiet --out "$work/sweep_$pf" "${opt[@]}" 2>&1 | grep "sweep timing")
  row "sweep of 4, --prefetch-gb $pf$([ "$cold_ok" = 1 ] && echo ', cold start')" "${line#sinkscope: sweep timing: }" ""
done

echo
echo "shape: $config cut to $layers layer(s); $(awk -v b="$bytes" 'BEGIN{printf "%.2f", b/1e9}') GB per checkpoint; probes $probes; threads $threads; $(nproc) cores; $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM"
echo
echo "| measure | rate | notes |"
echo "|---|---|---|"
printf '%s\n' "${rows[@]}"
