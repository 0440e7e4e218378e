//! Preference optimisation from pairs: the DPO family (every `loss_type` of ../shared/LOSSES.md),
//! SimPO and ORPO (reference-free). The loss is the `pref_loss` kernel family's; this file builds its
//! inputs from the models and feeds its token gradient back through the policy.
//!
//! The reference is a frozen copy of the starting model on the same device, or with `precompute_ref`
//! its sequence log-probs computed in one pass before training, after which it is dropped. Gradient
//! accumulation weights each micro-batch by its share of the step's pairs, so the step's loss is the
//! mean over all of its pairs (ORPO's NLL term: by its share of the step's NLL tokens, so that term
//! is the token mean over the whole step).

use super::data::{self, Encoder, PairExample};
use super::{
    check_positive, check_range, eos_id, frozen_logps, load_policy, run, score, score_backward,
    Metrics, Objective, RunSummary, ScoredBatch, TrainArgs,
};
use crate::device::Tensor;
use crate::error::{Error, Result};
use crate::model::{Model, Params};
use crate::ops::pref_loss::{pref_loss, DpoLoss, PrefExtras, PrefLoss};

pub enum Reference {
    /// Reference-free losses (SimPO, ORPO).
    None,
    Model(Box<Model>),
    /// Per pair: (chosen, rejected) sequence log-probs of the reference.
    Precomputed(Vec<(f32, f32)>),
}

pub struct PrefObjective {
    pub pairs: Vec<PairExample>,
    pub kind: PrefLoss,
    pub reference: Reference,
}

/// The 2B sequences of a chunk of pairs: chosen first, then rejected, as TRL lays them out. With
/// `score_chosen_prompts` (ORPO's NLL) the chosen rows' prompts are scored too. With
/// `share_prompts`, each rejected sequence shares its prompt with its chosen one.
fn scored_batch(
    pairs: &[PairExample],
    chunk: &[usize],
    score_chosen_prompts: bool,
    share_prompts: bool,
) -> ScoredBatch {
    let mut seqs: Vec<(&[i32], &[i32])> = chunk
        .iter()
        .map(|&i| (pairs[i].prompt.as_slice(), pairs[i].chosen.as_slice()))
        .collect();
    seqs.extend(
        chunk
            .iter()
            .map(|&i| (pairs[i].prompt.as_slice(), pairs[i].rejected.as_slice())),
    );
    let scored = vec![score_chosen_prompts; chunk.len()];
    ScoredBatch::build(&seqs, &scored, share_prompts)
}

/// ORPO's NLL tokens in a chosen sequence: every token after the first, prompt and response.
fn nll_tokens(p: &PairExample) -> usize {
    (p.prompt.len() + p.chosen.len()).saturating_sub(1)
}

/// Sequence log-probs of a model for every pair: (chosen, rejected).
pub fn pair_logps(model: &Model, pairs: &[PairExample], micro: usize) -> Result<Vec<(f32, f32)>> {
    let idx: Vec<usize> = (0..pairs.len()).collect();
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in idx.chunks(micro.max(1)) {
        let sb = scored_batch(pairs, chunk, false, model.share_prompts);
        let sums = super::sequence_sums(&sb, &frozen_logps(model, &sb)?);
        let b = chunk.len();
        out.extend((0..b).map(|k| (sums[k] as f32, sums[b + k] as f32)));
    }
    Ok(out)
}

impl PrefObjective {
    /// Reference per-token log-probs `[R, T]` for a chunk: the model's, or each sequence's sum in its
    /// first completion column (the losses only use sums and the mask).
    fn reference(&self, sb: &ScoredBatch, chunk: &[usize], t: usize) -> Result<Option<Vec<f32>>> {
        Ok(match &self.reference {
            Reference::None => None,
            Reference::Model(m) => Some(sb.padded(&frozen_logps(m, sb)?).0),
            Reference::Precomputed(sums) => {
                let b = chunk.len();
                let mut r = vec![0.0; 2 * b * t];
                for (k, &i) in chunk.iter().enumerate() {
                    r[k * t] = sums[i].0;
                    r[(b + k) * t] = sums[i].1;
                }
                Some(r)
            }
        })
    }
}

impl Objective for PrefObjective {
    fn example_count(&self) -> usize {
        self.pairs.len()
    }

