#!/usr/bin/env bash
set -uo pipefail
source .gpu-deps/env.sh
t0=$(date +%s)
cmake -S . -B /tmp/b -G Ninja -DCMAKE_BUILD_TYPE=Release -DSINKSCOPE_CUDA=ON $GPU_CMAKE_FLAGS >/dev/null && cmake --build /tmp/b -j 16 2>&1 | grep -E "error|FAILED" | head -20
timeout 420 ctest --test-dir /tmp/b -L gpu -j 4 --output-on-failure > $OUT/ctest.log 2>&1
echo "ctest rc $? at $(( $(date +%s) - t0 )) s"
grep -E "tests passed|\*\*\*Failed|Test #.*sec" $OUT/ctest.log | sort -t'#' -k2 | tail -4
grep -E "tests passed|\*\*\*Failed" $OUT/ctest.log | head
grep -E "Failure|Which is|actual|sink score difference" $OUT/ctest.log | head -20
/tmp/b/bench/sinkscope_bench_gpu --config bench/qwen3_30b_a3b.json --probes 8 --seq 4096 --batch 8 --iters 3 --modes plain,record 2>&1 | grep -A2 "tokens/s"
