#!/usr/bin/env python3
"""Build golden fixtures for the model families beyond Qwen3-MoE: tiny random checkpoints + references.

Command (run where torch and transformers are installed, e.g. the GPU machine; CPU is enough):

    python3 tools/make_family_goldens.py --out tests/golden/families            # every family
    python3 tools/make_family_goldens.py --out /tmp/gold --families llama olmo2  # a few

For each family a TINY random model (vocab 128, hidden 64, 3 layers, 4 heads of 16) is built with
transformers in float32, its weights re-drawn from a seeded generator (matrices N(0, 0.2), norm gains
U(0.5, 1.5), biases N(0, 0.1): attention of an untrained model is then far from uniform), saved with
`save_pretrained` (safetensors, one file; float32 unless the family says bf16 / fp16) and reloaded from
that folder with eager attention (and eager experts). The reference comes from the reload in float64
(transformers still computes RMSNorm, the RoPE tables and the attention / router softmaxes in float32
inside a float64 model, so expect ~1e-7 relative rounding); a float32 reload is run too and its
largest differences are written to meta.json.

Folder tests/golden/families/<family>/:
- config.json, generation_config.json, model.safetensors: as save_pretrained wrote them (for
  qwen3_moe_fused model.safetensors is rewritten with fused expert tensors, see README.md).
- probes.npy: int32 [3, 20], token 1 first, then uniform in [2, vocab).
- expected.safetensors (float32 unless noted):
    tokens int32 [N, T]; attn_p0 [N, L, H, T] (attention of query i on key 0);
    norm_p0 [N, L+1] (||x_l[0]||; x_0 = embedding output, x_l = output of layer l-1, the last one
    taken BEFORE the final norm through a hook on the last decoder layer);
    norm_rest_median [N, L+1] (numpy median over i >= 1 of ||x_l[i]||);
    residual [N, L+1, T, D] (the x_l themselves, for debugging);
    router_logits [N, L_moe, T, E] and moe_layers int32 [L_moe] (MoE families only: raw router
    logits = gate.weight @ (input of the router) (+ its bias), before any softmax, MoE layers in order);
    sink_mass [N, L, H, T] (gpt_oss only: the learned sink's softmax mass per query, 1 - the row sum of
    transformers' eager attention weights, which drop the sink column);
    logits [N, T, V].
- gpt_oss_mxfp4: the gpt_oss model with every expert matrix replaced by its MXFP4 round trip; the
  reference runs on those (dequantised) weights saved in bf16, then model.safetensors is rewritten with
  `*_blocks` / `*_scales` in the released layout in their place (checked against transformers'
  convert_moe_packed_tensors, which must decode them to the saved bf16 values exactly) and config.json
  gets a quantization_config; meta.json["mxfp4"] holds the checks.
- meta.json: family, versions, seed, date, command, checkpoint tensor names / shapes / dtypes, the
  config, and the facts found while building (hidden_states semantics, router output semantics,
  RoPE inv_freq, float32-vs-float64 differences).
"""

import argparse
import copy
import datetime
import json
import os
import re
import sys
import tempfile
import traceback

import numpy as np
import safetensors
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy_file
from safetensors.torch import load_file as load_torch_file
from safetensors.torch import save_file as save_torch_file

NUM_PROBES = 3
PROBE_LEN = 20
BOS_ID = 1
WEIGHT_STD = 0.2
BIAS_STD = 0.1
GAIN_RANGE = (0.5, 1.5)

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128, bos_token_id=BOS_ID, eos_token_id=2, pad_token_id=0)
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}

DEEPSEEK_V3 = dict(
    hidden_size=160, intermediate_size=288, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
    n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
    norm_topk_prob=True, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
    num_key_value_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_interleave=True,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8})
ROUTER_BIAS_STD = 0.1  # DeepSeek's e_score_correction_bias (a buffer: redrawn explicitly)
FP8_BLOCK = 128
FP8_MAX = 448.0
GPT_OSS = dict(head_dim=16, intermediate_size=32, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
               sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
               attention_bias=True, rms_norm_eps=1e-5, tie_word_embeddings=False, swiglu_limit=7.0,
               rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16})
SINK_LOGIT = (0.5, 1.0)  # learned sink logits N(0.5, 1): some heads put most of their mass on the sink

