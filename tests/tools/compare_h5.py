#!/usr/bin/python3
"""Compares two sinkscope HDF5 files dataset by dataset.

Float datasets agree when max |a - b| <= rtol * max |a| (plus a tiny absolute floor for all-zero
arrays): differences relative to the array's scale, because summation order legitimately differs
between parallel layouts and entries near zero have no meaningful relative error. Integer and
string datasets must be equal. Root attributes must be equal except the ones that describe the
run rather than the result: always created_utc, command_line and options (format version 2
provenance) and content_sha256 (the file's checksum, which covers the clock; the datasets and
attributes it covers are compared), and those given with --ignore-attrs.

usage: compare_h5.py A.h5 B.h5 [--rtol 1e-5] [--ignore-attrs created_utc,layout,...]
exit 0 when equal within tolerance, 1 otherwise (a line per difference).
"""
import argparse
import sys

import h5py
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument("--ignore-attrs", default="created_utc")
    ap.add_argument("--skip", default="", help="comma-separated dataset names not compared")
    args = ap.parse_args()
    ignore = set(filter(None, args.ignore_attrs.split(","))) | {"created_utc", "command_line", "options", "content_sha256"}
    skip = set(filter(None, args.skip.split(",")))
    fa, fb = h5py.File(args.a, "r"), h5py.File(args.b, "r")
    problems = []
    names_a, names_b = [], []
    fa.visititems(lambda n, o: names_a.append(n) if isinstance(o, h5py.Dataset) else None)
    fb.visititems(lambda n, o: names_b.append(n) if isinstance(o, h5py.Dataset) else None)
    if sorted(names_a) != sorted(names_b):
        problems.append(f"dataset lists differ: {sorted(set(names_a) ^ set(names_b))}")
    worst = (0.0, "")
    for n in sorted(set(names_a) & set(names_b)):
        if n in skip:
            continue
        x, y = fa[n][()], fb[n][()]
        if np.shape(x) != np.shape(y):
            problems.append(f"{n}: shapes {np.shape(x)} vs {np.shape(y)}")
            continue
        if fa[n].attrs.get("dims") != fb[n].attrs.get("dims"):
            problems.append(f"{n}: dims attributes differ")
        if np.asarray(x).dtype.kind == "f":
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            if np.size(x) == 0:
                continue
            if not np.array_equal(np.isnan(x), np.isnan(y)):
                problems.append(f"{n}: NaN positions differ")
                continue
            scale = max(np.nanmax(np.abs(x)), 1e-30)
            err = np.nanmax(np.abs(x - y)) / scale if np.any(~np.isnan(x)) else 0.0
            if err > worst[0]:
                worst = (err, n)
            if err > args.rtol and np.nanmax(np.abs(x - y)) > 1e-12:
                problems.append(f"{n}: max difference {err:.3g} of the array scale {scale:.3g} > {args.rtol}")
        elif not np.array_equal(x, y):
            problems.append(f"{n}: values differ")
    for k in sorted(set(fa.attrs) | set(fb.attrs)):
        if k in ignore:
            continue
        va, vb = fa.attrs.get(k), fb.attrs.get(k)
        if isinstance(va, (float, np.floating)) and isinstance(vb, (float, np.floating)):
            if abs(va - vb) > args.rtol * max(abs(va), 1e-12):
                problems.append(f"attribute {k}: {va} vs {vb}")
        elif not np.array_equal(va, vb):
            problems.append(f"attribute {k}: {va!r} vs {vb!r}")
    for p in problems:
        print(f"{args.b}: {p}")
    print(f"compare {args.a} {args.b}: {'OK' if not problems else 'DIFFERENT'} (worst {worst[0]:.2e} in {worst[1] or '-'})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