    fn tokens(&self, i: usize) -> usize {
        let p = &self.pairs[i];
        2 * p.prompt.len() + p.chosen.len() + p.rejected.len()
    }

    fn step(
        &mut self,
        model: &Model,
        examples: &[usize],
        micro: usize,
        grads: &mut Params,
    ) -> Result<Metrics> {
        let total = examples.len() as f64;
        let orpo = matches!(self.kind, PrefLoss::Orpo { .. });
        // ORPO's NLL is a token mean over the whole step, its odds-ratio term a pair mean.
        let nll_total: usize = examples.iter().map(|&i| nll_tokens(&self.pairs[i])).sum();
        let mut m = Metrics::new();
        let mut add = |k: &str, v: f64, w: f64| *m.entry(k.to_owned()).or_insert(0.0) += v * w;
        for chunk in examples.chunks(micro) {
            let b = chunk.len();
            let w = b as f64 / total;
            let sb = scored_batch(&self.pairs, chunk, orpo, model.share_prompts);
            let s = score(model, &sb)?;
            let (lp, mask, t) = sb.padded(&s.per_token);
            let reference = self.reference(&sb, chunk, t)?;
            let dev = &model.device;
            let shape = [2 * b, t];
            let lp_t = Tensor::from_f32(&shape, lp.clone(), dev)?;
            let mask_t = Tensor::from_f32(&shape, mask.clone(), dev)?;
            let ref_t = reference
                .map(|r| Tensor::from_f32(&shape, r, dev))
                .transpose()?;
            // ORPO's NLL runs over the chosen rows' prompts and responses, as TRL's.
            let nll = sb.scored_mask(0..b, t);
            let nll_micro: f32 = nll.iter().sum();
            let nll_t = Tensor::from_f32(&shape, nll.clone(), dev)?;
            let ex = PrefExtras {
                ref_logps: ref_t.as_ref(),
                nll_mask: Some(&nll_t),
                ..Default::default()
            };
            let out = pref_loss(&self.kind, &lp_t, &mask_t, &ex)?;
            // The op's NLL is this micro-batch's token mean (gradient -1/nll_micro a token); the
            // step's weights it by the micro-batch's share of the step's tokens instead.
            let nll_w = if orpo && nll_total > 0 {
                nll_micro as f64 / nll_total as f64
            } else {
                0.0
            };
            let nll_fix = if orpo && nll_micro > 0.0 {
                -(nll_w - w) as f32 / nll_micro
            } else {
                0.0
            };
            let grad: Vec<f32> = out
                .grad_policy_logps
                .to_f32_vec()?
                .iter()
                .zip(&nll)
                .map(|(g, &n)| g * w as f32 + nll_fix * n)
                .collect();
            score_backward(model, &s, sb.unpad(&grad, t), grads)?;
            let (c, r, margin, acc) = out.metrics();
            let sums = super::sequence_sums(&sb, &s.per_token);
            add("loss", out.loss - out.nll_loss, w);
            add("loss", out.nll_loss, nll_w);
            add("rewards/chosen", c, w);
            add("rewards/rejected", r, w);
            add("rewards/margins", margin, w);
            add("rewards/accuracies", acc, w);
            add("logps/chosen", sums[..b].iter().sum::<f64>() / b as f64, w);
            add(
                "logps/rejected",
                sums[b..].iter().sum::<f64>() / b as f64,
                w,
            );
            if orpo {
                add("nll_loss", out.nll_loss, nll_w);
                let (ratio, chosen) = out.log_odds_metrics();
                add("log_odds_ratio", ratio, w);
                add("log_odds_chosen", chosen, w);
            }
        }
        Ok(m)
    }
}

