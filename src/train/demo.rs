//! `rlhf demo`: the whole offline pipeline on the built-in synthetic task. SFT on answers and
//! refusals, a reward model on answer-over-refusal pairs, then DPO from the SFT model; a before/after
//! table on held-out questions (fresh draws, mostly unseen in training) and a PNG of the training curves.
//! With `--model DIR` the same pipeline runs on that model (its tokenizer, plain-text prompts).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::builtin::{self, is_refusal};
use super::data::{self, Encoder, Limits};
use super::eval::{evaluate, sample_responses, EvalReport};
use super::honesty::{calibration, reliability_png, CalibrationReport};
use super::{dpo, eos_id, plot, reward, sft, TrainArgs};
use crate::device::{Device, DeviceChoice};
use crate::error::{Error, Result};
use crate::model::generate::GenerateOptions;
use crate::model::tokenizer::TextTokenizer;
use crate::model::Model;
use crate::ops::pref_loss::DpoLoss;

pub struct DemoOptions {
    pub out: PathBuf,
    pub model: Option<PathBuf>,
    pub device: DeviceChoice,
    pub examples: usize,
    pub seed: u64,
    pub quiet: bool,
}

/// What the demo measured, for its table and for tests.
pub struct DemoReport {
    pub sft_eval_loss: f64,
    pub rm_heldout_accuracy: f64,
    pub before: EvalReport,
    pub after: EvalReport,
    pub refusals_before: f64,
    pub refusals_after: f64,
    pub samples: Vec<(String, String, String)>,
    pub plot: PathBuf,
    /// Calibration on the abstention task: (before, after) DPO on abstention preferences.
    pub calibration: (CalibrationReport, CalibrationReport),
}

fn say(quiet: bool, msg: &str) {
    if !quiet {
        eprintln!("{msg}");
    }
}

