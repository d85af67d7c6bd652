#!/usr/bin/env bash
# Reading the next checkpoint ahead (--prefetch-gb) changes nothing in a sweep's outputs: the
# analysis files and sweep.h5 of a sweep with and without it hold the same datasets, value for
# value (tests/tools/compare_h5.sh; attributes such as the creation time and the command line
# differ by design). --verbose prints the read/compute/overlap timings.
set -euo pipefail
bin=$(realpath "$1")
root=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
for s in 0 100 200 400; do
  "$bin" synth --config "$root/tests/data/tiny_moe.json" --out "run/step$s" --seed $((s + 3)) 2>/dev/null
done
common=(--models-glob 'run/step*' --probes random:6:12:5 --bootstrap 20 --quiet)
"$bin" sweep "${common[@]}" --out off --prefetch-gb 0
"$bin" sweep "${common[@]}" --out on --prefetch-gb 1 --verbose 2>verbose.log
grep -q "sweep timing: wall" verbose.log || { echo "no sweep timing line"; cat verbose.log; exit 1; }
grep -q "next checkpoint read ahead" verbose.log || { echo "no read-ahead line"; cat verbose.log; exit 1; }
n=0
for f in off/checkpoints/*.h5 off/sweep.h5; do
  g=on/${f#off/}
  bash "$root/tests/tools/compare_h5.sh" "$f" "$g"
  n=$((n + 1))
done
[ "$n" -eq 5 ] || { echo "expected 5 files, compared $n"; exit 1; }
echo "prefetch: $n files identical"
