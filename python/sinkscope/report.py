#!/usr/bin/env python3
"""Figures and a one-page summary of sinkscope output (what `sinkscope report` runs).

    python3 -m sinkscope.report INPUT --out DIR [--top N]

INPUT is a sweep folder (sweep.h5 and checkpoints/*.h5), a sweep.h5, or one analysis file.
DIR receives PNG figures, index.html (one page, for reading and for a paper's supplement) and
summary.md (the same numbers as text). Every quantity is defined in docs/metrics.md; dataset
names follow docs/schema.md. Needs only numpy, h5py and matplotlib (Agg backend, no display).

Exit status: 0 ok; 1 missing or bad input (one line on stderr naming the file and the problem).
"""

import argparse
import html
import math
import os
import sys

PROG = "sinkscope report"


def fail(message):
    print(f"{PROG}: {message}", file=sys.stderr)
    sys.exit(1)


try:
    import numpy as np
    import h5py
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes; set before pyplot is imported
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors, ticker

    from sinkscope.circuit import strongest_edges
except ImportError as error:  # one line, like every other failure of this tool
    fail(f"needs numpy, h5py and matplotlib ({error}); run it with a python3 that has them")


class InputProblem(Exception):
    """A missing or malformed input: reported in one line, exit status 1."""


# ---- Style: readable on a laptop screen and in a two-column paper at 100% zoom ---------------

plt.rcParams.update({
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 9.5,
    "figure.titlesize": 13,
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "grid.alpha": 0.3,
})
SCORE_CMAP = "magma"       # sink score 0..1: dark = no sink, bright = sink
SHARE_CMAP = "viridis"     # layer share
CHECKPOINT_CMAP = "viridis"  # early checkpoints dark, late bright
MAX_PANELS = 12            # small multiples beyond this become unreadable: sample evenly
GRAPH_EDGES = 25           # a layered graph with more arrows than this is a hairball


# ---- Reading ---------------------------------------------------------------------------------

def as_text(value):
    """h5py hands strings back as str, bytes or numpy scalars depending on how they were stored."""
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return as_text(value[()])
    return str(value)


