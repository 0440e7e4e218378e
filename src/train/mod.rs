//! Training: one loop shared by every trainer (batches, gradient accumulation, AdamW with warmup and
//! cosine decay, clipping, checkpoints every N steps, at the end and on Ctrl-C, resume, JSON-lines
//! metrics and a progress bar), and one file per trainer.

pub mod builtin;
pub mod data;
pub mod demo;
pub mod dpo;
pub mod eval;
pub mod grpo;
pub mod honesty;
pub mod kto;
pub mod label;
pub mod plot;
pub mod ppo;
pub mod reward;
pub mod sft;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::device::{DType, Device, DeviceChoice, Tensor};
use crate::error::{Error, Result};
use crate::model::tokenizer::TextTokenizer;
use crate::model::weights::{save_state, stored_parameters, write_file_atomic, StateFile};
use crate::model::{Batch, Model, Params, SharedPrefix};
use crate::ops::adamw::{adamw_step, clip_coefficient, global_grad_norm, AdamWConfig};
use crate::ops::logprob::{linear_logprob_bwd, linear_logprob_fwd, LogprobOut};
use crate::rng::Rng;

/// Options every trainer takes.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// The starting model: a Hugging Face folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Training data, JSON Lines.
    #[arg(long)]
    pub data: PathBuf,
    /// Where checkpoints, metrics.jsonl and the final model go.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f64,
    /// Passes over the data (ignored when --max-steps is given).
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Optimizer steps to run; overrides --epochs.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Examples (pairs, for preference trainers) per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step; the loss is normalised over all of them together.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Linear warmup steps, then cosine decay to zero.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save a checkpoint every N steps (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many steps (iterations, for ppo and grpo) of this invocation (checkpoint
    /// saved; the schedule still spans the whole run), e.g. to fit a time slot; continue later with
    /// --resume.
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Longest prompt + completion, in tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_len: usize,
    /// Longest prompt; longer prompts keep their end.
    #[arg(long, default_value_t = 512)]
    pub max_prompt_len: usize,
    /// Skip and count lines that fail to parse instead of stopping at the first.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Fraction of the data held out for evaluation at the end.
    #[arg(long, default_value_t = 0.0)]
    pub eval_fraction: f64,
    /// Recompute activations in the backward pass, layer by layer (less memory, one more forward).
    #[arg(long)]
    pub recompute: bool,
    /// Run each sequence's prompt on its own instead of once for the sequences that share it
    /// (chosen and rejected of a pair, a GRPO group, in training and in GRPO's reward-model
    /// scoring): the same losses up to rounding, more work.
    #[arg(long)]
    pub no_shared_prompts: bool,
    /// No progress bar (metrics still go to metrics.jsonl).
    #[arg(long)]
    pub quiet: bool,
    /// Bitwise-repeatable GPU gradients: the attention backward without atomics (slower). Without
    /// it, RLHF_DETERMINISTIC=1 does the same. CPU runs are always repeatable.
    #[arg(long)]
    pub deterministic: bool,
}

impl TrainArgs {
    /// Defaults for a run driven from code (the demo, tests).
    pub fn new(model: &Path, data: &Path, out: &Path) -> TrainArgs {
        TrainArgs {
            model: model.to_path_buf(),
            data: data.to_path_buf(),
            out: out.to_path_buf(),
            device: DeviceChoice::Auto,
            lr: 1e-5,
            epochs: 1,
            max_steps: None,
            batch_size: 8,
            grad_accum: 1,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            seed: 0,
            save_every: 0,
            resume: false,
            stop_after: None,
            max_len: 1024,
            max_prompt_len: 512,
            skip_invalid: false,
            eval_fraction: 0.0,
            recompute: false,
            no_shared_prompts: false,
            quiet: true,
            deterministic: false,
        }
    }

    pub fn limits(&self) -> data::Limits {
        data::Limits {
            max_len: self.max_len,
            max_prompt_len: self
                .max_prompt_len
                .min(self.max_len.saturating_sub(1))
                .max(1),
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |detail: String| {
            Err(Error::Unsupported {
                op: "train",
                detail,
            })
        };
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("--batch-size and --grad-accum must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("--lr must be positive, got {}", self.lr));
        }
        if self.epochs == 0 {
            return bad("--epochs must be at least 1".into());
        }
        for (flag, v) in [
            ("--max-steps", self.max_steps),
            ("--stop-after", self.stop_after),
        ] {
            if v == Some(0) {
                return bad(format!("{flag} must be at least 1"));
            }
        }
        check_non_negative("train", "--weight-decay", self.weight_decay)?;
        // 0 is documented as "no clipping".
        check_non_negative("train", "--max-grad-norm", self.max_grad_norm)?;
        if self.max_prompt_len == 0 {
            return bad("--max-prompt-len must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return bad(format!(
                "--eval-fraction must be in [0, 1), got {}",
                self.eval_fraction
            ));
        }
        if self.max_len < 2 {
            return bad("--max-len must be at least 2".into());
        }
        Ok(())
    }
}

/// Counts that must be at least 1: an error naming the first that is 0.
pub fn check_counts(op: &'static str, counts: &[(&str, usize)]) -> Result<()> {
    match counts.iter().find(|(_, n)| *n == 0) {
        Some((flag, _)) => Err(Error::Unsupported {
            op,
            detail: format!("{flag} must be at least 1"),
        }),
        None => Ok(()),
    }
}

/// An option that must be a finite number at least 0: an error naming it otherwise.
pub fn check_non_negative(op: &'static str, flag: &str, v: f64) -> Result<()> {
    if v >= 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(Error::Unsupported {
            op,
            detail: format!("{flag} must be a finite number at least 0, got {v}"),
        })
    }
}

