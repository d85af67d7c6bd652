#!/usr/bin/env python3
"""Compare two sinkscope sweep folders file by file, dataset by dataset.

    compare_sweeps.py REFERENCE_DIR CANDIDATE_DIR [--layout tp=2,ep=1,dp=1,world_size=2] [--exact]

Used by tests/slurm/test_slurm_sweep.sh: REFERENCE_DIR comes from a direct one-process
`sinkscope sweep`, CANDIDATE_DIR from the same sweep run as Slurm array tasks over MPI ranks.
Both must hold the same checkpoints/*.h5 and a sweep.h5, with the same groups, datasets, dtypes,
shapes and attributes. Exits 0 when they agree, 1 with one line per difference otherwise.

Tolerances (why they are what they are):
- Floating-point datasets: |a - b| <= 1e-5 * max|reference| over the dataset. Splitting heads
  (tp) or experts (ep) over ranks changes the order of the fp32 sums (all-reduce of o_proj
  partials, the combine of expert outputs), which moves results by a few ulps of the dataset's
  largest values; small entries next to large ones are therefore judged on the dataset's scale.
- Integer, boolean and string datasets must be equal.
- Floating-point attributes (eps, sink_rate, tau): relative 1e-5 of their own magnitude.
- Attributes ignored: created_utc (a clock); content_sha256 (the file's checksum, which covers the
  clock; what it covers is compared); command_line and options (the command as run, which differs
  between a direct sweep and array tasks); tp, ep, etp, dp, world_size, layout describe the
  layout, which differs on purpose: --layout checks the candidate's values instead.
- --exact (both folders from the same layout, e.g. an interrupted and requeued sweep against an
  uninterrupted one): floating-point values must be bitwise equal and the layout attributes equal
  too; only the clock, the checksum and the command line may differ.
- Dimension scales (DIMENSION_LIST, REFERENCE_LIST hold object references, which differ between
  files) are compared by the names of the scales attached to each axis.
"""

import argparse
import pathlib
import sys

import h5py
import numpy as np

REL_TOL = 1e-5
IGNORED_ATTRS = {"created_utc", "content_sha256", "command_line", "options", "DIMENSION_LIST", "REFERENCE_LIST"}
# etp follows the layout; the identity error is rounding that differs with summation order.
LAYOUT_ATTRS = {"tp", "ep", "etp", "dp", "world_size", "layout", "circuit_identity_max_rel_err"}


