//! GRPO: several responses per prompt, advantages normalised within each group (no value model), a
//! clipped ratio with separate low and high bounds, an optional k3 KL term to the reference, and the
//! loss aggregated per sequence (mean of each response's token mean) or per token (over all tokens).
//! Rewards come from a reward model or from a rule for verifiable tasks.

use std::path::PathBuf;
use std::time::Instant;

use super::data::{self, Encoder};
use super::reward::response_rewards;
use super::{
    check_finite, check_non_negative, check_positive, eos_id, frozen_logps_at, iteration_bar,
    load_policy, restore, save_checkpoint, score_at, score_backward, Metrics, OnlineProgress,
    Optimizer, RunSummary, ScoredBatch, TrainArgs,
};
use crate::device::DType;
use crate::error::{Error, Result};
use crate::model::generate::GenerateOptions;
use crate::model::tokenizer::TextTokenizer;
use crate::model::{Model, Params};
use crate::ops::adamw::{clip_coefficient, global_grad_norm, AdamWConfig};

/// A rule that scores a decoded completion against the prompt's `answer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RewardRule {
    /// 1 when the last integer in the completion equals `answer`, else 0.
    Exact,
    /// 1 when the completion states an answer as "answer is <integer>", else 0.
    Format,
}

/// The last integer in a text (digits with an optional leading minus).
pub fn last_integer(text: &str) -> Option<i64> {
    let mut last = None;
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let start = if i > 0 && b[i - 1] == b'-' { i - 1 } else { i };
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            last = text[start..i].parse().ok();
        } else {
            i += 1;
        }
    }
    last
}