pub fn run(o: &DemoOptions) -> Result<DemoReport> {
    if o.examples < 2 {
        // Fewer leave a stage with no example after the held-out split.
        return Err(Error::Unsupported {
            op: "demo",
            detail: format!("--examples must be at least 2, got {}", o.examples),
        });
    }
    std::fs::create_dir_all(&o.out).map_err(|e| Error::io(&o.out, e))?;
    // The trainers refuse to write over a run; the demo's own stages from an earlier demo in the
    // same folder are replaced, and said so.
    for stage in ["sft", "rm", "dpo", "cal-sft", "cal-dpo"] {
        let dir = o.out.join(stage);
        if dir.exists() {
            say(
                o.quiet,
                &format!("replacing the earlier demo's {}", dir.display()),
            );
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
    }
    let data_dir = o.out.join("data");
    builtin::write_synthetic_task(&data_dir, o.examples, o.seed)?;
    // Learning rates: the tiny model from scratch needs large steps for SFT; DPO moves it far from
    // the reference quickly (the KL row of the table), so it gets a hundredth of that. A pretrained
    // model gets the usual fine-tuning rates.
    let (base, lr, epochs, dpo_lr) = match &o.model {
        Some(dir) => (dir.clone(), 1e-5, 1, 5e-7),
        None => {
            let dir = o.out.join("base");
            builtin::write_tiny_model(&dir, o.seed)?;
            (dir, 3e-3, 3, 3e-5)
        }
    };
    let args = |model: &Path, data: &str, out: &str, lr: f64, epochs: usize| {
        let mut a = TrainArgs::new(model, &data_dir.join(data), &o.out.join(out));
        a.device = o.device;
        a.lr = lr;
        a.epochs = epochs;
        a.batch_size = 16;
        a.warmup_steps = 5;
        a.max_len = 96;
        a.max_prompt_len = 48;
        a.seed = o.seed;
        a.quiet = o.quiet;
        a
    };
    say(
        o.quiet,
        "1/3 supervised fine-tuning on answers and refusals",
    );
    let mut a = args(&base, "sft.jsonl", "sft", lr, epochs);
    a.eval_fraction = 0.1;
    let (sft_run, sft_eval) = sft::train(&a)?;
    say(o.quiet, "2/3 reward model on answer-over-refusal pairs");
    let mut a = args(&sft_run.final_dir, "prefs.jsonl", "rm", lr / 3.0, 1);
    a.eval_fraction = 0.1;
    let (rm_run, _) = reward::train(&a)?;
    say(o.quiet, "3/3 DPO from the SFT model");
    let a = args(&sft_run.final_dir, "prefs.jsonl", "dpo", dpo_lr, 1);
    let dpo_choice = dpo::PrefTrainer::Dpo {
        loss: DpoLoss::Sigmoid,
        beta: 0.1,
        label_smoothing: 0.0,
        precompute_ref: true,
    };
    let (dpo_run, _) = dpo::train(&a, dpo_choice)?;

    let device = Device::from_choice(o.device)?;
    let sft_model = Model::load(&sft_run.final_dir, &device)?;
    let dpo_model = Model::load(&dpo_run.final_dir, &device)?;
    let rm = Model::load(&rm_run.final_dir, &device)?;
    let tok = TextTokenizer::load(&sft_run.final_dir)?;
    let enc = Encoder {
        tok: &tok,
        limits: Limits {
            max_len: 96,
            max_prompt_len: 48,
        },
        eos: eos_id(&sft_model, &tok)?,
    };
    let (held, _) = data::load_pairs(&data_dir.join("held_out.jsonl"), &enc, false)?;
    let held = &held[..held.len().min(64)];
    let opts = GenerateOptions {
        max_new_tokens: 24,
        temperature: 1.0,
        seed: o.seed,
        eos: vec![enc.eos],
        ..Default::default()
    };
    let before = evaluate(
        &sft_model,
        Some(&sft_model),
        Some(&rm),
        held,
        0.1,
        &opts,
        16,
    )?;
    let after = evaluate(
        &dpo_model,
        Some(&sft_model),
        Some(&rm),
        held,
        0.1,
        &opts,
        16,
    )?;
    let refusal_rate = |m: &Model| -> Result<f64> {
        let prompts: Vec<Vec<i32>> = held.iter().map(|p| p.prompt.clone()).collect();
        let samples = sample_responses(m, &prompts, &opts)?;
        let refusals = samples
            .iter()
            .filter(|s| tok.decode(s, true).map(|t| is_refusal(&t)).unwrap_or(true))
            .count();
        Ok(refusals as f64 / samples.len().max(1) as f64)
    };
    let (refusals_before, refusals_after) = (refusal_rate(&sft_model)?, refusal_rate(&dpo_model)?);
    let greedy = GenerateOptions {
        temperature: 0.0,
        ..opts.clone()
    };
    let mut samples = Vec::new();
    for p in held.iter().take(3) {
        let q = tok.decode(&p.prompt, true)?;
        let s = tok.decode(
            &sft_model.generate(std::slice::from_ref(&p.prompt), &greedy, |_, _| {})?[0].tokens,
            true,
        )?;
        let d = tok.decode(
            &dpo_model.generate(std::slice::from_ref(&p.prompt), &greedy, |_, _| {})?[0].tokens,
            true,
        )?;
        samples.push((q, s, d));
    }
    let mut series = BTreeMap::new();
    for (run, keys) in [
        ("sft", &["loss"][..]),
        ("rm", &["loss", "accuracy"][..]),
        (
            "dpo",
            &["loss", "rewards/margins", "rewards/accuracies"][..],
        ),
    ] {
        let m = plot::read_metrics(&o.out.join(run).join("metrics.jsonl"))?;
        for k in keys {
            if let Some(s) = m.get(*k) {
                series.insert(format!("{run} {k}"), s.clone());
            }
        }
    }
    let plot_path = o.out.join("demo.png");
    plot::plot_series(&series, "rlhf demo: sft, reward model, dpo", &plot_path)?;
    let rm_acc = rm_run.last.get("accuracy").copied().unwrap_or(f64::NAN);

    say(
        o.quiet,
        "calibration: SFT that guesses, then DPO that prefers abstaining over a guess",
    );
    builtin::write_calibration_task(&data_dir, o.examples / 2, o.seed)?;
    let (cal_lr, cal_epochs, cal_dpo_lr) = if o.model.is_some() {
        (lr, epochs, dpo_lr)
    } else {
        (3e-3, 6, 3e-4)
    };
    let cal_sft = sft::train(&args(&base, "cal_sft.jsonl", "cal-sft", cal_lr, cal_epochs))?
        .0
        .final_dir;
    let cal_dpo = dpo::train(
        &args(&cal_sft, "cal_prefs.jsonl", "cal-dpo", cal_dpo_lr, 1),
        dpo_choice,
    )?
    .0
    .final_dir;
    let cal_tok = TextTokenizer::load(&cal_sft)?;
    let cal_eos = eos_id(&Model::load(&cal_sft, &device)?, &cal_tok)?;
    let cal_enc = Encoder {
        tok: &cal_tok,
        limits: Limits {
            max_len: 96,
            max_prompt_len: 48,
        },
        eos: cal_eos,
    };
    let (questions, _) = data::load_prompts(&data_dir.join("cal_qa.jsonl"), &cal_enc, false)?;
    let qa: Vec<(Vec<i32>, String)> = questions
        .into_iter()
        .take(80)
        .filter_map(|p| p.answer.map(|a| (p.tokens, a)))
        .collect();
    let cal_before = calibration(
        &Model::load(&cal_sft, &device)?,
        &cal_tok,
        &qa,
        " The answer is",
        20,
        &[cal_eos],
    )?;
    let cal_after = calibration(
        &Model::load(&cal_dpo, &device)?,
        &cal_tok,
        &qa,
        " The answer is",
        20,
        &[cal_eos],
    )?;
    reliability_png(
        &cal_before,
        "before DPO",
        &o.out.join("reliability-before.png"),
    )?;
    reliability_png(
        &cal_after,
        "after DPO",
        &o.out.join("reliability-after.png"),
    )?;
    Ok(DemoReport {
        sft_eval_loss: sft_eval.unwrap_or(f64::NAN),
        rm_heldout_accuracy: after.reward_model_accuracy.unwrap_or(rm_acc),
        before,
        after,
        refusals_before,
        refusals_after,
        samples,
        plot: plot_path,
        calibration: (cal_before, cal_after),
    })
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), crate::train::honesty::percent)
}