def decode(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
        return [decode(v) for v in value.tolist()]
    return value


def compare_attrs(where, ref, cand, problems):
    names = set(ref.attrs) | set(cand.attrs)
    for name in sorted(names - IGNORED_ATTRS - LAYOUT_ATTRS):
        if name not in ref.attrs or name not in cand.attrs:
            problems.append(f"{where}: attribute {name} only in the {'reference' if name in ref.attrs else 'candidate'}")
            continue
        a, b = decode(ref.attrs[name]), decode(cand.attrs[name])
        if isinstance(a, (float, np.floating)) or (isinstance(a, np.ndarray) and a.dtype.kind == "f"):
            a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            scale = max(float(np.max(np.abs(a_arr), initial=0.0)), np.finfo(np.float32).tiny)
            if a_arr.shape != b_arr.shape or np.max(np.abs(a_arr - b_arr), initial=0.0) > REL_TOL * scale:
                problems.append(f"{where}: attribute {name}: {a!r} != {b!r}")
        elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            if not np.array_equal(np.asarray(a), np.asarray(b)):
                problems.append(f"{where}: attribute {name}: {a!r} != {b!r}")
        elif a != b:
            problems.append(f"{where}: attribute {name}: {a!r} != {b!r}")


def compare_dataset(where, ref, cand, problems, worst):
    if ref.shape != cand.shape:
        problems.append(f"{where}: shape {ref.shape} != {cand.shape}")
        return
    if ref.dtype != cand.dtype:
        problems.append(f"{where}: dtype {ref.dtype} != {cand.dtype}")
        return
    a, b = ref[()], cand[()]
    if ref.dtype.kind == "f":
        a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if not np.array_equal(np.isnan(a64), np.isnan(b64)):
            problems.append(f"{where}: NaN in different places")
            return
        finite = ~np.isnan(a64)
        scale = float(np.max(np.abs(a64[finite]), initial=0.0))
        diff = float(np.max(np.abs(a64[finite] - b64[finite]), initial=0.0))
        allowed = REL_TOL * max(scale, np.finfo(np.float32).tiny) if REL_TOL else 0.0
        if diff > allowed:
            problems.append(f"{where}: max |difference| {diff:.3g} > {allowed:.3g} ({REL_TOL:g} of max |value| {scale:.3g})")
        if scale > 0:
            worst[0] = max(worst[0], diff / scale)
    else:
        if not np.array_equal(np.asarray(decode(a), dtype=object), np.asarray(decode(b), dtype=object)):
            problems.append(f"{where}: values differ")


def compare_file(ref_path, cand_path, layout, problems, counts, worst):
    with h5py.File(ref_path, "r") as ref, h5py.File(cand_path, "r") as cand:
        compare_attrs(f"{cand_path}:/", ref, cand, problems)
        for key, want in layout.items():
            if key in cand.attrs and int(cand.attrs[key]) != want:
                problems.append(f"{cand_path}: attribute {key} is {int(cand.attrs[key])}, the job asked for {want}")

        ref_items, cand_items = {}, {}
        ref.visititems(lambda name, obj: ref_items.__setitem__(name, obj))
        cand.visititems(lambda name, obj: cand_items.__setitem__(name, obj))
        for name in sorted(set(ref_items) ^ set(cand_items)):
            problems.append(f"{cand_path}: /{name} only in the {'reference' if name in ref_items else 'candidate'}")
        for name in sorted(set(ref_items) & set(cand_items)):
            r, c = ref_items[name], cand_items[name]
            where = f"{cand_path}:/{name}"
            if isinstance(r, h5py.Dataset) != isinstance(c, h5py.Dataset):
                problems.append(f"{where}: a dataset in one file, a group in the other")
                continue
            compare_attrs(where, r, c, problems)
            if isinstance(r, h5py.Dataset):
                scales = [[list(d.keys()) for d in x.dims] for x in (r, c)]
                if scales[0] != scales[1]:
                    problems.append(f"{where}: dimension scales {scales[0]} != {scales[1]}")
                compare_dataset(where, r, c, problems, worst)
                counts[1] += 1
    counts[0] += 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=pathlib.Path)
    parser.add_argument("candidate", type=pathlib.Path)
    parser.add_argument("--layout", default="", help="expected layout attributes of the candidate, e.g. tp=2,ep=1")
    parser.add_argument("--exact", action="store_true", help="bitwise equal values, equal layout attributes")
    args = parser.parse_args()
    if args.exact:
        global REL_TOL, LAYOUT_ATTRS
        REL_TOL = 0.0
        LAYOUT_ATTRS = set()
    layout = {}
    for item in filter(None, args.layout.split(",")):
        key, _, value = item.partition("=")
        layout[key] = int(value)

    problems = []
    ref_files = sorted(p.name for p in (args.reference / "checkpoints").glob("*.h5"))
    cand_files = sorted(p.name for p in (args.candidate / "checkpoints").glob("*.h5"))
    if not ref_files:
        problems.append(f"{args.reference}/checkpoints: no analysis file")
    if ref_files != cand_files:
        problems.append(f"checkpoint files differ: reference {ref_files}, candidate {cand_files}")
    leftovers = sorted(str(p) for p in args.candidate.rglob(".*.tmp"))
    if leftovers:
        problems.append(f"temporary files left behind: {leftovers}")

    counts, worst = [0, 0], [0.0]
    pairs = [(args.reference / "checkpoints" / n, args.candidate / "checkpoints" / n) for n in ref_files if n in cand_files]
    pairs.append((args.reference / "sweep.h5", args.candidate / "sweep.h5"))
    for ref_path, cand_path in pairs:
        if not cand_path.is_file() or not ref_path.is_file():
            problems.append(f"missing {cand_path if ref_path.is_file() else ref_path}")
            continue
        compare_file(ref_path, cand_path, layout if cand_path.name != "sweep.h5" else {}, problems, counts, worst)

    for p in problems:
        print(f"compare_sweeps: {p}", file=sys.stderr)
    print(f"compare_sweeps: {counts[0]} files, {counts[1]} datasets compared; largest difference "
          f"{worst[0]:.2e} of a dataset's max |value|; {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