pub fn rule_reward(rule: RewardRule, completion: &str, answer: Option<&str>) -> f32 {
    match rule {
        RewardRule::Exact => {
            let want = answer.and_then(|a| a.trim().parse::<i64>().ok());
            f32::from(want.is_some() && last_integer(completion) == want)
        }
        RewardRule::Format => {
            let rest = completion.split("answer is").nth(1).unwrap_or("");
            f32::from(
                rest.trim_start()
                    .starts_with(|c: char| c.is_ascii_digit() || c == '-'),
            )
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LossAggregation {
    /// Mean over each response's tokens, then over responses (GRPO's paper).
    Sequence,
    /// Mean over every token of the batch (DAPO's; long responses weigh more).
    Token,
}

#[derive(Debug, Clone, clap::Args)]
pub struct GrpoArgs {
    /// --model is the policy; --data holds `prompt` lines (and `answer` for rule rewards).
    #[command(flatten)]
    pub train: TrainArgs,
    /// Score with this reward model ...
    #[arg(long, conflicts_with = "reward_rule")]
    pub reward_model: Option<PathBuf>,
    /// ... or with a rule against each prompt's `answer`.
    #[arg(long, value_enum)]
    pub reward_rule: Option<RewardRule>,
    #[arg(long, default_value_t = 100)]
    pub iterations: usize,
    /// Prompts per iteration.
    #[arg(long, default_value_t = 8)]
    pub prompts_per_step: usize,
    /// Responses per prompt.
    #[arg(long, default_value_t = 8)]
    pub group_size: usize,
    /// Updates per rollout (the ratio departs from 1 after the first).
    #[arg(long, default_value_t = 1)]
    pub updates_per_rollout: usize,
    #[arg(long, default_value_t = 0.2)]
    pub epsilon: f64,
    /// The upper clip bound [default: --epsilon].
    #[arg(long)]
    pub epsilon_high: Option<f64>,
    /// Coefficient of the k3 KL term to the reference (0: no reference model).
    #[arg(long, default_value_t = 0.0)]
    pub beta: f64,
    #[arg(long, value_enum, default_value_t = LossAggregation::Sequence)]
    pub loss_aggregation: LossAggregation,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
}

impl GrpoArgs {
    pub fn new(train: TrainArgs, reward_rule: RewardRule) -> GrpoArgs {
        GrpoArgs {
            train,
            reward_model: None,
            reward_rule: Some(reward_rule),
            iterations: 100,
            prompts_per_step: 8,
            group_size: 8,
            updates_per_rollout: 1,
            epsilon: 0.2,
            epsilon_high: None,
            beta: 0.0,
            loss_aggregation: LossAggregation::Sequence,
            max_new_tokens: 64,
            temperature: 1.0,
        }
    }
}

/// Group-normalised advantages: (r − mean) / (std + 1e-4) within each consecutive group.
pub fn group_advantages(rewards: &[f32], group: usize) -> Vec<f32> {
    rewards
        .chunks(group)
        .flat_map(|g| {
            let n = g.len() as f32;
            let mean = g.iter().sum::<f32>() / n;
            let std = (g.iter().map(|r| (r - mean) * (r - mean)).sum::<f32>() / (n - 1.0).max(1.0))
                .sqrt();
            g.iter()
                .map(move |r| (r - mean) / (std + 1e-4))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The GRPO objective for one response's tokens: returns (loss contribution, d/d new log-prob per
/// token, clipped count) given per-token new, old and reference log-probs and the weight per token.
#[allow(clippy::too_many_arguments)]
pub fn grpo_token_terms(
    new: &[f32],
    old: &[f32],
    reference: Option<&[f32]>,
    adv: f32,
    eps_low: f64,
    eps_high: f64,
    beta: f64,
    weight: f64,
) -> (f64, Vec<f32>, usize) {
    let (mut loss, mut clipped) = (0.0f64, 0usize);
    let mut grad = Vec::with_capacity(new.len());
    for t in 0..new.len() {
        let ratio = ((new[t] - old[t]) as f64).exp();
        let a = adv as f64;
        let unclipped = ratio * a;
        let c = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * a;
        let mut g = if unclipped <= c { -a * ratio } else { 0.0 };
        clipped += usize::from(c < unclipped);
        let mut l = -unclipped.min(c);
        if let Some(r) = reference {
            let logr = (r[t] - new[t]) as f64;
            l += beta * (logr.exp_m1() - logr);
            g += beta * -logr.exp_m1();
        }
        loss += weight * l;
        grad.push((weight * g) as f32);
    }
    (loss, grad, clipped)
}

enum Scorer<'a> {
    Model(Box<Model>),
    Rule(RewardRule, &'a TextTokenizer),
}

/// `rlhf grpo`; the summary counts iterations as steps.
pub fn train(a: &GrpoArgs) -> Result<RunSummary> {
    let t = &a.train;
    super::reject_offline_options(t, "grpo")?;
    if a.group_size < 2 {
        return Err(Error::Unsupported {
            op: "grpo",
            detail: "--group-size must be at least 2 (advantages are relative within a group)"
                .into(),
        });
    }
    super::check_counts(
        "grpo",
        &[
            ("--iterations", a.iterations),
            ("--prompts-per-step", a.prompts_per_step),
            ("--updates-per-rollout", a.updates_per_rollout),
            ("--max-new-tokens", a.max_new_tokens),
        ],
    )?;
    // The ratio needs a stochastic policy: log-probs of softmax(logits / T) for T > 0.
    check_positive("grpo", "--temperature", a.temperature as f64)?;
    check_non_negative("grpo", "--epsilon", a.epsilon)?;
    if let Some(high) = a.epsilon_high {
        check_non_negative("grpo", "--epsilon-high", high)?;
    }
    if a.epsilon >= 1.0 {
        return Err(Error::Unsupported {
            op: "grpo",
            detail: format!(
                "--epsilon must be below 1 (the ratio's lower clip bound is 1 - epsilon), got {}",
                a.epsilon
            ),
        });
    }
    check_non_negative("grpo", "--beta", a.beta)?;
    let (mut policy, tok) = load_policy(t)?;
    let device = policy.device.clone();
    let scorer = match (&a.reward_model, a.reward_rule) {
        (Some(dir), None) => {
            let mut rm = Model::load(dir, &device)?;
            rm.share_prompts = policy.share_prompts;
            Scorer::Model(Box::new(rm))
        }
        (None, Some(rule)) => Scorer::Rule(rule, &tok),
        _ => {
            return Err(Error::Unsupported {
                op: "grpo",
                detail: "give exactly one of --reward-model and --reward-rule".into(),
            })
        }
    };
    let reference = if a.beta > 0.0 {
        Some(Model::load(&t.model, &device)?)
    } else {
        None
    };
    let eos = eos_id(&policy, &tok)?;
    let enc = Encoder {
        tok: &tok,
        limits: t.limits(),
        eos,
    };
    let (prompts, report) = data::load_prompts(&t.data, &enc, t.skip_invalid)?;
    report.print(&t.data, t.quiet);
    if matches!(scorer, Scorer::Rule(RewardRule::Exact, _))
        && prompts.iter().any(|p| p.answer.is_none())
    {
        return Err(Error::file(
            &t.data,
            "--reward-rule exact needs an `answer` on every line",
        ));
    }
    std::fs::create_dir_all(&t.out).map_err(|e| Error::io(&t.out, e))?;
    let mut opt = Optimizer::new(
        &policy,
        AdamWConfig {
            weight_decay: t.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    let bar = iteration_bar(t.quiet, "grpo", a.iterations);
    let (eps_low, eps_high) = (a.epsilon, a.epsilon_high.unwrap_or(a.epsilon));
    let mut progress =
        OnlineProgress::begin(t, "grpo", a.iterations, prompts.len(), a.prompts_per_step)?;
    // Opened once `begin` has checked that --out holds no other run.
    let mut metrics = super::MetricsLog::open(&t.out)?;
    if let Some((dir, _)) = &progress.resumed {
        restore(&mut policy, &mut opt, dir)?;
    }
    bar.set_position(progress.start as u64);
    let mut last = Metrics::new();
    let total_updates = a.iterations * a.updates_per_rollout;
    let mut done = progress.start;
    while done < progress.stop {
        let it = done;
        let picked = progress.cycle.take(a.prompts_per_step);
        // Each prompt repeated group_size times, consecutively.
        let batch: Vec<Vec<i32>> = picked
            .iter()
            .flat_map(|&i| std::iter::repeat_n(prompts[i].tokens.clone(), a.group_size))
            .collect();
        let t_gen = Instant::now();
        let opts = GenerateOptions {
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            seed: progress.rng.next_u64(),
            eos: vec![eos],
            ..Default::default()
        };
        let gens = policy.generate(&batch, &opts, |_, _| {})?;
        let gen_secs = t_gen.elapsed().as_secs_f64();
        let responses: Vec<Vec<i32>> = gens.iter().map(|g| g.tokens.clone()).collect();
        let rewards: Vec<f32> = match &scorer {
            Scorer::Model(rm) => {
                let seqs: Vec<(&[i32], &[i32])> = batch
                    .iter()
                    .zip(&responses)
                    .map(|(p, r)| (p.as_slice(), r.as_slice()))
                    .collect();
                response_rewards(rm, &seqs)?
            }
            Scorer::Rule(rule, tok) => responses
                .iter()
                .enumerate()
                .map(|(k, r)| {
                    Ok(rule_reward(
                        *rule,
                        &tok.decode(r, true)?,
                        prompts[picked[k / a.group_size]].answer.as_deref(),
                    ))
                })
                .collect::<Result<_>>()?,
        };
        let adv = group_advantages(&rewards, a.group_size);
        let seqs: Vec<(&[i32], &[i32])> = batch
            .iter()
            .zip(&responses)
            .map(|(p, r)| (p.as_slice(), r.as_slice()))
            .collect();
        // A group's responses share its prompt: the layers run it once for the group.
        let sb = ScoredBatch::build(&seqs, &[], policy.share_prompts);
        // The first update scores the rollout with the weights that sampled it, so its log-probs
        // are the old ones, bit for bit (the same forward on the same batch): no forward of its own.
        let mut old: Option<Vec<f32>> = None;
        let ref_lp = reference
            .as_ref()
            .map(|r| frozen_logps_at(r, &sb, a.temperature))
            .transpose()?;
        let total_tokens: usize = sb.spans.iter().map(|s| s.len()).sum();
        let n = sb.spans.len();
        let t_train = Instant::now();
        let (mut loss, mut clipped) = (0.0, 0usize);
        for _ in 0..a.updates_per_rollout {
            let s = score_at(&policy, &sb, a.temperature)?;
            let old = old.get_or_insert_with(|| s.per_token.clone());
            let mut upstream = vec![0.0f32; sb.batch.len()];
            loss = 0.0;
            clipped = 0;
            for (k, span) in sb.spans.iter().enumerate() {
                let w = match a.loss_aggregation {
                    LossAggregation::Sequence => 1.0 / (span.len().max(1) * n) as f64,
                    LossAggregation::Token => 1.0 / total_tokens.max(1) as f64,
                };
                let r = ref_lp.as_ref().map(|r| &r[span.clone()]);
                let (l, g, c) = grpo_token_terms(
                    &s.per_token[span.clone()],
                    &old[span.clone()],
                    r,
                    adv[k],
                    eps_low,
                    eps_high,
                    a.beta,
                    w,
                );
                loss += l;
                clipped += c;
                upstream[span.clone()].copy_from_slice(&g);
            }
            let mut grads = Params::zeros(&policy.cfg, &device, DType::F32)?;
            score_backward(&policy, &s, upstream, &mut grads)?;
            check_finite("grpo", it + 1, "loss", loss)?;
            let norm = global_grad_norm(&grads.named())?;
            check_finite("grpo", it + 1, "gradient norm", norm)?;
            let lr = super::learning_rate(t.lr, opt.step as usize, t.warmup_steps, total_updates);
            opt.update(
                &mut policy,
                &grads,
                lr,
                clip_coefficient(norm, t.max_grad_norm),
            )?;
        }
        let mean_reward = rewards.iter().map(|&r| r as f64).sum::<f64>() / rewards.len() as f64;
        let groups_with_signal = rewards
            .chunks(a.group_size)
            .filter(|g| g.iter().any(|&r| r != g[0]))
            .count();
        let m = Metrics::from([
            ("iteration".into(), (it + 1) as f64),
            ("reward".into(), mean_reward),
            ("loss".into(), loss),
            (
                "clip_fraction".into(),
                clipped as f64 / total_tokens.max(1) as f64,
            ),
            (
                "groups_with_signal".into(),
                groups_with_signal as f64 / picked.len() as f64,
            ),
            ("response_length".into(), total_tokens as f64 / n as f64),
            (
                "generation_tokens_per_s".into(),
                total_tokens as f64 / gen_secs,
            ),
            (
                "training_tokens_per_s".into(),
                (sb.batch.unshared_len() * (1 + a.updates_per_rollout)) as f64
                    / t_train.elapsed().as_secs_f64(),
            ),
        ]);
        metrics.write(&m)?;
        bar.set_position((it + 1) as u64);
        bar.set_message(format!(
            "reward {mean_reward:.3} clip {:.3} len {:.1}",
            m["clip_fraction"], m["response_length"]
        ));
        last = m;
        done += 1;
        if progress.interrupted() {
            break;
        }
        if t.save_every > 0 && done.is_multiple_of(t.save_every) && done < progress.stop {
            save_checkpoint(
                &policy,
                Some(&opt),
                &t.model,
                &t.out.join(format!("checkpoint-{done}")),
                &progress.state(done),
            )?;
        }
    }
    bar.finish_and_clear();
    let state = progress.state(done);
    save_checkpoint(
        &policy,
        Some(&opt),
        &t.model,
        &t.out.join(format!("checkpoint-{done}")),
        &state,
    )?;
    let final_dir = t.out.join("final");
    save_checkpoint(&policy, None, &t.model, &final_dir, &state)?;
    Ok(RunSummary {
        steps: done,
        interrupted: progress.interrupted(),
        last,
        final_dir,
    })
}
