//! Sampling with a KV cache: batched, temperature / top-k / top-p with a seed, stop on EOS or after
//! `max_new_tokens`. Returns each sampled token's log-probability, as PPO needs.

use super::llama::{KvCache, Model};
use crate::error::{Error, Result};
use crate::rng::Rng;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 samples greedily (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: all).
    pub top_p: f32,
    pub seed: u64,
    /// Token ids that end a sequence (included in its output).
    pub eos: Vec<i32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            eos: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<i32>,
    /// log p(token) under softmax(logits / temperature) before top-k/top-p filtering (under the raw
    /// logits when greedy): the policy's log-prob that PPO's ratio compares against.
    pub logprobs: Vec<f32>,
    /// Ended on an EOS token rather than the length limit.
    pub finished: bool,
}

/// Picks one token from a row of logits with `u`, a uniform draw in [0, 1); returns (token, its
/// log-prob under softmax(logits / temperature)). Plain sampling inverts the CDF in vocabulary order,
/// one pass over the row; top-k and top-p sort only the head of the distribution they keep.
pub fn sample(logits: &[f32], opts: &GenerateOptions, u: f64) -> (i32, f32) {
    let inv_t = if opts.temperature > 0.0 {
        1.0 / opts.temperature
    } else {
        1.0
    };
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // f32 weights (the row's one pass of exp), summed in f64.
    let weights: Vec<f32> = logits.iter().map(|&l| ((l - m) * inv_t).exp()).collect();
    let total: f64 = weights.iter().map(|&w| w as f64).sum();
    let logp = |i: usize| (((logits[i] - m) * inv_t) as f64 - total.ln()) as f32;
    if opts.temperature <= 0.0 {
        let best = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
            .map(|(i, _)| i)
            .unwrap_or(0);
        return (best as i32, logp(best));
    }
    let pick = if opts.top_k == 0 && opts.top_p >= 1.0 {
        invert_cdf(0..logits.len(), &weights, u * total)
    } else {
        let limit = if opts.top_k > 0 {
            opts.top_k.min(logits.len())
        } else {
            logits.len()
        };
        // Without top-p the head is the top k; with it, the head grows until it reaches top_p (a
        // peaked row needs a few dozen tokens).
        let mut k = if opts.top_p >= 1.0 {
            limit
        } else {
            limit.min(64)
        };
        loop {
            let head = descending_head(logits, k);
            let mut keep = head.len();
            let mut reached = false;
            if opts.top_p < 1.0 {
                let mut cum = 0.0;
                for (n, &i) in head.iter().enumerate() {
                    cum += weights[i] as f64 / total;
                    if cum >= opts.top_p as f64 {
                        keep = n + 1;
                        reached = true;
                        break;
                    }
                }
            }
            if reached || k == limit {
                let kept = &head[..keep];
                let mass: f64 = kept.iter().map(|&i| weights[i] as f64).sum();
                break invert_cdf(kept.iter().copied(), &weights, u * mass);
            }
            k = (k * 4).min(limit);
        }
    };
    (pick as i32, logp(pick))
}

/// The index at which the running sum of `weights` over `order` first exceeds `target` (the last
/// index with positive weight when rounding leaves `target` past the sum).
fn invert_cdf(order: impl Iterator<Item = usize>, weights: &[f32], mut target: f64) -> usize {
    let mut last = 0;
    for i in order {
        let w = weights[i] as f64;
        if target < w {
            return i;
        }
        target -= w;
        if w > 0.0 {
            last = i;
        }
    }
    last
}

/// The `k` largest entries of `z`, largest first, ties by index.
fn descending_head(z: &[f32], k: usize) -> Vec<usize> {
    let order = |a: &usize, b: &usize| z[*b].total_cmp(&z[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..z.len()).collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k, order);
        idx.truncate(k);
    }
    idx.sort_unstable_by(order);
    idx
}

/// `sample` for every row of `logits` (`rows` of `vocab`), with one draw per row; rows are spread
/// over the host's cores when there is enough work to pay for the threads.
fn sample_rows(
    logits: &[f32],
    vocab: usize,
    opts: &GenerateOptions,
    draws: &[f64],
) -> Vec<(i32, f32)> {
    let one = |(row, &u): (&[f32], &f64)| sample(row, opts, u);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads == 1 || draws.len() < 2 || logits.len() < 1 << 18 {
        return logits.chunks(vocab).zip(draws).map(one).collect();
    }
    let per = draws.len().div_ceil(threads);
    std::thread::scope(|s| {
        let jobs: Vec<_> = logits
            .chunks(vocab * per)
            .zip(draws.chunks(per))
            .map(|(l, d)| s.spawn(move || l.chunks(vocab).zip(d).map(one).collect::<Vec<_>>()))
            .collect();
        jobs.into_iter()
            .flat_map(|j| j.join().expect("a sampling thread panicked"))
            .collect()
    })
}

impl Model {
    /// Continues every prompt; `on_token(sequence, token)` sees each token as it is sampled.
    pub fn generate(
        &self,
        prompts: &[Vec<i32>],
        opts: &GenerateOptions,
        mut on_token: impl FnMut(usize, i32),
    ) -> Result<Vec<Generated>> {
        if prompts.iter().any(Vec::is_empty) {
            return Err(Error::Unsupported {
                op: "generate",
                detail: "every prompt needs at least one token".into(),
            });
        }
        if !(opts.top_p > 0.0 && opts.top_p <= 1.0) {
            return Err(Error::Unsupported {
                op: "generate",
                detail: format!("top_p must be in (0, 1], got {}", opts.top_p),
            });
        }
        let capacity = prompts.iter().map(Vec::len).max().unwrap_or(0) + opts.max_new_tokens;
        let mut cache = KvCache::new(self, prompts.len(), capacity)?;
        let mut rng = Rng::new(opts.seed);
        let mut out: Vec<Generated> = prompts
            .iter()
            .map(|_| Generated {
                tokens: Vec::new(),
                logprobs: Vec::new(),
                finished: false,
            })
            .collect();
        let mut next: Vec<Vec<i32>> = prompts.to_vec();
        for _ in 0..opts.max_new_tokens {
            if next.iter().all(Vec::is_empty) {
                break;
            }
            let (hidden, seqs) = self.forward_cached(&next, &mut cache)?;
            let rows: Vec<usize> = (0..seqs.len()).collect();
            let logits = self.logits_rows(&hidden, &rows)?;
            let vocab = self.cfg.vocab_size;
            for row in next.iter_mut() {
                row.clear();
            }
            // One draw per row in row order, so the tokens do not depend on the thread count.
            let draws: Vec<f64> = seqs.iter().map(|_| rng.unit()).collect();
            let picked = sample_rows(&logits[..seqs.len() * vocab], vocab, opts, &draws);
            for (&b, &(tok, lp)) in seqs.iter().zip(&picked) {
                on_token(b, tok);
                out[b].tokens.push(tok);
                out[b].logprobs.push(lp);
                if opts.eos.contains(&tok) {
                    out[b].finished = true;
                } else {
                    next[b].push(tok);
                }
            }
        }
        Ok(out)
    }
}
