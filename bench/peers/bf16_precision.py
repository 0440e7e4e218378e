#!/usr/bin/env python3
"""Our bf16 forward and backward against PyTorch's bf16, both measured from PyTorch's f32, on a real
model's weights and one text: STYLE.md's bf16 rule at the scale of a whole model (ours should be at
most twice the reference's error). Needs torch and transformers, and two dumps of
examples/precision_dump.rs for the same text: ours in f32 on the CPU and ours in bf16 on CUDA (a GPU,
or scripts/emulated-gpu):
    cargo run --release --example precision_dump -- MODEL TEXT cpu /tmp/ours-f32
    scripts/emulated-gpu target/release/examples/precision_dump MODEL TEXT cuda /tmp/ours-bf16
    python3 bench/peers/bf16_precision.py --model MODEL --f32 /tmp/ours-f32 --bf16 /tmp/ours-bf16
Prints, per forward, the mean and max absolute error of the text's per-token log-probs, and per
backward the median and max over the parameter tensors of the gradient's relative L2 error (the
gradient of the log-probs' sum), then the per-tensor ratio of ours to PyTorch's.
"""
import argparse
import json

import numpy as np
import torch
from transformers import LlamaForCausalLM


def load_dump(prefix):
    meta = json.load(open(prefix + ".json"))
    raw = np.fromfile(prefix + ".bin", dtype=np.float32)
    grads, at = {}, 0
    for t in meta["tensors"]:
        n = int(np.prod(t["shape"]))
        grads[t["name"]] = torch.from_numpy(raw[at:at + n].copy()).reshape(t["shape"])
        at += n
    return meta["tokens"], np.array(meta["logprobs"]), grads


def torch_run(model, tokens, dtype, attn):
    m = LlamaForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation=attn)
    x = torch.tensor([tokens])
    logits = m(x).logits.float()
    lp = torch.log_softmax(logits[0, :-1], -1).gather(1, x[0, 1:, None])[:, 0]
    lp.sum().backward()
    return lp.detach().numpy(), {n: p.grad.float() for n, p in m.named_parameters()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--f32", required=True, help="examples/precision_dump output prefix, CPU")
    ap.add_argument("--bf16", required=True, help="examples/precision_dump output prefix, CUDA")
    a = ap.parse_args()
    tokens, ours32_lp, ours32 = load_dump(a.f32)
    tokens16, ours16_lp, ours16 = load_dump(a.bf16)
    assert tokens == tokens16, "the two dumps are of different texts"
    ref_lp, ref = torch_run(a.model, tokens, torch.float32, "eager")
    runs = {"ours f32 (CPU)": (ours32_lp, ours32), "ours bf16 (CUDA)": (ours16_lp, ours16)}
    for attn in ["sdpa", "eager"]:
        runs[f"PyTorch bf16 ({attn})"] = torch_run(a.model, tokens, torch.bfloat16, attn)
    print(f"{len(tokens) - 1} scored tokens, {len(ref)} parameter tensors, errors against PyTorch f32")
    print(f"{'forward and backward':<24} {'logp mean':>10} {'logp max':>10} {'grad median':>12} {'grad max':>10}")
    rel = {}
    for name, (lp, grads) in runs.items():
        d = np.abs(lp - ref_lp)
        rel[name] = {n: ((grads[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in ref.items()}
        e = np.array(list(rel[name].values()))
        print(f"{name:<24} {d.mean():>10.2e} {d.max():>10.2e} {np.median(e):>12.2e} {e.max():>10.2e}")
    ours, theirs = rel["ours bf16 (CUDA)"], rel["PyTorch bf16 (sdpa)"]
    ratio = np.array([ours[n] / max(theirs[n], 1e-30) for n in ref])
    print(f"gradient error, ours bf16 / PyTorch bf16 (sdpa) per tensor: median {np.median(ratio):.2f}, "
          f"max {ratio.max():.2f}, above 2: {(ratio > 2).sum()} of {len(ratio)}")
    for r, n in sorted(zip(ratio, ref), reverse=True)[:5]:
        print(f"  {r:.2f} {n}: ours {ours[n]:.3e}, PyTorch {theirs[n]:.3e}")


if __name__ == "__main__":
    main()
