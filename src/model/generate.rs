//! Sampling with a KV cache: batched, temperature / top-k / top-p with a seed, stop on EOS or after
//! `max_new_tokens`. Returns each sampled token's log-probability, as PPO needs.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use super::llama::{DecodeGraph, KvCache, Model};
use crate::device::{profile, Device};
use crate::error::{Error, Result};
use crate::ops::sample::{device_sampling, invert_cdf, sample_plain, sample_plain_ref, RowWeights};
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

impl GenerateOptions {
    /// Whether top-k or top-p narrows the distribution (greedy decoding ignores both).
    pub fn filtered(&self) -> bool {
        self.temperature > 0.0 && (self.top_k > 0 || self.top_p < 1.0)
    }
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
/// log-prob under softmax(logits / temperature)). Plain and greedy sampling are the `sample` op's
/// reference; top-k and top-p sort only the head of the distribution they keep.
pub fn sample(logits: &[f32], opts: &GenerateOptions, u: f64) -> (i32, f32) {
    if !opts.filtered() {
        return sample_plain_ref(logits, opts.temperature, u);
    }
    let w = RowWeights::new(logits, opts.temperature);
    let limit = if opts.top_k > 0 {
        opts.top_k.min(logits.len())
    } else {
        logits.len()
    };
    // Without top-p the head is the top k; with it, the head grows until it reaches top_p (a peaked
    // row needs a few dozen tokens).
    let mut k = if opts.top_p >= 1.0 {
        limit
    } else {
        limit.min(64)
    };
    let pick = loop {
        let head = descending_head(logits, k);
        let mut keep = head.len();
        let mut reached = false;
        if opts.top_p < 1.0 {
            let mut cum = 0.0;
            for (n, &i) in head.iter().enumerate() {
                cum += w.weights[i] as f64 / w.total;
                if cum >= opts.top_p as f64 {
                    keep = n + 1;
                    reached = true;
                    break;
                }
            }
        }
        if reached || k == limit {
            let kept = &head[..keep];
            let mass: f64 = kept.iter().map(|&i| w.weights[i] as f64).sum();
            break invert_cdf(kept.iter().copied(), &w.weights, u * mass);
        }
        k = (k * 4).min(limit);
    };
    (pick as i32, w.logp(logits, pick))
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
        // 0 means greedy; a negative or non-finite temperature has no sampling meaning.
        if !(opts.temperature >= 0.0 && opts.temperature.is_finite()) {
            return Err(Error::Unsupported {
                op: "generate",
                detail: format!(
                    "temperature must be a finite number at least 0 (0: greedy), got {}",
                    opts.temperature
                ),
            });
        }
        if opts.max_new_tokens == 0 {
            return Err(Error::Unsupported {
                op: "generate",
                detail: "max_new_tokens must be at least 1".into(),
            });
        }
        let capacity = prompts.iter().map(Vec::len).max().unwrap_or(0) + opts.max_new_tokens;
        self.warn_past_context(capacity);
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
        // On a GPU every sequence takes a token at every step after its prompt, a finished one its
        // last token again (its outputs unused), so that a step's shape never changes and it can
        // replay as one recorded graph. On the CPU a finished sequence costs nothing.
        let fixed_steps = self.device.is_cuda();
        let mut recorded: Option<Option<DecodeGraph>> = None;
        let mut next: Vec<Vec<i32>> = prompts.to_vec();
        // Identical prompts (a GRPO group, the labeller's samples) run once: the others copy the
        // first one's cache rows and its first logits, which is what their own run would give.
        let owners = prompt_owners(prompts, self.share_prompts);
        // On a GPU the plain and greedy rules run on the device; top-k and top-p on the host.
        let on_device =
            matches!(self.device, Device::Cuda(_)) && !opts.filtered() && device_sampling();
        for step in 0..opts.max_new_tokens {
            if out.iter().all(|g| g.finished) {
                break;
            }
            // The sequences that take tokens this step (on a GPU all of them), and one draw per
            // unfinished one in row order, so the tokens do not depend on where they are sampled or
            // on whether finished sequences still run.
            let seqs: Vec<usize> = (0..next.len()).filter(|&b| !next[b].is_empty()).collect();
            let live: Vec<bool> = seqs.iter().map(|&b| !out[b].finished).collect();
            let draws: Vec<f64> = live
                .iter()
                .map(|&l| if l { rng.unit() } else { 0.0 })
                .collect();
            // Step 0 runs the prompts; step 1, eager, loads the decode kernels and cuBLAS's
            // kernels for the step's shapes, so recording (at step 2) triggers no lazy loading.
            let replay = step > 1 && fixed_steps && decode_graphs() && !profile::enabled();
            if replay && recorded.is_none() {
                let sample_at = on_device.then_some(opts.temperature);
                recorded = Some(self.decode_graph(&mut cache, sample_at).or_else(|e| {
                    warn_unrecorded(&e);
                    Ok::<_, Error>(None)
                })?);
            }
            let eager;
            let (logits, in_graph) = match recorded.as_mut().and_then(Option::as_mut) {
                Some(graph) if replay => {
                    let tokens: Vec<i32> = next.iter().map(|t| t[0]).collect();
                    let step_draws = if on_device { &draws[..] } else { &[] };
                    let o = self.decode_step(graph, &tokens, step_draws, &mut cache)?;
                    (o.logits, o.sampled)
                }
                _ if step == 0 && owners.is_some() => {
                    let owners = owners.as_deref().unwrap_or_default();
                    let first: Vec<Vec<i32>> = (0..next.len())
                        .map(|b| {
                            if owners[b] == b {
                                next[b].clone()
                            } else {
                                Vec::new()
                            }
                        })
                        .collect();
                    let (hidden, ran) = self.forward_cached(&first, &mut cache)?;
                    cache.copy_sequences(owners)?;
                    let row_of = |b: usize| ran.iter().position(|&r| r == owners[b]);
                    let rows: Vec<usize> = seqs.iter().filter_map(|&b| row_of(b)).collect();
                    debug_assert_eq!(rows.len(), seqs.len(), "every owner's prompt ran");
                    eager = self.logits_rows_tensor(&hidden, &rows)?;
                    (&eager, None)
                }
                _ => {
                    let (hidden, ran) = self.forward_cached(&next, &mut cache)?;
                    debug_assert_eq!(ran, seqs);
                    let rows: Vec<usize> = (0..seqs.len()).collect();
                    eager = self.logits_rows_tensor(&hidden, &rows)?;
                    (&eager, None)
                }
            };
            let picked: Vec<Option<(i32, f32)>> = if on_device {
                let (tokens, logps) = match in_graph {
                    Some(s) => s,
                    None => sample_plain(logits, opts.temperature, &draws)?,
                };
                tokens
                    .into_iter()
                    .zip(logps)
                    .zip(&live)
                    .map(|(p, &l)| l.then_some(p))
                    .collect()
            } else {
                let vocab = self.cfg.vocab_size;
                let all = logits.to_f32_vec()?;
                let rows: Vec<f32> = all
                    .chunks(vocab)
                    .zip(&live)
                    .filter(|(_, &l)| l)
                    .flat_map(|(r, _)| r.iter().copied())
                    .collect();
                let live_draws: Vec<f64> = draws
                    .iter()
                    .zip(&live)
                    .filter(|(_, &l)| l)
                    .map(|(&u, _)| u)
                    .collect();
                let mut sampled = sample_rows(&rows, vocab, opts, &live_draws).into_iter();
                live.iter()
                    .map(|&l| if l { sampled.next() } else { None })
                    .collect()
            };
            for (&b, pick) in seqs.iter().zip(picked) {
                let Some((tok, lp)) = pick else { continue };
                on_token(b, tok);
                out[b].tokens.push(tok);
                out[b].logprobs.push(lp);
                out[b].finished = opts.eos.contains(&tok);
                next[b] = if out[b].finished && !fixed_steps {
                    Vec::new()
                } else {
                    vec![tok]
                };
            }
        }
        Ok(out)
    }
}

