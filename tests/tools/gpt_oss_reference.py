#!/usr/bin/python3
"""An independent float64 numpy forward of a gpt_oss checkpoint, and an MXFP4 writer, for the tests
that run where torch and transformers are not (tests/cli/test_gpt_oss.sh; the transformers goldens
come from tools/make_family_goldens.py).

    gpt_oss_reference.py check MODEL_DIR ANALYSIS_H5      # compares analyze --per-query's output
    gpt_oss_reference.py to-mxfp4 SRC_DIR DST_DIR          # experts re-stored as MXFP4 blocks/scales
    gpt_oss_reference.py expected MODEL_DIR PROBES.npy     # writes MODEL_DIR/expected.safetensors in the
                                                           # layout of tools/make_family_goldens.py (a
                                                           # stand-in fixture to try the golden test on)

The forward follows transformers' modeling_gpt_oss.py as documented in docs/families.md: RMSNorm,
q/k/v/o with biases, RoPE (rotate-half) with yarn's inv_freq and attention factor on cos/sin,
eager attention with the per-head sink logit appended to the scores, softmaxed and dropped,
sliding windows (key j visible from query i when i - window < j <= i) on sliding layers, the router
(linear with bias, top-k of the logits, softmax over them), experts on gate_up_proj [E, D, 2I] (gate
the even columns, up the odd) with the clamped SwiGLU (alpha 1.702, limit 7), down_proj [E, I, D].
MXFP4: blocks [..., G, 16] uint8 with the low nibble the even element, e2m1 values, scales
[..., G] uint8 e8m0 (2^(s - 127)); the dequantised [E, out, in] is transposed to [E, in, out].
"""
import json
import math
import os
import shutil
import struct
import sys

import numpy as np

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


# ---- safetensors ---------------------------------------------------------------------------------

def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        raw = data[b:e]
        dt = t["dtype"]
        if dt == "F32":
            a = np.frombuffer(raw, np.float32).astype(np.float64)
        elif dt == "F16":
            a = np.frombuffer(raw, np.float16).astype(np.float64)
        elif dt == "BF16":
            a = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        elif dt == "U8":
            a = np.frombuffer(raw, np.uint8).copy()
        elif dt == "I32":
            a = np.frombuffer(raw, np.int32).copy()
        else:
            raise SystemExit(f"{path}: {name}: dtype {dt} not handled")
        out[name] = (a.reshape(t["shape"]), dt)
    return out