def open_h5(path):
    if not os.path.exists(path):
        raise InputProblem(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise InputProblem(f"{path}: not a readable HDF5 file ({error})") from None


def dataset(f, name, ndim=None):
    """A dataset as a numpy array; a missing one is the input's fault, named in the message."""
    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise InputProblem(f"{f.filename}: missing dataset /{name}")
    try:
        value = f[name][()]
    except (OSError, ValueError) as error:
        raise InputProblem(f"{f.filename}: cannot read dataset /{name} ({error})") from None
    if ndim is not None and np.ndim(value) != ndim:
        raise InputProblem(f"{f.filename}: dataset /{name} has {np.ndim(value)} dimensions, "
                           f"expected {ndim}")
    return value


def attribute(f, name, default=None):
    if name not in f.attrs:
        if default is not None:
            return default
        raise InputProblem(f"{f.filename}: missing root attribute {name}")
    value = f.attrs[name]
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(())[()]
    return value


class Analysis:
    """One analysis file: the parts the report shows."""

    def __init__(self, path):
        with open_h5(path) as f:
            if "attention/sink_score" not in f:
                raise InputProblem(f"{path}: not a sinkscope analysis file "
                                   "(no /attention/sink_score)")
            self.path = path
            self.attrs = {k: attribute(f, k) for k in f.attrs}
            self.step = int(self.attrs.get("step", -1))
            self.eps = float(self.attrs.get("eps", 0.3))
            self.sink_score = dataset(f, "attention/sink_score", 2).astype(float)
            self.sink_rate = dataset(f, "attention/sink_rate", 1).astype(float)
            self.h_ratio = dataset(f, "residual/h_ratio", 1).astype(float)
            # Contract 1.4 (gpt-oss): the softmax mass each head puts on its learned sink logit.
            self.learned_sink_mass = (dataset(f, "attention/learned_sink_mass", 2).astype(float)
                                      if "attention/learned_sink_mass" in f else None)
            self.layer_share = dataset(f, "profile/layer_share", 1).astype(float)
            # Contract 1.2 (--causal-profile); None in files without it.
            self.causal_layer_share = (dataset(f, "profile/causal_layer_share", 1).astype(float)
                                       if "profile/causal_layer_share" in f else None)
            self.first2_share = float(dataset(f, "profile/first2_share"))
            self.entropy = float(dataset(f, "profile/entropy"))
            self.peak_layer = int(dataset(f, "profile/peak_layer"))
            self.attr_embed = dataset(f, "circuit/attr_embed", 2)
            self.attr_head = dataset(f, "circuit/attr_head", 4)
            self.attr_expert = dataset(f, "circuit/attr_expert", 4)
            self.attr_mlp = dataset(f, "circuit/attr_mlp", 3)
            # Families with a shared expert (format 2, docs/metrics.md "Model families").
            self.attr_shared_expert = (dataset(f, "circuit/attr_shared_expert", 3)
                                       if "circuit/attr_shared_expert" in f else None)
            # Optional (--ablate): the causal check of the circuit, docs/metrics.md §4.
            self.ablation_components = self.ablation_delta = None
            if "circuit/ablation/components" in f and "circuit/ablation/delta_sink_score" in f:
                self.ablation_components = dataset(f, "circuit/ablation/components", 2).astype(int)
                self.ablation_delta = dataset(f, "circuit/ablation/delta_sink_score", 3).astype(float)
        layers, heads = self.sink_score.shape
        for name, array, shape in [
            ("attention/sink_rate", self.sink_rate, (layers,)),
            ("residual/h_ratio", self.h_ratio, (layers + 1,)),
            ("profile/layer_share", self.layer_share, (layers + 1,)),
            ("circuit/attr_embed", self.attr_embed, (layers, heads)),
            ("circuit/attr_head", self.attr_head, (layers, heads, layers, heads)),
            ("circuit/attr_mlp", self.attr_mlp, (layers, heads, layers)),
        ]:
            if array.shape != shape:
                raise InputProblem(f"{path}: dataset /{name} has shape {list(array.shape)}, "
                                   f"expected {list(shape)}")
        if self.attr_expert.shape[:3] != (layers, heads, layers):
            raise InputProblem(f"{path}: dataset /circuit/attr_expert has shape "
                               f"{list(self.attr_expert.shape)}, expected [L,H,L,E]")

    @property
    def name(self):
        return os.path.splitext(os.path.basename(self.path))[0]


class Sweep:
    """sweep.h5 plus where its checkpoint files are."""

    def __init__(self, path):
        with open_h5(path) as f:
            if "steps" not in f or "layer_share" not in f:
                raise InputProblem(f"{path}: not a sinkscope sweep file (no /steps, /layer_share)")
            self.path = path
            self.steps = dataset(f, "steps", 1).astype(np.int64)
            self.names = [as_text(n) for n in dataset(f, "names", 1)]
            self.sink_rate = dataset(f, "sink_rate", 2).astype(float)
            self.sink_score = dataset(f, "sink_score", 3).astype(float)
            self.h_ratio = dataset(f, "h_ratio", 2).astype(float)
            self.layer_share = dataset(f, "layer_share", 2).astype(float)
            self.first2_share = dataset(f, "first2_share", 1).astype(float)
            self.tv = dataset(f, "convergence/tv", 1).astype(float)
            self.convergence_step = int(dataset(f, "convergence/step"))  # 1.0, deprecated
            self.tau = float(attribute(f, "tau"))
            # Contract 1.2: the outcome in the words sinkscope prints; 1.1 files have none.
            self.outcome = as_text(attribute(f, "convergence_outcome", "")) or None
            self.converged_step = (int(dataset(f, "convergence/converged_step"))
                                   if "convergence/converged_step" in f else -1)
            self.convergence_profile = as_text(attribute(f, "convergence_profile", "attribution"))
            self.causal_layer_share = (dataset(f, "causal_layer_share", 2).astype(float)
                                       if "causal_layer_share" in f else None)
            if "convergence/distance" in f:  # 1.2: the profile's distance and its threshold
                self.tv = dataset(f, "convergence/distance", 1).astype(float)
                self.threshold = dataset(f, "convergence/threshold", 1).astype(float)
            else:
                self.threshold = None
            failed = as_text(attribute(f, "failed", ""))
            self.failed = [n for n in failed.split(",") if n]
            self.version = as_text(attribute(f, "sinkscope_version", "?"))
        count = len(self.steps)
        if count == 0:
            raise InputProblem(f"{path}: the sweep holds no checkpoint"
                               + (f" (failed: {', '.join(self.failed)})" if self.failed else ""))
        layers = self.sink_score.shape[1]
        for name, array, shape in [
            ("names", np.empty(len(self.names)), (count,)),
            ("sink_rate", self.sink_rate, (count, layers)),
            ("h_ratio", self.h_ratio, (count, layers + 1)),
            ("layer_share", self.layer_share, (count, layers + 1)),
            ("first2_share", self.first2_share, (count,)),
            ("convergence/tv", self.tv, (count - 1,)),
        ]:
            if array.shape != shape:
                raise InputProblem(f"{path}: dataset /{name} has shape {list(array.shape)}, "
                                   f"expected {list(shape)}")
        self.folder = os.path.dirname(os.path.abspath(path))

    def checkpoint_file(self, index):
        """The analysis file of checkpoint `index`, or None when it is not next to sweep.h5."""
        candidate = os.path.join(self.folder, "checkpoints", self.names[index] + ".h5")
        return candidate if os.path.isfile(candidate) else None


# ---- Axes helpers ----------------------------------------------------------------------------

def step_label(step):
    """Compact step labels for ticks: 512, 2048, 2k, 250k, 1.5M. Exact below 100k unless round
    (power-of-two schedules read better as 2048 than as 2.05k)."""
    step = int(step)
    if abs(step) >= 1_000_000:
        return f"{step // 1_000_000}M" if step % 1_000_000 == 0 else f"{step / 1e6:.3g}M"
    if step != 0 and step % 1000 == 0:
        return f"{step // 1000}k"
    if abs(step) >= 100_000:
        return f"{step / 1000:.4g}k"
    return str(step)


class StepAxis:
    """Where checkpoints go on an x axis. Training steps are usually log-spaced (0, 128, 256, ...):
    a log axis shows early formation and late stability equally, and step 0 sits on a short
    linear stretch (symlog) instead of vanishing. Unknown or unordered steps fall back to
    checkpoint order labelled by name."""

    def __init__(self, steps, names):
        steps = np.asarray(steps, dtype=np.int64)
        self.by_step = bool(len(steps) and np.all(steps >= 0) and np.all(np.diff(steps) > 0))
        self.x = steps.astype(float) if self.by_step else np.arange(len(steps), dtype=float)
        self.labels = [step_label(s) for s in steps] if self.by_step else list(names)
        positive = steps[steps > 0] if self.by_step else np.array([])
        self.log = bool(len(positive) >= 2 and positive.max() / positive.min() >= 30)
        self.linthresh = float(positive.min()) if len(positive) else 1.0
        self.title = "training step" + (" (log scale)" if self.log else "")
        if not self.by_step:
            self.title = "checkpoint"

    def apply(self, ax):
        if self.log:
            ax.set_xscale("symlog", linthresh=self.linthresh, linscale=0.5)
            # Autoscaling pads symmetrically in the transformed space, which puts a stretch of
            # negative steps before 0; pad by a fraction of the linear stretch and a tenth of a
            # decade instead.
            ax.set_xlim(self.x[0] - 0.25 * self.linthresh if self.x[0] == 0 else self.x[0] / 1.3,
                        self.x[-1] * 1.3)
        if self.by_step and len(self.x) <= 16:
            ax.set_xticks(self.x)
            ax.set_xticklabels(self.labels)
            ax.xaxis.set_minor_locator(ticker.NullLocator())
        elif self.by_step:
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: step_label(v)))
        else:
            ax.set_xticks(self.x)
            ax.set_xticklabels(self.labels, rotation=45, ha="right")
        if self.by_step and len(self.x) > 8:
            plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
        if self.by_step and len(self.x) <= 16:
            self.thin_labels(ax)
        ax.set_xlabel(self.title)

    def thin_labels(self, ax):
        """Blanks tick labels that would touch the previous shown one (0, 128 and 256 sit close
        together on a log axis and printed as "0 128256"); the ticks themselves stay."""
        ax.figure.canvas.draw()  # settles the layout, so data -> pixel positions are final
        pixels = ax.transData.transform(np.column_stack([self.x, np.zeros_like(self.x)]))[:, 0]
        rotated = len(self.x) > 8
        font = float(plt.rcParams["xtick.labelsize"]) * ax.figure.dpi / 72  # points -> pixels
        labels, last = [], None
        for x, label in zip(pixels, self.labels):
            width = (0.75 if rotated else 0.62) * font * (1 if rotated else len(label)) + 6
            if last is None or x - last >= width:
                labels.append(label)
                last = x
            else:
                labels.append("")
        ax.set_xticklabels(labels, rotation=45 if rotated else 0, ha="right" if rotated else "center")


def layer_ticks(ax, axis, count):
    """Integer ticks for layer (or head) axes, thinned so labels never collide."""
    stride = max(1, int(math.ceil(count / 12)))
    positions = list(range(0, count, stride))
    labels = [str(p) for p in positions]
    if axis == "x":
        ax.set_xticks(positions)
        ax.set_xticklabels(labels)
    else:
        ax.set_yticks(positions)
        ax.set_yticklabels(labels)


def checkpoint_colours(count):
    cmap = plt.get_cmap(CHECKPOINT_CMAP)
    return [cmap(0.1 + 0.8 * i / max(count - 1, 1)) for i in range(count)]


def checkpoint_key(fig, ax, lines_axis, labels):
    """Legend for a few checkpoints, a labelled colour bar for many."""
    if len(labels) <= 8:  # outside the axes: the lines use the whole height
        ax.legend(title=lines_axis, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return
    cmap = colors.ListedColormap(checkpoint_colours(len(labels)))
    norm = colors.BoundaryNorm(np.arange(len(labels) + 1) - 0.5, len(labels))
    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02)
    stride = max(1, int(math.ceil(len(labels) / 10)))
    bar.set_ticks(range(0, len(labels), stride))
    bar.set_ticklabels(labels[::stride])
    bar.set_label(lines_axis)


def save(fig, out_dir, name):
    path = os.path.join(out_dir, name)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return name


