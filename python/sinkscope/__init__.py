"""sinkscope's output files as xarray Datasets (docs/schema.md; every number: docs/metrics.md).

open_analysis(path) and open_sweep(folder) return one xarray.Dataset with every group of the file
merged in: variables keep their HDF5 path as name ("attention/sink_score", "convergence/tv"), the
dimensions are the files' dimension scales (layer, layer_input, embedding_or_layer, head, expert,
target_layer, source_layer, ..., checkpoint with its coordinates steps and names), and the root
attributes (provenance included) are the Dataset's attrs. strongest_edges() and ablations() give
the circuit and the causal ablations as pandas DataFrames.
"""

import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import xarray as xr

from sinkscope.circuit import strongest_edges as _strongest_edges

__all__ = ["open_analysis", "open_sweep", "strongest_edges", "ablations", "COMPONENT_KINDS"]
__version__ = "0.1.0"

# circuit/ablation/components[:, 1] (docs/metrics.md section 4 and its additions).
COMPONENT_KINDS = {0: "head", 1: "expert", 2: "embedding", 3: "mlp", 4: "shared_expert"}


def _groups(path):
    import h5py

    groups = ["/"]
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: groups.append(name) if isinstance(obj, h5py.Group) else None)
    return groups


def _open_merged(path):
    parts = []
    attrs = {}
    for group in _groups(path):
        ds = xr.open_dataset(path, engine="h5netcdf", group=group)
        if group == "/":
            attrs = dict(ds.attrs)
        else:
            ds = ds.rename({name: f"{group}/{name}" for name in ds.data_vars})
        parts.append(ds.load())
        ds.close()
    merged = xr.merge(parts, combine_attrs="drop")
    merged.attrs = attrs
    return merged


def open_analysis(path):
    """One analysis file (`sinkscope analyze`, or OUTDIR/checkpoints/NAME.h5 of a sweep)."""
    ds = _open_merged(os.fspath(path))
    if "attention/sink_score" not in ds:
        raise ValueError(f"{path}: not a sinkscope analysis file (no attention/sink_score)")
    return ds


def open_sweep(folder):
    """A sweep folder (or its sweep.h5): the per-checkpoint summaries along `checkpoint`."""
    folder = os.fspath(folder)
    path = os.path.join(folder, "sweep.h5") if os.path.isdir(folder) else folder
    ds = _open_merged(path)
    if "layer_share" not in ds or "steps" not in ds.coords:
        raise ValueError(f"{path}: not a sinkscope sweep file")
    return ds


def strongest_edges(analysis, top=20):
    """The `top` circuit edges source -> target head with the most sink-building weight
    (alpha(target) * max(attribution, 0)) as a DataFrame, strongest first."""
    view = SimpleNamespace(**{
        name.split("/")[-1]: np.asarray(analysis[name].values)
        for name in ["attention/sink_score", "circuit/attr_embed", "circuit/attr_head",
                     "circuit/attr_expert", "circuit/attr_mlp", "circuit/attr_shared_expert"]
        if name in analysis
    })
    edges = _strongest_edges(view, top)
    columns = ["source", "kind", "source_layer", "slot", "target", "target_layer", "target_head",
               "attribution", "alpha", "weight"]
    return pd.DataFrame(edges, columns=columns)


def ablations(analysis):
    """One row per ablated component (--ablate): what it is, and how the sink scores moved.

    Columns: source_layer, kind (head/expert/embedding/mlp), index, component ("L3.H1"),
    mean_delta (mean over all heads of delta_sink_score), min_delta (the largest drop) and
    min_delta_layer / min_delta_head (where it happened). Empty without --ablate."""
    columns = ["component", "source_layer", "kind", "index", "mean_delta", "min_delta",
               "min_delta_layer", "min_delta_head"]
    if "circuit/ablation/components" not in analysis:
        return pd.DataFrame(columns=columns)
    components = np.asarray(analysis["circuit/ablation/components"].values)
    delta = np.asarray(analysis["circuit/ablation/delta_sink_score"].values)
    rows = []
    for k, (layer, kind, index) in enumerate(components):
        kind_name = COMPONENT_KINDS.get(int(kind), f"kind{int(kind)}")
        label = {"head": f"L{layer}.H{index}", "expert": f"L{layer}.E{index}",
                 "embedding": "emb", "mlp": f"L{layer}.MLP", "shared_expert": f"L{layer}.SE"}.get(kind_name, f"L{layer}.{kind_name}{index}")
        where = np.unravel_index(int(np.argmin(delta[k])), delta[k].shape) if delta[k].size else (-1, -1)
        rows.append({"component": label, "source_layer": int(layer), "kind": kind_name,
                     "index": int(index), "mean_delta": float(delta[k].mean()) if delta[k].size else 0.0,
                     "min_delta": float(delta[k].min()) if delta[k].size else 0.0,
                     "min_delta_layer": int(where[0]), "min_delta_head": int(where[1])})
    return pd.DataFrame(rows, columns=columns)
