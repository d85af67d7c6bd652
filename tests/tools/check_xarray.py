#!/usr/bin/env python3
"""Opens every output kind of the binary with xarray through h5netcdf, as a user would.

usage: check_xarray.py ANALYSIS.h5 SWEEP_DIR
Fails (exit 1, one line per problem) when a group does not open, a dimension is phony or has the
wrong length, a coordinate is missing, a string reads back as bytes, or provenance is missing.
"""
import sys

import xarray as xr

problems = []


def expect(condition, what):
    if not condition:
        problems.append(what)


def open_group(path, group):
    try:
        return xr.open_dataset(path, engine="h5netcdf", group=group)
    except Exception as error:  # every failure is one reported problem
        problems.append(f"{path} group {group}: {type(error).__name__}: {error}")
        return None


def is_str(value):
    return isinstance(value, str)


PROVENANCE = ["format_version", "sinkscope_version", "git_commit", "command_line", "options"]


def check_analysis(path, command="analyze", optional=True):
    """optional: the file was written with --per-query and --ablate."""
    root = open_group(path, "/")
    if root is None:
        return
    attrs = root.attrs
    L, H, E = int(attrs["num_layers"]), int(attrs["num_heads"]), int(attrs["num_experts"])
    N, T = int(attrs["num_probes"]), int(attrs["seq_len"])
    expect(int(attrs["format_version"]) == 2, "analysis: format_version is not 2")
    for name in PROVENANCE + ["probes", "prepend_bos", "ablate", "eps", "batch", "threads", "device",
                              "layout", "checkpoint", "checkpoint_headers_sha256"]:
        expect(name in attrs, f"analysis: root attribute {name} missing")
    for name in ["command_line", "options", "git_commit", "checkpoint", "model_type"]:
        expect(is_str(attrs.get(name)), f"analysis: attribute {name} is not str: {attrs.get(name)!r}")
    expect(len(attrs.get("checkpoint_headers_sha256", "")) == 64, "analysis: headers SHA-256 is not 64 hex")
    expect(f" {command} " in attrs.get("command_line", ""),
           f"analysis: command_line does not hold the command: {attrs.get('command_line')!r}")
    expect("eps=" in attrs.get("options", ""), "analysis: options do not list eps")
    sizes = {"probe": N, "position": T, "query": T, "layer": L, "layer_input": L + 1,
             "embedding_or_layer": L + 1, "head": H, "expert": E, "target_layer": L, "target_head": H,
             "source_layer": L, "source_head": H, "source_expert": E, "field": 3}
    if not optional:
        for dim in ("query", "field"):
            expect(dim not in root.coords, f"analysis: coordinate {dim} without its dataset")
            del sizes[dim]
    for dim, size in sizes.items():
        expect(dim in root.coords, f"analysis: root has no coordinate {dim}")
        if dim in root.sizes:
            expect(root.sizes[dim] == size, f"analysis: dimension {dim} has {root.sizes[dim]}, expected {size}")
    expect(list(root.coords["layer"].values) == list(range(L)), "analysis: layer coordinate is not 0..L-1")
    expect(root["tokens"].dims == ("probe", "position"), f"analysis: tokens dims {root['tokens'].dims}")
    if optional:
        fields = [str(v) for v in root.coords["field"].values] if "field" in root.coords else []
        expect(fields == ["source_layer", "kind", "index"], f"analysis: field coordinate {fields}")
        expect(all(is_str(v) for v in root.coords["field"].values) if "field" in root.coords else False,
               "analysis: field names read back as bytes")
    expected_dims = {
        "attention": {"sink_score": ("layer", "head"), "sink_rate": ("layer",),
                      "p0_per_query": ("probe", "layer", "head", "query")},
        "residual": {"norm_p0": ("probe", "layer_input"), "h_ratio": ("layer_input",),
                     "p0_cosine": ("layer_input",), "massive_p0": ("layer_input",)},
        "writes": {"expert_p0": ("layer", "expert"), "moe_p0": ("layer",)},
        "routing": {"p0_topk_freq": ("layer", "expert")},
        "circuit": {"attr_head": ("target_layer", "target_head", "source_layer", "source_head"),
                    "attr_expert": ("target_layer", "target_head", "source_layer", "source_expert"),
                    "attr_mlp": ("target_layer", "target_head", "source_layer")},
        "circuit/ablation": {"components": ("component", "field"),
                             "delta_sink_score": ("component", "layer", "head")},
        "profile": {"layer_share": ("embedding_or_layer",), "norm_gain_share": ("layer",),
                    "first2_share": (), "peak_layer": (), "entropy": ()},
    }
    if not optional:
        del expected_dims["circuit/ablation"]
        del expected_dims["attention"]["p0_per_query"]
    for group, variables in expected_dims.items():
        ds = open_group(path, group)
        if ds is None:
            continue
        for name, dims in variables.items():
            if name not in ds:
                problems.append(f"analysis: {group}/{name} missing")
                continue
            var = ds[name]
            expect(var.dims == dims, f"analysis: {group}/{name} dims {var.dims}, expected {dims}")
            expect(not any(d.startswith("phony") for d in var.dims), f"analysis: {group}/{name} phony dims")
            for needed in ("long_name", "units", "description"):
                expect(needed in var.attrs, f"analysis: {group}/{name} has no {needed}")
        ds.close()
    root.close()


