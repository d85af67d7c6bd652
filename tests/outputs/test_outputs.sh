#!/usr/bin/env bash
# Real output of the binary, read by its users' tools: every analysis and sweep group opens with
# xarray through h5netcdf (tests/tools/check_xarray.py), and docs/schema.md's tables are exactly
# what the files hold (tests/tools/schema_doc.py --check).
# usage: test_outputs.sh SINKSCOPE REPO_ROOT (xarray|schema_doc)
set -euo pipefail
bin=$1 root=$2 what=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bash "$root/tests/outputs/make_outputs.sh" "$bin" "$root" "$work"
case "$what" in
  xarray) /usr/bin/python3 "$root/tests/tools/check_xarray.py" "$work/a.h5" "$work/sweep" ;;
  schema_doc) /usr/bin/python3 "$root/tests/tools/schema_doc.py" --check "$root/docs/schema.md" "$work/a.h5,$work/g.h5" "$work/sweep/sweep.h5" ;;
  *) echo "unknown check $what"; exit 2 ;;
esac