# name: (config class, model class, config kwargs, saved dtype, is MoE)
FAMILIES = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        intermediate_size=32, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(DEFAULT_ROPE)), "float32", True),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        intermediate_size=32, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=None, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(DEFAULT_ROPE)), "float32", True),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1],
        norm_topk_prob=False, num_key_value_heads=2, use_sliding_window=False, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_parameters=dict(DEFAULT_ROPE)), "float32", True),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        intermediate_size=96, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "bfloat16", False),
    # Llama with biases on the attention and the gated MLP (`mlp_bias`), default rope.
    "llama_mlp_bias": ("LlamaConfig", "LlamaForCausalLM", dict(
        intermediate_size=96, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attention_bias=True, mlp_bias=True, rope_parameters=dict(DEFAULT_ROPE)), "float32", False),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        head_dim=16, intermediate_size=96, num_key_value_heads=2, rms_norm_eps=1e-6,
        use_sliding_window=False, tie_word_embeddings=False, rope_parameters=dict(DEFAULT_ROPE)),
        "float16", False),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(
        intermediate_size=96, num_key_value_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters=dict(DEFAULT_ROPE)), "float32", False),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        intermediate_size=256, hidden_act="gelu", use_parallel_residual=True, layer_norm_eps=1e-5,
        attention_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
        "float32", False),
    # Multi-head latent attention with a low-rank query, yarn rope (attention factor != 1, softmax
    # mscale), interleaved rope, sigmoid group-limited routing with a selection bias, a dense first
    # layer and an ungated shared expert. hidden 160 and intermediate 288 leave partial 128-blocks
    # for the FP8 variant.
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", DEEPSEEK_V3, "float32", True),
    # The same model with its layers' linear weights quantised to FP8 e4m3 with 128 x 128 block
    # scales (weight_scale_inv), as DeepSeek ships them; the reference runs on the dequantised weights.
    "deepseek_v3_fp8": ("DeepseekV3Config", "DeepseekV3ForCausalLM", DEEPSEEK_V3, "float32", True),
    # gpt-oss: a sliding window (8) shorter than the probes (20) on alternating layers, yarn, learned
    # sinks; the _mxfp4 variant stores its experts as MXFP4 blocks/scales (see build_family).
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(GPT_OSS), "bfloat16", True),
    "gpt_oss_mxfp4": ("GptOssConfig", "GptOssForCausalLM", dict(GPT_OSS), "bfloat16", True),
    "qwen3_moe_fused": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], num_key_value_heads=2,
        rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters=dict(DEFAULT_ROPE)), "float32", True),
}

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def log(family, message):
    print(f"[{family}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# Building and saving
# ----------------------------------------------------------------------------------------------


def legacy_rope_variant(kwargs):
    """The same config in transformers-4 spellings (rope_theta + rope_scaling / rotary_pct), as a fallback."""
    kwargs = dict(kwargs)
    rope = dict(kwargs.pop("rope_parameters", None) or {})
    if not rope:
        return kwargs
    theta = rope.pop("rope_theta", 10000.0)
    partial = rope.pop("partial_rotary_factor", None)
    kwargs["rope_theta"] = theta
    if partial is not None:
        kwargs["rotary_pct"] = partial
        kwargs["rotary_emb_base"] = theta
    if rope.get("rope_type", "default") != "default":
        kwargs["rope_scaling"] = rope
    return kwargs


def make_config(family):
    config_name, _, kwargs, _, _ = FAMILIES[family]
    config_cls = getattr(transformers, config_name)
    full = dict(COMMON, **kwargs)
    try:
        return config_cls(**full)
    except Exception as error:  # noqa: BLE001 - fall back to the legacy spellings, then give up
        log(family, f"config with rope_parameters failed ({error!r}); trying legacy rope keys")
        return config_cls(**legacy_rope_variant(full))


def redraw_weights(model, seed):
    """Matrices and embeddings N(0, 0.2), norm gains U(0.5, 1.5), all biases N(0, 0.1); deterministic."""
    generator = torch.Generator().manual_seed(seed + 1)
    norm_params = set()
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            for param in module.parameters(recurse=False):
                norm_params.add(id(param))
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied parameters appear once
            if id(param) in norm_params and not name.endswith("bias"):
                param.uniform_(*GAIN_RANGE, generator=generator)
            elif name.endswith("self_attn.sinks"):
                param.normal_(*SINK_LOGIT, generator=generator)
            elif name.endswith("bias"):
                param.normal_(0.0, BIAS_STD, generator=generator)
            else:
                param.normal_(0.0, WEIGHT_STD, generator=generator)


def build_model(family, seed):
    _, model_name, _, _, _ = FAMILIES[family]
    config = make_config(family)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(torch.float32)
    redraw_weights(model, seed)
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # DeepSeek's selection bias is a buffer in some versions: set it here
        for name, tensor in list(model.named_buffers()) + list(model.named_parameters()):
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * ROUTER_BIAS_STD)
    return model.eval()


def tensor_table(path):
    """{name: [shape, dtype]} of a safetensors file, sorted by name."""
    table = {}
    with safe_open(path, framework="pt") as f:
        for key in sorted(f.keys()):
            tensor = f.get_tensor(key)
            table[key] = [list(tensor.shape), str(tensor.dtype).replace("torch.", "")]
    return table


def tensor_patterns(table):
    """Compact patterns: layer index -> {l}, expert index -> {e}; each with its shape(s), dtype and layers."""
    patterns = {}
    for key, (shape, dtype) in table.items():
        layer = re.search(r"\.layers\.(\d+)\.", key)
        pattern = re.sub(r"\.layers\.\d+\.", ".layers.{l}.", key)
        pattern = re.sub(r"\.experts\.\d+\.", ".experts.{e}.", pattern)
        entry = patterns.setdefault(pattern, {"shapes": [], "dtype": dtype, "layers": []})
        if shape not in entry["shapes"]:
            entry["shapes"].append(shape)
        if layer and int(layer.group(1)) not in entry["layers"]:
            entry["layers"].append(int(layer.group(1)))
    for entry in patterns.values():
        entry["layers"].sort()
    return patterns


