#!/usr/bin/env bash
# `cmake --install` into a temporary prefix, then everything used from there only: the binary
# runs an analysis, `sinkscope report` finds the installed report, and the installed Python
# package imports from <prefix>/share/sinkscope/python.
# usage: test_install.sh BUILD_DIR REPO_ROOT
set -euo pipefail
build=$1 root=$2
py=/usr/bin/python3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake --install "$build" --prefix "$work/prefix" >/dev/null
bin="$work/prefix/bin/sinkscope"
test -x "$bin" || { echo "FAIL: no installed binary"; exit 1; }
test -f "$work/prefix/share/sinkscope/python/sinkscope/report.py" || { echo "FAIL: no installed package"; exit 1; }
cd "$work"
"$bin" synth --config "$root/tests/data/tiny_moe.json" --out model --seed 3 2>/dev/null
"$bin" analyze --quiet --model model --probes random:2:8:1 --out a.h5
# The report from the installed tree, with the source tree's copy out of reach.
env -u SINKSCOPE_REPORT_SCRIPT PYTHONPATH= "$bin" report a.h5 --out report >/dev/null
test -s report/index.html || { echo "FAIL: installed report wrote nothing"; exit 1; }
PYTHONPATH="$work/prefix/share/sinkscope/python" "$py" -c "
import sinkscope, sys
assert sinkscope.__file__.startswith('$work/prefix'), sinkscope.__file__
a = sinkscope.open_analysis('a.h5')
assert a['attention/sink_score'].dims == ('layer', 'head')
"
echo "ok: installed binary, report and Python package work from $work/prefix"
