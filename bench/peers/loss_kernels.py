#!/usr/bin/env python3
"""Times the loss-kernel shapes of `rlhf bench kernels` in PyTorch eager and torch.compile (and TRL's
chunked log-prob helper when its wheel is importable), runs our binary in the same call on the same
card, and prints speed-ups (peer time / our time; above 1 means we are faster).

Run on the GPU machine, which has PyTorch and Triton but no network:
    python3 bench/peers/loss_kernels.py --rlhf gpu-bundle/rlhf [--out results.json]
"""
import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F


def median_ms(fn, warmup=3, reps=15):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def logprob_entropy(logits, target):
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def kl_full(policy, reference):
    lp = torch.log_softmax(policy.float(), -1)
    lq = torch.log_softmax(reference.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def dpo_sigmoid(policy, reference, mask, beta=0.1):
    seq = (policy * mask).sum(-1)
    ref = (reference * mask).sum(-1)
    b = seq.shape[0] // 2
    delta = (seq[:b] - ref[:b]) - (seq[b:] - ref[b:])
    return -F.logsigmoid(beta * delta).mean()


def linear_logprob(hidden, weight, target):
    return logprob_entropy(hidden @ weight.t(), target)


def peers():
    dev = "cuda"
    bf16 = torch.bfloat16
    compiled = {name: torch.compile(fn) for name, fn in
                [("logprob", logprob_entropy), ("kl", kl_full), ("dpo", dpo_sigmoid), ("linear", linear_logprob)]}
    rows = []

    def run(kernel, shape, make, fn_name, fn):
        for mode, f in (("eager", fn), ("torch.compile", compiled[fn_name])):
            try:
                args = make()

                def step():
                    out = f(*args)
                    loss = sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,)))
                    loss.backward()

                rows.append({"kernel": kernel, "shape": shape, "peer": mode, "median_ms": median_ms(step)})
            except Exception as e:  # an out-of-memory or compile failure is a result too
                rows.append({"kernel": kernel, "shape": shape, "peer": mode, "error": str(e).splitlines()[0][:200]})
            torch.cuda.empty_cache()

    n = 8192
    for vocab in (49152, 128256):
        shape = f"{n}x{vocab} bf16"
        run("logprob fwd+bwd", shape,
            lambda: (torch.randn(n, vocab, device=dev, dtype=bf16).mul_(2).requires_grad_(),
                     torch.randint(0, vocab, (n,), device=dev)), "logprob", logprob_entropy)
        run("kl_full fwd+bwd", shape,
            lambda: (torch.randn(n, vocab, device=dev, dtype=bf16).mul_(2).requires_grad_(),
                     torch.randn(n, vocab, device=dev, dtype=bf16).mul_(2)), "kl", kl_full)
    for (n, d, vocab) in ((8192, 576, 49152), (8192, 4096, 128256)):
        run("linear_logprob fwd+bwd", f"n{n} d{d} V{vocab} bf16",
            lambda: (torch.randn(n, d, device=dev, dtype=bf16).requires_grad_(),
                     (torch.randn(vocab, d, device=dev, dtype=bf16) / d ** 0.5).requires_grad_(),
                     torch.randint(0, vocab, (n,), device=dev)), "linear", linear_logprob)
    r, t = 128, 1024
    run("pref_loss dpo sigmoid", "64 pairs x 1024",
        lambda: (torch.rand(r, t, device=dev).mul_(-4).requires_grad_(), torch.rand(r, t, device=dev).mul_(-4),
                 torch.ones(r, t, device=dev)), "dpo", dpo_sigmoid)
    try:
        import trl  # noqa: F401
        from trl.trainer.utils import selective_log_softmax
        for vocab in (49152, 128256):
            logits = torch.randn(n, vocab, device=dev, dtype=bf16).requires_grad_()
            target = torch.randint(0, vocab, (n,), device=dev)

            def step():
                selective_log_softmax(logits, target).sum().backward()

            rows.append({"kernel": "logprob fwd+bwd", "shape": f"{n}x{vocab} bf16", "peer": "trl selective_log_softmax (no entropy)",
                         "median_ms": median_ms(step)})
    except ImportError as e:
        print(f"TRL not importable here ({e}); its log-prob helper is not timed", file=sys.stderr)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rlhf", required=True, help="path to the rlhf binary")
    ap.add_argument("--out", help="write every number as JSON here")
    a = ap.parse_args()
    ours_out = subprocess.run([a.rlhf, "bench", "kernels", "--device", "cuda", "--json"], check=True,
                              capture_output=True, text=True).stdout
    lines = [json.loads(l) for l in ours_out.splitlines() if l.strip()]
    ceilings, ours = lines[0], {(r["kernel"], r["shape"]): r for r in lines[1:]}
    theirs = peers()
    print(f"device: {ceilings['device']}  copy {ceilings['copy_gbs']:.0f} GB/s  GEMM {ceilings['gemm_tflops']:.1f} TFLOP/s")
    print(f"{'kernel':<24} {'shape':<26} {'ours ms':>9} {'peer':<40} {'peer ms':>9} {'speed-up':>8}")
    for p in theirs:
        o = ours.get((p["kernel"], p["shape"]))
        our_ms = o["median_ms"] if o else float("nan")
        if "error" in p:
            print(f"{p['kernel']:<24} {p['shape']:<26} {our_ms:>9.3f} {p['peer']:<40} {'failed':>9}  {p['error']}")
        else:
            print(f"{p['kernel']:<24} {p['shape']:<26} {our_ms:>9.3f} {p['peer']:<40} {p['median_ms']:>9.3f} {p['median_ms'] / our_ms:>7.2f}x")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"ceilings": ceilings, "ours": lines[1:], "peers": theirs}, f, indent=1)


if __name__ == "__main__":
    main()
