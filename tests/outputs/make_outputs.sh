#!/usr/bin/env bash
# Writes one output of every kind with the binary, into OUTDIR: a.h5 (analysis with every optional
# dataset but the learned sinks'), g.h5 (gpt_oss: learned sinks, --per-query) and sweep/ (two
# checkpoints). Shared by the output tests and by
# `tests/tools/schema_doc.py --write` when docs/schema.md's tables are regenerated.
# usage: make_outputs.sh SINKSCOPE REPO_ROOT OUTDIR
set -euo pipefail
bin=$1 root=$2 out=$3
mkdir -p "$out"
"$bin" synth --config "$root/tests/data/tiny_moe.json" --out "$out/run/step0" --seed 1 2>/dev/null
"$bin" synth --config "$root/tests/data/tiny_moe.json" --out "$out/run/step100" --seed 2 2>/dev/null
"$bin" synth --config "$root/tests/data/tiny_qwen2_moe.json" --out "$out/shared" --seed 3 2>/dev/null
# a.h5: a family with a shared expert and a dense layer, so that every dataset is written
"$bin" analyze --quiet --model "$out/shared" --probes random:3:10:7 --prepend-bos 1 \
  --per-query --ablate layers=0-1 --causal-profile --out "$out/a.h5"
"$bin" sweep --quiet --models-glob "$out/run/step*" --probes random:3:10:7 --out "$out/sweep"
# g.h5: gpt_oss (learned sinks, sliding windows shorter than the probes)
"$bin" synth --config "$root/tests/data/tiny_gpt_oss.json" --out "$out/gpt_oss" --seed 3 2>/dev/null
"$bin" analyze --quiet --model "$out/gpt_oss" --probes random:2:12:7 --per-query --out "$out/g.h5"
