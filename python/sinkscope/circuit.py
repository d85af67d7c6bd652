"""The circuit's strongest edges (docs/metrics.md sections 4-5), shared by the report and the API."""

import numpy as np


def strongest_edges(a, top):
    """The `top` edges source -> target head carrying the most sink-building weight.

    An edge's weight is alpha(target) * max(attr, 0): the amount it contributes to the layer-share
    profile (docs/metrics.md §5), so edges into heads that do not sink rank low however large their
    attribution. Sources: embedding, heads, experts and dense MLPs of earlier layers."""
    alpha = a.sink_score
    layers, heads = alpha.shape
    earlier = np.arange(layers)[:, None] > np.arange(layers)[None, :]  # [target, source]
    candidates = []

    def collect(kind, attr, weight):
        flat = weight.ravel()
        keep = min(top, flat.size)
        if keep == 0:
            return
        best = np.argpartition(-flat, keep - 1)[:keep]
        for index in best:
            if not flat[index] > 0:
                continue
            where = np.unravel_index(index, weight.shape)
            candidates.append((float(flat[index]), kind, where, float(attr[where])))

    collect("embed", a.attr_embed, alpha * np.maximum(a.attr_embed, 0))
    mask = earlier[:, None, :, None]
    collect("head", a.attr_head, alpha[:, :, None, None] * np.maximum(a.attr_head, 0) * mask)
    collect("expert", a.attr_expert, alpha[:, :, None, None] * np.maximum(a.attr_expert, 0) * mask)
    collect("mlp", a.attr_mlp,
            alpha[:, :, None] * np.maximum(a.attr_mlp, 0) * earlier[:, None, :])
    shared = getattr(a, "attr_shared_expert", None)
    if shared is not None:
        collect("shared_expert", shared,
                alpha[:, :, None] * np.maximum(shared, 0) * earlier[:, None, :])
    candidates.sort(key=lambda c: -c[0])

    edges = []
    for weight, kind, where, value in candidates[:top]:
        target_layer, target_head = int(where[0]), int(where[1])
        if kind == "embed":
            source, source_layer, slot = "emb", -1, 0
        elif kind == "mlp":
            source_layer, slot = int(where[2]), 0
            source = f"L{source_layer}.MLP"
        elif kind == "shared_expert":
            source_layer, slot = int(where[2]), 0
            source = f"L{source_layer}.SE"
        else:
            source_layer, slot = int(where[2]), int(where[3])
            source = f"L{source_layer}.{'H' if kind == 'head' else 'E'}{slot}"
        edges.append({
            "source": source, "kind": kind, "source_layer": source_layer, "slot": slot,
            "target": f"L{target_layer}.H{target_head}", "target_layer": target_layer,
            "target_head": target_head, "attribution": value,
            "alpha": float(alpha[target_layer, target_head]), "weight": weight,
        })
    return edges