def evenly_sampled(count, limit):
    if count <= limit:
        return list(range(count))
    return sorted(set(np.round(np.linspace(0, count - 1, limit)).astype(int).tolist()))


# ---- Figures ---------------------------------------------------------------------------------

def dots_readable(shape):
    """Dots marking α > ε help on small grids; on larger ones they hide the colours they mark."""
    return max(shape) <= 24


def plot_sink_heatmaps(scores, titles, eps, out_dir, name, suptitle):
    """Small multiples of the sink score (layer x head), one shared 0..1 colour scale; cells
    above eps are dotted so sink heads stand out even in print."""
    count = len(scores)
    layers, heads = scores[0].shape
    aspect = min(max(layers / heads, 0.5), 1.8)
    # Fewest empty slots; tall panels prefer more columns so the page stays landscape.
    choices = (6, 5, 4, 3) if aspect > 1.2 else (4, 5, 6, 3)
    cols = count if count <= 4 else min(choices, key=lambda c: math.ceil(count / c) * c - count)
    rows = int(math.ceil(count / cols))
    dotted = dots_readable(scores[0].shape)
    panel_w = 2.7 if count > 1 else 5.0
    size = (panel_w * cols + 1.2, panel_w * aspect * rows + 1.0)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, sharex=True, sharey=True,
                             layout="constrained")
    image = None
    for index, ax in enumerate(axes.flat):
        if index >= count:
            ax.axis("off")
            continue
        score = scores[index]
        image = ax.imshow(score, origin="lower", aspect="auto", cmap=SCORE_CMAP, vmin=0, vmax=1,
                          interpolation="nearest")
        if dotted:
            layer_idx, head_idx = np.nonzero(score > eps)
            ax.scatter(head_idx, layer_idx, s=max(4, 120 / max(layers, heads)), c="white",
                       edgecolors="black", linewidths=0.4)
        ax.set_title(titles[index])
        layer_ticks(ax, "x", heads)
        layer_ticks(ax, "y", layers)
        if index % cols == 0:
            ax.set_ylabel("layer")
        if index // cols == rows - 1 or index + cols >= count:
            ax.set_xlabel("head")
            ax.tick_params(labelbottom=True)
    bar = fig.colorbar(image, ax=axes, shrink=min(1.0, 0.5 + 0.25 * rows), pad=0.02)
    bar.set_label("sink score α  (mean attention to position 0)")
    bar.ax.axhline(eps, color="white", linewidth=2)
    bar.ax.text(-0.08, eps, "ε", transform=bar.ax.get_yaxis_transform(), ha="right", va="center",
                fontsize=11)
    fig.suptitle(f"{suptitle}  (dots: α > ε = {eps:g})" if dotted else
                 f"{suptitle}  (ε = {eps:g} marked on the colour bar)")
    return save(fig, out_dir, name)


def plot_sink_rate(sweep, axis, eps, out_dir):
    layers = sweep.sink_rate.shape[1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.3), layout="constrained",
                                      gridspec_kw={"width_ratios": [1.25, 1]})
    # A heatmap, not one line per checkpoint: checkpoints with the same sink rate in every layer
    # would draw identical lines, hiding each other.
    count = len(sweep.steps)
    image = left.imshow(sweep.sink_rate, aspect="auto", cmap=SCORE_CMAP, vmin=0, vmax=1,
                        interpolation="nearest")
    left.set_xlabel("layer")
    layer_ticks(left, "x", layers)
    shown = evenly_sampled(count, 16)
    left.set_yticks(shown)
    left.set_yticklabels([axis.labels[c] for c in shown])
    left.set_ylabel("step" if axis.by_step else "checkpoint")
    left.set_title("(a) sink rate by layer and checkpoint")
    bar = fig.colorbar(image, ax=left, pad=0.01)
    bar.set_label(f"sink rate (fraction of heads with α > {eps:g})")

    mean_rate = sweep.sink_rate.mean(axis=1)
    right.plot(axis.x, mean_rate, color="black", marker="o", linewidth=2, label="mean over layers")
    right.plot(axis.x, sweep.sink_rate.max(axis=1), color="tab:red", marker="s", markersize=4,
               linewidth=1.3, linestyle="--", label="most-sinking layer")
    right.set_ylim(-0.03, 1.03)
    right.set_ylabel("sink rate")
    right.set_title("(b) sink rate over training")
    right.grid(True, axis="y")
    right.legend(frameon=False, loc="best")
    axis.apply(right)
    fig.suptitle("Heads attending to position 0 (sink rate, docs/metrics.md §1)")
    return save(fig, out_dir, "sink_rate.png")


