#!/usr/bin/env bash
set -uo pipefail
source .gpu-deps/env.sh
t0=$(date +%s)
cmake -S . -B /tmp/b -G Ninja -DCMAKE_BUILD_TYPE=Release -DSINKSCOPE_CUDA=ON $GPU_CMAKE_FLAGS >/dev/null && cmake --build /tmp/b -j 16 2>&1 | grep -E "error|FAILED" | head -20
timeout 300 ctest --test-dir /tmp/b -L gpu -j 4 --output-on-failure > $OUT/ctest.log 2>&1
echo "ctest rc $? at $(( $(date +%s) - t0 )) s"
grep -E "tests passed|\*\*\*Failed" $OUT/ctest.log | head
grep -E "Failure|Which is|actual" $OUT/ctest.log | head -10
python3 -c "import json; c=json.load(open('bench/qwen3_30b_a3b.json')); c['num_hidden_layers']=2; json.dump(c,open('/tmp/c2.json','w'))"
THREADS=16 timeout 230 bench/bench_load.sh /tmp/b/src/sinkscope /tmp/c2.json 2 /tmp/benchload > $OUT/bench_load.txt 2>&1
echo "bench rc $? at $(( $(date +%s) - t0 )) s"
tail -40 $OUT/bench_load.txt
