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

/// Picks one token from a row of logits; returns (token, its log-prob).
pub fn sample(logits: &[f32], opts: &GenerateOptions, rng: &mut Rng) -> (i32, f32) {
    let t = if opts.temperature > 0.0 {
        opts.temperature
    } else {
        1.0
    };
    let z: Vec<f64> = logits.iter().map(|&l| l as f64 / t as f64).collect();
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    if opts.temperature <= 0.0 {
        let best = z
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap_or(0);
        return (best as i32, (z[best] - lse) as f32);
    }
    let mut order: Vec<usize> = (0..z.len()).collect();
    order.sort_by(|&a, &b| z[b].total_cmp(&z[a]));
    if opts.top_k > 0 {
        order.truncate(opts.top_k);
    }
    if opts.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = 0;
        for &i in &order {
            cum += (z[i] - lse).exp();
            keep += 1;
            if cum >= opts.top_p as f64 {
                break;
            }
        }
        order.truncate(keep.max(1));
    }
    let weights: Vec<f64> = order.iter().map(|&i| (z[i] - m).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.unit() * total;
    let mut pick = order[order.len() - 1];
    for (&i, &w) in order.iter().zip(&weights) {
        if u < w {
            pick = i;
            break;
        }
        u -= w;
    }
    (pick as i32, (z[pick] - lse) as f32)
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
            for (r, &b) in seqs.iter().enumerate() {
                let (tok, lp) = sample(&logits[r * vocab..(r + 1) * vocab], opts, &mut rng);
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