def write_safetensors(path, tensors):
    """tensors: name -> (numpy array, dtype string); BF16 arrays are float and rounded to nearest even."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        a, dt = tensors[name]
        if dt == "BF16":
            bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
            raw = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()
        elif dt == "F32":
            raw = np.ascontiguousarray(a, dtype=np.float32).tobytes()
        elif dt == "U8":
            raw = np.ascontiguousarray(a, dtype=np.uint8).tobytes()
        elif dt == "I32":
            raw = np.ascontiguousarray(a, dtype=np.int32).tobytes()
        else:
            raise SystemExit(f"write {dt}")
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)


# ---- MXFP4 ---------------------------------------------------------------------------------------

def mxfp4_quantise(w):
    """w [..., K] (K a multiple of 32) -> blocks [..., K/32, 16] uint8, scales [..., K/32] uint8."""
    *prefix, k = w.shape
    g = w.reshape(*prefix, k // 32, 32)
    amax = np.abs(g).max(axis=-1)
    with np.errstate(divide="ignore"):
        exp = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-300) / 6.0)), -127)
    exp = np.clip(exp, -127, 127).astype(np.int64)
    scaled = g / np.ldexp(1.0, exp)[..., None]
    mags = E2M1[:8]
    idx = np.abs(np.abs(scaled)[..., None] - mags).argmin(axis=-1)  # nearest magnitude (ties: lower)
    nib = (idx + np.where(scaled < 0, 8, 0)).astype(np.uint8)
    blocks = (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (exp + 127).astype(np.uint8)


def mxfp4_dequantise(blocks, scales):
    lo, hi = E2M1[blocks & 0x0F], E2M1[blocks >> 4]
    vals = np.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], 32)
    vals = vals * np.ldexp(1.0, scales.astype(np.int64) - 127)[..., None]
    return vals.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def to_mxfp4(src, dst):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f != "model.safetensors":
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    tensors = read_safetensors(os.path.join(src, "model.safetensors"))
    out = {}
    for name, (a, dt) in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            blocks, scales = mxfp4_quantise(np.swapaxes(a, 1, 2))  # [E, out, in]
            out[name + "_blocks"] = (blocks, "U8")
            out[name + "_scales"] = (scales, "U8")
        else:
            out[name] = (a, dt)
    write_safetensors(os.path.join(dst, "model.safetensors"), out)


# ---- the forward ---------------------------------------------------------------------------------

def yarn_inv_freq(rope, dim):
    base = rope["rope_theta"]
    factor = rope["factor"]
    omp = rope["original_max_position_embeddings"]
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1
    pos_freqs = base ** (np.arange(0, dim, 2) / dim)

    def corr(rot):
        return dim * math.log(omp / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr(beta_fast), corr(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    keep = 1 - ramp
    inv = (1 / (factor * pos_freqs)) * (1 - keep) + (1 / pos_freqs) * keep
    af = rope.get("attention_factor")
    if af is None:
        af = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv, af


def rms(x, g, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def forward(model_dir, tokens):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    w = {k: v for k, (v, _) in read_safetensors(os.path.join(model_dir, "model.safetensors")).items()}
    L, H, KV = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D, d = cfg["hidden_size"], cfg["head_dim"]
    E, K, eps = cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["rms_norm_eps"]
    window = cfg.get("sliding_window") or 0
    types = cfg["layer_types"]
    limit, alpha = cfg.get("swiglu_limit", 7.0), cfg.get("swiglu_alpha", 1.702)
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling"))
    rope.setdefault("rope_theta", cfg.get("rope_theta", 150000.0))
    inv, af = yarn_inv_freq(rope, d)
    N, T = tokens.shape
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(ang) * af, np.sin(ang) * af

    def rot(x):  # [N, heads, T, d]
        a, b = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def p(name, l):
        return w[f"model.layers.{l}.{name}"]

    x = w["model.embed_tokens.weight"][tokens]
    out = {"attn_p0": np.zeros((N, L, H, T)), "sink_mass": np.zeros((N, L, H, T)),
           "norm_p0": np.zeros((N, L + 1)), "p0_routed": np.zeros((L, E)), "sink_score": np.zeros((L, H)),
           "learned_sink_mass": np.zeros((L, H))}
    out["norm_p0"][:, 0] = np.linalg.norm(x[:, 0], axis=-1)
    out["norm_rest_median"] = np.zeros((N, L + 1))
    out["norm_rest_median"][:, 0] = np.median(np.linalg.norm(x[:, 1:], axis=-1), axis=-1)
    out["router_logits"] = np.zeros((N, L, T, E))
    i_idx, j_idx = np.arange(T)[:, None], np.arange(T)[None, :]
    for l in range(L):
        u = rms(x, p("input_layernorm.weight", l), eps)
        q = u @ p("self_attn.q_proj.weight", l).T + p("self_attn.q_proj.bias", l)
        k = u @ p("self_attn.k_proj.weight", l).T + p("self_attn.k_proj.bias", l)
        v = u @ p("self_attn.v_proj.weight", l).T + p("self_attn.v_proj.bias", l)
        q = rot(q.reshape(N, T, H, d).transpose(0, 2, 1, 3))
        k = rot(k.reshape(N, T, KV, d).transpose(0, 2, 1, 3))
        v = v.reshape(N, T, KV, d).transpose(0, 2, 1, 3)
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
        allowed = j_idx <= i_idx
        sliding = types[l] == "sliding_attention" and window > 0
        if sliding:
            allowed &= (i_idx - j_idx) < window
        s = np.where(allowed, s, -np.inf)
        sink = np.broadcast_to(p("self_attn.sinks", l)[None, :, None, None], (N, H, T, 1))
        full = np.concatenate([s, sink], axis=-1)
        full = np.exp(full - full.max(-1, keepdims=True))
        full /= full.sum(-1, keepdims=True)
        a, sm = full[..., :-1], full[..., -1]
        out["attn_p0"][:, l] = a[..., 0]
        out["sink_mass"][:, l] = sm
        nq = min(T, window) if sliding else T
        out["sink_score"][l] = a[..., :nq, 0].mean(axis=(0, 2))
        out["learned_sink_mass"][l] = sm[..., :nq].mean(axis=(0, 2))
        z = (a @ v).transpose(0, 2, 1, 3).reshape(N, T, H * d)
        x = x + z @ p("self_attn.o_proj.weight", l).T + p("self_attn.o_proj.bias", l)
        u = rms(x, p("post_attention_layernorm.weight", l), eps)
        logits = u @ p("mlp.router.weight", l).T + p("mlp.router.bias", l)
        out["router_logits"][:, l] = logits
        order = np.argsort(-logits, axis=-1, kind="stable")[..., :K]
        top = np.take_along_axis(logits, order, -1)
        wts = np.exp(top - top.max(-1, keepdims=True))
        wts /= wts.sum(-1, keepdims=True)
        pre = f"model.layers.{l}.mlp.experts."
        if pre + "gate_up_proj" in w:
            gu_w, dn_w = w[pre + "gate_up_proj"], w[pre + "down_proj"]
        else:
            gu_w = np.swapaxes(mxfp4_dequantise(w[pre + "gate_up_proj_blocks"], w[pre + "gate_up_proj_scales"]), 1, 2)
            dn_w = np.swapaxes(mxfp4_dequantise(w[pre + "down_proj_blocks"], w[pre + "down_proj_scales"]), 1, 2)
        gu_b, dn_b = w[pre + "gate_up_proj_bias"], w[pre + "down_proj_bias"]
        m = np.zeros_like(x)
        for e in range(E):
            sel = order == e
            hit = sel.any(-1)
            if not hit.any():
                continue
            ue = u[hit]
            gu = ue @ gu_w[e] + gu_b[e]
            gate, up = np.minimum(gu[:, ::2], limit), np.clip(gu[:, 1::2], -limit, limit)
            y = ((up + 1) * gate / (1 + np.exp(-alpha * gate))) @ dn_w[e] + dn_b[e]
            m[hit] += y * (wts * sel).sum(-1)[hit][:, None]
        out["p0_routed"][l] = np.array([(order[:, 0] == e).any(-1).mean() for e in range(E)])
        x = x + m
        out["norm_p0"][:, l + 1] = np.linalg.norm(x[:, 0], axis=-1)
        out["norm_rest_median"][:, l + 1] = np.median(np.linalg.norm(x[:, 1:], axis=-1), axis=-1)
    out["logits"] = rms(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].T
    return out


def expected(model_dir, probes_path):
    tokens = np.load(probes_path).astype(np.int64)
    ref = forward(model_dir, tokens)
    L = ref["norm_p0"].shape[1] - 1
    out = {"tokens": (tokens.astype(np.int32), "I32"), "moe_layers": (np.arange(L, dtype=np.int32), "I32")}
    for key in ("attn_p0", "sink_mass", "norm_p0", "norm_rest_median", "router_logits", "logits"):
        out[key] = (ref[key], "F32")
    write_safetensors(os.path.join(model_dir, "expected.safetensors"), out)


def check(model_dir, h5_path):
    import h5py
    f = h5py.File(h5_path, "r")
    tokens = f["tokens"][:].astype(np.int64)
    ref = forward(model_dir, tokens)
    worst, bad = {}, []

    def cmp(name, got, want, atol, rtol):
        err = np.abs(got - want)
        worst[name] = float(err.max())
        if not np.all(err <= atol + rtol * np.abs(want)):
            bad.append(f"{name}: max |diff| {err.max():.3e} (atol {atol}, rtol {rtol})")

    cmp("attn_p0", f["attention/p0_per_query"][:], ref["attn_p0"], 1e-4, 0)
    cmp("sink_mass", f["attention/learned_sink_mass_per_query"][:], ref["sink_mass"], 1e-4, 0)
    cmp("sink_score", f["attention/sink_score"][:], ref["sink_score"], 1e-4, 0)
    cmp("learned_sink_mass", f["attention/learned_sink_mass"][:], ref["learned_sink_mass"], 1e-4, 0)
    cmp("norm_p0", f["residual/norm_p0"][:], ref["norm_p0"], 0, 1e-3)
    cmp("p0_topk_freq", f["routing/p0_topk_freq"][:], ref["p0_routed"], 1e-6, 0)
    identity = float(f.attrs["circuit_identity_max_rel_err"])
    if not identity < 1e-4:
        bad.append(f"circuit identity {identity}")
    print(f"{model_dir}: worst differences {json.dumps({k: f'{v:.2e}' for k, v in worst.items()})}, identity {identity:.1e}")
    if bad:
        print("FAIL: " + "; ".join(bad))
        sys.exit(1)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "to-mxfp4":
        to_mxfp4(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "expected":
        expected(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
