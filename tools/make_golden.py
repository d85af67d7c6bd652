#!/usr/bin/env python3
"""Build and verify sinkscope's golden fixtures: tiny Qwen3-MoE checkpoints with float64 reference data.

Commands (run where torch and transformers are installed, e.g. the GPU machine):

    python3 tools/make_golden.py --out tests/golden                 # build every fixture
    python3 tools/make_golden.py --out tests/golden --check         # recompute, compare with the files

Each fixture folder tests/golden/<name>/ holds a Hugging Face checkpoint (config.json and
model.safetensors in bf16, per-expert tensor names as on the Hub), probes.npy (int32 [N, T]),
expected.safetensors (reference tensors plus the metrics of docs/metrics.md sections 1-5) and
meta.json (versions, seed, date, command, the self-check results). tests/golden/README.md lists
every tensor and the tolerances to compare with.

How the reference is made: the saved bf16 checkpoint is reloaded with transformers in float64, eager
attention and eager experts; forward hooks record the residual stream, the attention probabilities,
the o_proj inputs, q and k after their norms, the router outputs and the MoE block inputs and outputs.
Everything else (per-expert writes, RoPE'd queries, the key attribution and every metric) is recomputed
here in numpy float64 from the checkpoint file itself, and each hooked tensor is cross-checked against
that independent recomputation. transformers computes RMSNorm, the RoPE tables and both softmaxes
(attention, router) in float32 even inside a float64 model, so hooked values carry float32 rounding
(about 1e-7 relative): the cross-checks allow TOL_FLOAT32_INSIDE on those paths and TOL_FLOAT64 on
pure float64 paths. Both are far inside sinkscope's own targets (docs/metrics.md section 7).
"""

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

import numpy as np
import safetensors
import torch
import transformers
from safetensors.numpy import load_file as load_numpy_file
from safetensors.numpy import save_file as save_numpy_file
from safetensors.torch import load_file as load_torch_file
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

FIXTURES = ("tiny_random", "tiny_trained")
NUM_PROBES = 3
PROBE_LEN = 24
BOS_ID = 1  # the fixed first token of tiny_trained's training text and probes
SINK_EPS = 0.3  # docs/metrics.md section 1 default
MASSIVE_ABS = 100.0  # docs/metrics.md section 2 (Sun et al.)
MASSIVE_REL = 1000.0
MAX_TOTAL_BYTES = 3 * 1024 * 1024  # the fixtures are committed: keep them small

# Self-check tolerances, relative to the largest magnitude of the reference tensor.
TOL_FLOAT64 = 1e-9  # paths computed in float64 on both sides
TOL_FLOAT32_INSIDE = 1e-5  # paths where transformers rounds through float32 (see module docstring)
TOL_KEY_IDENTITY = 1e-6  # sum of K(c[0]) vs the model's k_0 (docs/metrics.md section 4)
TOL_STORED = 1e-5  # --check: recomputed float64 vs the stored float32 tensors

# Training of tiny_trained: short, but long enough for a BOS sink to form.
TRAIN_STEPS = 500
TRAIN_BATCH = 64
TRAIN_SEQ_LEN = 64
TRAIN_LR = 3e-3
TRAIN_WARMUP = 25


# ----------------------------------------------------------------------------------------------
# Fixture models
# ----------------------------------------------------------------------------------------------


def tiny_random_config():
    """3 layers (layer 1 dense), explicit head_dim 16 != hidden/heads, larger init so attention is not uniform."""
    return Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )


def tiny_trained_config():
    """4 MoE layers, no head_dim key (so 64 / 4 = 16), unnormalised top-k weights."""
    return Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
    )


def build_tiny_random(seed):
    """Random-init tiny_random; norm gains are drawn away from 1 so every gamma in the formulas matters."""
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(tiny_random_config())
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                # Larger q/k gains sharpen the attention of an untrained model.
                param.uniform_(1.0, 3.0, generator=generator)
            elif name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5, generator=generator)
    return model.eval()


class SyntheticText:
    """Byte-like text for tiny_trained; every sequence starts with BOS_ID.

    With equal odds a sequence continues as a first-order Markov chain over tokens 2..vocab-1 (each
    token has 4 likely successors with fixed random odds) or as a random motif of 2-8 tokens repeated
    to the end (which rewards attending back). The tables come from `seed`; draws from the caller's rng.
    """

    SUCCESSORS = 4
    MAX_MOTIF = 8

    def __init__(self, vocab_size, seed):
        rng = np.random.default_rng(seed)
        self.vocab_size = vocab_size
        self.successors = rng.integers(2, vocab_size, size=(vocab_size, self.SUCCESSORS))
        odds = rng.random((vocab_size, self.SUCCESSORS)) + 0.1
        self.cumulative = np.cumsum(odds / odds.sum(axis=1, keepdims=True), axis=1)

    def sample(self, rng, count, seq_len):
        """int64 [count, seq_len] token sequences."""
        body_len = seq_len - 1
        markov = np.empty((count, body_len), dtype=np.int64)
        current = rng.integers(2, self.vocab_size, size=count)
        for i in range(body_len):
            markov[:, i] = current
            choice = (rng.random(count)[:, None] > self.cumulative[current]).sum(axis=1)
            current = self.successors[current, np.minimum(choice, self.SUCCESSORS - 1)]
        motif = rng.integers(2, self.vocab_size, size=(count, self.MAX_MOTIF))
        motif_len = rng.integers(2, self.MAX_MOTIF + 1, size=count)
        repeated = np.take_along_axis(motif, np.arange(body_len)[None, :] % motif_len[:, None], axis=1)
        use_markov = rng.random(count) < 0.5
        out = np.empty((count, seq_len), dtype=np.int64)
        out[:, 0] = BOS_ID
        out[:, 1:] = np.where(use_markov[:, None], markov, repeated)
        return out


