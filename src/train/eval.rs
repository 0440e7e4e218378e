//! Evaluation of a policy on held-out preference pairs: implicit-reward accuracy and margins against
//! a reference, reward-model accuracy, the mean KL to the reference on the policy's own samples, and
//! the win rate of its samples over the reference's under a reward model.

use super::data::PairExample;
use super::dpo::{implicit_reward_accuracy, pair_logps};
use super::reward::{evaluate as rm_accuracy, response_rewards};
use super::{frozen_logps, sequence_sums, ScoredBatch};
use crate::error::Result;
use crate::model::generate::GenerateOptions;
use crate::model::Model;

#[derive(Debug, Clone, Default)]
pub struct EvalReport {
    /// Fraction of pairs whose implicit reward β·(Δ log π) prefers the chosen response.
    pub implicit_accuracy: Option<f64>,
    pub implicit_margin: Option<f64>,
    /// Fraction of pairs the reward model scores chosen above rejected.
    pub reward_model_accuracy: Option<f64>,
    /// Mean Σ_t (log π − log π_ref) over the policy's sampled responses (a k1 estimate of the
    /// sequence KL; non-negative in expectation).
    pub kl_to_reference: Option<f64>,
    /// Fraction of prompts where the reward model prefers the policy's sample to the reference's
    /// (ties count half).
    pub win_rate: Option<f64>,
    /// Mean reward-model score of the policy's samples.
    pub mean_sample_reward: Option<f64>,
}

/// Samples one response per prompt.
pub fn sample_responses(
    model: &Model,
    prompts: &[Vec<i32>],
    opts: &GenerateOptions,
) -> Result<Vec<Vec<i32>>> {
    Ok(model
        .generate(prompts, opts, |_, _| {})?
        .into_iter()
        .map(|g| g.tokens)
        .collect())
}

/// Σ log π over each response given its prompt.
pub fn response_logps(
    model: &Model,
    prompts: &[Vec<i32>],
    responses: &[Vec<i32>],
    micro: usize,
) -> Result<Vec<f64>> {
    let idx: Vec<usize> = (0..prompts.len())
        .filter(|&i| !responses[i].is_empty())
        .collect();
    let mut all = vec![0.0; prompts.len()];
    for chunk in idx.chunks(micro.max(1)) {
        let seqs: Vec<(&[i32], &[i32])> = chunk
            .iter()
            .map(|&i| (prompts[i].as_slice(), responses[i].as_slice()))
            .collect();
        let sb = ScoredBatch::new(&seqs);
        for (&i, v) in chunk
            .iter()
            .zip(sequence_sums(&sb, &frozen_logps(model, &sb)?))
        {
            all[i] = v;
        }
    }
    Ok(all)
}

/// Every metric whose models are given. `pairs` supply the prompts for sampling.
pub fn evaluate(
    policy: &Model,
    reference: Option<&Model>,
    reward_model: Option<&Model>,
    pairs: &[PairExample],
    beta: f64,
    opts: &GenerateOptions,
    micro: usize,
) -> Result<EvalReport> {
    let mut r = EvalReport::default();
    if let Some(reference) = reference {
        let ref_lp = pair_logps(reference, pairs, micro)?;
        let (acc, margin) = implicit_reward_accuracy(policy, &ref_lp, pairs, beta, micro)?;
        r.implicit_accuracy = Some(acc);
        r.implicit_margin = Some(margin);
    }
    if let Some(rm) = reward_model {
        r.reward_model_accuracy = Some(rm_accuracy(rm, pairs, micro)?.0);
    }
    let prompts: Vec<Vec<i32>> = pairs.iter().map(|p| p.prompt.clone()).collect();
    if reference.is_some() || reward_model.is_some() {
        let samples = sample_responses(policy, &prompts, opts)?;
        if let Some(reference) = reference {
            let (p, q) = (
                response_logps(policy, &prompts, &samples, micro)?,
                response_logps(reference, &prompts, &samples, micro)?,
            );
            r.kl_to_reference =
                Some(p.iter().zip(&q).map(|(a, b)| a - b).sum::<f64>() / p.len().max(1) as f64);
        }
        if let Some(rm) = reward_model {
            // The reference's samples scored with ours, so each prompt runs once for both.
            let theirs = match reference {
                Some(reference) => sample_responses(reference, &prompts, opts)?,
                None => Vec::new(),
            };
            let seqs: Vec<(&[i32], &[i32])> = prompts
                .iter()
                .zip(&samples)
                .chain(prompts.iter().zip(&theirs))
                .map(|(p, c)| (p.as_slice(), c.as_slice()))
                .collect();
            let mut ours = response_rewards(rm, &seqs)?;
            let theirs = ours.split_off(samples.len());
            r.mean_sample_reward =
                Some(ours.iter().map(|&v| v as f64).sum::<f64>() / ours.len().max(1) as f64);
            if reference.is_some() {
                let wins: f64 = ours
                    .iter()
                    .zip(&theirs)
                    .map(|(a, b)| {
                        if a > b {
                            1.0
                        } else if a == b {
                            0.5
                        } else {
                            0.0
                        }
                    })
                    .sum();
                r.win_rate = Some(wins / ours.len().max(1) as f64);
            }
        }
    }
    Ok(r)
}