def fuse_experts(model_path, num_layers):
    """Rewrite per-expert Qwen3-MoE tensors as mlp.experts.gate_up_proj [E, 2I, D] (gate rows, then up rows)
    and mlp.experts.down_proj [E, D, I]. Returns a description of what was done."""
    tensors = load_torch_file(model_path)
    if any(key.endswith("mlp.experts.gate_up_proj") for key in tensors):
        return "save_pretrained already wrote fused experts; file kept as written"
    out = {}
    expert_key = re.compile(r"^(model\.layers\.(\d+)\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    grouped = {}
    for key, tensor in tensors.items():
        match = expert_key.match(key)
        if match:
            grouped.setdefault(match.group(1), {}).setdefault(int(match.group(3)), {})[match.group(4)] = tensor
        else:
            out[key] = tensor
    if not grouped:
        raise RuntimeError("found neither per-expert nor fused expert tensors")
    for prefix, experts in grouped.items():
        ids = sorted(experts)
        if ids != list(range(len(ids))):
            raise RuntimeError(f"{prefix}: expert ids {ids} are not 0..E-1")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]], dim=0) for e in ids]).contiguous()
        out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in ids]).contiguous()
    save_torch_file(out, model_path, metadata={"format": "pt"})
    return (f"save_pretrained wrote per-expert tensors; rewritten fused for {len(grouped)} of {num_layers} layers: "
            "gate_up_proj [E, 2I, D] = cat(gate_proj.weight, up_proj.weight, dim 0) per expert, down_proj [E, D, I]")


def quantize_fp8(model_path):
    """DeepSeek's FP8 format: every 2-D linear weight of the decoder layers (not the router, norms,
    embedding or lm_head) as float8_e4m3fn with a float32 `<name>_scale_inv` [ceil(out/128), ceil(in/128)]:
    per 128 x 128 block (partial at the edges) scale = max |w| / 448, q = e4m3(w / scale), dequantised
    w' = q * scale. Rewrites model_path with the dequantised float32 weights (the reference's input) and
    returns the FP8 tensors to store afterwards."""
    tensors = load_torch_file(model_path)
    weight = re.compile(r"^model\.layers\.\d+\..*_proj(_with_mqa)?\.weight$")
    stored, dequantised, names, partial = {}, {}, [], 0
    for key, w in tensors.items():
        if not (weight.match(key) and w.dim() == 2):
            stored[key] = w
            dequantised[key] = w
            continue
        rows, cols = w.shape
        nbr, nbc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
        scale = torch.ones(nbr, nbc, dtype=torch.float32)
        q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
        for i in range(nbr):
            for j in range(nbc):
                block = w[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK].float()
                partial += int(block.shape != (FP8_BLOCK, FP8_BLOCK))
                amax = float(block.abs().max())
                s = amax / FP8_MAX if amax > 0 else 1.0
                scale[i, j] = s
                q[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK] = (
                    block / scale[i, j]).to(torch.float8_e4m3fn)
        expanded = scale.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
        dequantised[key] = (q.float() * expanded).to(w.dtype).contiguous()
        stored[key] = q.contiguous()
        stored[key + "_scale_inv"] = scale.contiguous()
        names.append(key)
    save_torch_file(dequantised, model_path, metadata={"format": "pt"})
    return {"stored": stored, "facts": {
        "quantised_tensors": len(names), "partial_blocks": partial, "block": [FP8_BLOCK, FP8_BLOCK],
        "rule": "scale = max|w| / 448 per block (1 where the block is 0); q = (w / scale).to(float8_e4m3fn); "
                "reference computed from q.float() * scale",
        "examples": names[:6]}}


# ----------------------------------------------------------------------------------------------
# MXFP4 (gpt_oss_mxfp4): the experts of the released gpt-oss checkpoints
# ----------------------------------------------------------------------------------------------

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # fp4 e2m1 codes 0-7; bit 3 is the sign


def mxfp4_quantise(w):
    """w [..., K] (K a multiple of 32), blocks of 32 along K -> (blocks uint8 [..., K/32, 16] with the even
    element in the low nibble, scales uint8 [..., K/32] e8m0 = exponent + 127, dequantised values [..., K]).
    Scale: the smallest power of two that brings the block's largest magnitude to <= 6; values rounded to
    the nearest e2m1 magnitude."""
    *prefix, k = w.shape
    g = w.detach().to(torch.float64).cpu().reshape(*prefix, k // 32, 32)
    amax = g.abs().amax(dim=-1)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax.clamp_min(1e-300) / 6.0)),
                      torch.full_like(amax, -127.0)).clamp(-127, 127)
    scaled = g / torch.pow(2.0, exp)[..., None]
    table = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float64)
    index = (scaled.abs()[..., None] - table).abs().argmin(dim=-1)
    negative = scaled < 0
    nibble = (index + 8 * negative.long()).to(torch.uint8)
    blocks = (nibble[..., 0::2] | (nibble[..., 1::2] << 4)).to(torch.uint8).contiguous()
    scales = (exp + 127).to(torch.uint8).contiguous()
    values = torch.where(negative, -table[index], table[index]) * torch.pow(2.0, exp)[..., None]
    return blocks, scales, values.reshape(*prefix, k)