def plain_log_labels(ax, axis="y"):
    """Log-axis labels as plain numbers (3, 10, 30), never 9.75×10⁻¹; minor ticks get labels
    only when the axis spans less than a decade (otherwise it would have none to read)."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    target.set_major_formatter(plain)
    narrow = low > 0 and high / low < 10
    target.set_minor_formatter(plain if narrow else ticker.NullFormatter())


def positive_or_nan(values):
    values = np.asarray(values, dtype=float).copy()
    values[~(values > 0)] = np.nan  # log axes: hide zeros/negatives rather than crash
    return values


def plot_h_ratio(sweep, axis, out_dir):
    layers = sweep.h_ratio.shape[1] - 1
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.3), layout="constrained",
                                      gridspec_kw={"width_ratios": [1.25, 1]})
    for c, colour in enumerate(checkpoint_colours(len(sweep.steps))):
        left.plot(np.arange(layers + 1), positive_or_nan(sweep.h_ratio[c]), color=colour,
                  marker="o" if layers <= 24 else None, markersize=3.5, linewidth=1.6,
                  label=axis.labels[c])
    left.set_yscale("log")
    left.axhline(1, color="grey", linewidth=0.8, linestyle=":")
    left.set_xlabel("residual stream x_l (input of layer l; l = L is the final residual)")
    layer_ticks(left, "x", layers + 1)
    left.set_ylabel("h-ratio  ‖x_l[0]‖ / median ‖x_l[i≥1]‖")
    left.set_title("(a) position-0 norm ratio by layer")
    left.grid(True, axis="y", which="major")
    plain_log_labels(left)
    checkpoint_key(fig, left, "step" if axis.by_step else "checkpoint", axis.labels)

    after_two = min(2, layers)
    right.plot(axis.x, positive_or_nan(sweep.h_ratio.max(axis=1)), color="black", marker="o",
               linewidth=2, label="max over layers")
    right.plot(axis.x, positive_or_nan(sweep.h_ratio[:, after_two]), color="tab:blue",
               marker="s", markersize=4, linewidth=1.5, linestyle="--",
               label=f"after the first {after_two} layers (x_{after_two})")
    right.set_yscale("log")
    right.axhline(1, color="grey", linewidth=0.8, linestyle=":")
    right.set_ylabel("h-ratio (log scale)")
    right.set_title("(b) h-ratio over training")
    right.grid(True, axis="y", which="major")
    plain_log_labels(right)
    right.legend(frameon=False, loc="best")
    axis.apply(right)
    fig.suptitle("Norm asymmetry of the position-0 residual (docs/metrics.md §2)")
    return save(fig, out_dir, "h_ratio.png")


def share_labels(layers):
    return ["emb"] + [str(l) for l in range(layers)]


def plot_layer_share(sweep, axis, out_dir):
    count, width = sweep.layer_share.shape
    layers = width - 1
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained",
                                      gridspec_kw={"width_ratios": [1.3, 1]})
    image = left.imshow(sweep.layer_share.T, origin="lower", aspect="auto", cmap=SHARE_CMAP,
                        vmin=0, vmax=max(float(np.nanmax(sweep.layer_share)), 1e-9),
                        interpolation="nearest")
    if count <= 16 and width <= 16:  # few cells: print the numbers too
        for c in range(count):
            for i in range(width):
                value = sweep.layer_share[c, i]
                light = value < 0.6 * np.nanmax(sweep.layer_share)
                left.text(c, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                          color="white" if light else "black")
    stride = max(1, int(math.ceil(count / 14)))
    left.set_xticks(range(0, count, stride))
    left.set_xticklabels(axis.labels[::stride], rotation=45 if count > 10 else 0,
                         ha="right" if count > 10 else "center")
    left.set_xlabel("training step (one column per checkpoint)" if axis.by_step else "checkpoint")
    stride = max(1, int(math.ceil(layers / 14)))
    rows = [0] + [1 + l for l in range(0, layers, stride)]  # 'emb', then round layer numbers
    left.set_yticks(rows)
    left.set_yticklabels([share_labels(layers)[r] for r in rows])
    left.set_ylabel("source layer ('emb' = embedding)")
    left.set_title("(a) layer share of the sink circuit")
    bar = fig.colorbar(image, ax=left, pad=0.02)
    bar.set_label("share of α-weighted positive attribution")

    right.plot(axis.x, sweep.first2_share, color="black", marker="o", linewidth=2,
               label="layers 0 and 1 (first2_share)")
    right.axhline(2 / (layers + 1), color="grey", linestyle=":", linewidth=1,
                  label=f"uniform over emb + {layers} layers")
    right.set_ylim(-0.03, 1.03)
    right.set_ylabel("share of the sink circuit")
    right.set_title("(b) concentration in the first two layers")
    right.grid(True, axis="y")
    right.legend(frameon=False, loc="best")
    axis.apply(right)
    fig.suptitle("Where the position-0 sink circuit is built (layer-concentration profile, "
                 "docs/metrics.md §5)")
    return save(fig, out_dir, "layer_share.png")


def plot_convergence(sweep, axis, out_dir):
    fig, ax = plt.subplots(figsize=(8, 4.3), layout="constrained")
    x = axis.x[1:]  # tv[i] compares checkpoint i with i + 1: plotted at the later one
    tv = sweep.tv
    profile = "causal layer share" if sweep.convergence_profile == "causal" else "layer share"
    ax.plot(x, tv, color="black", marker="o", linewidth=2, label=f"TV({profile}, previous)")
    if sweep.threshold is not None:
        ax.plot(x, sweep.threshold, color="tab:red", linestyle="--", marker="_", linewidth=1.3,
                label=f"threshold: max(τ·gap in doublings, noise floor), τ = {sweep.tau:g}")
    else:
        ax.axhline(sweep.tau, color="tab:red", linestyle="--", linewidth=1.3,
                   label=f"τ = {sweep.tau:g}")
    positive = tv[tv > 0]
    log_y = bool(len(positive) and positive.max() / max(positive.min(), 1e-12) > 30)
    if log_y:
        ax.set_yscale("log")  # the tail below tau matters as much as the early jumps
    else:
        ax.set_ylim(0, max(float(np.nanmax(tv)) if len(tv) else 0, sweep.tau) * 1.15)
    if sweep.outcome is not None:
        if sweep.converged_step >= 0:
            where = axis.x[list(sweep.steps).index(sweep.converged_step)]
            ax.axvline(where, color="tab:green", linewidth=2, alpha=0.8,
                       label=f"converged at step {step_label(sweep.converged_step)}")
        title = f"{profile[0].upper() + profile[1:]} profile: {sweep.outcome}"
    elif sweep.convergence_step >= 0:
        where = (axis.x[list(sweep.steps).index(sweep.convergence_step)]
                 if sweep.convergence_step in sweep.steps else float(sweep.convergence_step))
        ax.axvline(where, color="tab:green", linewidth=2, alpha=0.8,
                   label=f"converged at step {step_label(sweep.convergence_step)}")
        title = f"Layer-share profile converged at step {sweep.convergence_step}"
    else:
        title = "Layer-share profile not converged by the last checkpoint"
    axis.apply(ax)
    if log_y:
        plain_log_labels(ax)
    ax.set_ylabel("total variation distance")
    ax.grid(True, axis="y", which="major")
    ax.legend(frameon=False, loc="best")
    ax.set_title(title + ("  (docs/metrics.md 1.2)" if sweep.outcome else "  (docs/metrics.md §6)"))
    return save(fig, out_dir, "convergence.png")


# ---- Single analysis figures -----------------------------------------------------------------

def plot_single_heatmap(a, out_dir):
    layers, heads = a.sink_score.shape
    height = min(max(3.8, 0.22 * layers + 1.6), 11)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, height), layout="constrained",
                                      sharey=True, gridspec_kw={"width_ratios": [3, 1]})
    image = left.imshow(a.sink_score, origin="lower", aspect="auto", cmap=SCORE_CMAP, vmin=0,
                        vmax=1, interpolation="nearest")
    if dots_readable(a.sink_score.shape):
        layer_idx, head_idx = np.nonzero(a.sink_score > a.eps)
        left.scatter(head_idx, layer_idx, s=max(4, 120 / max(layers, heads)), c="white",
                     edgecolors="black", linewidths=0.4)
    layer_ticks(left, "x", heads)
    layer_ticks(left, "y", layers)
    left.set_xlabel("head")
    left.set_ylabel("layer")
    left.set_title(f"(a) sink score per head (dots: α > ε = {a.eps:g})"
                   if dots_readable(a.sink_score.shape) else "(a) sink score per head")
    bar = fig.colorbar(image, ax=left, pad=0.02)
    bar.set_label("sink score α")
    bar.ax.axhline(a.eps, color="white", linewidth=2)
    bar.ax.text(-0.08, a.eps, "ε", transform=bar.ax.get_yaxis_transform(), ha="right",
                va="center", fontsize=11)
    right.barh(np.arange(layers), a.sink_rate, color="tab:red", height=0.8)
    right.set_xlim(0, 1)
    right.set_xlabel("sink rate")
    right.set_title("(b) fraction of sink heads")
    right.grid(True, axis="x")
    fig.suptitle(f"Attention to position 0 — {checkpoint_title(a)}")
    return save(fig, out_dir, "sink_score.png")


def plot_learned_sinks(a, out_dir):
    """The learned sink next to the position-0 sink, per head (models with learned sinks)."""
    layers, heads = a.sink_score.shape
    height = min(max(3.8, 0.22 * layers + 1.6), 11)
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, height), layout="constrained",
                                              gridspec_kw={"width_ratios": [3, 3, 2.4]})
    for ax, values, title in ((left, a.sink_score, "(a) attention to position 0, α"),
                              (middle, a.learned_sink_mass, "(b) mass on the learned sink, σ")):
        image = ax.imshow(values, origin="lower", aspect="auto", cmap=SCORE_CMAP, vmin=0, vmax=1,
                          interpolation="nearest")
        layer_ticks(ax, "x", heads)
        layer_ticks(ax, "y", layers)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title)
    fig.colorbar(image, ax=middle, pad=0.02).set_label("mean softmax weight")
    right.scatter(a.learned_sink_mass.ravel(), a.sink_score.ravel(), s=14, color="tab:blue",
                  edgecolors="black", linewidths=0.3)
    right.set_xlim(0, 1)
    right.set_ylim(0, 1)
    right.axhline(a.eps, color="grey", linewidth=0.8, linestyle=":")
    right.text(0.99, a.eps, " ε", ha="right", va="bottom", color="grey")
    right.set_xlabel("learned sink mass σ")
    right.set_ylabel("sink score α (position 0)")
    right.set_title("(c) one dot per head")
    right.grid(True)
    fig.suptitle(f"Learned sinks and the position-0 sink — {checkpoint_title(a)}")
    return save(fig, out_dir, "learned_sink.png")


def plot_single_h_ratio(a, out_dir):
    layers = len(a.h_ratio) - 1
    fig, ax = plt.subplots(figsize=(8, 4.3), layout="constrained")
    ax.plot(np.arange(layers + 1), positive_or_nan(a.h_ratio), color="black", marker="o",
            linewidth=2)
    ax.set_yscale("log")
    ax.axhline(1, color="grey", linewidth=0.8, linestyle=":")
    layer_ticks(ax, "x", layers + 1)
    ax.set_xlabel("residual stream x_l (input of layer l; l = L is the final residual)")
    ax.set_ylabel("h-ratio  ‖x_l[0]‖ / median ‖x_l[i≥1]‖")
    ax.grid(True, axis="y")
    plain_log_labels(ax)
    ax.set_title(f"Position-0 norm ratio by layer — {checkpoint_title(a)}")
    return save(fig, out_dir, "h_ratio.png")


def plot_single_layer_share(a, out_dir):
    width = len(a.layer_share)
    layers = width - 1
    fig, ax = plt.subplots(figsize=(max(7, 0.28 * width + 3), 4.3), layout="constrained")
    bar_colours = ["tab:grey"] + ["tab:blue"] * layers
    for i in (1, 2):
        if i < width:
            bar_colours[i] = "tab:orange"
    ax.bar(np.arange(width), a.layer_share, color=bar_colours)
    stride = max(1, int(math.ceil(layers / 14)))
    bars = [0] + [1 + l for l in range(0, layers, stride)]
    ax.set_xticks(bars)
    ax.set_xticklabels([share_labels(layers)[b] for b in bars])
    ax.set_xlabel("source ('emb' = embedding, then layer index)")
    ax.set_ylabel("share of α-weighted positive attribution")
    ax.set_ylim(0, max(float(np.nanmax(a.layer_share)), 1e-9) * 1.18)
    ax.grid(True, axis="y")
    ax.text(0.99, 0.97, f"first two layers (orange): {a.first2_share:.2f}\n"
            f"peak layer: {a.peak_layer}    entropy: {a.entropy:.2f} nats",
            transform=ax.transAxes, ha="right", va="top", fontsize=10,
            bbox={"facecolor": "white", "edgecolor": "lightgrey", "boxstyle": "round"})
    ax.set_title(f"Layer-concentration profile — {checkpoint_title(a)}")
    return save(fig, out_dir, "layer_share.png")


def residual_name(index, layers):
    return "final residual" if index == layers else f"entering layer {index}"


def checkpoint_title(a):
    return f"step {a.step}" if a.step >= 0 else a.name


# ---- Circuit edges ---------------------------------------------------------------------------

def plot_circuit_graph(edges, a, out_dir):
    """Layered drawing of the strongest edges: columns are layers (embedding at the left),
    attention heads above the midline, experts/MLPs below; line width ~ edge weight."""
    if not edges:
        return None
    layers = a.sink_score.shape[0]
    nodes = {}  # (kind, layer, slot) -> (x, y)
    columns = {}
    for e in edges:
        source = (e["kind"], e["source_layer"], e["slot"])
        target = ("head", e["target_layer"], e["target_head"])
        columns.setdefault(e["source_layer"], set()).add(source)
        columns.setdefault(e["target_layer"], set()).add(target)
    used = sorted(columns)
    heads_total = a.sink_score.shape[1]
    lower_slots = max([m[2] for col in columns.values() for m in col if m[0] not in ("head", "embed")]
                      + [0]) + 1
    # Columns are evenly spaced in layer order (not at their layer number): a circuit from
    # layer 0 into layers 40-47 would otherwise crowd into one corner. Rows are fixed per head
    # (and per expert) index, so head h sits at the same height in every column.
    for column, layer in enumerate(used):
        for member in columns[layer]:
            kind, _, slot = member
            if kind == "embed":
                nodes[member] = (column, 0.775)
            elif kind == "head":
                nodes[member] = (column, 0.55 + 0.45 * (slot + 0.5) / heads_total)
            else:  # experts, dense MLP, shared expert over the lower band
                nodes[member] = (column, 0.45 * (slot + 0.5) / lower_slots)
    fig, ax = plt.subplots(figsize=(min(4 + 1.1 * len(used), 16), 5.5), layout="constrained")
    heaviest = max(e["weight"] for e in edges)
    for index, e in enumerate(sorted(edges, key=lambda e: e["weight"])):
        x0, y0 = nodes[(e["kind"], e["source_layer"], e["slot"])]
        x1, y1 = nodes[("head", e["target_layer"], e["target_head"])]
        share = e["weight"] / heaviest
        # An edge that skips columns bends further out, so it does not run through the nodes of
        # the columns it passes (and never reads as an edge from one of them).
        skip = max(0, abs(x1 - x0) - 1)
        rad = (0.12 + 0.18 * skip) * (1 if index % 2 == 0 else -1)
        arrow = {"arrowstyle": "-|>", "color": plt.get_cmap("Reds")(0.35 + 0.6 * share),
                 "linewidth": 0.8 + 4.5 * share, "shrinkA": 9, "shrinkB": 9,
                 "connectionstyle": f"arc3,rad={rad:.2f}", "alpha": 0.9}
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=arrow)
    alpha_norm = colors.Normalize(0, 1)
    for (kind, layer, slot), (x, y) in nodes.items():
        if kind == "head":
            face = plt.get_cmap(SCORE_CMAP)(alpha_norm(a.sink_score[layer, slot]))
            marker, label = "o", f"H{slot}"
        elif kind == "embed":
            face, marker, label = "lightgrey", "s", "emb"
        else:
            face, marker = "lightsteelblue", "D"
            label = {"mlp": "MLP", "shared_expert": "SE"}.get(kind, f"E{slot}")
        ax.scatter([x], [y], s=260, marker=marker, color=face, edgecolors="black", zorder=3)
        # Labels sit on a white patch: arrows leaving a busy source node would hide them.
        ax.text(x + 0.1, y + 0.035, label, va="bottom", ha="left", fontsize=9, zorder=5,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1})
    ax.axhline(0.5, color="lightgrey", linewidth=0.8, zorder=0)
    ax.set_xticks(range(len(used)))
    ax.set_xticklabels(["emb" if l < 0 else f"L{l}" for l in used])
    ax.set_xlim(-0.5, len(used) - 0.2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_yticks([0.22, 0.77])
    ax.set_yticklabels(["experts / MLP", "attention heads"])
    ax.spines["left"].set_visible(False)
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel("layer (only layers with a drawn edge)" if len(used) < layers + 1 else "layer")
    bar = fig.colorbar(cm.ScalarMappable(norm=alpha_norm, cmap=SCORE_CMAP), ax=ax, pad=0.01,
                       shrink=0.8)
    bar.set_label("head sink score α")
    from matplotlib.lines import Line2D
    legend = [Line2D([], [], marker="o", linestyle="", markersize=10, markeredgecolor="black",
                     markerfacecolor=plt.get_cmap(SCORE_CMAP)(0.8), label="attention head (fill: α)"),
              Line2D([], [], marker="s", linestyle="", markersize=10, markeredgecolor="black",
                     markerfacecolor="lightgrey", label="embedding"),
              Line2D([], [], marker="D", linestyle="", markersize=9, markeredgecolor="black",
                     markerfacecolor="lightsteelblue", label="expert / MLP / shared expert"),
              Line2D([], [], color=plt.get_cmap("Reds")(0.95), linewidth=4,
                     label="edge: darker and wider = more weight")]
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(0, -0.12), ncol=4, frameon=False,
              fontsize=8)
    ax.set_title(f"Strongest {len(edges)} sink-circuit edges — {checkpoint_title(a)}\n"
                 "(arrow width ∝ α(target) × attribution)")
    return save(fig, out_dir, "circuit_graph.png")


def write_edges_csv(edges, out_dir):
    path = os.path.join(out_dir, "edges.csv")
    with open(path, "w", encoding="utf-8") as f:
        f.write("rank,source,kind,target,attribution,target_alpha,weight\n")
        for rank, e in enumerate(edges, 1):
            f.write(f"{rank},{e['source']},{e['kind']},{e['target']},{e['attribution']:.6g},"
                    f"{e['alpha']:.6g},{e['weight']:.6g}\n")
    return "edges.csv"


# ---- Pages -----------------------------------------------------------------------------------

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1180px;
       margin: 2em auto; padding: 0 1.2em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #555; } figure { margin: 1.2em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.95em; margin-top: 0.3em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.93em; }
th, td { border: 1px solid #ddd; padding: 0.28em 0.7em; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
.warn { background: #fff4e5; border-left: 4px solid #f0a020; padding: 0.6em 1em; }
.keys { display: grid; grid-template-columns: repeat(auto-fit, minmax(190px, 1fr)); gap: 0.6em; }
.key { background: #f7f7f9; padding: 0.6em 0.8em; border-radius: 6px; }
.key b { display: block; font-size: 1.3em; }
"""


