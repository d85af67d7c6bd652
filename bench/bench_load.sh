#!/usr/bin/env bash
# Loading benchmark (issue 16), every row from one run: `synth` MB/s; the `cat` rate of the
# checkpoint, cold and warm; warm and cold load GB/s of the CPU backend and (where built and a GPU
# is present) the CUDA backend, end to end and the weight load alone; transformers'
# from_pretrained, cold and warm, where torch + transformers import (to the GPU when torch sees
# one); a sweep of 4 checkpoints with and without read-ahead (wall/read/compute/overlap). Prints a
# Markdown table; the issue's targets are computed under it.
#
#   bench/bench_load.sh [BIN] [CONFIG] [LAYERS] [WORKDIR]
#     BIN      sinkscope binary (default build/src/sinkscope)
#     CONFIG   shape (default bench/qwen3_30b_a3b.json), cut to LAYERS layers (default 1)
#     WORKDIR  where the checkpoints go (default a temporary folder, removed at the end)
#   DEVICES="cpu cuda" (default: cpu, plus cuda when nvidia-smi sees a GPU and BIN has it)
#   PROBES (default random:4:32:1: the load rows' analyze) THREADS (default nproc: --threads of
#   every command, and OMP_NUM_THREADS of synth) SWEEP=0 skips the sweeps, SWEEP_DEVICE (default:
#   the last of DEVICES, so cuda where there is one), SWEEP_PROBES (default PROBES; the issue's
#   sweep is SWEEP_PROBES=random:8:4096:1)
#   Cold rows need root (echo 3 > /proc/sys/vm/drop_caches); without it they are skipped.
#   The sweep writes 4 checkpoints into WORKDIR; the bench checks the disk has room for them
#   (after the first) and skips the sweep with a note when it has not.
#
# The issue's sweep on the H200 machine (64 GiB disk; 6 layers of Qwen3-30B-A3B are 8.7 GB per
# checkpoint, 35 GB for the four):
#   SWEEP_PROBES=random:8:4096:1 THREADS=16 bench/bench_load.sh build-cuda/src/sinkscope \
#     bench/qwen3_30b_a3b.json 6 /tmp/benchload
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${1:-$root/build/src/sinkscope}
config=${2:-$root/bench/qwen3_30b_a3b.json}
layers=${3:-1}
work=${4:-}
probes=${PROBES:-random:4:32:1}
sweep_probes=${SWEEP_PROBES:-$probes}
threads=${THREADS:-$(nproc)}
sweep=${SWEEP:-1}
if [ -z "$work" ]; then work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; fi
mkdir -p "$work"
devices=${DEVICES:-cpu}
if [ -z "${DEVICES:-}" ] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 &&
   "$bin" analyze --help 2>/dev/null | grep -q cuda; then
  devices="cpu cuda"
fi
now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"$1\", $2 }"; }
rows=()
row() { rows+=("| $1 | $2 | $3 |"); }
targets=()

python3 - "$config" "$layers" "$work/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1])); c["num_hidden_layers"] = int(sys.argv[2])
json.dump(c, open(sys.argv[3], "w"), indent=1)
PY

