#!/usr/bin/env python3
"""A DPO step of SmolLM2-135M's shape (random weights) in TRL / transformers on the same batch as
`rlhf bench train --trainer dpo`: 16 pairs x 1,024 tokens (half prompt), bf16, policy forward and
backward on chosen and rejected plus the reference forward. Prints tokens/s and peak memory, then
runs our binary in the same call and prints the ratios.

Needs torch and transformers (and trl for the DPOTrainer path); carry them as wheels if the GPU machine
lacks them. Without trl it times the same computation written as TRL's `concatenated_forward` and
sigmoid loss do it.
    python3 bench/peers/trl_dpo.py --rlhf gpu-bundle/rlhf
"""
import argparse
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def smollm2_config():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192)


def sequence_logps(model, ids, prompt_len):
    logits = model(ids).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return lp[:, prompt_len - 1:].sum(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rlhf", help="our binary, run in the same call")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    try:
        from transformers import LlamaForCausalLM
    except ImportError as e:
        print(f"transformers is not importable here ({e}); carry its wheel to time the peer", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(smollm2_config()).cuda().to(torch.bfloat16)
    reference = LlamaForCausalLM(smollm2_config()).cuda().to(torch.bfloat16).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    p = a.seq_len // 2
    ids = torch.randint(0, 49152, (2 * a.pairs, a.seq_len), device="cuda")
    ids[a.pairs:, :p] = ids[:a.pairs, :p]

    def step():
        with torch.no_grad():
            ref = sequence_logps(reference, ids, p)
        pol = sequence_logps(policy, ids, p)
        delta = (pol[:a.pairs] - ref[:a.pairs]) - (pol[a.pairs:] - ref[a.pairs:])
        loss = -F.logsigmoid(0.1 * delta).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.reps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    ms = sorted(times)[len(times) // 2] * 1e3
    tokens = 2 * a.pairs * a.seq_len
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"transformers (TRL's DPO computation, eager): {ms:.1f} ms/step, {tokens / ms * 1e3:.0f} tokens/s, peak {peak:.2f} GiB")
    if a.rlhf:
        out = subprocess.run([a.rlhf, "bench", "train", "--trainer", "dpo", "--device", "cuda", "--pairs", str(a.pairs),
                              "--seq-len", str(a.seq_len)], capture_output=True, text=True)
        print(out.stdout, end="")
        for line in out.stdout.splitlines():
            if "ms/step" in line:
                ours = float(line.split()[0])
                print(f"speed-up over transformers: {ms / ours:.2f}x (tokens/s ratio)")


if __name__ == "__main__":
    main()