class Page:
    """Collects sections once and renders them both as HTML and as Markdown."""

    def __init__(self, title, subtitle):
        self.title, self.subtitle = title, subtitle
        self.html, self.md = [], [f"# {title}", "", subtitle, ""]

    def keys(self, items):
        self.html.append('<div class="keys">' + "".join(
            f'<div class="key">{html.escape(k)}<b>{html.escape(v)}</b></div>' for k, v in items)
            + "</div>")
        self.md += [f"- **{k}**: {v}" for k, v in items] + [""]

    def warning(self, text):
        self.html.append(f'<p class="warn">{html.escape(text)}</p>')
        self.md += [f"> **Warning:** {text}", ""]

    def heading(self, text):
        self.html.append(f"<h2>{html.escape(text)}</h2>")
        self.md += [f"## {text}", ""]

    def text(self, text):
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md += [text, ""]

    def text_with_link(self, before, label, href, after=""):
        self.html.append(f"<p>{html.escape(before)}<a href=\"{html.escape(href)}\">"
                         f"{html.escape(label)}</a>{html.escape(after)}</p>")
        self.md += [f"{before}[{label}]({href}){after}", ""]

    def figure(self, image, caption):
        if image is None:
            return
        self.html.append(f'<figure><img src="{html.escape(image)}" alt="{html.escape(caption)}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        self.md += [f"![{os.path.splitext(image)[0]}]({image})", "", f"*{caption}*", ""]

    def table(self, header, rows, left_columns=()):
        cells = lambda row, tag: "".join(
            f'<{tag}{" class=l" if i in left_columns else ""}>{html.escape(str(v))}</{tag}>'
            for i, v in enumerate(row))
        self.html.append("<table><tr>" + cells(header, "th") + "</tr>"
                         + "".join("<tr>" + cells(r, "td") + "</tr>" for r in rows) + "</table>")
        self.md += ["| " + " | ".join(header) + " |",
                    "|" + "|".join("---" if i in left_columns else "---:"
                                   for i in range(len(header))) + "|"]
        self.md += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows] + [""]

    def write(self, out_dir):
        body = "\n".join(self.html)
        page = (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
                f"<title>{html.escape(self.title)}</title><style>{CSS}</style></head><body>\n"
                f"<h1>{html.escape(self.title)}</h1>"
                f"<p class=meta>{html.escape(self.subtitle)}</p>\n"
                f"{body}\n</body></html>\n")
        with open(os.path.join(out_dir, "index.html"), "w", encoding="utf-8") as f:
            f.write(page)
        with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
            f.write("\n".join(self.md).rstrip() + "\n")