/// For each prompt, the first prompt identical to it, where any two are identical and `share`.
fn prompt_owners(prompts: &[Vec<i32>], share: bool) -> Option<Vec<usize>> {
    let mut first: std::collections::HashMap<&[i32], usize> = Default::default();
    let owners: Vec<usize> = prompts
        .iter()
        .enumerate()
        .map(|(b, p)| *first.entry(p.as_slice()).or_insert(b))
        .collect();
    let repeats = owners.iter().enumerate().any(|(b, &o)| o != b);
    (share && repeats).then_some(owners)
}

static DECODE_GRAPHS: AtomicU8 = AtomicU8::new(0);

/// Whether decode steps on a GPU replay a recorded graph (the default) or launch their kernels one
/// by one (`RLHF_CUDA_GRAPHS=0`, or `set_decode_graphs(false)`): the same kernels and results,
/// slower; for profiling a step op by op, or ruling graphs out.
pub fn decode_graphs() -> bool {
    match DECODE_GRAPHS.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => std::env::var("RLHF_CUDA_GRAPHS").map_or(true, |v| v != "0"),
    }
}

pub fn set_decode_graphs(on: bool) {
    DECODE_GRAPHS.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Says once a process why decode steps run without a graph, when recording one failed.
fn warn_unrecorded(e: &Error) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "warning: decode steps launch their kernels one by one (slower): recording a CUDA \
             graph of a step failed: {e}"
        );
    }
}