def quantise_experts(model):
    """Replaces every gpt-oss expert matrix by its MXFP4 round trip (so the reference runs on the
    dequantised weights) and returns {checkpoint name: (blocks, scales)} in the released layout:
    gate_up_proj [E, D, 2I] -> gate_up_proj_blocks [E, 2I, D/32, 16], _scales [E, 2I, D/32];
    down_proj [E, I, D] -> down_proj_blocks [E, D, I/32, 16], _scales [E, D, I/32] (rows out x in)."""
    packed = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not (name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj")):
                continue
            blocks, scales, values = mxfp4_quantise(param.transpose(1, 2))  # [E, out, in]
            param.copy_(values.transpose(1, 2).to(param.dtype))
            packed[name] = (blocks, scales)
    if not packed:
        raise RuntimeError("no mlp.experts.gate_up_proj / down_proj parameters to quantise")
    return packed


def write_mxfp4(family, model_dir, packed, reference_logits, probes, device):
    """Rewrites model.safetensors with the MXFP4 blocks/scales in place of the (dequantised) bf16 expert
    matrices, checks them against transformers' own decoder, and tries transformers' MXFP4 loader."""
    model_path = os.path.join(model_dir, "model.safetensors")
    tensors = load_torch_file(model_path)
    facts = {"layout": "blocks [E, out, in/32, 16] uint8 (low nibble = even element), scales [E, out, in/32] "
                       "uint8 e8m0; out x in = 2I x D (gate_up, rows interleaved gate/up) and D x I (down)"}
    worst = 0.0
    try:
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    except Exception:  # noqa: BLE001
        convert_moe_packed_tensors = None
        facts["transformers_decoder"] = "transformers.integrations.mxfp4.convert_moe_packed_tensors not importable"
    for name, (blocks, scales) in packed.items():
        saved = tensors.pop(name)
        tensors[name + "_blocks"] = blocks
        tensors[name + "_scales"] = scales
        if convert_moe_packed_tensors is not None:  # transformers' decoder gives [E, in, out], the param layout
            try:
                decoded = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).cpu().double()
            except Exception:  # noqa: BLE001 - an API change is recorded, not fatal
                facts["transformers_decoder"] = {"error": traceback.format_exc()[-1500:]}
                convert_moe_packed_tensors = None
                continue
            if tuple(decoded.shape) != tuple(saved.shape):
                raise RuntimeError(f"{name}: transformers decodes the blocks to {tuple(decoded.shape)}, "
                                   f"the parameter is {tuple(saved.shape)}")
            worst = max(worst, float((decoded - saved.double()).abs().max()))
    if convert_moe_packed_tensors is not None:
        facts["transformers_decoder_minus_saved_bf16_max_abs"] = worst
        if worst != 0.0:
            raise RuntimeError(f"transformers' convert_moe_packed_tensors disagrees with the written MXFP4 ({worst})")
    save_torch_file(tensors, model_path, metadata={"format": "pt"})
    config_path = os.path.join(model_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    try:  # transformers' own MXFP4 load (dequantised), to the same logits?
        model = transformers.GptOssForCausalLM.from_pretrained(
            model_dir, dtype=torch.float64, attn_implementation="eager",
            quantization_config=transformers.Mxfp4Config(dequantize=True)).to(device).eval()
        logits = run_model(family, model, probes, device)[0]["logits"]
        facts["transformers_mxfp4_reload_logits_minus_reference_max_abs"] = float(
            np.max(np.abs(logits - reference_logits)))
        del model
    except Exception:  # noqa: BLE001 - a cross-check only
        facts["transformers_mxfp4_reload"] = {"error": traceback.format_exc()[-2000:]}
    log(family, f"mxfp4: {json.dumps(facts)[:400]}")
    return facts


# ----------------------------------------------------------------------------------------------
# The reference forward pass
# ----------------------------------------------------------------------------------------------


def _main(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _np(tensor):
    return tensor.detach().to("cpu", torch.float64).numpy()


def num_experts_of(config):
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return 0


def load_model(family, model_dir, dtype, device):
    _, model_name, _, _, is_moe = FAMILIES[family]
    model_cls = getattr(transformers, model_name)
    kwargs = dict(dtype=dtype, attn_implementation="eager", output_loading_info=True)
    attempts = [dict(kwargs, experts_implementation="eager"), kwargs] if is_moe else [kwargs]
    error = None
    for attempt in attempts:
        try:
            model, info = model_cls.from_pretrained(model_dir, **attempt)
            break
        except Exception as caught:  # noqa: BLE001
            error = caught
            log(family, f"from_pretrained({sorted(attempt)}) failed: {caught!r}")
    else:
        raise error
    info = {k: sorted(map(str, v)) if isinstance(v, (list, set, tuple)) else str(v) for k, v in info.items()}
    bad_dtypes = sorted({str(p.dtype) for p in model.parameters() if p.dtype != dtype})
    if bad_dtypes:
        raise RuntimeError(f"reloaded model has parameters in {bad_dtypes}, not {dtype}")
    return model.to(device).eval(), info


def run_model(family, model, probes, device):
    """One forward with outputs + hooks. Returns numpy float64 dict and facts about transformers' outputs."""
    _, _, _, _, is_moe = FAMILIES[family]
    config = model.config
    base = model.base_model
    layers = base.layers
    num_layers = len(layers)
    num_experts = num_experts_of(config)
    hidden = config.hidden_size
    record = {"layer_out": {}, "router_in": {}, "block_in": {}, "router_out": {}, "attn_hook": {}}
    handles = []

    def keep_layer(index):
        def hook(module, args, output):
            record["layer_out"][index] = _main(output)
        return hook

    def keep_router_in(index):
        def hook(module, args, kwargs):
            record["router_in"][index] = args[0] if args else next(iter(kwargs.values()))
        return hook

    def keep_block_in(index):
        def hook(module, args, kwargs):
            record["block_in"][index] = args[0] if args else next(iter(kwargs.values()))
        return hook

    def keep_router_out(index):
        def hook(module, args, output):
            record["router_out"][index] = output
        return hook

    def keep_attn(index):
        def hook(module, args, output):
            if isinstance(output, (tuple, list)) and len(output) > 1:
                record["attn_hook"][index] = output[1] if output[1] is not None else output[-1]
        return hook

    def keep_embed(module, args, output):
        record["embed"] = _main(output)

    handles.append(base.get_input_embeddings().register_forward_hook(keep_embed))
    routers = {}
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(keep_layer(index)))
        for name, module in layer.named_modules():
            leaf = name.split(".")[-1]
            if leaf in ("self_attn", "attention") and name.count(".") == 0:
                handles.append(module.register_forward_hook(keep_attn(index)))
            weight = getattr(module, "weight", None)
            if (leaf in ("gate", "router") and isinstance(weight, torch.Tensor) and weight.dim() == 2
                    and tuple(weight.shape) == (num_experts, hidden)):
                routers[index] = (name, module)
                handles.append(module.register_forward_pre_hook(keep_router_in(index), with_kwargs=True))
                handles.append(module.register_forward_hook(keep_router_out(index)))
                if "." in name:  # the MoE block's input is the router's input, should the gate not be called
                    parent = layer.get_submodule(name.rsplit(".", 1)[0])
                    handles.append(parent.register_forward_pre_hook(keep_block_in(index), with_kwargs=True))
    if is_moe and not routers:
        raise RuntimeError("no router module (.gate or .router with weight [E, D]) found")

    ids = torch.from_numpy(probes.astype(np.int64)).to(device)
    kwargs = dict(input_ids=ids, output_attentions=True, output_hidden_states=True, use_cache=False)
    with torch.no_grad():
        try:
            output = model(**kwargs, **({"output_router_logits": True} if is_moe else {}))
        except TypeError as error:
            log(family, f"forward with output_router_logits failed ({error!r}); without it")
            output = model(**kwargs)
    for handle in handles:
        handle.remove()

    n_probes, seq_len = probes.shape
    facts = {}
    layer_out = [_np(record["layer_out"][i]) for i in range(num_layers)]
    if output.hidden_states is None:
        facts["hidden_states_count"] = 0
        hidden_states = [_np(record["embed"])] + layer_out
    else:
        hidden_states = [_np(h) for h in output.hidden_states]
        facts["hidden_states_count"] = len(hidden_states)
    facts["hidden_states0_minus_embedding_output_max_abs"] = float(
        np.max(np.abs(hidden_states[0] - _np(record["embed"]))))
    residual = np.stack([hidden_states[0]] + layer_out, axis=1)  # [N, L+1, T, D]
    facts["hidden_states_match_layer_hooks_before_last"] = float(max(
        [np.max(np.abs(hidden_states[i + 1] - layer_out[i])) for i in range(num_layers - 1)] + [0.0]))
    if len(hidden_states) == num_layers + 1:
        facts["hidden_states_last_minus_last_layer_hook_max_abs"] = float(
            np.max(np.abs(hidden_states[-1] - layer_out[-1])))
        facts["hidden_states_last_is"] = ("pre-norm (last layer output)"
                                          if facts["hidden_states_last_minus_last_layer_hook_max_abs"] < 1e-12
                                          else "NOT the last layer output (final norm applied)")

    attentions = output.attentions
    if attentions is None or len(attentions) != num_layers or any(a is None for a in attentions):
        facts["attentions_source"] = "hooks on the attention modules (output.attentions unusable)"
        attentions = [record["attn_hook"][i] for i in range(num_layers)]
    else:
        facts["attentions_source"] = "output.attentions"
    attn = np.stack([_np(a) for a in attentions], axis=1)  # [N, L, H, T, T]
    if attn.shape != (n_probes, num_layers, config.num_attention_heads, seq_len, seq_len):
        raise RuntimeError(f"attention shape {attn.shape}")
    facts["attention_row_sum_max_err"] = float(np.max(np.abs(attn.sum(-1) - 1.0)))
    facts["attention_causal_max_above_diagonal"] = float(np.max(np.triu(np.ones((seq_len, seq_len)), 1) * attn))

    result = {"residual": residual, "attn_p0": attn[..., 0], "logits": _np(output.logits)}
    if getattr(layers[0].self_attn, "sinks", None) is not None:
        # gpt-oss: transformers' eager attention softmaxes [scores, sink] and drops the sink
        # column, so the learned sink's mass per query is 1 - the row sum.
        result["sink_mass"] = 1.0 - attn.sum(-1)  # [N, L, H, T]
        facts["sink_mass_range"] = [float(result["sink_mass"].min()), float(result["sink_mass"].max())]
        facts["sink_logits"] = {str(i): [float(v) for v in _np(layer.self_attn.sinks)]
                                for i, layer in enumerate(layers)}
    if routers:
        moe_layers = sorted(routers)
        logits_by_layer = []
        facts["router_module_names"] = {str(i): routers[i][0] for i in moe_layers}
        facts["router_module_class"] = type(routers[moe_layers[0]][1]).__name__
        router_outputs = getattr(output, "router_logits", None)
        for position, index in enumerate(moe_layers):
            module = routers[index][1]
            x = record["router_in"].get(index)
            if x is None:
                facts["router_input_source"] = "MoE block input (the gate module was not called)"
                x = record["block_in"][index]
            raw = F.linear(x.to(module.weight.dtype), module.weight, getattr(module, "bias", None))
            raw = raw.reshape(n_probes, seq_len, num_experts)
            logits_by_layer.append(_np(raw))
            out = record["router_out"].get(index)
            if out is None:
                continue
            first = _main(out)
            facts.setdefault("router_module_returns", type(out).__name__ + (
                f" of {len(out)}: shapes {[list(t.shape) if isinstance(t, torch.Tensor) else None for t in out]}"
                if isinstance(out, (tuple, list)) else f" shape {list(out.shape)}"))
            if not isinstance(first, torch.Tensor) or first.numel() != n_probes * seq_len * num_experts:
                continue  # e.g. DeepSeek's router returns (top-k indices, weights): nothing to compare
            first = _np(first).reshape(n_probes, seq_len, num_experts)
            raw_np = logits_by_layer[-1]
            probs = np.exp(raw_np - raw_np.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            facts.setdefault("router_module_first_output_minus_raw_logits", []).append(
                float(np.max(np.abs(first - raw_np))))
            facts.setdefault("router_module_first_output_minus_softmax", []).append(
                float(np.max(np.abs(first - probs))))
            if router_outputs is not None and position < len(router_outputs) and router_outputs[position] is not None:
                given = _np(router_outputs[position]).reshape(n_probes, seq_len, num_experts)
                facts.setdefault("output_router_logits_minus_raw_logits", []).append(
                    float(np.max(np.abs(given - raw_np))))
                facts.setdefault("output_router_logits_minus_softmax", []).append(
                    float(np.max(np.abs(given - probs))))
        if router_outputs is not None:
            facts["output_router_logits_count"] = len(router_outputs)
        result["router_logits"] = np.stack(logits_by_layer, axis=1)  # [N, L_moe, T, E]
        result["moe_layers"] = np.array(moe_layers, dtype=np.int32)
    return result, facts


def rope_facts(model):
    """inv_freq of every rotary embedding module (to show the llama3 scaling and the partial rotary)."""
    found = {}
    for name, module in model.named_modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            found[name] = {"inv_freq": [float(v) for v in inv_freq.double().cpu()],
                           "attention_scaling": float(getattr(module, "attention_scaling", 1.0))}
    return found


def derived(result):
    """norm_p0 [N, L+1] and norm_rest_median [N, L+1] from the residual stream [N, L+1, T, D]."""
    norms = np.linalg.norm(result["residual"], axis=-1)  # [N, L+1, T]
    return norms[:, :, 0], np.median(norms[:, :, 1:], axis=-1)


def reference(family, model_dir, probes, device):
    """float64 reference (float32 fallback) and the float32-vs-float64 differences."""
    runs, facts, errors = {}, {}, {}
    for dtype_name in ("float64", "float32"):
        try:
            model, info = load_model(family, model_dir, DTYPES[dtype_name], device)
            tied = bool(getattr(model.config, "tie_word_embeddings", False))
            missing = [k for k in info.get("missing_keys", []) if not (tied and k.endswith("lm_head.weight"))]
            if missing or info.get("unexpected_keys") or info.get("mismatched_keys"):
                raise RuntimeError(f"loading info: {info}")
            facts.setdefault("loading_info", {})[dtype_name] = info
            result, run_facts = run_model(family, model, probes, device)
            result["norm_p0"], result["norm_rest_median"] = derived(result)
            runs[dtype_name] = result
            facts[dtype_name] = run_facts
            if dtype_name == "float64":
                facts["rope"] = rope_facts(model)
                facts["module_tree_layer0"] = [f"{n}: {type(m).__name__}" for n, m in
                                               model.base_model.layers[0].named_modules() if n]
            del model
        except Exception:  # noqa: BLE001
            errors[dtype_name] = traceback.format_exc()
            log(family, f"{dtype_name} reference failed:\n{errors[dtype_name]}")
    if not runs:
        raise RuntimeError("neither the float64 nor the float32 reload ran")
    used = "float64" if "float64" in runs else "float32"
    if len(runs) == 2:
        diffs = {}
        for key, value in runs["float64"].items():
            if key == "moe_layers":
                continue
            scale = max(float(np.max(np.abs(value))), 1e-30)
            diffs[key] = {"max_abs": float(np.max(np.abs(runs["float32"][key] - value))),
                          "max_rel_to_max": float(np.max(np.abs(runs["float32"][key] - value))) / scale}
        facts["float32_minus_float64"] = diffs
    facts["reference_dtype"] = used
    if errors:
        facts["errors"] = errors
    return runs[used], facts


# ----------------------------------------------------------------------------------------------
# One family
# ----------------------------------------------------------------------------------------------


def make_probes(vocab_size, seed):
    rng = np.random.default_rng(seed + 100)
    probes = rng.integers(2, vocab_size, size=(NUM_PROBES, PROBE_LEN))
    probes[:, 0] = BOS_ID
    return probes.astype(np.int32)


def versions():
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "safetensors": safetensors.__version__}


def build_family(family, out_root, seed, device):
    model_dir = os.path.join(out_root, family)
    os.makedirs(model_dir, exist_ok=True)
    for stale in os.listdir(model_dir):
        os.remove(os.path.join(model_dir, stale))
    _, _, _, save_dtype, is_moe = FAMILIES[family]
    log(family, f"building (saved in {save_dtype})")
    model = build_model(family, seed)
    internal = {name: list(param.shape) for name, param in model.state_dict().items()}
    with torch.no_grad():  # round the weights to the saved dtype; buffers (RoPE inv_freq) stay float32
        for param in model.parameters():
            param.copy_(param.to(DTYPES[save_dtype]).to(torch.float32))
    mxfp4 = quantise_experts(model) if family.endswith("_mxfp4") else None
    copy.deepcopy(model).to(DTYPES[save_dtype]).save_pretrained(model_dir)
    try:  # the built model, to check the reload against
        with torch.no_grad():
            built_logits = model(
                input_ids=torch.from_numpy(make_probes(model.config.vocab_size, seed).astype(np.int64)),
                use_cache=False).logits.double().numpy()
    except Exception:  # noqa: BLE001 - only a cross-check
        built_logits = None
        log(family, f"built-model forward failed (cross-check skipped):\n{traceback.format_exc()[-600:]}")
    del model
    files = sorted(os.listdir(model_dir))
    if "model.safetensors" not in files:
        raise RuntimeError(f"save_pretrained wrote {files}, not one model.safetensors")
    model_path = os.path.join(model_dir, "model.safetensors")
    saved_table = tensor_table(model_path)
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)

    probes = make_probes(config["vocab_size"], seed)
    np.save(os.path.join(model_dir, "probes.npy"), probes)
    fp8 = None
    if family.endswith("_fp8"):  # the reference runs on the dequantised weights
        fp8 = quantize_fp8(model_path)
    result, facts = reference(family, model_dir, probes, device)
    if fp8 is not None:  # now the checkpoint becomes the FP8 one
        save_torch_file(fp8["stored"], model_path, metadata={"format": "pt"})
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        facts["fp8"] = fp8["facts"]

    built_diff = float(np.max(np.abs(built_logits - result["logits"]))) if built_logits is not None else -1.0
    facts["built_model_float32_logits_minus_reference_max_abs"] = built_diff
    if built_diff > 1e-3 * max(1.0, float(np.max(np.abs(result["logits"])))):
        log(family, f"WARNING: the reloaded checkpoint differs from the built model (logits {built_diff:.3e})")
    meta_extra = {}
    if mxfp4 is not None:
        meta_extra["mxfp4"] = write_mxfp4(family, model_dir, mxfp4, result["logits"], probes, device)
        meta_extra["save_pretrained_tensors"] = tensor_patterns(saved_table)
    if family == "qwen3_moe_fused":
        meta_extra["fused_rewrite"] = fuse_experts(model_path, config["num_hidden_layers"])
        meta_extra["save_pretrained_tensors"] = tensor_patterns(saved_table)
        try:  # does transformers itself load the fused file, and to the same model?
            model, info = load_model(family, model_dir, torch.float64, device)
            fused_logits = run_model(family, model, probes, device)[0]["logits"]
            meta_extra["fused_reload_by_transformers"] = {
                "loading_info": info, "logits_max_abs_diff_vs_reference": float(
                    np.max(np.abs(fused_logits - result["logits"])))}
            del model
        except Exception:  # noqa: BLE001
            meta_extra["fused_reload_by_transformers"] = {"error": traceback.format_exc()[-2000:]}
        log(family, f"fused: {json.dumps(meta_extra['fused_reload_by_transformers'])[:400]}")

    expected = {"tokens": probes.astype(np.int32)}
    for key in ("attn_p0", "sink_mass", "norm_p0", "norm_rest_median", "residual", "router_logits", "moe_layers",
                "logits"):
        if key in result:
            value = result[key]
            dtype = np.int32 if np.issubdtype(value.dtype, np.integer) else np.float32
            expected[key] = np.ascontiguousarray(value.astype(dtype))
    save_numpy_file(expected, os.path.join(model_dir, "expected.safetensors"))

    table = tensor_table(model_path)
    attn_p0 = result["attn_p0"]
    summary = {
        "max_attn_p0_excluding_query0": round(float(attn_p0[..., 1:].max()), 4),
        "mean_attn_p0_excluding_query0_per_layer": [round(float(v), 4) for v in
                                                     attn_p0[..., 1:].mean(axis=(0, 2, 3))],
        "h_ratio_probe0": [round(float(v), 3) for v in result["norm_p0"][0] / result["norm_rest_median"][0]],
    }
    meta = {
        "family": family,
        "seed": seed,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python3"] + sys.argv),
        "device": device,
        "versions": versions(),
        "saved_dtype": save_dtype,
        "init": (f"transformers init, then every parameter re-drawn (torch.Generator seed {seed + 1}, "
                 f"named_parameters order): matrices / embeddings N(0, {WEIGHT_STD}), norm gains "
                 f"U{GAIN_RANGE}, biases N(0, {BIAS_STD})"),
        "probes": {"shape": list(probes.shape), "first_token": BOS_ID, "rest": "uniform in [2, vocab)",
                   "numpy_seed": seed + 100},
        "expected_tensors": {k: [list(v.shape), str(v.dtype)] for k, v in expected.items()},
        "model_tensors": table,
        "model_tensor_patterns": tensor_patterns(table),
        "internal_state_dict_shapes": internal,
        "files": sorted(os.listdir(model_dir)) + ["meta.json"],
        "config": config,
        "facts": facts,
        "summary": summary,
    }
    meta.update(meta_extra)
    with open(os.path.join(model_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir))
    log(family, f"ok, {size / 1e3:.0f} kB, reference {facts['reference_dtype']}; {json.dumps(summary)}")
    return size


