#!/usr/bin/env python3
"""TRL's GRPOTrainer (generation with transformers' generate) on the rollout and update of
`rlhf bench train --trainer grpo`: SmolLM2-135M's shape with random weights, 64 responses per step (8
prompts x 8 generations) of 512 prompt + 512 sampled tokens (min_new_tokens pins the length, as our
bench samples without EOS), temperature 1, a k3 KL term (beta 0.04, so the reference forward runs as in
ours), one update per rollout. Weights in f32 with bf16 autocast. Generation is timed inside the step
by wrapping the model's generate; training is the rest of the step. Then runs our binary in the same
call and prints the ratios.
    python3 bench/peers/trl_grpo.py --rlhf gpu-bundle/rlhf
    python3 bench/peers/trl_grpo.py --tiny --responses 8 --seq-len 32   # CPU smoke run of the script
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_common import StepTimer, random_words, run_ours, smollm2_config, trl_version, word_tokenizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rlhf", help="our binary, run in the same call")
    ap.add_argument("--responses", type=int, default=64, help="responses per step (a multiple of --group-size)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024, help="prompt + response tokens (half each)")
    ap.add_argument("--reps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--tiny", action="store_true", help="a two-layer model on the CPU: checks the script only")
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.tiny
    version = trl_version()
    if not version:
        print("peer: TRL GRPOTrainer not timed")
        sys.exit(2)
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    p = a.seq_len // 2
    new = a.seq_len - p
    prompts_per_step = a.responses // a.group_size
    gen = torch.Generator().manual_seed(0)
    rows = [{"prompt": random_words(gen, p) + " "} for _ in range(prompts_per_step * (a.reps + 1))]
    generated = []

    def token_reward(prompts, completions, completion_ids, **kw):
        # Varies within each group, so the advantages and the policy gradient are not zero.
        generated.append(sum(len(c) for c in completion_ids))
        return [float(sum(c) % 97) / 97 for c in completion_ids]

    # TRL builds the reference model from the policy's path, so the random policy goes to disk first.
    torch.manual_seed(0)
    model_dir = tempfile.mkdtemp(prefix="trl-grpo-model-")
    LlamaForCausalLM(smollm2_config(a.tiny)).save_pretrained(model_dir)
    word_tokenizer().save_pretrained(model_dir)
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-grpo-"), per_device_train_batch_size=a.responses,
                      num_generations=a.group_size, max_completion_length=new,
                      generation_kwargs={"min_new_tokens": new}, temperature=1.0, top_p=1.0, top_k=0, beta=0.04,
                      num_iterations=1, max_steps=a.reps + 1, learning_rate=1e-6, bf16=cuda, use_cpu=not cuda,
                      report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                      dataloader_num_workers=0, seed=0)
    timer = StepTimer(cuda)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=token_reward, args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=word_tokenizer(),
                          callbacks=[timer.callback()])
    gen_secs = []
    inner = trainer.model.generate

    def timed_generate(*args, **kw):
        timer.sync()
        t0 = time.perf_counter()
        out = inner(*args, **kw)
        timer.sync()
        gen_secs.append(time.perf_counter() - t0)
        return out

    trainer.model.generate = timed_generate
    trainer.train()
    n = len(timer.times)
    if n < 2 or len(gen_secs) < n:
        print(f"peer: TRL GRPOTrainer ran {n} steps and {len(gen_secs)} generations; expected {a.reps + 1} each")
        sys.exit(1)
    steps = range(1, n)  # the first is warm-up
    gen_s = sorted(gen_secs[i] for i in steps)[len(steps) // 2]
    step_s = timer.median_ms() * 1e-3
    tokens_generated = sorted(generated[i] for i in steps)[len(steps) // 2]
    training_tokens = a.responses * p + tokens_generated
    gen_tps, train_tps = tokens_generated / gen_s, training_tokens / max(step_s - gen_s, 1e-9)
    print(f"peer: TRL {version} GRPOTrainer ({'cuda' if cuda else 'cpu'}): {a.responses} responses of {p} + "
          f"{tokens_generated // a.responses} tokens; step {step_s * 1e3:.0f} ms, generation {gen_s * 1e3:.0f} ms "
          f"({gen_tps:.0f} tokens/s), rest of the step {(step_s - gen_s) * 1e3:.0f} ms ({train_tps:.0f} training "
          f"tokens/s), peak reserved {timer.peak_gib():.2f} GiB (allocated {timer.peak_allocated_gib():.2f})")
    if a.tiny and a.rlhf:
        print("(--tiny: the peer ran a two-layer model and ours SmolLM2's shape; the ratios check the script only)")
    ours = run_ours(a.rlhf, ["bench", "train", "--trainer", "grpo", "--device", "cuda" if cuda else "cpu",
                             "--pairs", str(a.responses // 4), "--seq-len", str(a.seq_len)])
    for line in ours.splitlines():
        words = line.replace(",", "").split()
        if line.startswith("generation:") and "tokens/s" in line:
            print(f"ours vs peer: generation {float(words[-2]) / gen_tps:.2f}x tokens/s")
        if "launched one by one" in line:
            print(f"ours vs peer: generation with each decode step launched op by op (no CUDA graphs) "
                  f"{float(words[0]) / gen_tps:.2f}x tokens/s")
        if line.startswith("training:") and "tokens/s" in line:
            print(f"ours vs peer: training {float(words[-2]) / train_tps:.2f}x tokens/s")
        if line.startswith("tensor memory"):
            gib = float(line.split("):")[1].split()[0])
            print(f"ours vs peer: {gib / timer.peak_allocated_gib():.2f}x memory (ours the most tensor bytes "
                  f"alive at once, the peer's max_memory_allocated)")
        if "with every prompt run on its own" in line:
            print(f"ours vs peer: training with every prompt run on its own (as the peer) "
                  f"{float(words[0]) / train_tps:.2f}x tokens/s")


if __name__ == "__main__":
    main()