def model_keys(a):
    at = a.attrs
    get = lambda k: at.get(k, "?")
    return [
        ("model", f"{as_text(get('model_type'))}: {get('num_layers')} layers, "
                  f"{get('num_heads')} heads ({get('num_kv_heads')} KV), "
                  f"{get('num_experts')} experts top-{get('top_k')}"),
        ("probes", f"{get('num_probes')} × {get('seq_len')} tokens"),
        ("sink threshold ε", f"{float(get('eps')):g}"),
    ]


def column_formatter(values):
    """One number format for a whole table column, so decimals line up: fixed point with three
    decimals unless the values are tiny or huge."""
    finite = [abs(v) for v in values if np.isfinite(v) and v != 0]
    largest = max(finite, default=1.0)
    if 0.01 <= largest < 1e5:
        return lambda v: f"{v:.3f}"
    return lambda v: f"{v:.3e}"


def edges_section(page, edges, a, out_dir):
    has_sink = bool(np.nanmax(a.sink_score) > a.eps)
    page.heading(f"Strongest circuit edges ({checkpoint_title(a)})" if has_sink else
                 f"Strongest attribution edges ({checkpoint_title(a)}; no sink head)")
    if not has_sink:
        page.warning(f"No head of this checkpoint has a sink score above ε = {a.eps:g}: there is no "
                     "sink circuit to explain, and the edges below only rank attributions into "
                     "heads that attend weakly to position 0.")
    if not edges:
        page.text("No edge with a positive attribution into a head with a non-zero sink score.")
        return
    page.text_with_link(
        "Ranked by α(target) × attribution, the weight each edge carries in the "
        "layer-share profile (docs/metrics.md §4-5). Attribution is in sink-logit units: how "
        "much more the source's write at position 0 raises the target head's logit for key "
        f"0 than its typical write elsewhere. Top {len(edges)}, also in ", "edges.csv",
        "edges.csv", ".")
    attribution = column_formatter([e["attribution"] for e in edges])
    weight = column_formatter([e["weight"] for e in edges])
    rows = [(rank, e["source"], "→ " + e["target"], attribution(e["attribution"]),
             f"{e['alpha']:.3f}", weight(e["weight"])) for rank, e in enumerate(edges, 1)]
    page.table(["#", "source", "target head", "attribution", "target α", "weight"], rows,
               left_columns=(1, 2))
    drawn = edges[:GRAPH_EDGES]
    page.figure(plot_circuit_graph(drawn, a, out_dir),
                f"The strongest {len(drawn)} edges as a layered graph: columns are layers, heads "
                "above the line, experts/MLPs below; heads coloured by their own sink score.")
    write_edges_csv(edges, out_dir)


