//! KTO for unpaired feedback: each completion is labelled desirable or not. The reference point z0 is
//! the mean of log π − log π_ref over mismatched (prompt, completion) pairs of the same micro-batch
//! (each prompt with the next example's completion), detached and clamped at 0, as TRL computes it.
//! The reference model stays on the device (the mismatched pairs change with the data order).

use super::data::{self, Encoder, KtoExample};
use super::{
    eos_id, frozen_logps, load_policy, run, score, score_backward, sequence_sums, Metrics,
    Objective, RunSummary, ScoredBatch, TrainArgs,
};
use crate::device::Tensor;
use crate::error::{Error, Result};
use crate::model::{Model, Params};
use crate::ops::pref_loss::{pref_loss, PrefExtras, PrefLoss};

pub struct KtoObjective {
    pub examples: Vec<KtoExample>,
    pub reference: Model,
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

impl Objective for KtoObjective {
    fn example_count(&self) -> usize {
        self.examples.len()
    }

    fn tokens(&self, i: usize) -> usize {
        self.examples[i].prompt.len() + self.examples[i].completion.len()
    }

    fn step(
        &mut self,
        model: &Model,
        examples: &[usize],
        micro: usize,
        grads: &mut Params,
    ) -> Result<Metrics> {
        let total = examples.len() as f64;
        let mut m = Metrics::new();
        // Desirable and undesirable implicit rewards: (sum, count) over the step.
        let (mut des, mut und) = ((0.0f64, 0usize), (0.0f64, 0usize));
        let ex = &self.examples;
        for chunk in examples.chunks(micro) {
            let w = chunk.len() as f64 / total;
            let seqs: Vec<(&[i32], &[i32])> = chunk
                .iter()
                .map(|&i| (ex[i].prompt.as_slice(), ex[i].completion.as_slice()))
                .collect();
            let sb = ScoredBatch::new(&seqs);
            // z0 from mismatched pairs: prompt k with completion k + 1. A micro-batch of one (the
            // last of an epoch whose size the batch does not divide) pairs the prompt with its own
            // completion, as TRL's KL dataset, rotated within blocks of the batch size, does.
            let mis: Vec<(&[i32], &[i32])> = (0..chunk.len())
                .map(|k| {
                    (
                        ex[chunk[k]].prompt.as_slice(),
                        ex[chunk[(k + 1) % chunk.len()]].completion.as_slice(),
                    )
                })
                .collect();
            let msb = ScoredBatch::new(&mis);
            let p = sequence_sums(&msb, &frozen_logps(model, &msb)?);
            let r = sequence_sums(&msb, &frozen_logps(&self.reference, &msb)?);
            let z0 = (p.iter().zip(&r).map(|(a, b)| a - b).sum::<f64>() / p.len() as f64).max(0.0);
            let s = score(model, &sb)?;
            let (lp, mask, t) = sb.padded(&s.per_token);
            let (rp, _, _) = sb.padded(&frozen_logps(&self.reference, &sb)?);
            let dev = &model.device;
            let shape = [chunk.len(), t];
            let labels: Vec<f32> = chunk
                .iter()
                .map(|&i| if ex[i].desirable { 1.0 } else { 0.0 })
                .collect();
            let (lp_t, mask_t, ref_t) = (
                Tensor::from_f32(&shape, lp, dev)?,
                Tensor::from_f32(&shape, mask, dev)?,
                Tensor::from_f32(&shape, rp, dev)?,
            );
            let labels_t = Tensor::from_f32(&[chunk.len()], labels.clone(), dev)?;
            let kind = PrefLoss::Kto {
                beta: self.beta,
                desirable_weight: self.desirable_weight,
                undesirable_weight: self.undesirable_weight,
            };
            let out = pref_loss(
                &kind,
                &lp_t,
                &mask_t,
                &PrefExtras {
                    ref_logps: Some(&ref_t),
                    labels: Some(&labels_t),
                    kto_ref_point: z0,
                    ..Default::default()
                },
            )?;
            let grad: Vec<f32> = out
                .grad_policy_logps
                .to_f32_vec()?
                .iter()
                .map(|g| g * w as f32)
                .collect();
            score_backward(model, &s, sb.unpad(&grad, t), grads)?;
            *m.entry("loss".into()).or_insert(0.0) += out.loss * w;
            *m.entry("kl".into()).or_insert(0.0) += z0 * w;
            for (r, &l) in out.chosen_rewards.iter().zip(&labels) {
                let acc = if l > 0.0 { &mut des } else { &mut und };
                acc.0 += *r as f64;
                acc.1 += 1;
            }
        }
        // Class means over the whole step: a micro-batch may hold one class only.
        for (key, (sum, n)) in [("rewards/chosen", des), ("rewards/rejected", und)] {
            if n > 0 {
                m.insert(key.into(), sum / n as f64);
            }
        }
        Ok(m)
    }
}

/// `rlhf kto`: returns the run and, with a held-out split, the mean implicit reward
/// β·(log π − log π_ref) of (desirable, undesirable) held-out completions.
pub fn train(
    args: &TrainArgs,
    beta: f64,
    desirable_weight: f64,
    undesirable_weight: f64,
) -> Result<(RunSummary, Option<(f64, f64)>)> {
    super::reject_shared_prompts_option(args, "kto")?;
    super::check_positive("kto", "--beta", beta)?;
    super::check_positive("kto", "--desirable-weight", desirable_weight)?;
    super::check_positive("kto", "--undesirable-weight", undesirable_weight)?;
    if args.batch_size < 2 {
        // The reference point z0 comes from mismatched pairs within a micro-batch.
        return Err(Error::Unsupported {
            op: "kto",
            detail: "--batch-size must be at least 2: KTO's reference point pairs each prompt with another example's completion".into(),
        });
    }
    let (mut model, tok) = load_policy(args)?;
    let enc = Encoder {
        tok: &tok,
        limits: args.limits(),
        eos: eos_id(&model, &tok)?,
    };
    let (train, eval) = super::load_split(args, &enc, data::load_kto)?;
    let reference = Model::load(&args.model, &model.device)?;
    let eval_ref = if eval.is_empty() {
        Vec::new()
    } else {
        completion_logps(&reference, &eval, args.batch_size)?
    };
    let mut obj = KtoObjective {
        examples: train,
        reference,
        beta,
        desirable_weight,
        undesirable_weight,
    };
    let summary = run(args, &mut model, &mut obj, "kto")?;
    let held_out = if eval.is_empty() {
        None
    } else {
        let lp = completion_logps(&model, &eval, args.batch_size)?;
        let mean = |want: bool| {
            let v: Vec<f64> = eval
                .iter()
                .zip(lp.iter().zip(&eval_ref))
                .filter(|(e, _)| e.desirable == want)
                .map(|(_, (p, r))| beta * (p - r))
                .collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        Some((mean(true), mean(false)))
    };
    Ok((summary, held_out))
}

/// Sequence log-probs of each example's completion.
pub fn completion_logps(model: &Model, examples: &[KtoExample], micro: usize) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(micro.max(1)) {
        let seqs: Vec<(&[i32], &[i32])> = chunk
            .iter()
            .map(|e| (e.prompt.as_slice(), e.completion.as_slice()))
            .collect();
        let sb = ScoredBatch::new(&seqs);
        out.extend(sequence_sums(&sb, &score(model, &sb)?.per_token));
    }
    Ok(out)
}
