#!/usr/bin/env bash
# The Python package as a user installs it: `pip install --no-deps --no-build-isolation` into a
# temporary --target, then imported from there (not from the source tree) and run on real output
# of the binary: open_analysis, open_sweep, strongest_edges, ablations and python -m sinkscope.report.
# usage: test_python_package.sh SINKSCOPE REPO_ROOT
set -euo pipefail
bin=$1 root=$2
py=/usr/bin/python3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# pip builds in the folder it is given: copy, so the source tree gets no build/ or egg-info.
cp -r "$root/python" "$work/src"
"$py" -m pip install --quiet --no-deps --no-build-isolation --target "$work/site" "$work/src" 2>"$work/pip.log" ||
  { cat "$work/pip.log"; exit 1; }
bash "$root/tests/outputs/make_outputs.sh" "$bin" "$root" "$work/out"
cd "$work"
PYTHONPATH="$work/site" "$py" - "$work/out" <<'PY'
import os, sys
import sinkscope
out = sys.argv[1]
assert os.path.dirname(sinkscope.__file__).startswith(os.path.dirname(out)), sinkscope.__file__
a = sinkscope.open_analysis(f"{out}/a.h5")
L, H = int(a.attrs["num_layers"]), int(a.attrs["num_heads"])
assert a["attention/sink_score"].dims == ("layer", "head")
assert a.sizes["layer"] == L and a.sizes["layer_input"] == L + 1 and a.sizes["head"] == H
assert list(a["layer"].values) == list(range(L))
assert a["circuit/attr_head"].dims == ("target_layer", "target_head", "source_layer", "source_head")
assert isinstance(a.attrs["command_line"], str) and a.attrs["format_version"] == 2
edges = sinkscope.strongest_edges(a, top=5)
assert len(edges) == 5 and list(edges["weight"]) == sorted(edges["weight"], reverse=True)
assert (edges["target_layer"] > edges["source_layer"]).all()
abl = sinkscope.ablations(a)
# --ablate layers=0-1 on tiny_qwen2_moe (4 heads, 8 experts and a shared expert, both layers MoE):
# 2 * (4 + 8 + 1) components
assert len(abl) == 26, len(abl)
assert set(abl["kind"]) == {"head", "expert", "shared_expert"} and set(abl["source_layer"]) == {0, 1}
assert a["circuit/attr_shared_expert"].dims == ("target_layer", "target_head", "source_layer")
assert abl["mean_delta"].notna().all()
s = sinkscope.open_sweep(f"{out}/sweep")
assert list(s["steps"].values) == [0, 100], s["steps"].values
assert [str(n) for n in s["names"].values] == ["step0", "step100"]
assert s["sink_rate"].dims == ("checkpoint", "layer") and "steps" in s["sink_rate"].coords
assert s["convergence/tv"].dims == ("checkpoint_pair",)
assert s.sizes["checkpoint_pair"] == 1
print("ok: package installed with pip --target, imported and used on real output")
PY
PYTHONPATH="$work/site" "$py" -m sinkscope.report "$work/out/sweep" --out "$work/report" >/dev/null
test -s "$work/report/index.html" || { echo "FAIL: no index.html from python -m sinkscope.report"; exit 1; }
# The report of an analysis with --ablate: the ablation table and plot, edges.csv linked.
PYTHONPATH="$work/site" "$py" -m sinkscope.report "$work/out/a.h5" --out "$work/report-a" >/dev/null
grep -q "<h2>Ablations" "$work/report-a/index.html" && test -s "$work/report-a/ablations.png" &&
  grep -q '<a href="edges.csv">edges.csv</a>' "$work/report-a/index.html" && test -s "$work/report-a/edges.csv" &&
  echo "ok: report shows the ablations and links edges.csv"
# A model with learned sinks (gpt-oss fixture): the report shows the learned sink next to the
# position-0 sink.
"$bin" analyze --quiet --model "$root/tests/golden/families/gpt_oss" \
  --tokens "$root/tests/golden/families/gpt_oss/probes.npy" --out "$work/gpt_oss.h5"
PYTHONPATH="$work/site" "$py" -m sinkscope.report "$work/gpt_oss.h5" --out "$work/report-g" >/dev/null
grep -q "<h2>Learned sinks" "$work/report-g/index.html" && test -s "$work/report-g/learned_sink.png" ||
  { echo "FAIL: the report of a gpt_oss analysis shows no learned sinks"; exit 1; }
echo "ok: report shows the learned sinks"
grep -q "<h2>Learned sinks" "$work/report-a/index.html" &&
  { echo "FAIL: learned sinks shown for a model without them"; exit 1; }
echo "ok: no learned-sink section without learned sinks"
