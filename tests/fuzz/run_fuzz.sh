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
# Seeds: byte 0 selects the parser (0 header, 1 index, 2 config, 3 npy). Besides valid files, seeds
# near the limits: nesting just past the depth limit (64), metadata repeating a tensor name, .npy
# headers with a long descr, a huge shape and version 2.
printf '\x00{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"__metadata__":{"format":"pt"}}' > "$corpus/header"
printf '\x01{"metadata":{"total_size":8},"weight_map":{"a":"model-00001-of-00002.safetensors"}}' > "$corpus/index"
printf '\x01{"metadata":{"a":8},"weight_map":{"a":"s1.safetensors"}}' > "$corpus/index-metadata"
printf '\x02' > "$corpus/config"; cat "$root/tests/data/tiny_moe.json" >> "$corpus/config"
printf '\x02' > "$corpus/config-deepseek"; cat "$root/tests/data/tiny_deepseek_v3.json" >> "$corpus/config-deepseek"
printf '\x00{"w":{"dtype":"F8_E4M3","shape":[2,3],"data_offsets":[0,6]},"w_scale_inv":{"dtype":"F32","shape":[1,1],"data_offsets":[6,10]}}' > "$corpus/header-fp8"
/usr/bin/python3 - "$corpus" <<'PY'
import io, struct, sys, numpy as np
corpus = sys.argv[1]
b = io.BytesIO(); np.save(b, np.arange(12, dtype=np.int32).reshape(3, 4))
open(f"{corpus}/npy", "wb").write(b"\x03" + b.getvalue())
def npy(header, data=b"", major=1):
    fixed = 10 if major == 1 else 12
    header += " " * ((64 - (fixed + len(header) + 1) % 64) % 64) + "\n"
    size = struct.pack("<H", len(header)) if major == 1 else struct.pack("<I", len(header))
    return b"\x03\x93NUMPY" + bytes([major, 0]) + size + header.encode() + data
open(f"{corpus}/npy-long-descr", "wb").write(npy("{'descr': '" + "x" * 40000 + "', 'fortran_order': False, 'shape': (1, 2), }", b"\0" * 8, 2))
open(f"{corpus}/npy-huge-shape", "wb").write(npy("{'descr': '<i8', 'fortran_order': False, 'shape': (2147483648, 2147483648), }"))
open(f"{corpus}/npy-v2", "wb").write(npy("{'descr': '<i8', 'fortran_order': False, 'shape': (1, 2), }", b"\0" * 16, 2))
open(f"{corpus}/header-deep", "wb").write(b"\x00" + b"[" * 65 + b"]" * 65)
open(f"{corpus}/header-deep-object", "wb").write(b'\x00{"__metadata__":' + b'{"a":' * 63 + b'"x"' + b"}" * 64)
open(f"{corpus}/index-deep", "wb").write(b'\x01{"weight_map":' + b"[" * 70)
open(f"{corpus}/config-deep", "wb").write(b"\x02" + b'{"a":' * 64 + b"1" + b"}" * 64)
PY
"$build/tests/fuzz/sinkscope_fuzz_parsers" "$corpus" -max_total_time="$seconds" -max_len=131072 -print_final_stats=1 \
  -rss_limit_mb=2048 2>&1 | tee "$build/fuzz.log" | grep -E "^(#[0-9]+ +DONE|stat::number_of_executed_units|==.*ERROR|SUMMARY)" || true
grep -q "stat::number_of_executed_units" "$build/fuzz.log" && ! grep -q "ERROR" "$build/fuzz.log"
