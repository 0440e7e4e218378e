//! PPO against a reward model (InstructGPT / TRL's PPOTrainer): per iteration, sample responses with
//! the KV cache, score them, put a per-token KL penalty to the frozen reference into the reward (plus
//! the score on the last response token, minus a penalty when the response never reached EOS), GAE
//! with whitening, then several epochs of clipped policy and value updates over minibatches.
//!
//! The log-probs in the ratio's denominator are recomputed by the training forward pass; the sampling
//! log-probs are logged beside them (`logprob_mismatch`) so a mismatch between the two paths shows.
//! The value model starts from the reward model (a separate network with its own optimizer), or with
//! `shared_value` is a scalar head on the policy's hidden states, trained with it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::data::{self, Encoder};
use super::eval::response_logps;
use super::reward::sequence_rewards;
use super::{
    check_finite, check_non_negative, check_positive, check_range, eos_id, frozen_logps_at,
    frozen_score_at, iteration_bar, load_policy, restore, save_checkpoint, save_checkpoint_with,
    score_at, score_backward, Metrics, OnlineProgress, Optimizer, RunSummary, ScoredBatch,
    TrainArgs,
};
use crate::device::{DType, Tensor};
use crate::error::{Error, Result};
use crate::model::generate::GenerateOptions;
use crate::model::llama::{head_values, head_values_bwd};
use crate::model::weights::{save_state, StateFile};
use crate::model::{Model, Params};
use crate::ops::adamw::{adamw_step, clip_coefficient, global_grad_norm, AdamWConfig};
use crate::ops::elementwise::add;
use crate::ops::kl::KlEstimator;
use crate::ops::ppo::{ppo_advantages, ppo_loss, PpoConfig};
use crate::rng::Rng;

#[derive(Debug, Clone, clap::Args)]
pub struct PpoArgs {
    /// --model is the policy (usually the SFT model); --data holds `prompt` lines.
    #[command(flatten)]
    pub train: TrainArgs,
    /// The reward model (a ForSequenceClassification folder, e.g. from `rlhf rm`).
    #[arg(long)]
    pub reward_model: PathBuf,
    /// The value model's starting point [default: the reward model].
    #[arg(long, conflicts_with = "shared_value")]
    pub value_model: Option<PathBuf>,
    /// A value head on the policy's own hidden states instead of a separate value model (half the
    /// memory; the value loss then also trains the policy's trunk). The head starts at N(0, 0.02²).
    #[arg(long)]
    pub shared_value: bool,
    /// PPO iterations (rollout, then updates).
    #[arg(long, default_value_t = 100)]
    pub iterations: usize,
    /// Prompts per rollout.
    #[arg(long, default_value_t = 32)]
    pub rollout_batch: usize,
    /// Passes over each rollout.
    #[arg(long, default_value_t = 4)]
    pub ppo_epochs: usize,
    /// Responses per minibatch update.
    #[arg(long, default_value_t = 8)]
    pub minibatch: usize,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub kl_coef: f64,
    #[arg(long, value_enum, default_value_t = KlEstimator::K1)]
    pub kl_estimator: KlEstimator,
    /// Adapt the KL coefficient toward this per-response KL (Ziegler et al.); fixed when absent.
    #[arg(long)]
    pub target_kl: Option<f64>,
    /// The adaptive controller's horizon, in responses.
    #[arg(long, default_value_t = 10_000.0)]
    pub kl_horizon: f64,
    /// Subtracted from the score of a response that hit the length limit without EOS.
    #[arg(long, default_value_t = 1.0)]
    pub missing_eos_penalty: f64,
    #[arg(long, default_value_t = 1.0)]
    pub gamma: f64,
    #[arg(long, default_value_t = 0.95)]
    pub lam: f64,
    #[arg(long, default_value_t = 0.2)]
    pub cliprange: f64,
    #[arg(long, default_value_t = 0.2)]
    pub cliprange_value: f64,
    #[arg(long, default_value_t = 0.1)]
    pub vf_coef: f64,
}