def report_sweep(sweep, out_dir, top):
    axis = StepAxis(sweep.steps, sweep.names)
    last = len(sweep.steps) - 1
    last_file = sweep.checkpoint_file(last)
    last_analysis = Analysis(last_file) if last_file else None
    eps = last_analysis.eps if last_analysis else 0.3
    if last_analysis is None:
        first_file = next((sweep.checkpoint_file(i) for i in range(last + 1)
                           if sweep.checkpoint_file(i)), None)
        eps = Analysis(first_file).eps if first_file else 0.3

    layers, heads = sweep.sink_score.shape[1:]
    page = Page("sinkscope report: position-0 sink circuit across training",
                f"{sweep.path} · {len(sweep.steps)} checkpoints · sinkscope {sweep.version}")
    keys = model_keys(last_analysis) if last_analysis else [
        ("model", f"{layers} layers, {heads} heads")]
    conv = (f"{sweep.outcome} ({sweep.convergence_profile} profile)" if sweep.outcome else
            (f"step {sweep.convergence_step} (contract 1.0 rule)" if sweep.convergence_step >= 0
             else "not converged (contract 1.0 rule)"))
    keys += [("steps", f"{step_label(sweep.steps[0])} … {step_label(sweep.steps[-1])}"),
             ("convergence (τ = " + f"{sweep.tau:g})", conv),
             ("first-two-layer share (last)", f"{sweep.first2_share[-1]:.2f}"),
             ("mean sink rate (last)", f"{sweep.sink_rate[-1].mean():.2f}")]
    page.keys(keys)
    if sweep.failed:
        page.warning(f"{len(sweep.failed)} checkpoint(s) had no valid analysis file and are not "
                     f"shown: {', '.join(sweep.failed)}")

    page.heading("Sink heads")
    shown = evenly_sampled(len(sweep.steps), MAX_PANELS)
    note = "" if len(shown) == len(sweep.steps) else \
        f" ({len(shown)} of {len(sweep.steps)} checkpoints, evenly spaced)"
    page.figure(plot_sink_heatmaps([sweep.sink_score[c] for c in shown],
                                   [f"step {step_label(sweep.steps[c])}" if axis.by_step
                                    else sweep.names[c] for c in shown],
                                   eps, out_dir, "sink_score_grid.png",
                                   "Sink score per head across training" + note),
                "Sink score α (mean attention from every query to position 0) of each head, one "
                "panel per checkpoint, shared 0-1 colour scale; "
                + (f"dots mark α > ε = {eps:g}." if dots_readable((layers, heads)) else
                   f"ε = {eps:g} is marked on the colour bar."))
    page.figure(plot_sink_rate(sweep, axis, eps, out_dir),
                "(a) Fraction of each layer's heads whose sink score exceeds ε; "
                "(b) its mean over layers, and the most-sinking layer, over training.")

    page.heading("Position-0 residual")
    page.figure(plot_h_ratio(sweep, axis, out_dir),
                "(a) Norm of the position-0 residual over the median norm of the other positions, "
                "entering each layer (log scale); (b) the largest ratio and the ratio after the "
                "first two layers over training.")

    page.heading("Where the circuit is built")
    page.figure(plot_layer_share(sweep, axis, out_dir),
                "(a) Share of the sink-building attribution (α-weighted, positive part) "
                "contributed by the embedding and by each layer's heads, experts and MLP; (b) the "
                "share of layers 0 and 1 against the uniform baseline.")
    if sweep.causal_layer_share is not None:
        labels = [f"step {step_label(s)}" if axis.by_step else n
                  for s, n in zip(sweep.steps, sweep.names)]
        causation_section(page, sweep.layer_share, sweep.causal_layer_share, labels, out_dir)
    if len(sweep.steps) >= 2:
        page.figure(plot_convergence(sweep, axis, out_dir),
                    ("Total-variation distance between consecutive profiles and the threshold "
                     "of each pair (τ per doubling of the step, or the bootstrap noise floor). "
                     "Outcomes: 'converged at step S' (a sink from S on, the profile moved "
                     "before S and at least two pairs after S stay under the threshold), 'not "
                     "converged', 'no sink', 'too few checkpoints' (docs/metrics.md 1.2)."
                     if sweep.outcome else
                     "Total-variation distance between consecutive layer-share profiles. The "
                     "profile has converged at the first step after which every distance stays "
                     "≤ τ."))
    else:
        page.text("One checkpoint only: no convergence curve.")

    page.heading("Per checkpoint")
    page.table(["step", "checkpoint", "mean sink rate", "max α", "max h-ratio", "first2_share",
                "peak layer"],
               [(int(s), n, f"{sweep.sink_rate[c].mean():.3f}",
                 f"{np.nanmax(sweep.sink_score[c]):.3f}", f"{np.nanmax(sweep.h_ratio[c]):.1f}",
                 f"{sweep.first2_share[c]:.3f}", int(np.argmax(sweep.layer_share[c, 1:])))
                for c, (s, n) in enumerate(zip(sweep.steps, sweep.names))],
               left_columns=(1,))

    if last_analysis is not None:
        edges_section(page, strongest_edges(last_analysis, top), last_analysis, out_dir)
        ablation_section(page, last_analysis, out_dir, top)
    else:
        page.heading("Strongest circuit edges")
        page.text(f"Not shown: the last checkpoint's analysis file "
                  f"(checkpoints/{sweep.names[last]}.h5) is not next to {sweep.path}.")
    page.write(out_dir)


def report_analysis(a, out_dir, top):
    page = Page("sinkscope report: position-0 sink circuit",
                f"{a.path} · {checkpoint_title(a)} · sinkscope "
                f"{as_text(a.attrs.get('sinkscope_version', '?'))}")
    page.keys(model_keys(a) + [
        ("mean sink rate", f"{a.sink_rate.mean():.2f}"),
        ("max h-ratio", f"{np.nanmax(a.h_ratio):.1f} "
                        f"({residual_name(int(np.nanargmax(a.h_ratio)), len(a.h_ratio) - 1)})"),
        ("first-two-layer share", f"{a.first2_share:.2f}"),
        ("peak layer · entropy", f"{a.peak_layer} · {a.entropy:.2f} nats"),
    ])
    page.heading("Sink heads")
    page.figure(plot_single_heatmap(a, out_dir),
                "(a) Sink score α of every head (mean attention to position 0); "
                + ("dots mark α > ε. " if dots_readable(a.sink_score.shape) else
                   "ε is marked on the colour bar. ") +
                "(b) Fraction of each layer's heads above ε (sink rate).")
    if a.learned_sink_mass is not None:
        page.heading("Learned sinks")
        both = int(np.sum((a.sink_score > a.eps) & (a.learned_sink_mass > a.eps)))
        page.figure(plot_learned_sinks(a, out_dir),
                    "Every head of this model has a learned sink logit in its softmax "
                    "(docs/metrics.md, contract 1.4). (a) Attention to position 0 with the sink "
                    "in the denominator, (b) the mass on the learned sink itself, both averaged "
                    "over the queries that can see position 0; (c) the two per head: "
                    f"{both} of {a.sink_score.size} heads put more than ε on both.")
    page.heading("Position-0 residual")
    page.figure(plot_single_h_ratio(a, out_dir),
                "Norm of the position-0 residual over the median norm of the other positions, "
                "entering each layer (log scale).")
    page.heading("Where the circuit is built")
    page.figure(plot_single_layer_share(a, out_dir),
                "Share of the sink-building attribution contributed by the embedding and by each "
                "layer; layers 0 and 1 in orange.")
    if a.causal_layer_share is not None:
        causation_section(page, a.layer_share[None, :], a.causal_layer_share[None, :],
                          [checkpoint_title(a)], out_dir)
    edges_section(page, strongest_edges(a, top), a, out_dir)
    ablation_section(page, a, out_dir, top)
    page.write(out_dir)