/// An option that must be a finite number above 0: an error naming it otherwise.
pub fn check_positive(op: &'static str, flag: &str, v: f64) -> Result<()> {
    if v > 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(Error::Unsupported {
            op,
            detail: format!("{flag} must be a finite number above 0, got {v}"),
        })
    }
}

/// An option that must lie in [lo, hi]: an error naming it otherwise.
pub fn check_range(op: &'static str, flag: &str, v: f64, lo: f64, hi: f64) -> Result<()> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(Error::Unsupported {
            op,
            detail: format!("{flag} must be in [{lo}, {hi}], got {v}"),
        })
    }
}

/// A new run must not write into a folder that holds another run's metrics or checkpoints: its
/// metrics would be appended to theirs and its checkpoints would replace theirs.
pub fn refuse_existing_run(out: &Path) -> Result<()> {
    let metrics = out.join("metrics.jsonl");
    let has_checkpoint = std::fs::read_dir(out)
        .map(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("checkpoint-") || name == "final"
            })
        })
        .unwrap_or(false);
    if metrics.exists() || has_checkpoint {
        return Err(Error::file(
            out,
            "already holds a run (metrics.jsonl or checkpoints): continue it with --resume, or choose another --out",
        ));
    }
    Ok(())
}

/// A checkpoint's trainer_state.json, checked against the invocation that resumes it: the same
/// trainer, and the same value of every field in `same` (those that fix the data order and the
/// meaning of a step).
fn resumed_state(
    dir: &Path,
    trainer: &str,
    same: &[(&str, &str, u64)],
) -> Result<(PathBuf, serde_json::Value)> {
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let state: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(&path, e.to_string()))?;
    if state["trainer"] != trainer {
        return Err(Error::file(
            &path,
            format!("`trainer` is {}, not {trainer}", state["trainer"]),
        ));
    }
    for &(key, what, now) in same {
        let was = state_integer(&path, &state, key)?;
        if was != now {
            return Err(Error::file(
                &path,
                format!(
                    "`{key}` is {was} there but {now} now: {what} must match to continue the run"
                ),
            ));
        }
    }
    Ok((path, state))
}

/// An integer field of a trainer_state.json (written as a number, or as a string where it may
/// pass 2^53).
fn state_integer(path: &Path, state: &serde_json::Value, key: &str) -> Result<u64> {
    state[key]
        .as_u64()
        .or_else(|| state[key].as_str()?.parse().ok())
        .ok_or_else(|| Error::file(path, format!("no integer `{key}`")))
}

/// A learning rate: linear warmup from 0, then cosine decay to 0 at `total`.
pub fn learning_rate(base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// AdamW over a model's parameters with f32 master weights (the model's own on the CPU; separate
/// f32 copies on CUDA, where the model computes in bf16).
pub struct Optimizer {
    pub cfg: AdamWConfig,
    m: Params,
    v: Params,
    master: Option<Params>,
    pub step: u64,
}

impl Optimizer {
    pub fn new(model: &Model, cfg: AdamWConfig) -> Result<Optimizer> {
        let master = if model.dtype == DType::F32 {
            None
        } else {
            Some(
                model
                    .params
                    .convert(&model.cfg, &model.device, DType::F32)?,
            )
        };
        Ok(Optimizer {
            cfg,
            m: Params::zeros(&model.cfg, &model.device, DType::F32)?,
            v: Params::zeros(&model.cfg, &model.device, DType::F32)?,
            master,
            step: 0,
        })
    }

    /// One step with learning rate `lr` after scaling gradients by `clip`.
    pub fn update(&mut self, model: &mut Model, grads: &Params, lr: f64, clip: f64) -> Result<()> {
        self.step += 1;
        let cfg = AdamWConfig { lr, ..self.cfg };
        let grads = grads.named();
        let (ms, vs) = (self.m.named_mut(), self.v.named_mut());
        match &mut self.master {
            None => {
                for (((w, m), v), g) in model
                    .params
                    .named_mut()
                    .into_iter()
                    .zip(ms)
                    .zip(vs)
                    .zip(grads)
                {
                    adamw_step(w, m, v, None, g, &cfg, self.step, clip)?;
                }
            }
            Some(master) => {
                for ((((w, copy), m), v), g) in master
                    .named_mut()
                    .into_iter()
                    .zip(model.params.named_mut())
                    .zip(ms)
                    .zip(vs)
                    .zip(grads)
                {
                    adamw_step(w, m, v, Some(copy), g, &cfg, self.step, clip)?;
                }
            }
        }
        Ok(())
    }

    fn save(&self, model: &Model, path: &Path) -> Result<()> {
        // Under the stored (stacked) names: the state of one stacked parameter is one tensor.
        let names = stored_parameters(&model.cfg);
        let mut tensors: Vec<(String, &Tensor)> = Vec::new();
        let groups = [("exp_avg", &self.m), ("exp_avg_sq", &self.v)];
        let master = self.master.as_ref().map(|m| ("master", m));
        for (prefix, p) in groups.into_iter().chain(master) {
            for (stored, t) in names.iter().zip(p.named()) {
                tensors.push((format!("{prefix}.{}", stored.name), t));
            }
        }
        save_state(path, &tensors, &[("step", self.step.to_string())])
    }

    fn load(&mut self, model: &Model, path: &Path) -> Result<()> {
        let file = StateFile::open(path)?;
        self.step = file.meta("step")?;
        let names = stored_parameters(&model.cfg);
        let get = |prefix: &str, p: &mut Params| -> Result<()> {
            for (stored, t) in names.iter().zip(p.named_mut()) {
                let name = format!("{prefix}.{}", stored.name);
                *t = file.tensor(&name, &stored.shape, &model.device)?;
            }
            Ok(())
        };
        get("exp_avg", &mut self.m)?;
        get("exp_avg_sq", &mut self.v)?;
        if let Some(master) = &mut self.master {
            get("master", master)?;
        }
        Ok(())
    }
}

/// One optimizer step's worth of work for a trainer: compute the loss over `examples` (split into
/// micro-batches of `micro`), normalised over all of them, and add its gradient into `grads`.
pub trait Objective {
    /// Number of training examples (the loop indexes them).
    fn example_count(&self) -> usize;
    fn step(
        &mut self,
        model: &Model,
        examples: &[usize],
        micro: usize,
        grads: &mut Params,
    ) -> Result<Metrics>;
    /// Tokens processed per example index (for tokens/s).
    fn tokens(&self, example: usize) -> usize;
}

pub type Metrics = BTreeMap<String, f64>;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn install_ctrl_c() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // If another handler is installed already, Ctrl-C keeps its default meaning.
        let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
    });
}