impl PpoArgs {
    pub fn new(train: TrainArgs, reward_model: PathBuf) -> PpoArgs {
        PpoArgs {
            train,
            reward_model,
            value_model: None,
            shared_value: false,
            iterations: 100,
            rollout_batch: 32,
            ppo_epochs: 4,
            minibatch: 8,
            max_new_tokens: 64,
            temperature: 1.0,
            top_p: 1.0,
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            target_kl: None,
            kl_horizon: 10_000.0,
            missing_eos_penalty: 1.0,
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
        }
    }
}

/// Ziegler et al.'s adaptive KL coefficient.
pub fn adapt_kl(coef: f64, observed: f64, target: f64, responses: usize, horizon: f64) -> f64 {
    let error = (observed / target - 1.0).clamp(-0.2, 0.2);
    coef * (1.0 + error * responses as f64 / horizon)
}

/// 1 − Var(returns − values) / Var(returns) over the masked tokens.
pub fn explained_variance(values: &[f32], returns: &[f32], mask: &[f32]) -> f64 {
    let pick = |f: &dyn Fn(usize) -> f64| -> Vec<f64> {
        (0..mask.len()).filter(|&i| mask[i] > 0.0).map(f).collect()
    };
    let var = |v: &[f64]| {
        let m = v.iter().sum::<f64>() / v.len().max(1) as f64;
        v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len().max(1) as f64
    };
    let r = pick(&|i| returns[i] as f64);
    let d = pick(&|i| (returns[i] - values[i]) as f64);
    let vr = var(&r);
    if vr == 0.0 {
        return f64::NAN;
    }
    1.0 - var(&d) / vr
}

/// Host-side `[B, T]` rows picked by `idx`.
fn rows(v: &[f32], t: usize, idx: &[usize]) -> Vec<f32> {
    idx.iter()
        .flat_map(|&i| v[i * t..(i + 1) * t].iter().copied())
        .collect()
}

/// Where PPO's values come from.
enum Critic {
    Separate(Box<Model>, Box<Optimizer>),
    Shared(Box<ValueHead>),
}

/// A `[1, d]` value head on the policy's hidden states, with its own AdamW state (f32 master).
struct ValueHead {
    /// In the policy's dtype, for the forward.
    w: Tensor,
    master: Tensor,
    m: Tensor,
    v: Tensor,
    step: u64,
    cfg: AdamWConfig,
}

impl ValueHead {
    fn new(policy: &Model, seed: u64) -> Result<ValueHead> {
        let d = policy.cfg.hidden_size;
        let init = Rng::new(seed ^ 0x5ca1ab1e).normal_vec(d, 0.02);
        let dev = &policy.device;
        Ok(ValueHead {
            w: Tensor::from_f32_as(&[1, d], &init, policy.dtype, dev)?,
            master: Tensor::from_f32(&[1, d], init, dev)?,
            m: Tensor::zeros(&[1, d], DType::F32, dev)?,
            v: Tensor::zeros(&[1, d], DType::F32, dev)?,
            step: 0,
            cfg: AdamWConfig::default(),
        })
    }

    fn update(&mut self, grad: &Tensor, lr: f64, clip: f64) -> Result<()> {
        self.step += 1;
        let cfg = AdamWConfig { lr, ..self.cfg };
        let copy = if self.w.dtype() == DType::F32 {
            None
        } else {
            Some(&mut self.w)
        };
        adamw_step(
            &mut self.master,
            &mut self.m,
            &mut self.v,
            copy,
            grad,
            &cfg,
            self.step,
            clip,
        )?;
        if self.w.dtype() == DType::F32 {
            self.w = self.master.duplicate()?;
        }
        Ok(())
    }

    /// The f32 weights as `score.weight`, with the AdamW moments and step beside them so a resumed
    /// run continues the head's optimizer too.
    fn save(&self, path: &Path) -> Result<()> {
        save_state(
            path,
            &[
                ("score.weight".into(), &self.master),
                ("exp_avg".into(), &self.m),
                ("exp_avg_sq".into(), &self.v),
            ],
            &[("step", self.step.to_string())],
        )
    }