def check_sweep(folder):
    path = f"{folder}/sweep.h5"
    ds = open_group(path, "/")
    if ds is None:
        return
    C = ds.sizes.get("checkpoint", -1)
    expect(C >= 2, f"sweep: checkpoint dimension {C}")
    for name in ["sink_rate", "sink_score", "h_ratio", "layer_share", "first2_share", "norm_gain_share"]:
        expect(name in ds.data_vars, f"sweep: {name} missing")
        if name in ds:
            expect(ds[name].dims[0] == "checkpoint", f"sweep: {name} dims {ds[name].dims}")
            expect("steps" in ds[name].coords, f"sweep: steps is not a coordinate of {name}")
            expect("names" in ds[name].coords, f"sweep: names is not a coordinate of {name}")
    if "h_ratio" in ds and "sink_rate" in ds:
        expect(ds["h_ratio"].dims == ("checkpoint", "layer_input"), f"sweep: h_ratio dims {ds['h_ratio'].dims}")
        expect(ds.sizes["layer_input"] == ds.sizes["layer"] + 1, "sweep: layer_input is not L+1")
    expect(all(is_str(v) for v in ds["names"].values), "sweep: names read back as bytes")
    expect(all(is_str(v) for v in ds["checkpoint_paths"].values), "sweep: checkpoint_paths not str")
    expect(all(len(v) == 64 for v in ds["checkpoint_headers_sha256"].values), "sweep: header hashes")
    for name in PROVENANCE + ["tokens_sha256", "eps", "tau", "failed"]:
        expect(name in ds.attrs, f"sweep: root attribute {name} missing")
    expect(is_str(ds.attrs.get("command_line")), "sweep: command_line is not str")
    conv = open_group(path, "convergence")
    if conv is not None:
        expect(conv["tv"].dims == ("checkpoint_pair",), f"sweep: tv dims {conv['tv'].dims}")
        expect(conv.sizes["checkpoint_pair"] == C - 1, "sweep: checkpoint_pair is not C-1")
        conv.close()
    first = str(ds["names"].values[0])
    ds.close()
    check_analysis(f"{folder}/checkpoints/{first}.h5", command="sweep", optional=False)


def main(argv):
    if len(argv) != 3:
        raise SystemExit(__doc__)
    check_analysis(argv[1])
    check_sweep(argv[2])
    for problem in problems:
        print("FAIL:", problem)
    if not problems:
        print("ok: every analysis and sweep group opens with xarray (h5netcdf) with named dimensions")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