# ---- synth: the first checkpoint timed, three more for the sweep.
rm -rf "$work/run"
t0=$(now)
OMP_NUM_THREADS=$threads "$bin" synth --config "$work/config.json" --out "$work/run/step0" --seed 1 2>/dev/null || exit 1
t1=$(now)
files=("$work"/run/step0/*.safetensors)
bytes=$(stat -c %s "${files[@]}" | awk '{ s += $1 } END { print s }')
synth_s=$(calc "%.3f" "$t1 - $t0")
synth_mbs=$(calc "%.0f" "$bytes / 1e6 / $synth_s")
row "synth (whole command, $threads threads)" "$synth_mbs MB/s" "$synth_s s for $(calc "%.2f" "$bytes / 1e9") GB"
targets+=("synth: $synth_mbs MB/s (target >= 1000 MB/s)")
sweep_why=""
if [ "$sweep" = 1 ]; then
  # Room for three more checkpoints, the sweep's outputs and 2 GB to spare.
  free=$(df -B1 --output=avail "$work" | tail -1)
  need=$(calc "%.0f" "3 * $bytes + 2e9")
  if [ "$free" -lt "$need" ]; then
    sweep=0
    sweep_why="$(calc "%.1f" "$free / 1e9") GB free in $work, the other three checkpoints need $(calc "%.1f" "$need / 1e9") GB"
  fi
fi
if [ "$sweep" = 1 ]; then
  for s in 100 200 400; do
    OMP_NUM_THREADS=$threads "$bin" synth --config "$work/config.json" --out "$work/run/step$s" --seed $((s + 1)) 2>/dev/null || exit 1
  done
fi

drop_caches() {
  sync
  echo 3 > /proc/sys/vm/drop_caches 2>/dev/null
}
cold_ok=1
if ! drop_caches; then cold_ok=0; cold_why="cannot write /proc/sys/vm/drop_caches (not root or read-only /proc)"; fi

cat_rate() {  # GB/s of reading the checkpoint's files with cat
  local a b
  a=$(now); cat "${files[@]}" > /dev/null; b=$(now)
  calc "%.2f" "$bytes / 1e9 / ($b - $a)"
}
# Fills load_total, load_weights (seconds), load_gb from analyze --verbose's load line:
#   sinkscope: load T s (B GB, R GB/s; weights alone W s, R2 GB/s), compute C s
load_run() {  # device
  local line
  line=$("$bin" analyze --model "$work/run/step0" --probes "$probes" --device "$1" --threads "$threads" \
         --verbose --quiet --out "$work/a.h5" 2>&1 | grep "sinkscope: load ")
  load_total=$(echo "$line" | sed -E 's/.*load ([0-9.]+) s .*/\1/')
  load_gb=$(echo "$line" | sed -E 's/.*load [0-9.]+ s \(([0-9.]+) GB.*/\1/')
  load_weights=$(echo "$line" | sed -E 's/.*weights alone ([0-9.]+) s.*/\1/')
}
load_row() {  # device, label
  load_run "$1"
  row "load --device $1, $2" "$(calc "%.2f" "$load_gb / $load_weights") GB/s weights alone" \
      "$load_gb GB: weights $load_weights s; whole load $load_total s ($(calc "%.2f" "$load_gb / $load_total") GB/s: checkpoint open + backend setup + weights)"
}

declare -A warm_weights warm_rate warm_total warm_gb
cat_cold=""
for dev in $devices; do
  if [ "$cold_ok" = 1 ]; then
    drop_caches; cat_cold=$(cat_rate); row "cat, cold" "$cat_cold GB/s" "the $(calc "%.2f" "$bytes / 1e9") GB of safetensors"
    drop_caches; load_row "$dev" cold
    targets+=("$dev cold load: $(calc "%.0f" "100 * $load_gb / $load_weights / $cat_cold")% of the cold cat rate (target >= 90% of the disk's sequential rate)")
  else
    row "load --device $dev, cold" "skipped" "$cold_why"
  fi
  cat "${files[@]}" > /dev/null
  cat_warm=$(cat_rate)
  row "cat, warm" "$cat_warm GB/s" "page cache"
  load_row "$dev" warm
  warm_weights[$dev]=$load_weights
  warm_total[$dev]=$load_total
  warm_gb[$dev]=$load_gb
  warm_rate[$dev]=$(calc "%.2f" "$load_gb / $load_weights")
  targets+=("$dev warm load: $(calc "%.0f" "100 * ${warm_rate[$dev]} / $cat_warm")% of the warm cat rate (target >= 80%)")
done

# ---- transformers' from_pretrained, cold then warm, in one process (imports and CUDA set up
# before the clock starts; to the GPU when torch sees one, as device_map="cuda").
if python3 -c "import torch, transformers" 2>/dev/null; then
  hf=$(python3 - "$work/run/step0" "$cold_ok" 2>/dev/null <<'PY'
import gc, os, sys, time, torch, transformers
path, cold = sys.argv[1], sys.argv[2] == "1"
cuda = torch.cuda.is_available()
if cuda:
    torch.zeros(1, device="cuda")
def load():
    kw = {"device_map": "cuda"} if cuda else {}
    t = time.time()
    try:
        m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kw)
    except TypeError:  # transformers before the dtype= keyword
        m = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16, **kw)
    if cuda:
        torch.cuda.synchronize()
    s = time.time() - t
    del m
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return s
times = []
if cold:
    os.system("sync; echo 3 > /proc/sys/vm/drop_caches")
    times.append(load())
else:
    times.append(-1)