    fn load(&mut self, path: &Path) -> Result<()> {
        let file = StateFile::open(path)?;
        self.step = file.meta("step")?;
        let (shape, dev) = (self.master.shape().to_vec(), self.master.device().clone());
        self.master = file.tensor("score.weight", &shape, &dev)?;
        self.m = file.tensor("exp_avg", &shape, &dev)?;
        self.v = file.tensor("exp_avg_sq", &shape, &dev)?;
        self.w = Tensor::from_f32_as(&shape, &self.master.to_f32_vec()?, self.w.dtype(), &dev)?;
        Ok(())
    }
}

/// Per-row values of a scalar-head model at the rows scoring each response token, padded `[B, T]`.
fn values(model: &Model, sb: &ScoredBatch) -> Result<(crate::model::Activations, Vec<f32>)> {
    let acts = model.forward(&sb.batch)?;
    let padded = padded_values(model, &acts.hidden, sb)?;
    Ok((acts, padded))
}

/// `values` where no gradient flows (the rollout's old values): the same values, from a forward
/// that keeps no activations.
fn frozen_values(model: &Model, sb: &ScoredBatch) -> Result<Vec<f32>> {
    padded_values(model, &model.forward_frozen(&sb.batch)?, sb)
}

/// The value head on a final hidden state, in `ScoredBatch::padded`'s layout.
fn padded_values(model: &Model, hidden: &Tensor, sb: &ScoredBatch) -> Result<Vec<f32>> {
    Ok(sb.padded(&model.scalar_head(hidden)?.to_f32_vec()?).0)
}