def dequantise_fp8_copy(model_dir, out_dir):
    """Copies a fixture with its FP8 tensors dequantised (q.float() * scale per 128 x 128 block, as
    quantize_fp8 made them) to float32, the `_scale_inv` tensors and the quantization_config dropped."""
    tensors = load_torch_file(os.path.join(model_dir, "model.safetensors"))
    plain = {}
    for key, w in tensors.items():
        if key.endswith("_scale_inv"):
            continue
        if w.dtype == torch.float8_e4m3fn:
            scale = tensors[key + "_scale_inv"]
            rows, cols = w.shape
            expanded = scale.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
            w = (w.float() * expanded).contiguous()
        plain[key] = w
    save_torch_file(plain, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)


def add_hf_bf16(family, out_root, device):
    """Adds `attn_p0_hf_bf16` (and for gpt_oss `sink_mass_hf_bf16`) to an existing fixture:
    transformers' own bf16 eager attention to position 0 (and to the learned sink) on the same
    checkpoint and probes (device: the GPU), the yardstick for bf16 GPU backends (docs/metrics.md
    section 7: closer to float64 than transformers' bf16)."""
    from safetensors.numpy import load_file
    model_dir = os.path.join(out_root, family)
    expected = load_file(os.path.join(model_dir, "expected.safetensors"))
    probes = expected["tokens"].astype(np.int64)
    if family.endswith("_fp8"):
        # The reference ran on the dequantised weights: the same weights in bf16, from a copy of
        # the fixture with every FP8 tensor times its block scales and no quantization_config.
        with tempfile.TemporaryDirectory() as plain:
            dequantise_fp8_copy(model_dir, plain)
            model, _ = load_model(family, plain, torch.bfloat16, device)
    else:
        model, _ = load_model(family, model_dir, torch.bfloat16, device)
    result, _ = run_model(family, model, probes, device)
    expected["attn_p0_hf_bf16"] = np.ascontiguousarray(result["attn_p0"].astype(np.float32))
    if "sink_mass" in result:  # gpt_oss: the learned sink's mass, the same yardstick
        expected["sink_mass_hf_bf16"] = np.ascontiguousarray(result["sink_mass"].astype(np.float32))
    save_numpy_file(expected, os.path.join(model_dir, "expected.safetensors"))
    worst = float(np.max(np.abs(result["attn_p0"] - expected["attn_p0"])))
    log(family, f"transformers bf16 eager on {device}: worst |A[i,0] - float64| = {worst:.5f}")
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--add-hf-bf16", action="store_true",
                        help="only add attn_p0_hf_bf16 (transformers bf16 eager) to existing fixtures")
    parser.add_argument("--out", required=True, help="output root, e.g. tests/golden/families")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    if args.add_hf_bf16:
        for family in args.families:
            add_hf_bf16(family, args.out, args.device)
        return
    failed, total = [], 0
    for family in args.families:
        try:
            total += build_family(family, args.out, args.seed, args.device)
        except Exception:  # noqa: BLE001 - keep going, report at the end
            failed.append(family)
            log(family, f"FAILED:\n{traceback.format_exc()}")
    print(f"written under {args.out}: {total / 1e6:.2f} MB; failed: {failed or 'none'}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