impl PrefTrainer {
    /// Hyper-parameters the losses cannot use are errors naming the flag, before any work.
    fn check(&self) -> Result<()> {
        let (op, beta) = match self {
            PrefTrainer::Dpo { beta, .. } => ("dpo", *beta),
            PrefTrainer::Simpo { beta, gamma, .. } => {
                check_range("simpo", "--gamma", *gamma, f64::MIN, f64::MAX)?;
                ("simpo", *beta)
            }
            PrefTrainer::Orpo { beta } => ("orpo", *beta),
        };
        check_positive(op, "--beta", beta)?;
        if let PrefTrainer::Dpo {
            loss,
            label_smoothing,
            ..
        } = self
        {
            let smooths = matches!(
                loss,
                DpoLoss::Sigmoid | DpoLoss::SigmoidNorm | DpoLoss::Robust | DpoLoss::ExoPair
            );
            if *label_smoothing != 0.0 && !smooths {
                return Err(Error::Unsupported {
                    op: "dpo",
                    detail: format!(
                        "--label-smoothing is used by the sigmoid, sigmoid-norm, robust and exo-pair losses, not {}",
                        clap::ValueEnum::to_possible_value(loss)
                            .map_or_else(|| format!("{loss:?}"), |v| v.get_name().to_owned())
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Which preference trainer.
#[derive(Debug, Clone, Copy)]
pub enum PrefTrainer {
    Dpo {
        loss: DpoLoss,
        beta: f64,
        label_smoothing: f64,
        precompute_ref: bool,
    },
    Simpo {
        beta: f64,
        gamma: f64,
        label_smoothing: f64,
    },
    Orpo {
        beta: f64,
    },
}

/// Implicit-reward accuracy and mean margin of `policy` against reference log-probs on `pairs`:
/// the fraction of pairs with β·(Δchosen − Δrejected) > 0, ties counting half (so the reference
/// itself scores 50%).
pub fn implicit_reward_accuracy(
    policy: &Model,
    reference: &[(f32, f32)],
    pairs: &[PairExample],
    beta: f64,
    micro: usize,
) -> Result<(f64, f64)> {
    let lp = pair_logps(policy, pairs, micro)?;
    let margins: Vec<f64> = lp
        .iter()
        .zip(reference)
        .map(|(p, r)| beta * ((p.0 - r.0) as f64 - (p.1 - r.1) as f64))
        .collect();
    let n = margins.len().max(1) as f64;
    let wins: f64 = margins
        .iter()
        .map(|&m| {
            if m > 0.0 {
                1.0
            } else if m == 0.0 {
                0.5
            } else {
                0.0
            }
        })
        .sum();
    Ok((wins / n, margins.iter().sum::<f64>() / n))
}

/// `rlhf dpo`, `rlhf simpo`, `rlhf orpo`: returns the run and, with a held-out split, the
/// (accuracy, margin) of the implicit reward against the starting model.
pub fn train(args: &TrainArgs, which: PrefTrainer) -> Result<(RunSummary, Option<(f64, f64)>)> {
    which.check()?;
    let (mut model, tok) = load_policy(args)?;
    let enc = Encoder {
        tok: &tok,
        limits: args.limits(),
        eos: eos_id(&model, &tok)?,
    };
    let (train, eval) = super::load_split(args, &enc, data::load_pairs)?;
    let eval_ref = if eval.is_empty() {
        Vec::new()
    } else {
        pair_logps(&model, &eval, args.batch_size)?
    };
    let (kind, reference, beta) = match which {
        PrefTrainer::Dpo {
            loss,
            beta,
            label_smoothing,
            precompute_ref,
        } => {
            let reference = if precompute_ref {
                Reference::Precomputed(pair_logps(&model, &train, args.batch_size)?)
            } else {
                let mut r = Model::load(&args.model, &model.device)?;
                r.recompute = false;
                Reference::Model(Box::new(r))
            };
            (
                PrefLoss::Dpo {
                    loss,
                    beta,
                    label_smoothing,
                },
                reference,
                beta,
            )
        }
        PrefTrainer::Simpo {
            beta,
            gamma,
            label_smoothing,
        } => (
            PrefLoss::Simpo {
                beta,
                gamma,
                label_smoothing,
            },
            Reference::None,
            beta,
        ),
        PrefTrainer::Orpo { beta } => (PrefLoss::Orpo { beta }, Reference::None, beta),
    };
    let name = match which {
        PrefTrainer::Dpo { .. } => "dpo",
        PrefTrainer::Simpo { .. } => "simpo",
        PrefTrainer::Orpo { .. } => "orpo",
    };
    let mut obj = PrefObjective {
        pairs: train,
        kind,
        reference,
    };
    let summary = run(args, &mut model, &mut obj, name)?;
    let held_out = if eval.is_empty() {
        None
    } else {
        Some(implicit_reward_accuracy(
            &model,
            &eval_ref,
            &eval,
            beta,
            args.batch_size,
        )?)
    };
    Ok((summary, held_out))
}