/// `rlhf ppo`; the summary counts iterations as steps.
pub fn train(a: &PpoArgs) -> Result<RunSummary> {
    let t = &a.train;
    super::reject_offline_options(t, "ppo")?;
    super::reject_shared_prompts_option(t, "ppo")?;
    super::check_counts(
        "ppo",
        &[
            ("--iterations", a.iterations),
            ("--rollout-batch", a.rollout_batch),
            ("--minibatch", a.minibatch),
            ("--ppo-epochs", a.ppo_epochs),
            ("--max-new-tokens", a.max_new_tokens),
        ],
    )?;
    // The ratio needs a stochastic policy: log-probs of softmax(logits / T) for T > 0.
    check_positive("ppo", "--temperature", a.temperature as f64)?;
    check_range("ppo", "--top-p", a.top_p as f64, f64::MIN_POSITIVE, 1.0)?;
    check_non_negative("ppo", "--kl-coef", a.kl_coef)?;
    check_positive("ppo", "--kl-horizon", a.kl_horizon)?;
    if let Some(target) = a.target_kl {
        check_positive("ppo", "--target-kl", target)?;
    }
    check_range(
        "ppo",
        "--missing-eos-penalty",
        a.missing_eos_penalty,
        f64::MIN,
        f64::MAX,
    )?;
    check_range("ppo", "--gamma", a.gamma, 0.0, 1.0)?;
    check_range("ppo", "--lam", a.lam, 0.0, 1.0)?;
    check_positive("ppo", "--cliprange", a.cliprange)?;
    check_positive("ppo", "--cliprange-value", a.cliprange_value)?;
    check_non_negative("ppo", "--vf-coef", a.vf_coef)?;
    let (mut policy, tok) = load_policy(t)?;
    let device = policy.device.clone();
    let reference = Model::load(&t.model, &device)?;
    let reward = Model::load(&a.reward_model, &device)?;
    if !reward.cfg.scalar_head {
        return Err(Error::file(
            a.reward_model.join("config.json"),
            "the reward model has no scalar head (train one with `rlhf rm`)",
        ));
    }
    let value_dir = a
        .value_model
        .clone()
        .unwrap_or_else(|| a.reward_model.clone());
    let mut critic = if a.shared_value {
        Critic::Shared(Box::new(ValueHead::new(&policy, t.seed)?))
    } else {
        let mut value = Model::load(&value_dir, &device)?;
        value.recompute = t.recompute;
        let opt = Optimizer::new(
            &value,
            AdamWConfig {
                weight_decay: t.weight_decay,
                ..AdamWConfig::default()
            },
        )?;
        Critic::Separate(Box::new(value), Box::new(opt))
    };
    let eos = eos_id(&policy, &tok)?;
    let enc = Encoder {
        tok: &tok,
        limits: t.limits(),
        eos,
    };
    let (prompts, report) = data::load_prompts(&t.data, &enc, t.skip_invalid)?;
    report.print(&t.data, t.quiet);
    std::fs::create_dir_all(&t.out).map_err(|e| Error::io(&t.out, e))?;
    let adam = AdamWConfig {
        weight_decay: t.weight_decay,
        ..AdamWConfig::default()
    };
    let mut opt_p = Optimizer::new(&policy, adam)?;
    let mut cfg = PpoConfig {
        kl_coef: a.kl_coef,
        kl_estimator: a.kl_estimator,
        gamma: a.gamma,
        lam: a.lam,
        cliprange: a.cliprange,
        cliprange_value: a.cliprange_value,
        vf_coef: a.vf_coef,
    };
    let bar = iteration_bar(t.quiet, "ppo", a.iterations);
    let mut progress =
        OnlineProgress::begin(t, "ppo", a.iterations, prompts.len(), a.rollout_batch)?;
    // Opened once `begin` has checked that --out holds no other run.
    let mut metrics = super::MetricsLog::open(&t.out)?;
    if let Some((dir, state)) = &progress.resumed {
        restore(&mut policy, &mut opt_p, dir)?;
        match &mut critic {
            Critic::Separate(value, opt_v) => restore(value, opt_v, &dir.join("value"))?,
            Critic::Shared(head) => head.load(&dir.join("value_head.safetensors"))?,
        }
        cfg.kl_coef = state["kl_coef"]
            .as_f64()
            .ok_or_else(|| Error::file(dir.join("trainer_state.json"), "no number `kl_coef`"))?;
    }
    bar.set_position(progress.start as u64);
    let mut last = Metrics::new();
    let updates_per_iter = a.ppo_epochs * a.rollout_batch.div_ceil(a.minibatch);
    let total_updates = a.iterations * updates_per_iter;
    let mut update = progress.start * updates_per_iter;
    let mut done = progress.start;
    // A resumable checkpoint-N: the policy and critic with their optimizers, and where the run is.
    let save = |policy: &Model,
                opt_p: &Optimizer,
                critic: &Critic,
                mut state: serde_json::Value,
                kl_coef: f64| {
        state["kl_coef"] = kl_coef.into();
        let dir = t.out.join(format!("checkpoint-{}", state["iteration"]));
        save_checkpoint_with(
            policy,
            Some(opt_p),
            &t.model,
            &dir,
            &state,
            |tmp| match critic {
                Critic::Separate(value, opt_v) => {
                    save_checkpoint(value, Some(opt_v), &value_dir, &tmp.join("value"), &state)
                }
                Critic::Shared(head) => head.save(&tmp.join("value_head.safetensors")),
            },
        )?;
        Ok::<_, Error>(state)
    };
    while done < progress.stop {
        let it = done;
        let rng = &mut progress.rng;
        // 1. Prompts, cycling through the data in seeded shuffles.
        let batch: Vec<Vec<i32>> = progress
            .cycle
            .take(a.rollout_batch)
            .into_iter()
            .map(|i| prompts[i].tokens.clone())
            .collect();
        // 2. Rollout.
        let t_gen = Instant::now();
        let opts = GenerateOptions {
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_p: a.top_p,
            seed: rng.next_u64(),
            eos: vec![eos],
            top_k: 0,
        };
        let gens = policy.generate(&batch, &opts, |_, _| {})?;
        let gen_tokens: usize = gens.iter().map(|g| g.tokens.len()).sum();
        let gen_secs = t_gen.elapsed().as_secs_f64();
        let responses: Vec<Vec<i32>> = gens.iter().map(|g| g.tokens.clone()).collect();
        let seqs: Vec<(&[i32], &[i32])> = batch
            .iter()
            .zip(&responses)
            .map(|(p, r)| (p.as_slice(), r.as_slice()))
            .collect();
        let sb = ScoredBatch::new(&seqs);
        let t_train = Instant::now();
        // 3. Old log-probs, reference log-probs, values, scores. The old log-probs come from a
        // forward that keeps no activations (the same values as the training forward's): the
        // updates below run their own forwards, and the rollout's would otherwise stay alive
        // through them.
        let old = frozen_score_at(&policy, &sb, a.temperature)?;
        let (old_lp, mask, tt) = sb.padded(&old.per_token);
        let entropy = old.entropy;
        let (ref_lp, _, _) = sb.padded(&frozen_logps_at(&reference, &sb, a.temperature)?);
        let old_v = match &critic {
            Critic::Separate(value, _) => frozen_values(value, &sb)?,
            Critic::Shared(head) => {
                sb.padded(&head_values(&old.hidden, &head.w)?.to_f32_vec()?)
                    .0
            }
        };
        let full: Vec<Vec<i32>> = batch
            .iter()
            .zip(&responses)
            .map(|(p, r)| [p.as_slice(), r.as_slice()].concat())
            .collect();
        let raw_scores = sequence_rewards(&reward, &full)?;
        let scores: Vec<f32> = raw_scores
            .iter()
            .zip(&gens)
            .map(|(&s, g)| {
                if g.finished {
                    s
                } else {
                    s - a.missing_eos_penalty as f32
                }
            })
            .collect();
        let b = batch.len();
        let up = |v: Vec<f32>, shape: &[usize]| Tensor::from_f32(shape, v, &device);
        let adv = ppo_advantages(
            &cfg,
            &up(old_lp.clone(), &[b, tt])?,
            &up(ref_lp.clone(), &[b, tt])?,
            &up(old_v.clone(), &[b, tt])?,
            &up(scores.clone(), &[b])?,
            &up(mask.clone(), &[b, tt])?,
        )?;
        let (whitened, returns) = (adv.whitened.to_f32_vec()?, adv.returns.to_f32_vec()?);
        // 4. PPO epochs over minibatches.
        let (mut pg, mut vf, mut clip, mut akl, mut n_mb) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for _ in 0..a.ppo_epochs {
            let mut idx: Vec<usize> = (0..b).collect();
            data::shuffle(&mut idx, rng.next_u64());
            for mb in idx.chunks(a.minibatch) {
                let mseqs: Vec<(&[i32], &[i32])> = mb.iter().map(|&i| seqs[i]).collect();
                let msb = ScoredBatch::new(&mseqs);
                let s = score_at(&policy, &msb, a.temperature)?;
                let (new_lp, _, mt) = msb.padded(&s.per_token);
                let (vacts, new_v) = match &critic {
                    Critic::Separate(value, _) => {
                        let (acts, v) = values(value, &msb)?;
                        (Some(acts), v)
                    }
                    Critic::Shared(head) => (
                        None,
                        msb.padded(&head_values(&s.acts.hidden, &head.w)?.to_f32_vec()?)
                            .0,
                    ),
                };
                // Minibatch rows padded to the rollout's width T; the minibatch's own width is ≤ T.
                let widen = |v: &[f32]| -> Vec<f32> {
                    v.chunks(mt)
                        .flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(0.0, tt - mt)))
                        .collect()
                };
                let n = mb.len();
                let l = ppo_loss(
                    &cfg,
                    &up(widen(&new_lp), &[n, tt])?,
                    &up(widen(&new_v), &[n, tt])?,
                    &up(rows(&old_lp, tt, mb), &[n, tt])?,
                    &up(rows(&old_v, tt, mb), &[n, tt])?,
                    &up(rows(&whitened, tt, mb), &[n, tt])?,
                    &up(rows(&returns, tt, mb), &[n, tt])?,
                    &up(rows(&mask, tt, mb), &[n, tt])?,
                )?;
                let narrow = |v: Vec<f32>| -> Vec<f32> {
                    v.chunks(tt).flat_map(|r| r[..mt].to_vec()).collect()
                };
                let lr = super::learning_rate(t.lr, update, t.warmup_steps, total_updates);
                update += 1;
                let mut gp = Params::zeros(&policy.cfg, &device, DType::F32)?;
                let glp = msb.unpad(&narrow(l.grad_new_logps.to_f32_vec()?), mt);
                let dv = Tensor::from_f32(
                    &[msb.batch.len()],
                    msb.unpad(&narrow(l.grad_new_values.to_f32_vec()?), mt),
                    &device,
                )?;
                match &mut critic {
                    Critic::Separate(value, opt_v) => {
                        score_backward(&policy, &s, glp, &mut gp)?;
                        let vacts = vacts.expect("a separate critic has its own activations");
                        let mut gv = Params::zeros(&value.cfg, &device, DType::F32)?;
                        let dh = value.scalar_head_bwd(
                            &vacts.hidden,
                            &dv,
                            gv.score.as_mut().expect("value models have a score head"),
                        )?;
                        value.backward(&vacts, &dh, &mut gv)?;
                        let vnorm = global_grad_norm(&gv.named())?;
                        opt_v.update(value, &gv, lr, clip_coefficient(vnorm, t.max_grad_norm))?;
                    }
                    Critic::Shared(head) => {
                        // One backward through the trunk for both losses.
                        let dh_lp = s.dhidden(&policy, glp, &mut gp)?;
                        let mut dw = Tensor::zeros(head.w.shape(), DType::F32, &device)?;
                        let dh_v = head_values_bwd(&s.acts.hidden, &head.w, &dv, &mut dw)?;
                        policy.backward(&s.acts, &add(&dh_lp, &dh_v)?, &mut gp)?;
                        let hnorm = global_grad_norm(&[&dw])?;
                        head.update(&dw, lr, clip_coefficient(hnorm, t.max_grad_norm))?;
                    }
                }
                check_finite("ppo", it + 1, "policy loss", l.pg_loss)?;
                check_finite("ppo", it + 1, "value loss", l.vf_loss)?;
                let norm = global_grad_norm(&gp.named())?;
                check_finite("ppo", it + 1, "policy's gradient norm", norm)?;
                opt_p.update(
                    &mut policy,
                    &gp,
                    lr,
                    clip_coefficient(norm, t.max_grad_norm),
                )?;
                pg += l.pg_loss;
                vf += l.vf_loss;
                clip += l.clip_fraction;
                akl += l.approx_kl;
                n_mb += 1.0;
            }
        }
        let train_secs = t_train.elapsed().as_secs_f64();
        // 5. Logging and the KL controller, with the estimator the penalty uses (as TRL logs it).
        let per_seq_kl: Vec<f64> = (0..b)
            .map(|r| {
                (0..tt)
                    .map(|c| {
                        let i = r * tt + c;
                        let logr = (ref_lp[i] - old_lp[i]) as f64;
                        let k = match a.kl_estimator {
                            KlEstimator::K1 => -logr,
                            KlEstimator::K2 => 0.5 * logr * logr,
                            KlEstimator::K3 => logr.exp_m1() - logr,
                        };
                        mask[i] as f64 * k
                    })
                    .sum()
            })
            .collect();
        let kl = per_seq_kl.iter().sum::<f64>() / b as f64;
        let n_tok: f64 = mask.iter().map(|&m| m as f64).sum();
        let sample_lp: Vec<f32> = gens
            .iter()
            .flat_map(|g| {
                g.logprobs
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0.0, tt - g.logprobs.len()))
            })
            .collect();
        let mismatch = sample_lp
            .iter()
            .zip(&old_lp)
            .zip(&mask)
            .map(|((s, o), m)| (m * (s - o).abs()) as f64)
            .sum::<f64>()
            / n_tok;
        let mean_entropy = sb
            .spans
            .iter()
            .flat_map(|s| s.clone().map(|r| entropy[r] as f64))
            .sum::<f64>()
            / n_tok;
        let m = Metrics::from([
            ("iteration".into(), (it + 1) as f64),
            // After the missing-EOS penalty, as TRL's objective/scores; the reward model's own
            // beside it.
            (
                "score".into(),
                scores.iter().map(|&s| s as f64).sum::<f64>() / b as f64,
            ),
            (
                "score_raw".into(),
                raw_scores.iter().map(|&s| s as f64).sum::<f64>() / b as f64,
            ),
            ("kl".into(), kl),
            ("kl_coef".into(), cfg.kl_coef),
            ("entropy".into(), mean_entropy),
            ("pg_loss".into(), pg / n_mb),
            ("vf_loss".into(), vf / n_mb),
            ("clip_fraction".into(), clip / n_mb),
            ("approx_kl".into(), akl / n_mb),
            (
                "explained_variance".into(),
                explained_variance(&old_v, &returns, &mask),
            ),
            ("response_length".into(), gen_tokens as f64 / b as f64),
            (
                "eos_fraction".into(),
                gens.iter().filter(|g| g.finished).count() as f64 / b as f64,
            ),
            ("logprob_mismatch".into(), mismatch),
            (
                "generation_tokens_per_s".into(),
                gen_tokens as f64 / gen_secs,
            ),
            (
                "training_tokens_per_s".into(),
                (sb.batch.len() * (1 + a.ppo_epochs)) as f64 / train_secs,
            ),
        ]);
        metrics.write(&m)?;
        bar.set_position((it + 1) as u64);
        bar.set_message(format!(
            "score {:.3} kl {:.3} clip {:.3}",
            m["score"], kl, m["clip_fraction"]
        ));
        if let Some(target) = a.target_kl {
            cfg.kl_coef = adapt_kl(cfg.kl_coef, kl, target, b, a.kl_horizon);
        }
        last = m;
        done += 1;
        if progress.interrupted() {
            break;
        }
        if t.save_every > 0 && done.is_multiple_of(t.save_every) && done < progress.stop {
            save(&policy, &opt_p, &critic, progress.state(done), cfg.kl_coef)?;
        }
    }
    bar.finish_and_clear();
    let state = save(&policy, &opt_p, &critic, progress.state(done), cfg.kl_coef)?;
    let final_dir = t.out.join("final");
    save_checkpoint(&policy, None, &t.model, &final_dir, &state)?;
    match &critic {
        Critic::Separate(value, _) => {
            save_checkpoint(value, None, &value_dir, &t.out.join("value"), &state)?
        }
        Critic::Shared(head) => head.save(&final_dir.join("value_head.safetensors"))?,
    }
    Ok(RunSummary {
        steps: done,
        interrupted: progress.interrupted(),
        last,
        final_dir,
    })
}

/// Mean reward-model score and mean KL to the reference (Σ log π − log π_ref over the response) of
/// `policy`'s samples on `prompts`.
pub fn score_and_kl(
    policy: &Model,
    reference: &Model,
    reward: &Model,
    prompts: &[Vec<i32>],
    opts: &GenerateOptions,
) -> Result<(f64, f64)> {
    let samples: Vec<Vec<i32>> = policy
        .generate(prompts, opts, |_, _| {})?
        .into_iter()
        .map(|g| g.tokens)
        .collect();
    let full: Vec<Vec<i32>> = prompts
        .iter()
        .zip(&samples)
        .map(|(p, r)| [p.as_slice(), r.as_slice()].concat())
        .collect();
    let s = sequence_rewards(reward, &full)?;
    let (p, q) = (
        response_logps(policy, prompts, &samples, 16)?,
        response_logps(reference, prompts, &samples, 16)?,
    );
    let n = prompts.len().max(1) as f64;
    Ok((
        s.iter().map(|&v| v as f64).sum::<f64>() / n,
        p.iter().zip(&q).map(|(a, b)| a - b).sum::<f64>() / n,
    ))
}