fn num(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.3}"))
}

/// The before/after table.
pub fn render(r: &DemoReport) -> String {
    let mut s = String::new();
    s += &format!(
        "SFT held-out loss per completion token: {:.3}\n",
        r.sft_eval_loss
    );
    s += &format!(
        "reward model accuracy on held-out pairs: {:.1}%\n\n",
        100.0 * r.rm_heldout_accuracy
    );
    s += &format!(
        "{:<44} {:>12} {:>12}\n",
        "held-out questions", "SFT", "SFT + DPO"
    );
    let rows = [
        (
            "implicit reward accuracy (vs SFT reference)",
            pct(r.before.implicit_accuracy),
            pct(r.after.implicit_accuracy),
        ),
        (
            "implicit reward margin",
            num(r.before.implicit_margin),
            num(r.after.implicit_margin),
        ),
        (
            "mean reward-model score of samples",
            num(r.before.mean_sample_reward),
            num(r.after.mean_sample_reward),
        ),
        (
            "win rate over SFT samples (reward model)",
            pct(r.before.win_rate),
            pct(r.after.win_rate),
        ),
        (
            "KL to SFT on own samples (nats)",
            num(r.before.kl_to_reference),
            num(r.after.kl_to_reference),
        ),
        (
            "samples that refuse",
            pct(Some(r.refusals_before)),
            pct(Some(r.refusals_after)),
        ),
    ];
    for (name, a, b) in rows {
        s += &format!("{name:<44} {a:>12} {b:>12}\n");
    }
    s += "\ngreedy samples:\n";
    for (q, a, b) in &r.samples {
        s += &format!(
            "  {}\n    SFT:       {a:?}\n    SFT + DPO: {b:?}\n",
            q.replace('\n', " ")
        );
    }
    let (b, a) = &r.calibration;
    s += "\ncalibration (known questions and unknowable ones; DPO prefers abstaining over guessing):\n";
    s += &format!("{:<44} {:>12} {:>12}\n", "", "SFT", "SFT + DPO");
    let cal_rows = [
        (
            "expected calibration error",
            num(Some(b.ece)),
            num(Some(a.ece)),
        ),
        (
            "accuracy when answering",
            pct(Some(b.accuracy)),
            pct(Some(a.accuracy)),
        ),
        (
            "abstains when it would be wrong",
            pct(Some(b.abstain_when_wrong)),
            pct(Some(a.abstain_when_wrong)),
        ),
        (
            "abstains when it would be right",
            pct(Some(b.abstain_when_right)),
            pct(Some(a.abstain_when_right)),
        ),
    ];
    for (name, x, y) in cal_rows {
        s += &format!("{name:<44} {x:>12} {y:>12}\n");
    }
    s += &format!("\ntraining curves: {}\n", r.plot.display());
    s
}
