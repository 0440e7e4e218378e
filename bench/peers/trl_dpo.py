#!/usr/bin/env python3
"""TRL's DPOTrainer on a DPO step of SmolLM2-135M's shape (random weights) and the batch of
`rlhf bench train --trainer dpo`: 16 pairs x 1,024 tokens (half prompt), sigmoid loss, beta 0.1, a
frozen reference model on the GPU. Weights in f32 with bf16 autocast (TrainingArguments' bf16), as ours
keep f32 master weights and compute in bf16. Prints the median step time, tokens/s and peak memory,
then runs our binary in the same call and prints the ratios the issue asks for.

Needs torch, transformers and trl (with datasets, dill, multiprocess): gpu-run installs the wheels
that gpu-bundle carries. Without trl it times the same computation written as TRL's forward and
sigmoid loss do it, in plain transformers, and says so.
    python3 bench/peers/trl_dpo.py --rlhf gpu-bundle/rlhf
    python3 bench/peers/trl_dpo.py --tiny --pairs 2 --seq-len 64   # CPU smoke run of the script
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_common import (EOS, VOCAB, StepTimer, random_words, run_ours, smollm2_config, trl_version,  # noqa: E402
                       word_tokenizer)


def trl_dpo(a, cuda):
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer
    gen = torch.Generator().manual_seed(0)
    p = a.seq_len // 2
    c = a.seq_len - p
    # Prompts end with a space (TRL joins prompt and completion as text); completions end with EOS.
    rows = [{"prompt": random_words(gen, p) + " ",
             "chosen": random_words(gen, c - 1) + f" w{EOS}",
             "rejected": random_words(gen, c - 1) + f" w{EOS}"} for _ in range(a.pairs * (a.reps + 1))]
    torch.manual_seed(0)
    cfg = smollm2_config(a.tiny)
    policy, reference = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-dpo-"), per_device_train_batch_size=a.pairs,
                     max_steps=a.reps + 1, learning_rate=1e-6, beta=0.1, loss_type=["sigmoid"],
                     max_length=a.seq_len, bf16=cuda, use_cpu=not cuda, report_to="none", save_strategy="no",
                     logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    timer = StepTimer(cuda)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=word_tokenizer(), callbacks=[timer.callback()])
    trainer.train()
    return timer.median_ms(), timer.peak_gib(), timer.peak_allocated_gib(), "TRL DPOTrainer"


def eager_dpo(a, cuda):
    """TRL's concatenated forward and sigmoid loss written out in plain transformers."""
    from transformers import LlamaForCausalLM
    dev = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    policy = LlamaForCausalLM(smollm2_config(a.tiny)).to(dev)
    reference = LlamaForCausalLM(smollm2_config(a.tiny)).to(dev).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    p = a.seq_len // 2
    ids = torch.randint(3, VOCAB, (2 * a.pairs, a.seq_len), device=dev)
    ids[a.pairs:, :p] = ids[:a.pairs, :p]

    def logps(model):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            logits = model(ids).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return lp[:, p - 1:].sum(-1)

    timer = StepTimer(cuda)
    for _ in range(a.reps + 1):
        timer.sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = logps(reference)
        pol = logps(policy)
        delta = (pol[:a.pairs] - ref[:a.pairs]) - (pol[a.pairs:] - ref[a.pairs:])
        (-F.logsigmoid(0.1 * delta).mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        timer.sync()
        timer.times.append(time.perf_counter() - t0)
        if len(timer.times) == 1 and cuda:
            torch.cuda.reset_peak_memory_stats()
    return (timer.median_ms(), timer.peak_gib(), timer.peak_allocated_gib(),
            "transformers eager (TRL's DPO computation; trl not importable)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rlhf", help="our binary, run in the same call")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--tiny", action="store_true", help="a two-layer model on the CPU: checks the script only")
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.tiny
    version = trl_version()
    ms, peak, allocated, what = (trl_dpo if version else eager_dpo)(a, cuda)
    tokens = 2 * a.pairs * a.seq_len
    label = f"{what} {version}" if version else what
    print(f"peer: {label}: {ms:.1f} ms/step, {tokens / ms * 1e3:.0f} tokens/s, peak reserved {peak:.2f} GiB "
          f"(allocated {allocated:.2f}) ({a.pairs} pairs x {a.seq_len} tokens, {'cuda' if cuda else 'cpu'})")
    if a.tiny and a.rlhf:
        print("(--tiny: the peer ran a two-layer model and ours SmolLM2's shape; the ratios check the script only)")
    ours = run_ours(a.rlhf, ["bench", "train", "--trainer", "dpo", "--device", "cuda" if cuda else "cpu",
                             "--pairs", str(a.pairs), "--seq-len", str(a.seq_len)])
    for line in ours.splitlines():
        if "ms/step" in line:
            # Ours runs each pair's prompt once, then (the --no-shared-prompts line) every
            # sequence whole, as the peer does.
            how = " with every prompt on both sides" if "--no-shared-prompts" in line else ""
            print(f"ours vs peer{how}: {ms / float(line.split()[0]):.2f}x tokens/s")
        gib = [float(w) for w in line.replace(",", " ").split() if w.replace(".", "", 1).isdigit()]
        if not (cuda and gib and "GiB" in line):
            continue
        if line.startswith("device memory in use"):
            print(f"ours vs peer: {gib[-1] / peak:.2f}x memory (ours the most in use seen in a step, "
                  f"the peer's peak reserved)")
        elif line.startswith("tensor memory"):
            print(f"ours vs peer: {gib[-1] / allocated:.2f}x memory (ours the most tensor bytes alive at once, "
                  f"the peer's max_memory_allocated)")


if __name__ == "__main__":
    main()