# ---- Attribution next to causation (contract 1.2) ---------------------------------------------

def spearman(x, y):
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def plot_profiles(attribution, causal, labels, out_dir):
    count, width = attribution.shape
    shown = evenly_sampled(count, MAX_PANELS)
    fig, axes = plt.subplots(1, len(shown), figsize=(min(3.2 * len(shown), 18), 3.6),
                             layout="constrained", squeeze=False, sharey=True)
    x = np.arange(width)
    for ax, c in zip(axes[0], shown):
        ax.bar(x - 0.2, attribution[c], 0.4, color="tab:blue", label="attribution (layer_share)")
        ax.bar(x + 0.2, causal[c], 0.4, color="tab:orange", label="causal (causal_layer_share)")
        ax.set_xticks(x)
        ax.set_xticklabels(share_labels(width - 1), fontsize=7)
        ax.set_title(f"{labels[c]}\nSpearman ρ = {spearman(attribution[c], causal[c]):.2f}",
                     fontsize=9)
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("share")
    axes[0][0].legend(frameon=False, fontsize=7, loc="upper right")
    fig.suptitle("Attribution next to causation: where the sink circuit is built")
    return save(fig, out_dir, "attribution_vs_causal.png")


def causation_section(page, attribution, causal, labels, out_dir):
    page.heading("Attribution next to causation")
    page.figure(plot_profiles(attribution, causal, labels, out_dir),
                "Blue: the attribution profile (share of α-weighted positive direct attribution, "
                "docs/metrics.md §5). Orange: the causal profile (share of the drop in the "
                "sink-weighted sink score when the embedding or a whole layer is mean-ablated at "
                "position 0, contract 1.2). ρ: Spearman rank correlation of the two over the "
                "embedding and the layers.")
    page.table(["checkpoint", "attribution peak", "causal peak", "attribution first2",
                "causal first2", "Spearman ρ"],
               [(labels[c], int(np.argmax(attribution[c, 1:])), int(np.argmax(causal[c, 1:])),
                 f"{attribution[c, 1:3].sum():.3f}", f"{causal[c, 1:3].sum():.3f}",
                 f"{spearman(attribution[c], causal[c]):.2f}")
                for c in range(attribution.shape[0])],
               left_columns=(0,))


COMPONENT_KINDS = {0: "H", 1: "E", 2: "emb", 3: "MLP", 4: "SE"}


def component_label(layer, kind, index):
    if kind == 2:
        return "emb"
    if kind == 3:
        return f"L{layer}.MLP"
    return f"L{layer}.{COMPONENT_KINDS.get(kind, '?')}{index}"


def ablation_section(page, a, out_dir, top):
    """The causal check (--ablate): how much each mean-ablated component moves the sink scores."""
    if a.ablation_components is None:
        return
    page.heading(f"Ablations ({checkpoint_title(a)})")
    components, delta = a.ablation_components, a.ablation_delta
    if len(components) == 0:
        page.text("The ablation set was empty.")
        return
    flat = delta.reshape(len(components), -1)
    drop = flat.min(axis=1)  # the largest fall of any head's sink score
    order = np.argsort(drop)[:top]
    heads = delta.shape[2]
    fmt = column_formatter(list(drop[order]) + list(flat.mean(axis=1)[order]))
    rows = []
    for k in order:
        where = int(np.argmin(flat[k]))
        rows.append((component_label(*components[k]), fmt(drop[k]),
                     f"L{where // heads}.H{where % heads}", fmt(flat[k].mean())))
    page.text(f"Each component's write at position 0 replaced by its mean elsewhere and the layers "
              f"after it rerun (docs/metrics.md §4, causal version); {len(components)} components, "
              f"the {len(order)} with the largest drop of any head's sink score α first.")
    page.table(["component", "largest Δα", "at head", "mean Δα over heads"], rows,
               left_columns=(0, 2))
    page.figure(plot_ablations(components[order], drop[order], out_dir),
                "Largest fall of any head's sink score when the component is ablated "
                "(negative = the component builds the sink).")


def plot_ablations(components, drops, out_dir):
    labels = [component_label(*c) for c in components]
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.28 * len(labels)), layout="constrained")
    y = np.arange(len(labels))
    ax.barh(y, drops, color=["tab:red" if d < 0 else "tab:grey" for d in drops])
    ax.set_yticks(y)
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("largest Δ sink score α (ablated − clean)")
    ax.set_title("Mean-ablation at position 0")
    return save(fig, out_dir, "ablations.png")


def load_input(path):
    """(kind, object) for a sweep folder, a sweep.h5 or an analysis file."""
    if os.path.isdir(path):
        sweep_file = os.path.join(path, "sweep.h5")
        if not os.path.isfile(sweep_file):
            raise InputProblem(f"{path}: a folder without sweep.h5 (give a sweep folder, "
                               "a sweep.h5 or an analysis .h5)")
        return "sweep", Sweep(sweep_file)
    with open_h5(path) as f:
        is_sweep = "steps" in f and "layer_share" in f
        is_analysis = "attention/sink_score" in f
    if is_sweep:
        return "sweep", Sweep(path)
    if is_analysis:
        return "analysis", Analysis(path)
    raise InputProblem(f"{path}: neither a sinkscope sweep nor an analysis file")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors too: one line, exit status 1 (docs/schema.md)
        fail(f"{message} (see --help)")


def main(argv=None):
    parser = Parser(prog=PROG, description="Figures and a summary page of sinkscope output.")
    parser.add_argument("input", help="sweep folder, sweep.h5, or one analysis .h5 file")
    parser.add_argument("--out", required=True, help="output folder (created if needed)")
    parser.add_argument("--top", type=int, default=20, help="circuit edges to list (default 20)")
    args = parser.parse_args(argv)
    if args.top < 1:
        fail("--top must be at least 1")
    try:
        kind, data = load_input(args.input)
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as error:
            raise InputProblem(f"cannot create output folder {args.out}: "
                               f"{error.strerror or error}") from None
        if kind == "sweep":
            report_sweep(data, args.out, args.top)
        else:
            report_analysis(data, args.out, args.top)
    except InputProblem as problem:
        fail(str(problem))
    except OSError as error:  # e.g. an unwritable --out
        fail(f"{error.filename or args.out}: {error.strerror or error}")
    print(os.path.join(args.out, "index.html"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