/// The newest `checkpoint-N` folder in `out`.
pub fn latest_checkpoint(out: &Path) -> Option<(usize, PathBuf)> {
    std::fs::read_dir(out)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            e.path()
                .join("trainer_state.json")
                .is_file()
                .then_some((step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
}

/// `latest_checkpoint` for `--resume`, where having none is an error.
fn resume_checkpoint(out: &Path) -> Result<(usize, PathBuf)> {
    latest_checkpoint(out).ok_or_else(|| {
        Error::file(
            out,
            "--resume: no checkpoint-N folder with trainer_state.json",
        )
    })
}

/// Copies the tokenizer files of `from` into `to` (a checkpoint opens on its own).
fn copy_tokenizer(from: &Path, to: &Path) -> Result<()> {
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        let src = from.join(f);
        if src.is_file() {
            std::fs::copy(&src, to.join(f)).map_err(|e| Error::io(&src, e))?;
        }
    }
    Ok(())
}

/// Writes a complete checkpoint into `dir` atomically: everything goes to `dir.tmp`, then one rename.
pub fn save_checkpoint(
    model: &Model,
    opt: Option<&Optimizer>,
    source: &Path,
    dir: &Path,
    state: &serde_json::Value,
) -> Result<()> {
    save_checkpoint_with(model, opt, source, dir, state, |_| Ok(()))
}

/// `save_checkpoint` with `extra` writing more files (a value model, a value head) into the
/// temporary folder before the rename, so they land together with the policy or not at all.
pub fn save_checkpoint_with(
    model: &Model,
    opt: Option<&Optimizer>,
    source: &Path,
    dir: &Path,
    state: &serde_json::Value,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    model.params.save(&model.cfg, &tmp, DType::F32)?;
    write_file_atomic(
        &tmp.join("config.json"),
        serde_json::to_string_pretty(&model.cfg.to_json())
            .unwrap()
            .as_bytes(),
    )?;
    copy_tokenizer(source, &tmp)?;
    if let Some(opt) = opt {
        opt.save(model, &tmp.join("optimizer.safetensors"))?;
    }
    extra(&tmp)?;
    write_file_atomic(
        &tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(state).unwrap().as_bytes(),
    )?;
    if dir.exists() {
        // An older save of the same step: replace it only now that the new one is complete.
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
}

/// Loads a checkpoint's parameters into `model` and its optimizer state into `opt`.
pub fn restore(model: &mut Model, opt: &mut Optimizer, dir: &Path) -> Result<()> {
    model.params = Params::load(&model.cfg, dir, &model.device, model.dtype)?;
    opt.load(model, &dir.join("optimizer.safetensors"))
}

/// The outcome of a run.
pub struct RunSummary {
    pub steps: usize,
    pub interrupted: bool,
    pub last: Metrics,
    pub final_dir: PathBuf,
}

/// The shared loop: data order, micro-batches, optimizer, schedule, logging, checkpoints, resume.
pub fn run(
    args: &TrainArgs,
    model: &mut Model,
    objective: &mut dyn Objective,
    name: &str,
) -> Result<RunSummary> {
    args.check()?;
    if !args.resume {
        refuse_existing_run(&args.out)?;
    }
    install_ctrl_c();
    INTERRUPTED.store(false, Ordering::SeqCst);
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    let n = objective.example_count();
    let per_step = args.batch_size * args.grad_accum;
    let steps_per_epoch = n.div_ceil(per_step).max(1);
    let total = args
        .max_steps
        .unwrap_or(steps_per_epoch * args.epochs.max(1));
    let mut opt = Optimizer::new(
        model,
        AdamWConfig {
            weight_decay: args.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    let mut start = 0usize;
    if args.resume {
        let (step, dir) = resume_checkpoint(&args.out)?;
        resumed_state(
            &dir,
            name,
            &[
                ("seed", "--seed", args.seed),
                ("batch_size", "--batch-size", args.batch_size as u64),
                ("grad_accum", "--grad-accum", args.grad_accum as u64),
                (
                    "examples",
                    "the training examples (data and --eval-fraction)",
                    n as u64,
                ),
            ],
        )?;
        restore(model, &mut opt, &dir)?;
        start = step;
        if !args.quiet {
            eprintln!("resuming from {} (step {step})", dir.display());
        }
    }
    let mut metrics = MetricsLog::open(&args.out)?;
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b.set_prefix(name.to_owned());
        b.set_position(start as u64);
        b
    };
    let mut grads = Params::zeros(&model.cfg, &model.device, DType::F32)?;
    let state = |step: usize| {
        serde_json::json!({"trainer": name, "step": step, "total_steps": total, "seed": args.seed, "examples": n,
            "batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": args.lr})
    };
    let mut last = Metrics::new();
    let mut interrupted = false;
    let mut step = start;
    let stop = args.stop_after.map_or(total, |n| (start + n).min(total));
    while step < stop {
        // The data order of each epoch is a seeded shuffle, so a step number alone locates the batch.
        let (epoch, within) = (step / steps_per_epoch, step % steps_per_epoch);
        let mut order: Vec<usize> = (0..n).collect();
        data::shuffle(&mut order, args.seed.wrapping_add(epoch as u64));
        let examples = &order[within * per_step..((within + 1) * per_step).min(n)];
        let t0 = Instant::now();
        for g in grads.named_mut() {
            *g = Tensor::zeros(g.shape(), DType::F32, &model.device)?;
        }
        let mut m = objective.step(model, examples, args.batch_size, &mut grads)?;
        let norm = global_grad_norm(&grads.named())?;
        if !norm.is_finite() {
            return Err(Error::Unsupported {
                op: "train",
                detail: format!(
                    "step {}: the gradient norm is {norm}; stopping before the weights are ruined",
                    step + 1
                ),
            });
        }
        let lr = learning_rate(args.lr, step, args.warmup_steps, total);
        opt.update(
            model,
            &grads,
            lr,
            clip_coefficient(norm, args.max_grad_norm),
        )?;
        model.device.synchronize()?;
        step += 1;
        let secs = t0.elapsed().as_secs_f64();
        let tokens: usize = examples.iter().map(|&i| objective.tokens(i)).sum();
        m.insert("step".into(), step as f64);
        m.insert(
            "epoch".into(),
            epoch as f64 + (within + 1) as f64 / steps_per_epoch as f64,
        );
        m.insert("learning_rate".into(), lr);
        m.insert("grad_norm".into(), norm);
        m.insert("tokens_per_s".into(), tokens as f64 / secs);
        metrics.write(&m)?;
        bar.set_position(step as u64);
        bar.set_message(format!(
            "loss {:.4} lr {:.2e} |g| {:.3} {:.0} tok/s",
            m.get("loss").copied().unwrap_or(f64::NAN),
            lr,
            norm,
            tokens as f64 / secs
        ));
        last = m;
        if INTERRUPTED.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        if args.save_every > 0 && step.is_multiple_of(args.save_every) && step < total {
            save_checkpoint(
                model,
                Some(&opt),
                &args.model,
                &args.out.join(format!("checkpoint-{step}")),
                &state(step),
            )?;
        }
    }
    bar.finish_and_clear();
    save_checkpoint(
        model,
        Some(&opt),
        &args.model,
        &args.out.join(format!("checkpoint-{step}")),
        &state(step),
    )?;
    let final_dir = args.out.join("final");
    save_checkpoint(model, None, &args.model, &final_dir, &state(step))?;
    Ok(RunSummary {
        steps: step,
        interrupted,
        last,
        final_dir,
    })
}

/// The online trainers (PPO, GRPO) size their work in iterations and rollouts: refuse the offline
/// loop's options they would otherwise ignore.
pub fn reject_offline_options(args: &TrainArgs, trainer: &'static str) -> Result<()> {
    let defaults = TrainArgs::new(&args.model, &args.data, &args.out);
    let unused = [
        ("--max-steps", args.max_steps.is_some()),
        ("--epochs", args.epochs != defaults.epochs),
        ("--batch-size", args.batch_size != defaults.batch_size),
        ("--grad-accum", args.grad_accum != defaults.grad_accum),
        (
            "--eval-fraction",
            args.eval_fraction != defaults.eval_fraction,
        ),
    ];
    match unused.iter().find(|(_, set)| *set) {
        Some((flag, _)) => Err(offline_option_error(flag, trainer)),
        None => Ok(()),
    }
}

/// SFT, KTO and PPO give each prompt one sequence, so they share none: refuse
/// `--no-shared-prompts` rather than ignore it.
pub fn reject_shared_prompts_option(args: &TrainArgs, trainer: &'static str) -> Result<()> {
    if !args.no_shared_prompts {
        return Ok(());
    }
    Err(Error::Unsupported {
        op: trainer,
        detail: format!(
            "--no-shared-prompts does not apply to {trainer}: it runs one sequence a prompt, so no \
             prompt is shared (dpo, simpo, orpo, rm and grpo share them)"
        ),
    })
}

/// The error for an offline loop option given to an online trainer.
pub fn offline_option_error(flag: &str, trainer: &'static str) -> Error {
    Error::Unsupported {
        op: trainer,
        detail: format!(
            "{flag} does not apply to {trainer} (it runs --iterations of rollouts and updates)"
        ),
    }
}

/// Loads one kind of data with `loader`, reports what loading found (unless quiet), and splits off
/// the held-out fraction.
pub fn load_split<T: Clone>(
    args: &TrainArgs,
    enc: &data::Encoder,
    loader: data::Loader<T>,
) -> Result<(Vec<T>, Vec<T>)> {
    let (items, report) = loader(&args.data, enc, args.skip_invalid)?;
    report.print(&args.data, args.quiet);
    Ok(data::split(&items, args.eval_fraction, args.seed))
}

/// `metrics.jsonl` of a run, opened for appending (a resumed run continues it).
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    pub fn open(out: &Path) -> Result<MetricsLog> {
        let path = out.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(MetricsLog { path, file })
    }

    pub fn write(&mut self, m: &Metrics) -> Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(m).unwrap())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Where an online trainer (PPO, GRPO) stands: the iterations this invocation runs, the sampling
/// generator and the prompt order, restored from the newest checkpoint under `--resume`, and Ctrl-C
/// armed so an interrupted run saves a checkpoint before it stops.
pub struct OnlineProgress {
    pub start: usize,
    /// One past the last iteration this invocation runs (`--stop-after` may end it early).
    pub stop: usize,
    pub iterations: usize,
    pub rng: Rng,
    pub cycle: PromptCycler,
    /// The resumed checkpoint's folder and its trainer_state.json.
    pub resumed: Option<(PathBuf, serde_json::Value)>,
    trainer: &'static str,
    seed: u64,
}

impl OnlineProgress {
    /// `prompts` prompts in the data, `per_iteration` of them taken by each iteration.
    pub fn begin(
        args: &TrainArgs,
        trainer: &'static str,
        iterations: usize,
        prompts: usize,
        per_iteration: usize,
    ) -> Result<OnlineProgress> {
        if !args.resume {
            refuse_existing_run(&args.out)?;
        }
        install_ctrl_c();
        INTERRUPTED.store(false, Ordering::SeqCst);
        let mut p = OnlineProgress {
            start: 0,
            stop: 0,
            iterations,
            rng: Rng::new(args.seed),
            cycle: PromptCycler::new(prompts, args.seed),
            resumed: None,
            trainer,
            seed: args.seed,
        };
        if args.resume {
            let (_, dir) = resume_checkpoint(&args.out)?;
            let (path, state) = resumed_state(&dir, trainer, &[("seed", "--seed", args.seed)])?;
            p.start = state_integer(&path, &state, "iteration")? as usize;
            p.rng = Rng::from_state(state_integer(&path, &state, "rng_state")?);
            // The prompt order is a function of how many prompts were taken, so replaying the
            // takes restores it exactly.
            for _ in 0..p.start {
                p.cycle.take(per_iteration);
            }
            if !args.quiet {
                eprintln!("resuming from {} (iteration {})", dir.display(), p.start);
            }
            p.resumed = Some((dir, state));
        }
        p.stop = args
            .stop_after
            .map_or(iterations, |n| (p.start + n).min(iterations))
            .max(p.start);
        Ok(p)
    }

    /// Whether Ctrl-C was pressed; the trainer saves a checkpoint and stops after the iteration.
    pub fn interrupted(&self) -> bool {
        INTERRUPTED.load(Ordering::SeqCst)
    }

    /// trainer_state.json after `done` iterations: what `begin` needs to continue.
    pub fn state(&self, done: usize) -> serde_json::Value {
        // The generator state as a string: many JSON readers lose integers past 2^53.
        serde_json::json!({"trainer": self.trainer, "iteration": done, "iterations": self.iterations,
            "seed": self.seed, "rng_state": self.rng.state().to_string()})
    }
}

/// Prompts in seeded shuffles, one epoch after another, for the online trainers.
pub struct PromptCycler {
    order: Vec<usize>,
    cursor: usize,
    epoch: u64,
    seed: u64,
}

impl PromptCycler {
    pub fn new(n: usize, seed: u64) -> PromptCycler {
        PromptCycler {
            order: (0..n).collect(),
            cursor: n,
            epoch: 0,
            seed,
        }
    }

    /// The next `k` prompt indices.
    pub fn take(&mut self, k: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        while out.len() < k {
            if self.cursor == self.order.len() {
                data::shuffle(&mut self.order, self.seed.wrapping_add(self.epoch));
                self.epoch += 1;
                self.cursor = 0;
            }
            out.push(self.order[self.cursor]);
            self.cursor += 1;
        }
        out
    }
}

/// Loads a causal language model to train as a policy: a reward model (a scalar head in place of
/// the LM head's role) would train and generate through its tied embeddings as if it were one.
pub fn load_policy(args: &TrainArgs) -> Result<(Model, TextTokenizer)> {
    let (model, tok) = load_model(args)?;
    refuse_reward_model(&model, &args.model)?;
    Ok((model, tok))
}

/// `model`, loaded from `dir`, is to generate or be scored as a policy: a reward model is refused.
pub fn refuse_reward_model(model: &Model, dir: &Path) -> Result<()> {
    if model.cfg.scalar_head {
        return Err(Error::file(
            dir.join("config.json"),
            "is a reward model (a scalar head, ForSequenceClassification), not a causal language model",
        ));
    }
    Ok(())
}

/// Loads the model a trainer starts from (`load_policy` for the trainers that generate or score
/// text with it).
pub fn load_model(args: &TrainArgs) -> Result<(Model, TextTokenizer)> {
    if args.deterministic {
        crate::ops::attention::set_deterministic(true);
    }
    let device = Device::from_choice(args.device)?;
    let mut model = Model::load(&args.model, &device)?;
    model.recompute = args.recompute;
    model.share_prompts = !args.no_shared_prompts;
    let tok = TextTokenizer::load(&args.model)?;
    Ok((model, tok))
}

/// The EOS id completions end with: the tokenizer's EOS token, else the config's first.
pub fn eos_id(model: &Model, tok: &TextTokenizer) -> Result<i32> {
    tok.eos_token()
        .and_then(|t| tok.token_id(t))
        .or_else(|| model.cfg.eos_token_ids.first().map(|&e| e as i32))
        .ok_or_else(|| {
            Error::file(
                model_source(tok),
                "no EOS token in tokenizer_config.json or config.json",
            )
        })
}

fn model_source(_tok: &TextTokenizer) -> PathBuf {
    PathBuf::from("tokenizer_config.json")
}

/// Sequences of prompt + completion, packed, with next-token targets on the completion (and, for
/// the sequences that ask for it, on the prompt after its first token too).
pub struct ScoredBatch {
    pub batch: Batch,
    /// `[N]`: the next token for rows that predict a scored token, else -100.
    pub targets: Vec<i32>,
    /// Per sequence: the packed rows whose log-probs score its completion.
    pub spans: Vec<std::ops::Range<usize>>,
    /// Per sequence: the packed rows that predict its prompt's tokens after the first, where the
    /// prompt is scored too (ORPO's NLL), else empty.
    pub prompt_spans: Vec<std::ops::Range<usize>>,
}

impl ScoredBatch {
    pub fn new(seqs: &[(&[i32], &[i32])]) -> ScoredBatch {
        Self::build(seqs, &[], false)
    }

    /// As `new`, and sequence `i`'s prompt is scored too where `prompt_scored[i]` (missing entries
    /// are false).
    pub fn with_prompts_scored(seqs: &[(&[i32], &[i32])], prompt_scored: &[bool]) -> ScoredBatch {
        Self::build(seqs, prompt_scored, false)
    }

    /// As `with_prompts_scored`; with `share_prompts`, a sequence whose prompt is an earlier
    /// sequence's (chosen and rejected of a pair, a group's samples) and is not scored shares all
    /// of it but its last token with that sequence (`SharedPrefix`): the model runs those rows once.
    /// The last prompt token stays in every sequence, so each row still predicts the token after it
    /// in its own sequence. Log-probs, losses and gradients are those of the unshared batch, up to
    /// the order the shared rows' gradients are summed in.
    pub fn build(
        seqs: &[(&[i32], &[i32])],
        prompt_scored: &[bool],
        share_prompts: bool,
    ) -> ScoredBatch {
        let mut tokens = Vec::new();
        let mut seq_lens = Vec::new();
        let mut shared = Vec::new();
        let mut targets = Vec::new();
        let mut spans = Vec::new();
        let mut prompt_spans = Vec::new();
        let mut owners: std::collections::HashMap<&[i32], usize> = Default::default();
        for (i, &(p, c)) in seqs.iter().enumerate() {
            let scores_prompt = prompt_scored.get(i).copied().unwrap_or(false);
            let prefix = match owners.get(p) {
                Some(&from) if share_prompts && !scores_prompt && p.len() >= 2 => {
                    Some(SharedPrefix {
                        from,
                        len: p.len() - 1,
                    })
                }
                _ => {
                    owners.entry(p).or_insert(i);
                    None
                }
            };
            let skip = prefix.map_or(0, |s| s.len);
            let base = tokens.len();
            let full: Vec<i32> = p.iter().chain(c.iter()).copied().collect();
            // Token j of the whole sequence (its row is base + j - skip) predicts token j + 1: the
            // completion's tokens are predicted by tokens p-1 .. L-2, the prompt's after the first
            // by tokens 0 .. p-2.
            let first = if scores_prompt { 0 } else { p.len().max(1) - 1 };
            for j in skip..full.len() {
                targets.push(if j >= first && j + 1 < full.len() {
                    full[j + 1]
                } else {
                    -100
                });
            }
            let start = base + p.len().max(1) - 1 - skip;
            prompt_spans.push(base + first.max(skip) - skip..start);
            spans.push(start..base + full.len() - 1 - skip);
            seq_lens.push(full.len() - skip);
            shared.push(prefix);
            tokens.extend_from_slice(&full[skip..]);
        }
        if shared.iter().all(Option::is_none) {
            shared.clear();
        }
        ScoredBatch {
            batch: Batch {
                tokens,
                seq_lens,
                shared,
            },
            targets,
            spans,
            prompt_spans,
        }
    }

    /// Each sequence's scored rows, prompt first: the columns of `padded`.
    fn scored_rows(&self, r: usize) -> impl Iterator<Item = usize> {
        self.prompt_spans[r].clone().chain(self.spans[r].clone())
    }

    /// The scored log-probs `[R, T]` (a row's scored prompt rows first, then its completion's; T =
    /// the longest row) and the completion's mask.
    pub fn padded(&self, per_token: &[f32]) -> (Vec<f32>, Vec<f32>, usize) {
        let t = (0..self.spans.len())
            .map(|r| self.prompt_spans[r].len() + self.spans[r].len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut lp = vec![0.0; self.spans.len() * t];
        let mut mask = vec![0.0; self.spans.len() * t];
        for r in 0..self.spans.len() {
            let skip = self.prompt_spans[r].len();
            for (c, row) in self.scored_rows(r).enumerate() {
                lp[r * t + c] = per_token[row];
                mask[r * t + c] = if c >= skip { 1.0 } else { 0.0 };
            }
        }
        (lp, mask, t)
    }

    /// `[R, T]` in `padded`'s layout: 1 on every scored column (prompt and completion) of the rows
    /// `rows`, else 0.
    pub fn scored_mask(&self, rows: std::ops::Range<usize>, t: usize) -> Vec<f32> {
        let mut m = vec![0.0; self.spans.len() * t];
        for r in rows {
            let n = self.prompt_spans[r].len() + self.spans[r].len();
            m[r * t..r * t + n].fill(1.0);
        }
        m
    }

    /// The inverse of `padded` for a gradient: `[R, T]` back to packed rows `[N]`.
    pub fn unpad(&self, grad: &[f32], t: usize) -> Vec<f32> {
        let mut g = vec![0.0; self.batch.len()];
        for r in 0..self.spans.len() {
            for (c, row) in self.scored_rows(r).enumerate() {
                g[row] = grad[r * t + c];
            }
        }
        g
    }
}

/// The forward's state for one scored batch.
pub struct Scored {
    pub acts: crate::model::Activations,
    /// The LM head's outputs for the scored rows only (see `ScoredRows`).
    pub out: LogprobOut,
    scored: ScoredRows,
    /// Per packed row, log p(target) (0 where there is none).
    pub per_token: Vec<f32>,
    /// The log-probs are of softmax(logits / temperature).
    pub temperature: f32,
}

/// The packed rows that predict a scored token, and their hidden states: only they go through the
/// LM head. A prompt's rows predict nothing scored (unless ORPO scores it), and the head is the
/// costliest layer of a small model's step (for SmolLM2-135M, 49,152 x 576 against 3.5M weights a
/// layer), so a batch of half prompt, half completion spends half as much there.
struct ScoredRows {
    /// `[M]` targets of the scored rows.
    targets: Tensor,
    /// Where some rows are unscored: their packed indices (host and `[M]` device) and hidden
    /// states `[M, d]`; None when every row is scored (the model's hidden state is used as is).
    gathered: Option<(Vec<usize>, Tensor, Tensor)>,
}

impl ScoredRows {
    /// Gathers the rows of `hidden` `[N, d]` whose `targets` are not ignored (negative).
    fn new(hidden: &Tensor, targets: &[i32], device: &Device) -> Result<ScoredRows> {
        let rows: Vec<usize> = (0..targets.len()).filter(|&r| targets[r] >= 0).collect();
        if rows.is_empty() || rows.len() == targets.len() {
            let targets = Tensor::from_i32(&[targets.len()], targets.to_vec(), device)?;
            return Ok(ScoredRows {
                targets,
                gathered: None,
            });
        }
        let picked: Vec<i32> = rows.iter().map(|&r| targets[r]).collect();
        let ids = Tensor::from_i32(
            &[rows.len()],
            rows.iter().map(|&r| r as i32).collect(),
            device,
        )?;
        let h = crate::ops::embed::embed_fwd(hidden, &ids)?;
        Ok(ScoredRows {
            targets: Tensor::from_i32(&[rows.len()], picked, device)?,
            gathered: Some((rows, ids, h)),
        })
    }

    /// The scored rows of `hidden` (the model's final hidden state for `sb`) through the LM head
    /// at `temperature`.
    fn through_head(
        model: &Model,
        hidden: &Tensor,
        sb: &ScoredBatch,
        temperature: f32,
    ) -> Result<(ScoredRows, LogprobOut)> {
        let scored = ScoredRows::new(hidden, &sb.targets, &model.device)?;
        let out = linear_logprob_fwd(
            scored.hidden(hidden),
            model.lm_head(),
            &scored.targets,
            temperature,
        )?;
        Ok((scored, out))
    }

    /// The hidden states the LM head reads: the gathered rows, or all of `hidden`.
    fn hidden<'a>(&'a self, hidden: &'a Tensor) -> &'a Tensor {
        self.gathered.as_ref().map_or(hidden, |(_, _, h)| h)
    }

    /// Per-row values of the scored rows spread back over all `n` packed rows (0 elsewhere).
    fn spread(&self, values: Vec<f32>, n: usize) -> Vec<f32> {
        match &self.gathered {
            None => values,
            Some((rows, _, _)) => {
                let mut all = vec![0.0; n];
                for (&r, v) in rows.iter().zip(values) {
                    all[r] = v;
                }
                all
            }
        }
    }

    /// The scored rows' part of a per-row vector over all packed rows.
    fn pick(&self, all: Vec<f32>) -> Vec<f32> {
        match &self.gathered {
            None => all,
            Some((rows, _, _)) => rows.iter().map(|&r| all[r]).collect(),
        }
    }
}

impl Scored {
    /// Per packed row, the entropy of softmax(logits / temperature) (0 on unscored rows).
    pub fn entropy(&self) -> Result<Vec<f32>> {
        let n = self.acts.hidden.shape()[0];
        Ok(self.scored.spread(self.out.entropy.to_f32_vec()?, n))
    }

    /// The gradient of the hidden state `[N, d]` (f32) from `upstream`, one value per packed row
    /// (the loss's gradient with respect to that row's log-prob; ignored on unscored rows), and the
    /// LM head's weight gradient added into `grads`.
    pub fn dhidden(&self, model: &Model, upstream: Vec<f32>, grads: &mut Params) -> Result<Tensor> {
        let g = self.scored.pick(upstream);
        let m = g.len();
        let g = Tensor::from_f32(&[m], g, &model.device)?;
        let zero = Tensor::zeros(&[m], DType::F32, &model.device)?;
        let dh = linear_logprob_bwd(
            self.scored.hidden(&self.acts.hidden),
            model.lm_head(),
            &self.scored.targets,
            &self.out,
            &g,
            &zero,
            self.temperature,
            grads.lm_head_mut(),
        )?;
        match &self.scored.gathered {
            None => Ok(dh),
            Some((_, ids, _)) => {
                let mut all = Tensor::zeros(self.acts.hidden.shape(), DType::F32, &model.device)?;
                crate::ops::embed::rows_store(&mut all, &dh, ids)?;
                Ok(all)
            }
        }
    }
}

/// Forward + completion log-probs through the fused LM head.
pub fn score(model: &Model, sb: &ScoredBatch) -> Result<Scored> {
    score_at(model, sb, 1.0)
}

/// `score` under softmax(logits / temperature): the policy the online trainers sample from, whose
/// log-probs their ratios need (TRL divides the logits by the sampling temperature too).
pub fn score_at(model: &Model, sb: &ScoredBatch, temperature: f32) -> Result<Scored> {
    let acts = model.forward(&sb.batch)?;
    let (scored, out) = ScoredRows::through_head(model, &acts.hidden, sb, temperature)?;
    let per_token = scored.spread(out.logp.to_f32_vec()?, sb.batch.len());
    Ok(Scored {
        acts,
        out,
        scored,
        per_token,
        temperature,
    })
}

/// `score`'s per-token log-probs for a model that is not being trained (a reference, or the policy
/// where no gradient flows): nothing is kept for a backward.
pub fn frozen_logps(model: &Model, sb: &ScoredBatch) -> Result<Vec<f32>> {
    frozen_logps_at(model, sb, 1.0)
}

/// `frozen_logps` under softmax(logits / temperature), as `score_at`.
pub fn frozen_logps_at(model: &Model, sb: &ScoredBatch, temperature: f32) -> Result<Vec<f32>> {
    Ok(frozen_score_at(model, sb, temperature)?.per_token)
}

/// What a forward that keeps nothing for a backward gives: the final hidden state `[N, d]` and, per
/// packed row, log p(target) and the entropy (0 where there is no target), as `score_at` computes
/// them, bit for bit.
pub struct FrozenScored {
    pub hidden: Tensor,
    pub per_token: Vec<f32>,
    pub entropy: Vec<f32>,
}

/// `score_at`'s values without its saved activations: for log-probs no gradient flows through
/// (a rollout's old log-probs, a reference's), whose activations would otherwise stay alive
/// beside the updates' own.
pub fn frozen_score_at(model: &Model, sb: &ScoredBatch, temperature: f32) -> Result<FrozenScored> {
    let hidden = model.forward_frozen(&sb.batch)?;
    let (scored, out) = ScoredRows::through_head(model, &hidden, sb, temperature)?;
    let n = sb.batch.len();
    Ok(FrozenScored {
        per_token: scored.spread(out.logp.to_f32_vec()?, n),
        entropy: scored.spread(out.entropy.to_f32_vec()?, n),
        hidden,
    })
}

/// The online trainers' progress bar: iterations with elapsed time, ETA and the trainer's message.
pub fn iteration_bar(quiet: bool, trainer: &str, iterations: usize) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(iterations as u64);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} iterations [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    b.set_prefix(trainer.to_owned());
    b
}

/// The online trainers stop on a non-finite loss or gradient, as the offline loop does, before the
/// update would write it into the weights.
pub fn check_finite(trainer: &'static str, iteration: usize, what: &str, v: f64) -> Result<()> {
    if v.is_finite() {
        return Ok(());
    }
    Err(Error::Unsupported {
        op: trainer,
        detail: format!(
            "iteration {iteration}: the {what} is {v}; stopping before the weights are ruined"
        ),
    })
}

/// Backward of `Σ upstream[row]·logp[row]`, accumulating into `grads`.
pub fn score_backward(
    model: &Model,
    s: &Scored,
    upstream: Vec<f32>,
    grads: &mut Params,
) -> Result<()> {
    let dh = s.dhidden(model, upstream, grads)?;
    model.backward(&s.acts, &dh, grads)
}

/// Per-sequence sums of completion log-probs.
pub fn sequence_sums(sb: &ScoredBatch, per_token: &[f32]) -> Vec<f64> {
    sb.spans
        .iter()
        .map(|s| per_token[s.clone()].iter().map(|&v| v as f64).sum())
        .collect()
}
