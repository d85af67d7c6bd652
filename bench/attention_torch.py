#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention backends at the shapes of bench_attention, same GPU.

Causal, bf16, q [B, H, T, d] and k, v expanded from the KV heads to H (what transformers' sdpa
attention hands to PyTorch). Prints markdown rows in bench_attention's format: shape, backend,
median ms of --iters CUDA-event timings after a warm-up, TFLOP/s of the causal products
(4 B H d T (T + 1) / 2). A backend that refuses a shape prints why.

    python3 bench/attention_torch.py --shapes 8x4096,1x32768 --heads 32 --kv-heads 4 --head-dim 128
"""
import argparse
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8x4096,1x32768")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("attention_torch.py: torch sees no CUDA device", file=sys.stderr)
        return 1
    backends = [("torch sdpa flash", SDPBackend.FLASH_ATTENTION),
                ("torch sdpa cuDNN", SDPBackend.CUDNN_ATTENTION),
                ("torch sdpa efficient", SDPBackend.EFFICIENT_ATTENTION)]
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"{torch.cuda.get_device_name()}")
    for item in a.shapes.split(","):
        B, T = (int(v) for v in item.split("x"))
        H, KV, d = a.heads, a.kv_heads, a.head_dim
        g = torch.Generator(device="cuda").manual_seed(1)
        q = torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, KV, T, d, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, KV, T, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k = k.repeat_interleave(H // KV, dim=1)
        v = v.repeat_interleave(H // KV, dim=1)
        flops = B * 4.0 * H * d * T * (T + 1) / 2
        for name, be in backends:
            try:
                with sdpa_kernel([be]):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    torch.cuda.synchronize()
                    ms = []
                    for _ in range(a.iters):
                        e0 = torch.cuda.Event(enable_timing=True)
                        e1 = torch.cuda.Event(enable_timing=True)
                        e0.record()
                        F.scaled_dot_product_attention(q, k, v, is_causal=True)
                        e1.record()
                        e1.synchronize()
                        ms.append(e0.elapsed_time(e1))
                ms.sort()
                med = ms[len(ms) // 2]
                print(f"| {B} x {T} | {name} | {med:.3f} | {flops / (med * 1e-3) / 1e12:.1f} | |")
            except Exception as e:  # a backend that cannot run this shape
                msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                print(f"| {B} x {T} | {name} | | | refused: {msg} |")
        del q, k, v
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
