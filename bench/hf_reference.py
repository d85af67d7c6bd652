#!/usr/bin/env python3
"""Reference timings of Hugging Face transformers on the GPU, for bench/run_gpu_bench.sh.

Builds the config.json's model (its model_type through transformers' Auto classes: Qwen3-MoE,
gpt-oss, ...) with random bf16 weights on the device (speed only: the numbers it computes mean
nothing; a quantization_config such as gpt-oss's MXFP4 is dropped, so the experts are bf16 as in
sinkscope's synthetic weights) and times forwards with CUDA events after warm-up:
  eager: attn_implementation="eager" with output_attentions=True (what people use to get
         attention maps today; it materialises B x H x T x T per layer);
  sdpa:  attn_implementation="sdpa", a plain forward without attention output.
Both forwards ask for the logits of the last position only (logits_to_keep=1), so neither pays for
a [B, T, vocab] lm_head product that sinkscope does not compute either.

Prints one markdown row per (mode, B x T): tokens/s, ms per forward, peak GPU memory, or "OOM".
usage: hf_reference.py --config bench/qwen3_30b_a3b.json --run eager:1:4096 --run sdpa:8:4096
"""
import argparse
import json
import time

import torch
import transformers


def build(config_path, attn, layers):
    with open(config_path) as f:
        raw = json.load(f)
    if layers:
        raw["num_hidden_layers"] = layers
    if "layer_types" in raw:
        raw["layer_types"] = raw["layer_types"][: raw["num_hidden_layers"]]
    keep = {k: v for k, v in raw.items()
            if k not in ("architectures", "quantization_config", "_comment", "model_type")}
    cfg = transformers.AutoConfig.for_model(raw["model_type"], **keep)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: an fp32 copy would not fit
    try:
        with torch.device("cuda"):
            model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    return model, cfg


def time_forward(model, cfg, batch, seq, attentions, warmup, iters):
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = model(input_ids=ids, output_attentions=attentions, logits_to_keep=1,
                        use_cache=False)
            end.record()
            torch.cuda.synchronize()
            if attentions and out.attentions is None:
                raise RuntimeError("the model returned no attention weights")
            del out
            if i >= warmup:
                times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--run", action="append", required=True, help="MODE:B:T, MODE eager or sdpa")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: keep)")
    args = ap.parse_args()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}", flush=True)
    print("| implementation | B x T | tokens/s | ms/forward | peak GPU memory (GiB) |")
    print("|---|---|---|---|---|", flush=True)
    models = {}
    for run in args.run:
        mode, b, t = run.split(":")
        b, t = int(b), int(t)
        attn = "eager" if mode == "eager" else "sdpa"
        if attn not in models:
            models.clear()
            torch.cuda.empty_cache()
            t0 = time.time()
            try:
                models[attn] = build(args.config, attn, args.layers)
            except (ValueError, NotImplementedError) as e:  # e.g. a family without sdpa
                print(f"| HF {attn} | {b} x {t} | not available: {str(e).splitlines()[0][:120]} | | |",
                      flush=True)
                continue
            print(f"<!-- built the {attn} model in {time.time() - t0:.0f} s -->", flush=True)
        model, cfg = models[attn]
        label = "HF eager + output_attentions" if mode == "eager" else "HF sdpa (plain forward)"
        try:
            ms, peak = time_forward(model, cfg, b, t, mode == "eager", args.warmup, args.iters)
            print(f"| {label} | {b} x {t} | {b * t / ms * 1e3:.0f} | {ms:.1f} | {peak:.1f} |",
                  flush=True)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"| {label} | {b} x {t} | OOM | | > {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
