"""Pieces shared by the Hugging Face peers (trl_dpo.py, trl_grpo.py).

The trainers take text, so the peers use a word-level tokenizer whose every word `w<id>` is exactly one
token: text built from random ids tokenizes back to exactly those ids, which gives TRL the same token
counts as our binary's benches (random weights, random tokens) with no tokenizer download.
"""
import os
import subprocess
import time

import torch

VOCAB = 49152
EOS, PAD = 0, 1


def smollm2_config(tiny=False):
    """SmolLM2-135M's shape; `tiny` is a two-layer model of the same family for a CPU smoke run."""
    from transformers import LlamaConfig
    if tiny:
        return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                           eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None)
    return LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192,
                       eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"w{EOS}", pad_token=f"w{PAD}", unk_token="w2")


def random_words(gen, n):
    """`n` random ordinary tokens as text, one word each."""
    return " ".join(f"w{i}" for i in torch.randint(3, VOCAB, (n,), generator=gen).tolist())


def trl_version():
    """TRL's version, or None with the reason printed when it cannot be imported."""
    try:
        import trl
        return trl.__version__
    except Exception as e:  # noqa: BLE001 - any import failure means the same here
        print(f"trl is not importable here ({type(e).__name__}: {e}); gpu-bundle carries its wheels")
        return None


class StepTimer:
    """A TrainerCallback's hooks timing each optimizer step (synchronised), with peak memory after the
    first (warm-up) step."""

    def __init__(self, cuda):
        self.cuda, self.times, self.t0 = cuda, [], None

    def callback(self):
        from transformers import TrainerCallback
        timer = self

        class Hooks(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.sync()
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.sync()
                timer.times.append(time.perf_counter() - timer.t0)
                if len(timer.times) == 1 and timer.cuda:
                    torch.cuda.reset_peak_memory_stats()

        return Hooks()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self):
        timed = self.times[1:] or self.times
        return sorted(timed)[len(timed) // 2] * 1e3

    def peak_gib(self):
        """Peak memory reserved by PyTorch's caching allocator after warm-up, in GiB: the figure
        comparable with ours, which is the driver's in-use memory (our pool keeps freed blocks too)."""
        return torch.cuda.max_memory_reserved() / 2**30 if self.cuda else float("nan")

    def peak_allocated_gib(self):
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")


def run_ours(rlhf, args):
    """Our binary's output for `args`, run in the same call; prints it and returns it."""
    if not rlhf:
        return ""
    out = subprocess.run([rlhf, *args], capture_output=True, text=True, env=os.environ)
    print(out.stdout, end="")
    if out.returncode != 0:
        print(f"rlhf {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()[-400:]}")
    return out.stdout