def build_tiny_trained(seed, device):
    """Train tiny_trained from scratch on SyntheticText; returns (model, training record)."""
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(tiny_trained_config()).to(device)
    text = SyntheticText(model.config.vocab_size, seed)
    rng = np.random.default_rng(seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    losses = []
    started = time.time()
    for step in range(TRAIN_STEPS):
        lr = TRAIN_LR * min(1.0, (step + 1) / TRAIN_WARMUP)  # linear warm-up, then constant
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = torch.from_numpy(text.sample(rng, TRAIN_BATCH, TRAIN_SEQ_LEN)).to(device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == TRAIN_STEPS - 1:
            print(f"  tiny_trained step {step:4d} loss {losses[-1]:.4f}", flush=True)
    model.eval()
    record = {
        "data": ("SyntheticText: BOS (token 1), then with equal odds a first-order Markov chain over tokens "
                 "2..127 (4 successors per token) or a random 2-8 token motif repeated"),
        "steps": TRAIN_STEPS,
        "batch": TRAIN_BATCH,
        "seq_len": TRAIN_SEQ_LEN,
        "optimizer": "AdamW betas (0.9, 0.95), weight decay 0.1 on all parameters, grad clip 1.0",
        "lr": TRAIN_LR,
        "schedule": f"linear warm-up over {TRAIN_WARMUP} steps, then constant",
        "precision": "float32",
        "first_loss": losses[0],
        "final_loss_mean_last_50": float(np.mean(losses[-50:])),
        "seconds": round(time.time() - started, 1),
    }
    return model, record


def save_checkpoint(model, model_dir):
    """save_pretrained in bf16 with safetensors (transformers 5 writes per-expert tensor names)."""
    model.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)


def rewrite_config_legacy_keys(model_dir):
    """Rewrite config.json with the key spellings of transformers 4 and most Hub checkpoints.

    tiny_random carries `rope_theta`, `num_experts` and `torch_dtype` while tiny_trained keeps what
    transformers 5 writes (`rope_parameters`, `num_local_experts`, `dtype`), so the fixtures cover
    both variants that sinkscope must read (docs/schema.md, Inputs).
    """
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    rope = config.pop("rope_parameters", None)
    if rope is not None:
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{path}: only default RoPE can be written as a bare rope_theta")
        config["rope_theta"] = rope["rope_theta"]
    if "num_local_experts" in config:
        config["num_experts"] = config.pop("num_local_experts")
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def make_probes(name, seed):
    """int32 [NUM_PROBES, PROBE_LEN]: uniform tokens for tiny_random, held-out SyntheticText for tiny_trained."""
    rng = np.random.default_rng(seed + 100)
    if name == "tiny_random":
        return rng.integers(0, tiny_random_config().vocab_size, size=(NUM_PROBES, PROBE_LEN)).astype(np.int32)
    text = SyntheticText(tiny_trained_config().vocab_size, seed)
    return text.sample(rng, NUM_PROBES, PROBE_LEN).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# The checkpoint as sinkscope reads it (independent of transformers)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelSpec:
    """Shape and constants of a Qwen3-MoE checkpoint, read from config.json with every key variant."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    moe_layers: list  # bool per layer

    @property
    def group(self):
        """Query heads per KV head: head h reads KV head h // group."""
        return self.num_heads // self.num_kv_heads


def read_spec(model_dir):
    """Parse config.json the way docs/schema.md requires (rope_theta | rope_parameters, num_experts | ...)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    if config.get("attention_bias", False):
        raise ValueError("attention biases are not part of the metric definitions")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported rope_type {rope['rope_type']}")
    num_layers = config["num_hidden_layers"]
    num_experts = config.get("num_experts", config.get("num_local_experts", 0))
    sparse_step = config.get("decoder_sparse_step", 1)
    mlp_only = set(config.get("mlp_only_layers") or [])
    return ModelSpec(
        num_layers=num_layers,
        hidden_size=config["hidden_size"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        num_experts=num_experts,
        top_k=config["num_experts_per_tok"],
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        rms_norm_eps=float(config["rms_norm_eps"]),
        rope_theta=float(config["rope_theta"] if "rope_theta" in config else rope["rope_theta"]),
        vocab_size=config["vocab_size"],
        moe_layers=[
            layer not in mlp_only and num_experts > 0 and (layer + 1) % sparse_step == 0
            for layer in range(num_layers)
        ],
    )


def load_weights(model_dir):
    """Every checkpoint tensor as float64 numpy, read from the safetensors file(s) of the checkpoint."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for file_name in files:
        for key, tensor in load_torch_file(os.path.join(model_dir, file_name)).items():
            weights[key] = tensor.to(torch.float64).numpy()
    return weights


# ----------------------------------------------------------------------------------------------
# The transformers forward pass, recorded through hooks
# ----------------------------------------------------------------------------------------------


def _main_output(output):
    """A module's main output: transformers 5 returns a tensor where older versions returned a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _numpy(tensor):
    return tensor.detach().to("cpu", torch.float64).numpy()


def run_transformers(model_dir, spec, probes, device):
    """Run the checkpoint in float64 (eager attention and experts) and record what the metrics need.

    Returns numpy float64 arrays (int64 for router indices), one list entry per layer:
    embed [N,T,D]; layer_out[l] [N,T,D]; attn[l] [N,H,T,T]; z[l] [N,T,H*d] (o_proj input);
    q_normed[l] [N,T,H,d] and k_normed[l] [N,T,KV,d] (after q_norm / k_norm, before RoPE);
    mlp_in[l] [N,T,D] (post_attention_layernorm output); mlp_out[l] [N,T,D] (MoE block or dense MLP);
    router_logits / router_weights / router_index [l] [N*T, E|K|K] (None in dense layers); logits [N,T,V];
    inv_freq [d/2] (transformers' RoPE frequencies, to cross-check ours).
    """
    model = Qwen3MoeForCausalLM.from_pretrained(
        model_dir, dtype=torch.float64, attn_implementation="eager", experts_implementation="eager")
    model = model.to(device).eval()
    if any(p.dtype != torch.float64 for p in model.parameters()):
        raise RuntimeError("the reference model did not load in float64")

    record = {"embed": {}, "layer_out": {}, "attn": {}, "z": {}, "q_normed": {}, "k_normed": {}, "mlp_in": {},
              "mlp_out": {}, "router": {}}

    def keep(kind, layer):
        def hook(module, args, output):
            record[kind][layer] = output
        return hook

    def keep_o_proj_input(layer):
        def hook(module, args, kwargs):
            record["z"][layer] = args[0] if args else kwargs["input"]
        return hook

    handles = [model.model.embed_tokens.register_forward_hook(keep("embed", 0))]
    for layer, block in enumerate(model.model.layers):
        attention = block.self_attn
        handles += [
            block.register_forward_hook(keep("layer_out", layer)),
            attention.register_forward_hook(keep("attn", layer)),
            attention.o_proj.register_forward_pre_hook(keep_o_proj_input(layer), with_kwargs=True),
            attention.q_norm.register_forward_hook(keep("q_normed", layer)),
            attention.k_norm.register_forward_hook(keep("k_normed", layer)),
            block.post_attention_layernorm.register_forward_hook(keep("mlp_in", layer)),
            block.mlp.register_forward_hook(keep("mlp_out", layer)),
        ]
        if spec.moe_layers[layer]:
            if not hasattr(block.mlp, "gate"):
                raise RuntimeError(f"layer {layer} should be MoE but transformers built {type(block.mlp).__name__}")
            handles.append(block.mlp.gate.register_forward_hook(keep("router", layer)))
        elif hasattr(block.mlp, "gate"):
            raise RuntimeError(f"layer {layer} should be dense but transformers built an MoE block")

    ids = torch.from_numpy(probes.astype(np.int64)).to(device)
    with torch.no_grad():
        output = model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()

    result = {
        "embed": _numpy(_main_output(record["embed"][0])),
        "logits": _numpy(output.logits),
        "inv_freq": _numpy(model.model.rotary_emb.inv_freq),
    }
    for kind in ("layer_out", "z", "q_normed", "k_normed", "mlp_in", "mlp_out"):
        result[kind] = [_numpy(_main_output(record[kind][layer])) for layer in range(spec.num_layers)]
    result["attn"] = []
    for layer in range(spec.num_layers):
        weights = record["attn"][layer][1]
        if weights is None:
            raise RuntimeError("self_attn returned no attention weights: eager attention is required")
        result["attn"].append(_numpy(weights))
    result["router_logits"], result["router_weights"], result["router_index"] = [], [], []
    for layer in range(spec.num_layers):
        routed = record["router"].get(layer)
        if routed is None:
            for key in ("router_logits", "router_weights", "router_index"):
                result[key].append(None)
            continue
        if not (isinstance(routed, tuple) and len(routed) >= 3):
            raise RuntimeError("the router returned no (logits, weights, indices) tuple: unknown transformers API")
        result["router_logits"].append(_numpy(routed[0]))
        result["router_weights"].append(_numpy(routed[1]))
        result["router_index"].append(routed[2].detach().cpu().numpy().astype(np.int64))
    return result


# ----------------------------------------------------------------------------------------------
# Independent float64 recomputation (numpy)
# ----------------------------------------------------------------------------------------------


def rms_norm(x, gamma, eps):
    """RMSNorm over the last axis: gamma * x / sqrt(mean(x^2) + eps)."""
    return gamma * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def silu(x):
    return x / (1.0 + np.exp(-x))


def swiglu(x, gate_proj, up_proj, down_proj):
    """down(silu(gate x) * up x) for x [..., D] and nn.Linear-layout weights."""
    return (silu(x @ gate_proj.T) * (x @ up_proj.T)) @ down_proj.T


def softmax(logits, axis=-1):
    shifted = logits - np.max(logits, axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=axis, keepdims=True)


def rope_inv_freq(head_dim, theta):
    """Qwen3 default RoPE frequencies: theta^(-2j/d) for j = 0..d/2-1."""
    return theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def apply_rope(x, theta):
    """Rotate x [N, T, heads, d] by position (rotate_half convention: pairs (j, j + d/2))."""
    seq_len, head_dim = x.shape[1], x.shape[-1]
    angles = np.arange(seq_len, dtype=np.float64)[:, None] * rope_inv_freq(head_dim, theta)[None, :]
    angles = np.concatenate([angles, angles], axis=-1)[None, :, None, :]
    half = head_dim // 2
    rotated_half = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(angles) + rotated_half * np.sin(angles)


class SelfChecks:
    """Runs the cross-checks and keeps the worst error of each (written to meta.json)."""

    def __init__(self):
        self.results = {}

    def close(self, name, value, reference, tolerance):
        """Assert max|value - reference| <= tolerance * max|reference|."""
        scale = max(float(np.max(np.abs(reference))), 1e-30)
        error = float(np.max(np.abs(value - reference))) / scale
        self.results[name] = max(error, self.results.get(name, 0.0))
        if not error <= tolerance:
            raise AssertionError(f"self-check '{name}' failed: relative error {error:.3e} > {tolerance:.0e}")

    def equal(self, name, value, reference):
        mismatches = int(np.sum(value != reference))
        self.results[name] = max(mismatches, self.results.get(name, 0))
        if mismatches:
            raise AssertionError(f"self-check '{name}' failed: {mismatches} entries differ")


def recompute_layers(spec, weights, probes, hooked, checks):
    """Re-derive every layer from the hooked residual stream in float64 and check transformers against it.

    Returns a dict of float64 arrays: residual [N,L+1,T,D], q_rot [N,L,T,H,d] (normed, rotated queries),
    head_writes [N,L,H,T,D], router_logits [N,L,T,E], topk_idx int32 [N,L,T,K], topk_weight [N,L,T,K],
    expert_out [N,L,E,T,D], mlp_out [N,L,T,D] (dense layers), block_out [N,L,T,D] (m_l of every layer).
    """
    n_probes, seq_len = probes.shape
    L, D, H, KV, d = spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    E, K, eps = spec.num_experts, spec.top_k, spec.rms_norm_eps
    kv_of_head = np.arange(H) // spec.group
    causal = np.tril(np.ones((seq_len, seq_len), dtype=bool))

    checks.equal("embedding lookup", hooked["embed"], weights["model.embed_tokens.weight"][probes])
    checks.close("RoPE frequencies", hooked["inv_freq"], rope_inv_freq(d, spec.rope_theta), TOL_FLOAT32_INSIDE)

    out = {
        "residual": np.zeros((n_probes, L + 1, seq_len, D)),
        "q_rot": np.zeros((n_probes, L, seq_len, H, d)),
        "head_writes": np.zeros((n_probes, L, H, seq_len, D)),
        "router_logits": np.zeros((n_probes, L, seq_len, E)),
        "topk_idx": np.full((n_probes, L, seq_len, K), -1, dtype=np.int32),
        "topk_weight": np.zeros((n_probes, L, seq_len, K)),
        "expert_out": np.zeros((n_probes, L, E, seq_len, D)),
        "mlp_out": np.zeros((n_probes, L, seq_len, D)),
        "block_out": np.zeros((n_probes, L, seq_len, D)),
    }
    out["residual"][:, 0] = hooked["embed"]
    for layer in range(L):
        prefix = f"model.layers.{layer}."
        w = {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}
        x = out["residual"][:, layer]

        # Attention: queries and keys from our own norms and RoPE, probabilities compared with transformers'.
        u = rms_norm(x, w["input_layernorm.weight"], eps)
        q = rms_norm((u @ w["self_attn.q_proj.weight"].T).reshape(n_probes, seq_len, H, d),
                     w["self_attn.q_norm.weight"], eps)
        k = rms_norm((u @ w["self_attn.k_proj.weight"].T).reshape(n_probes, seq_len, KV, d),
                     w["self_attn.k_norm.weight"], eps)
        v = (u @ w["self_attn.v_proj.weight"].T).reshape(n_probes, seq_len, KV, d)
        checks.close("q after q_norm", q, hooked["q_normed"][layer], TOL_FLOAT32_INSIDE)
        checks.close("k after k_norm", k, hooked["k_normed"][layer], TOL_FLOAT32_INSIDE)
        q_rot = apply_rope(q, spec.rope_theta)
        k_rot = apply_rope(k, spec.rope_theta)[:, :, kv_of_head]
        scores = np.einsum("nihc,njhc->nhij", q_rot, k_rot) / np.sqrt(d)
        attn = softmax(np.where(causal, scores, -np.inf), axis=-1)
        checks.close("attention probabilities", attn, hooked["attn"][layer], TOL_FLOAT32_INSIDE)
        out["q_rot"][:, layer] = q_rot

        attn_hf = hooked["attn"][layer]
        z_recomputed = np.einsum("nhij,njhc->nihc", attn_hf, v[:, :, kv_of_head]).reshape(n_probes, seq_len, H * d)
        checks.close("o_proj input z", z_recomputed, hooked["z"][layer], TOL_FLOAT32_INSIDE)
        z = hooked["z"][layer].reshape(n_probes, seq_len, H, d)
        o_proj = w["self_attn.o_proj.weight"].reshape(D, H, d)
        head_writes = np.einsum("nihc,Dhc->nhiD", z, o_proj)
        out["head_writes"][:, layer] = head_writes
        y = x + head_writes.sum(axis=1)

        mlp_in = hooked["mlp_in"][layer]
        checks.close("post-attention norm", rms_norm(y, w["post_attention_layernorm.weight"], eps), mlp_in,
                     TOL_FLOAT32_INSIDE)
        block_out = hooked["mlp_out"][layer]
        if spec.moe_layers[layer]:
            logits = mlp_in @ w["mlp.gate.weight"].T
            checks.close("router logits", logits, hooked["router_logits"][layer].reshape(logits.shape),
                         TOL_FLOAT64)
            probs = softmax(logits, axis=-1)
            topk = np.argsort(-probs, axis=-1, kind="stable")[..., :K]
            topk_weight = np.take_along_axis(probs, topk, axis=-1)
            if spec.norm_topk_prob:
                topk_weight = topk_weight / topk_weight.sum(axis=-1, keepdims=True)
            hf_index = hooked["router_index"][layer].reshape(n_probes, seq_len, K)
            checks.equal("top-k expert sets", np.sort(topk, axis=-1), np.sort(hf_index, axis=-1))
            hf_weight = hooked["router_weights"][layer].reshape(n_probes, seq_len, K)
            sum_with_hf_weights = np.zeros_like(block_out)
            for expert in range(E):
                expert_prefix = f"mlp.experts.{expert}."
                expert_output = swiglu(mlp_in, w[expert_prefix + "gate_proj.weight"],
                                       w[expert_prefix + "up_proj.weight"], w[expert_prefix + "down_proj.weight"])
                weight = np.sum(np.where(topk == expert, topk_weight, 0.0), axis=-1)
                out["expert_out"][:, layer, expert] = weight[..., None] * expert_output
                hf_expert_weight = np.sum(np.where(hf_index == expert, hf_weight, 0.0), axis=-1)
                sum_with_hf_weights += hf_expert_weight[..., None] * expert_output
            # Our expert math reproduces the block exactly given transformers' own (float32-softmax) weights...
            checks.close("experts with transformers' weights", sum_with_hf_weights, block_out, TOL_FLOAT64)
            # ...and with the float64 routing weights of the definition, up to that float32 rounding.
            checks.close("sum of expert_out", out["expert_out"][:, layer].sum(axis=1), block_out,
                         TOL_FLOAT32_INSIDE)
            out["router_logits"][:, layer] = logits
            out["topk_idx"][:, layer] = topk.astype(np.int32)
            out["topk_weight"][:, layer] = topk_weight
        else:
            checks.close("dense MLP", swiglu(mlp_in, w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"],
                                             w["mlp.down_proj.weight"]), block_out, TOL_FLOAT64)
            out["mlp_out"][:, layer] = block_out
        out["block_out"][:, layer] = block_out
        checks.close("decoder layer output", y + block_out, hooked["layer_out"][layer], TOL_FLOAT64)
        out["residual"][:, layer + 1] = hooked["layer_out"][layer]

    final = rms_norm(out["residual"][:, L], weights["model.norm.weight"], eps) @ weights["lm_head.weight"].T
    checks.close("logits", final, hooked["logits"], TOL_FLOAT32_INSIDE)
    return out


# ----------------------------------------------------------------------------------------------
# Metrics (docs/metrics.md), float64 numpy
# ----------------------------------------------------------------------------------------------


def sink_score(attn_p0):
    """docs/metrics.md 1: alpha[l,h] = mean over probes and ALL queries i = 0..T-1 of A[i, 0]; attn_p0 [N,L,H,T]."""
    return attn_p0.mean(axis=(0, 3))


def sink_rate(alpha, eps=SINK_EPS):
    """docs/metrics.md 1: fraction of the heads of each layer with alpha > eps."""
    return (alpha > eps).mean(axis=1)


def norm_p0(residual):
    """docs/metrics.md 2: ||x_l[0]|| per probe and layer; residual [N,L+1,T,D] -> [N,L+1]."""
    return np.linalg.norm(residual[:, :, 0], axis=-1)


def norm_rest_median(residual):
    """docs/metrics.md 2: median over i = 1..T-1 of ||x_l[i]|| (mean of the middle two for an even count)."""
    return np.median(np.linalg.norm(residual[:, :, 1:], axis=-1), axis=-1)


def h_ratio(p0_norms, rest_medians):
    """docs/metrics.md 2: mean over probes of norm_p0 / norm_rest_median -> [L+1]."""
    return (p0_norms / rest_medians).mean(axis=0)


def p0_cosine(residual):
    """docs/metrics.md 2: mean over probe pairs n < m of cos(x_l,n[0], x_l,m[0]) -> [L+1]."""
    p0 = residual[:, :, 0]
    unit = p0 / np.linalg.norm(p0, axis=-1, keepdims=True)
    n_probes = p0.shape[0]
    pairs = [(n, m) for n in range(n_probes) for m in range(n + 1, n_probes)]
    return np.mean([np.sum(unit[n] * unit[m], axis=-1) for n, m in pairs], axis=0)


def massive_p0(residual):
    """docs/metrics.md 2: on probe 0, channels with |x_l[0,c]| > 100 and > 1000 x median |x_l[i,c']| (all i, c')."""
    magnitudes = np.abs(residual[0])  # [L+1, T, D]
    medians = np.median(magnitudes.reshape(magnitudes.shape[0], -1), axis=1)
    massive = (magnitudes[:, 0] > MASSIVE_ABS) & (magnitudes[:, 0] > MASSIVE_REL * medians[:, None])
    return massive.sum(axis=1).astype(np.int32)


def attn_head_norms(head_writes):
    """docs/metrics.md 3: attn_head_p0 = mean_n ||w^{l,h}[0]||, attn_head_rest = mean over n, i >= 1; [N,L,H,T,D]."""
    norms = np.linalg.norm(head_writes, axis=-1)
    return norms[..., 0].mean(axis=0), norms[..., 1:].mean(axis=(0, 3))


def block_norms(block_out):
    """docs/metrics.md 3: moe_p0 and moe_rest for m_l (MoE block or dense MLP output); block_out [N,L,T,D]."""
    norms = np.linalg.norm(block_out, axis=-1)
    return norms[..., 0].mean(axis=0), norms[..., 1:].mean(axis=(0, 2))


def expert_p0(expert_out):
    """docs/metrics.md 3: mean over probes of ||m^{l,e}[0]|| (zero where e is not routed); [N,L,E,T,D] -> [L,E]."""
    return np.linalg.norm(expert_out[..., 0, :], axis=-1).mean(axis=0)


def topk_freq(topk_idx, num_experts):
    """docs/metrics.md 3: p0_topk_freq (position 0, over probes) and rest_topk_freq (over probes and i >= 1).

    topk_idx int [N,L,T,K], -1 in dense layers (which therefore count zero everywhere).
    """
    routed = np.stack([(topk_idx == e).any(axis=-1) for e in range(num_experts)], axis=-1)  # [N,L,T,E]
    return routed[:, :, 0].mean(axis=0), routed[:, :, 1:].mean(axis=(0, 2))


def key_map(spec, weights, target, kv_head, r_x, r_k):
    """The d x D matrix of K(v) = gamma_k * (W_K^g (gamma_in * v)) / (r_x r_k) (docs/metrics.md 4), so K(v) = M @ v."""
    prefix = f"model.layers.{target}."
    d = spec.head_dim
    key_proj = weights[prefix + "self_attn.k_proj.weight"][kv_head * d:(kv_head + 1) * d]
    gamma_in = weights[prefix + "input_layernorm.weight"]
    gamma_k = weights[prefix + "self_attn.k_norm.weight"]
    return gamma_k[:, None] * key_proj * gamma_in[None, :] / (r_x * r_k)


def circuit_attribution(spec, weights, layers):
    """docs/metrics.md 4: differential key attribution of every upstream component to every head's sink logit.

    For target layer t, probe n, KV head g, with the RMS scales frozen at their actual values
    (r_x = sqrt(mean(x_t[0]^2) + eps), r_k the same for head g's pre-norm key at position 0),
    K(v) = gamma_k * (W_K^g (gamma_in * v)) / (r_x r_k) and
    attr(c -> t,h) = qbar . (K(c[0]) - K(cbar)) / sqrt(d), qbar = mean over i >= 1 of the normed, rotated
    queries of head h, cbar = mean over i >= 1 of c[i]; averaged over probes. Components: the embedding,
    every head write, every expert write (MoE layers) and the dense MLP output (dense layers) of layers < t.
    Returns attr_embed [L,H], attr_head [L,H,L,H], attr_expert [L,H,L,E], attr_mlp [L,H,L],
    k0_sum [N,L,KV,d] (sum over components of K(c[0])), qbar [N,L,H,d], attr_r_x [N,L], attr_r_k [N,L,KV].
    """
    residual, head_writes = layers["residual"], layers["head_writes"]
    n_probes = residual.shape[0]
    L, H, KV, d, E = spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.num_experts
    eps = spec.rms_norm_eps

    def differential(component):
        """c[0] - mean over i >= 1 of c[i], along the position axis (second to last)."""
        return component[..., 0, :] - component[..., 1:, :].mean(axis=-2)

    delta_embed = differential(residual[:, 0])  # [N,D]
    delta_head = differential(head_writes)  # [N,L,H,D]
    delta_expert = differential(layers["expert_out"])  # [N,L,E,D]
    delta_mlp = differential(layers["mlp_out"])  # [N,L,D]
    qbar = layers["q_rot"][:, :, 1:].mean(axis=2)  # [N,L,H,d]

    result = {
        "attr_embed": np.zeros((L, H)),
        "attr_head": np.zeros((L, H, L, H)),
        "attr_expert": np.zeros((L, H, L, E)),
        "attr_mlp": np.zeros((L, H, L)),
        "k0_sum": np.zeros((n_probes, L, KV, d)),
        "qbar": qbar,
        "attr_r_x": np.zeros((n_probes, L)),
        "attr_r_k": np.zeros((n_probes, L, KV)),
    }
    for target in range(L):
        gamma_in = weights[f"model.layers.{target}.input_layernorm.weight"]
        k_proj = weights[f"model.layers.{target}.self_attn.k_proj.weight"]
        for n in range(n_probes):
            x = residual[n, target, 0]
            r_x = np.sqrt(np.mean(x * x) + eps)
            result["attr_r_x"][n, target] = r_x
            # Position-0 writes of every component: embedding, heads and experts / MLP of layers < target.
            components = [residual[n, 0, 0]]
            components += [head_writes[n, l, h, 0] for l in range(target) for h in range(H)]
            components += [layers["expert_out"][n, l, e, 0] for l in range(target) if spec.moe_layers[l]
                           for e in range(E)]
            components += [layers["mlp_out"][n, l, 0] for l in range(target) if not spec.moe_layers[l]]
            for g in range(KV):
                raw_key = k_proj[g * d:(g + 1) * d] @ (gamma_in * x / r_x)  # head g's key before k_norm
                r_k = np.sqrt(np.mean(raw_key * raw_key) + eps)
                result["attr_r_k"][n, target, g] = r_k
                key = key_map(spec, weights, target, g, r_x, r_k)
                result["k0_sum"][n, target, g] = np.sum([key @ c for c in components], axis=0)
                for h in range(g * spec.group, (g + 1) * spec.group):
                    direction = key.T @ qbar[n, target, h] / np.sqrt(d)  # attr(c) = direction . delta(c)
                    result["attr_embed"][target, h] += direction @ delta_embed[n] / n_probes
                    result["attr_head"][target, h, :target] += delta_head[n, :target] @ direction / n_probes
                    result["attr_expert"][target, h, :target] += delta_expert[n, :target] @ direction / n_probes
                    result["attr_mlp"][target, h, :target] += delta_mlp[n, :target] @ direction / n_probes
    return result


def check_attribution(spec, weights, layers, attribution, k0_model, checks):
    """The two identities of docs/metrics.md 4 that must hold to rounding.

    1. sum over components of K(c[0]) equals the model's k_0 (the post-k_norm key at position 0: RoPE is
       the identity there).
    2. The attributions of all sources add up to qbar . (K(x_t[0]) - K(mean_{i>=1} x_t[i])) / sqrt(d),
       because the components add up to the residual at every position.
    """
    residual, n_probes = layers["residual"], layers["residual"].shape[0]
    for target in range(spec.num_layers):
        total = (attribution["attr_embed"][target] + attribution["attr_head"][target].sum(axis=(1, 2))
                 + attribution["attr_expert"][target].sum(axis=(1, 2)) + attribution["attr_mlp"][target].sum(axis=1))
        expected_total = np.zeros(spec.num_heads)
        for n in range(n_probes):
            delta = residual[n, target, 0] - residual[n, target, 1:].mean(axis=0)
            for g in range(spec.num_kv_heads):
                checks.close("k0_sum vs k0_model", attribution["k0_sum"][n, target, g], k0_model[n, target, g],
                             TOL_KEY_IDENTITY)
                key = key_map(spec, weights, target, g, attribution["attr_r_x"][n, target],
                              attribution["attr_r_k"][n, target, g])
                for h in range(g * spec.group, (g + 1) * spec.group):
                    expected_total[h] += (attribution["qbar"][n, target, h] @ (key @ delta)
                                          / np.sqrt(spec.head_dim) / n_probes)
        checks.close("attribution total", total, expected_total, TOL_KEY_IDENTITY)


def layer_share(spec, alpha, attribution):
    """docs/metrics.md 5: index 0 = embedding, 1 + l = layer l; sum_{t,h} alpha[t,h] sum_{c in layer} max(attr, 0).

    Normalised to sum 1 (all zeros if no attribution is positive).
    """
    positive = {key: np.maximum(attribution[key], 0.0) for key in ("attr_embed", "attr_head", "attr_expert",
                                                                    "attr_mlp")}
    share = np.zeros(spec.num_layers + 1)
    share[0] = np.sum(alpha * positive["attr_embed"])
    per_layer = (positive["attr_head"].sum(axis=3) + positive["attr_expert"].sum(axis=3)
                 + positive["attr_mlp"])  # [t, h, l]
    share[1:] = np.einsum("th,thl->l", alpha, per_layer)
    total = share.sum()
    return share / total if total > 0 else share


def first2_share(share):
    """docs/metrics.md 5: layer_share[1] + layer_share[2] (layers 0 and 1)."""
    return share[1] + share[2]


def norm_gain_share(ratios):
    """docs/metrics.md 5: G_l = log h_ratio[l+1] - log h_ratio[l]; share = max(G, 0) / sum max(G, 0) (zeros if none)."""
    gains = np.maximum(np.diff(np.log(ratios)), 0.0)
    total = gains.sum()
    return gains / total if total > 0 else gains


def peak_layer(share):
    """docs/metrics.md 5: argmax over l of layer_share[1 + l]."""
    return int(np.argmax(share[1:]))


def entropy(share):
    """docs/metrics.md 5: Shannon entropy in nats of layer_share (0 log 0 = 0)."""
    nonzero = share[share > 0]
    return float(-np.sum(nonzero * np.log(nonzero)))


# ----------------------------------------------------------------------------------------------
# Putting it together
# ----------------------------------------------------------------------------------------------


def compute_expected(model_dir, probes, device):
    """All reference tensors and metrics of one fixture (float64 / int32) plus the self-check results."""
    spec = read_spec(model_dir)
    weights = load_weights(model_dir)
    checks = SelfChecks()
    hooked = run_transformers(model_dir, spec, probes, device)
    layers = recompute_layers(spec, weights, probes, hooked, checks)

    attn_p0 = np.stack([hooked["attn"][layer][:, :, :, 0] for layer in range(spec.num_layers)], axis=1)
    attribution = circuit_attribution(spec, weights, layers)
    k0_model = np.stack([hooked["k_normed"][layer][:, 0] for layer in range(spec.num_layers)], axis=1)
    check_attribution(spec, weights, layers, attribution, k0_model, checks)

    alpha = sink_score(attn_p0)
    p0_norms = norm_p0(layers["residual"])
    rest_medians = norm_rest_median(layers["residual"])
    ratios = h_ratio(p0_norms, rest_medians)
    head_p0, head_rest = attn_head_norms(layers["head_writes"])
    moe_p0, moe_rest = block_norms(layers["block_out"])
    p0_freq, rest_freq = topk_freq(layers["topk_idx"], spec.num_experts)
    share = layer_share(spec, alpha, attribution)

    z = np.stack(hooked["z"], axis=1)  # [N,L,T,H*d]
    expected = {
        "tokens": probes.astype(np.int32),
        "attn_p0": attn_p0,
        "residual": layers["residual"],
        "attn_z": z,
        "router_logits": layers["router_logits"],
        "topk_idx": layers["topk_idx"],
        "topk_weight": layers["topk_weight"],
        "expert_out": layers["expert_out"],
        "mlp_out": layers["mlp_out"],
        "logits": hooked["logits"],
        "sink_score": alpha,
        "sink_rate": sink_rate(alpha),
        "norm_p0": p0_norms,
        "norm_rest_median": rest_medians,
        "h_ratio": ratios,
        "p0_cosine": p0_cosine(layers["residual"]),
        "massive_p0": massive_p0(layers["residual"]),
        "attn_head_p0": head_p0,
        "attn_head_rest": head_rest,
        "moe_p0": moe_p0,
        "moe_rest": moe_rest,
        "expert_p0": expert_p0(layers["expert_out"]),
        "p0_topk_freq": p0_freq,
        "rest_topk_freq": rest_freq,
        "attr_embed": attribution["attr_embed"],
        "attr_head": attribution["attr_head"],
        "attr_expert": attribution["attr_expert"],
        "attr_mlp": attribution["attr_mlp"],
        "k0_model": k0_model,
        "k0_sum": attribution["k0_sum"],
        "qbar": attribution["qbar"],
        "attr_r_x": attribution["attr_r_x"],
        "attr_r_k": attribution["attr_r_k"],
        "layer_share": share,
        "first2_share": np.array([first2_share(share)]),
        "norm_gain_share": norm_gain_share(ratios),
        "peak_layer": np.array([peak_layer(share)], dtype=np.int32),
        "entropy": np.array([entropy(share)]),
    }
    return expected, checks.results


def to_storage(expected):
    """float32 for every float tensor, int32 for integer ones, C-contiguous (safetensors requires it)."""
    stored = {}
    for key, value in expected.items():
        dtype = np.int32 if np.issubdtype(value.dtype, np.integer) else np.float32
        stored[key] = np.ascontiguousarray(value.astype(dtype))
    return stored


def versions():
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }


def build_fixture(name, out_root, seed, device):
    """Create, save and reference one fixture folder; returns the bytes it occupies."""
    model_dir = os.path.join(out_root, name)
    os.makedirs(model_dir, exist_ok=True)
    print(f"[{name}] building", flush=True)
    meta = {"fixture": name, "seed": seed}
    if name == "tiny_random":
        model = build_tiny_random(seed)
        save_checkpoint(model, model_dir)
        rewrite_config_legacy_keys(model_dir)
        meta["config_keys"] = "legacy spellings: rope_theta, num_experts, torch_dtype; head_dim present (16)"
    else:
        model, meta["training"] = build_tiny_trained(seed, device)
        save_checkpoint(model, model_dir)
        meta["config_keys"] = ("as written by transformers save_pretrained: rope_parameters, num_local_experts, "
                               "dtype; head_dim absent (64 / 4 = 16)")
    del model
    probes = make_probes(name, seed)
    np.save(os.path.join(model_dir, "probes.npy"), probes)

    expected, check_results = compute_expected(model_dir, probes, device)
    save_numpy_file(to_storage(expected), os.path.join(model_dir, "expected.safetensors"))
    meta.update({
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python3"] + sys.argv),
        "device": device,
        "versions": versions(),
        "probes": {"shape": list(probes.shape), "first_token": "1 (BOS) in every probe" if name == "tiny_trained"
                   else "uniform random"},
        "summary": summary(expected),
        "self_check_max_relative_errors": check_results,
        "self_check_tolerances": {"float64 paths": TOL_FLOAT64, "float32-inside-transformers paths":
                                  TOL_FLOAT32_INSIDE, "key identity and attribution total": TOL_KEY_IDENTITY},
    })
    with open(os.path.join(model_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"[{name}] {json.dumps(meta['summary'])}", flush=True)
    return sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir))


def summary(expected):
    """A few headline numbers for meta.json and the console."""
    return {
        "max_sink_score": round(float(expected["sink_score"].max()), 4),
        "sink_rate": [round(float(v), 4) for v in expected["sink_rate"]],
        "h_ratio": [round(float(v), 3) for v in expected["h_ratio"]],
        "layer_share": [round(float(v), 4) for v in expected["layer_share"]],
        "peak_layer": int(expected["peak_layer"][0]),
    }


def check_fixture(name, out_root, device):
    """Recompute a fixture from its checkpoint and probes; compare with expected.safetensors. Returns ok."""
    model_dir = os.path.join(out_root, name)
    probes = np.load(os.path.join(model_dir, "probes.npy"))
    expected, check_results = compute_expected(model_dir, probes, device)
    recomputed = to_storage(expected)
    stored = load_numpy_file(os.path.join(model_dir, "expected.safetensors"))
    ok = True
    if set(stored) != set(recomputed):
        print(f"[{name}] tensor names differ: {sorted(set(stored) ^ set(recomputed))}")
        ok = False
    for key in sorted(set(stored) & set(recomputed)):
        a, b = stored[key], recomputed[key]
        if a.shape != b.shape:
            print(f"[{name}] {key}: shape {a.shape} stored, {b.shape} recomputed")
            ok = False
        elif np.issubdtype(a.dtype, np.integer):
            if not np.array_equal(a, b):
                print(f"[{name}] {key}: {int(np.sum(a != b))} integer entries differ")
                ok = False
        else:
            scale = max(float(np.max(np.abs(b))), 1e-30) if b.size else 1.0
            error = float(np.max(np.abs(a.astype(np.float64) - b))) / scale if b.size else 0.0
            if error > TOL_STORED:
                print(f"[{name}] {key}: relative error {error:.3e} > {TOL_STORED:.0e}")
                ok = False
    k0_error = np.max(np.linalg.norm(stored["k0_sum"] - stored["k0_model"], axis=-1)
                      / np.linalg.norm(stored["k0_model"], axis=-1))
    print(f"[{name}] stored k0_sum vs k0_model: max relative error {k0_error:.2e}; "
          f"self-checks: {json.dumps({k: float(f'{v:.2e}') for k, v in check_results.items()})}")
    if k0_error > 10 * TOL_KEY_IDENTITY:  # float32 storage of both sides adds rounding
        ok = False
    print(f"[{name}] {'OK' if ok else 'MISMATCH'}", flush=True)
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="fixture root, e.g. tests/golden")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device for training tiny_trained and for the float64 reference pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true",
                        help="recompute every fixture under --out and compare with its expected.safetensors")
    args = parser.parse_args()

    if args.check:
        results = [check_fixture(name, args.out, args.device) for name in FIXTURES]
        sys.exit(0 if all(results) else 1)

    total = sum(build_fixture(name, args.out, args.seed, args.device) for name in FIXTURES)
    print(f"fixtures written under {args.out}: {total / 1e6:.2f} MB")
    if total > MAX_TOTAL_BYTES:
        sys.exit(f"fixtures take {total} bytes, more than the {MAX_TOTAL_BYTES} allowed")


if __name__ == "__main__":
    main()
