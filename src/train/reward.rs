//! Reward models: the decoder with a scalar head, trained on chosen/rejected pairs with the
//! Bradley-Terry loss `−logσ(r_c − r_r − margin)`, averaged over the pairs of the accumulated batch.
//! The reward of a sequence is the head's value at its last token.

use super::data::{self, Encoder, PairExample};
use super::{eos_id, load_model, run, Metrics, Objective, RunSummary, ScoredBatch, TrainArgs};
use crate::device::Tensor;
use crate::error::Result;
use crate::model::{Batch, Model, Params};
use crate::ops::stable::{log_sigmoid, sigmoid};
use crate::rng::Rng;

/// Turns a causal LM into a reward model: the LM head goes, a scalar head (N(0, 0.02²)) comes.
pub fn into_reward_model(mut model: Model, seed: u64) -> Result<Model> {
    if model.cfg.scalar_head {
        return Ok(model);
    }
    model.cfg.scalar_head = true;
    model.params.lm_head = None;
    let d = model.cfg.hidden_size;
    let w = Rng::new(seed).normal_vec(d, 0.02);
    model.params.score = Some(Tensor::from_f32_as(
        &[1, d],
        &w,
        model.dtype,
        &model.device,
    )?);
    Ok(model)
}

/// The reward of each full sequence (the head's value at its last token).
pub fn sequence_rewards(model: &Model, seqs: &[Vec<i32>]) -> Result<Vec<f32>> {
    batch_rewards(model, &Batch::new(seqs))
}

/// The reward of each prompt + response, the layers running a prompt once for all the responses
/// to it (as the trainers share prompts; each sequence keeps its own last token, where its
/// reward is read).
pub fn response_rewards(model: &Model, seqs: &[(&[i32], &[i32])]) -> Result<Vec<f32>> {
    batch_rewards(
        model,
        &ScoredBatch::build(seqs, &[], model.share_prompts).batch,
    )
}

fn batch_rewards(model: &Model, batch: &Batch) -> Result<Vec<f32>> {
    let hidden = model.forward_frozen(batch)?;
    let values = model.scalar_head(&hidden)?.to_f32_vec()?;
    Ok(batch.offsets()[1..]
        .iter()
        .map(|&end| values[end - 1])
        .collect())
}

pub struct RewardObjective {
    pub pairs: Vec<PairExample>,
}

impl Objective for RewardObjective {
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
        let (mut loss, mut correct, mut margin_sum) = (0.0f64, 0usize, 0.0f64);
        for chunk in examples.chunks(micro) {
            // Chosen and rejected share their prompt: the layers run it once for both.
            let mut seqs: Vec<(&[i32], &[i32])> = chunk
                .iter()
                .map(|&i| (&self.pairs[i].prompt[..], &self.pairs[i].chosen[..]))
                .collect();
            seqs.extend(
                chunk
                    .iter()
                    .map(|&i| (&self.pairs[i].prompt[..], &self.pairs[i].rejected[..])),
            );
            let batch = ScoredBatch::build(&seqs, &[], model.share_prompts).batch;
            let acts = model.forward(&batch)?;
            let values = model.scalar_head(&acts.hidden)?.to_f32_vec()?;
            let ends: Vec<usize> = batch.offsets()[1..].iter().map(|&e| e - 1).collect();
            let b = chunk.len();
            let mut dvalues = vec![0.0f32; batch.len()];
            for (k, &i) in chunk.iter().enumerate() {
                let (rc, rr) = (values[ends[k]] as f64, values[ends[b + k]] as f64);
                let z = rc - rr - self.pairs[i].margin as f64;
                loss -= log_sigmoid(z) / total;
                let g = -sigmoid(-z) / total;
                dvalues[ends[k]] = g as f32;
                dvalues[ends[b + k]] = -g as f32;
                correct += usize::from(rc > rr);
                margin_sum += rc - rr;
            }
            let dv = Tensor::from_f32(&[batch.len()], dvalues, &model.device)?;
            let dh = model.scalar_head_bwd(
                &acts.hidden,
                &dv,
                grads
                    .score
                    .as_mut()
                    .expect("a reward model has a score head"),
            )?;
            model.backward(&acts, &dh, grads)?;
        }
        Ok(Metrics::from([
            ("loss".into(), loss),
            ("accuracy".into(), correct as f64 / total),
            ("margin".into(), margin_sum / total),
        ]))
    }
}

/// Accuracy (chosen scored above rejected) and mean margin on `pairs`.
pub fn evaluate(model: &Model, pairs: &[PairExample], micro: usize) -> Result<(f64, f64)> {
    let (mut correct, mut margin) = (0usize, 0.0f64);
    for chunk in pairs.chunks(micro.max(1)) {
        let mut seqs: Vec<(&[i32], &[i32])> = chunk
            .iter()
            .map(|p| (&p.prompt[..], &p.chosen[..]))
            .collect();
        seqs.extend(chunk.iter().map(|p| (&p.prompt[..], &p.rejected[..])));
        let r = response_rewards(model, &seqs)?;
        for k in 0..chunk.len() {
            correct += usize::from(r[k] > r[chunk.len() + k]);
            margin += (r[k] - r[chunk.len() + k]) as f64;
        }
    }
    Ok((
        correct as f64 / pairs.len().max(1) as f64,
        margin / pairs.len().max(1) as f64,
    ))
}

/// `rlhf rm`: returns the run and the held-out (accuracy, margin).
pub fn train(args: &TrainArgs) -> Result<(RunSummary, Option<(f64, f64)>)> {
    let (model, tok) = load_model(args)?;
    let enc = Encoder {
        tok: &tok,
        limits: args.limits(),
        eos: eos_id(&model, &tok)?,
    };
    let mut model = into_reward_model(model, args.seed)?;
    let (train, eval) = super::load_split(args, &enc, data::load_pairs)?;
    let mut obj = RewardObjective { pairs: train };
    let summary = run(args, &mut model, &mut obj, "rm")?;
    let held_out = if eval.is_empty() {
        None
    } else {
        Some(evaluate(&model, &eval, args.batch_size)?)
    };
    Ok((summary, held_out))
}