load()  # the page cache warm
times.append(load())
print(f"{'cuda' if cuda else 'cpu'} {times[0]:.3f} {times[1]:.3f} {transformers.__version__}")
PY
  )
  if [ -n "$hf" ]; then
    read -r hf_dev hf_cold hf_warm hf_ver <<<"$hf"
    [ "$cold_ok" = 1 ] && row "transformers $hf_ver from_pretrained to $hf_dev, cold" "$(calc "%.2f" "$bytes / 1e9 / $hf_cold") GB/s" "$hf_cold s for the whole $(calc "%.2f" "$bytes / 1e9") GB"
    row "transformers $hf_ver from_pretrained to $hf_dev, warm" "$(calc "%.2f" "$bytes / 1e9 / $hf_warm") GB/s" "$hf_warm s for the whole $(calc "%.2f" "$bytes / 1e9") GB"
    dev=$([ "$hf_dev" = cuda ] && echo cuda || echo cpu)
    if [ -n "${warm_rate[$dev]:-}" ]; then
      # Times, not rates: both load the same folder for the same analysis. transformers reads
      # every tensor of it (embeddings and lm_head included) into a model, in a process whose
      # CUDA is set up before its clock starts; sinkscope reads the tensors the analysis needs
      # (the embedding rows of the probes are read apart and not counted, the output head only
      # for logits), and its whole load, in a fresh process, includes creating the CUDA context
      # and the cuBLAS handles.
      targets+=("$dev warm load vs transformers warm, whole load: transformers $hf_warm s / sinkscope ${warm_total[$dev]} s = $(calc "%.2f" "$hf_warm / ${warm_total[$dev]}")x (target >= 2x; sinkscope's whole load in a fresh process: checkpoint open, backend setup$([ "$dev" = cuda ] && echo " with the CUDA context and cuBLAS"), weights)")
      targets+=("$dev warm load vs transformers warm, weights alone: transformers $hf_warm s / sinkscope ${warm_weights[$dev]} s = $(calc "%.2f" "$hf_warm / ${warm_weights[$dev]}")x (sinkscope reads ${warm_gb[$dev]} GB of the folder's $(calc "%.2f" "$bytes / 1e9") GB, transformers all of it; by rate $(calc "%.2f" "${warm_rate[$dev]} / ($bytes / 1e9 / $hf_warm)")x)")
    fi
  else
    row "transformers from_pretrained" "failed" "the python script failed (run it by hand to see why)"
  fi
else
  row "transformers from_pretrained" "skipped" "python3 has no torch + transformers"
fi

# ---- a sweep of 4 checkpoints, with and without read-ahead
[ -n "$sweep_why" ] && row "sweep of 4" "skipped" "$sweep_why"
if [ "$sweep" = 1 ]; then
  dev=${SWEEP_DEVICE:-${devices##* }}
  for pf in 0 default; do
    [ "$cold_ok" = 1 ] && drop_caches
    opt=(); [ "$pf" = 0 ] && opt=(--prefetch-gb 0)
    line=$("$bin" sweep --models-glob "$work/run/step*" --probes "$sweep_probes" --device "$dev" --threads "$threads" \
           --bootstrap 20 --verbose --quiet --out "$work/sweep_$pf" "${opt[@]}" 2>&1 | grep "sweep timing")
    line=${line#sinkscope: sweep timing: }
    row "sweep of 4 on $dev, --prefetch-gb $pf$([ "$cold_ok" = 1 ] && echo ', cold start')" "$line" "probes $sweep_probes"
    wall=$(echo "$line" | sed -E 's/^wall ([0-9.]+) s.*/\1/')
    read_s=$(echo "$line" | sed -E 's/.* read ([0-9.]+) s, compute.*/\1/')
    compute=$(echo "$line" | sed -E 's/.* compute ([0-9.]+) s.*/\1/')
    ahead=$(echo "$line" | sed -E 's/.* read ahead ([0-9.]+) s.*/\1/')
    # The issue's measure: the total read time (on the critical path plus read ahead beside the
    # forwards) against the total compute time.
    total_read=$(calc "%.3f" "$read_s + $ahead")
    targets+=("sweep --prefetch-gb $pf: wall / max(total read, compute) = $(calc "%.2f" "$wall / ($total_read > $compute ? $total_read : $compute)") (target <= 1.15; total read = read $read_s s + read ahead $ahead s)")
  done
fi

echo
echo "shape: $config cut to $layers layer(s); $(calc "%.2f" "$bytes / 1e9") GB per checkpoint; probes $probes (sweep: $sweep_probes); threads $threads; $(nproc) cores; $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| measure | rate | notes |"
echo "|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "Against the targets of issue 16:"
printf -- '- %s\n' "${targets[@]}"
