#!/usr/bin/env python3
"""Times PyTorch SDPA (flash and cuDNN backends) on the shapes of `rlhf bench attention`: causal,
bf16, batch*T = 16k tokens, H*D = 2,048, D = 64 and 128; prints TFLOP/s (forward 4*B*H*T^2*D / 2,
backward 2.5x) beside ours from the same call.
    python3 bench/peers/attention.py --rlhf gpu-bundle/rlhf
"""
import argparse
import subprocess

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rlhf")
    a = ap.parse_args()
    print(f"{'backend':<10} {'T':>6} {'D':>4} {'fwd TFLOP/s':>12} {'bwd TFLOP/s':>12}")
    for d in (64, 128):
        h = 2048 // d
        for t in (512, 1024, 2048, 4096, 8192, 16384):
            b = max(16384 // t, 1)
            flops = 4 * b * h * t * t * d / 2
            for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
                try:
                    with sdpa_kernel(backend):
                        fwd = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
                        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                        g = torch.randn_like(out)
                        bwd = median_ms(lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True))
                    print(f"{name:<10} {t:>6} {d:>4} {flops / fwd / 1e9:>12.1f} {2.5 * flops / bwd / 1e9:>12.1f}")
                except RuntimeError as e:
                    print(f"{name:<10} {t:>6} {d:>4} unavailable: {str(e).splitlines()[0][:80]}")
    if a.rlhf:
        print(subprocess.run([a.rlhf, "bench", "attention", "--device", "cuda"], capture_output=True, text=True).stdout)


if __name__ == "__main__":
    main()
