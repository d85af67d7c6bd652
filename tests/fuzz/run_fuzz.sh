#!/usr/bin/env bash
# Builds the libFuzzer target with clang and runs it for SECONDS (default 60) on a seed corpus
# generated here (valid files of each kind). Prints libFuzzer's summary line; exits non-zero on a
# finding. usage: run_fuzz.sh REPO_ROOT [SECONDS] [BUILD_DIR]
set -euo pipefail
root=$1 seconds=${2:-60} build=${3:-$(mktemp -d)}
command -v clang++ >/dev/null || { echo "run_fuzz.sh: clang++ is required (apt-get install clang)"; exit 1; }
cmake -S "$root" -B "$build" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DSINKSCOPE_MPI=OFF -DSINKSCOPE_FUZZ=ON >/dev/null
cmake --build "$build" --target sinkscope_fuzz_parsers -j 2 >/dev/null
corpus="$build/fuzz-corpus"
mkdir -p "$corpus"
# Seeds: byte 0 selects the parser (0 header, 1 index, 2 config, 3 npy).
printf '\x00{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"__metadata__":{"format":"pt"}}' > "$corpus/header"
printf '\x01{"metadata":{"total_size":8},"weight_map":{"a":"model-00001-of-00002.safetensors"}}' > "$corpus/index"
printf '\x02' > "$corpus/config"; cat "$root/tests/data/tiny_moe.json" >> "$corpus/config"
/usr/bin/python3 - "$corpus/npy" <<'PY'
import io, sys, numpy as np
b = io.BytesIO(); np.save(b, np.arange(12, dtype=np.int32).reshape(3, 4))
open(sys.argv[1], "wb").write(b"\x03" + b.getvalue())
PY
"$build/tests/fuzz/sinkscope_fuzz_parsers" "$corpus" -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 \
  -rss_limit_mb=2048 2>&1 | tee "$build/fuzz.log" | grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units|==.*ERROR|SUMMARY)" || true
grep -q "stat::number_of_executed_units" "$build/fuzz.log" && ! grep -q "ERROR" "$build/fuzz.log"
