//! Supervised fine-tuning: next-token loss on the completion tokens only, averaged over every
//! completion token of the whole accumulated batch.

use super::data::{self, Encoder, Example};
use super::{
    eos_id, load_policy, run, score, score_backward, Metrics, Objective, RunSummary, ScoredBatch,
    TrainArgs,
};
use crate::error::Result;
use crate::model::{Model, Params};

pub struct Sft {
    pub examples: Vec<Example>,
}

impl Objective for Sft {
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
        let total: usize = examples
            .iter()
            .map(|&i| self.examples[i].completion.len())
            .sum();
        let mut nll = 0.0f64;
        for chunk in examples.chunks(micro) {
            let seqs: Vec<(&[i32], &[i32])> = chunk
                .iter()
                .map(|&i| {
                    (
                        self.examples[i].prompt.as_slice(),
                        self.examples[i].completion.as_slice(),
                    )
                })
                .collect();
            let sb = ScoredBatch::new(&seqs);
            let s = score(model, &sb)?;
            let upstream: Vec<f32> = sb
                .targets
                .iter()
                .map(|&t| if t >= 0 { -1.0 / total as f32 } else { 0.0 })
                .collect();
            nll -= s
                .per_token
                .iter()
                .zip(&sb.targets)
                .filter(|(_, &t)| t >= 0)
                .map(|(&l, _)| l as f64)
                .sum::<f64>();
            score_backward(model, &s, upstream, grads)?;
        }
        Ok(Metrics::from([
            ("loss".into(), nll / total as f64),
            ("completion_tokens".into(), total as f64),
        ]))
    }
}

/// Mean NLL per completion token of `examples` (no gradient).
pub fn eval_loss(model: &Model, examples: &[Example], micro: usize) -> Result<f64> {
    let (mut nll, mut n) = (0.0f64, 0usize);
    for chunk in examples.chunks(micro.max(1)) {
        let seqs: Vec<(&[i32], &[i32])> = chunk
            .iter()
            .map(|e| (e.prompt.as_slice(), e.completion.as_slice()))
            .collect();
        let sb = ScoredBatch::new(&seqs);
        let s = score(model, &sb)?;
        for (&l, &t) in s.per_token.iter().zip(&sb.targets) {
            if t >= 0 {
                nll -= l as f64;
                n += 1;
            }
        }
    }
    Ok(nll / n.max(1) as f64)
}

/// `rlhf sft`.
pub fn train(args: &TrainArgs) -> Result<(RunSummary, Option<f64>)> {
    super::reject_shared_prompts_option(args, "sft")?;
    let (mut model, tok) = load_policy(args)?;
    let enc = Encoder {
        tok: &tok,
        limits: args.limits(),
        eos: eos_id(&model, &tok)?,
    };
    let (train, eval) = super::load_split(args, &enc, data::load_sft)?;
    let mut obj = Sft { examples: train };
    let summary = run(args, &mut model, &mut obj, "sft")?;
    let eval_loss = if eval.is_empty() {
        None
    } else {
        Some(eval_loss(&model, &eval, args.batch_size)?)
    };
    Ok((summary, eval_loss))
}
