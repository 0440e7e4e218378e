//! Online RL on the tiny model: PPO raises the reward model's score within a KL bound; GRPO raises
//! the exact-match rate of a verifiable task; and the pieces (adaptive KL, explained variance, group
//! advantages, the GRPO token gradient, rule rewards) against hand computations.

mod common;

use std::path::{Path, PathBuf};

use common::{online_args, sft_and_reward_model, train_args};

use rlhf_kernels::model::generate::GenerateOptions;
use rlhf_kernels::model::tokenizer::TextTokenizer;
use rlhf_kernels::model::Model;
use rlhf_kernels::testing::fd_check;
use rlhf_kernels::train::grpo::{
    self, group_advantages, grpo_token_terms, last_integer, rule_reward, RewardRule,
};
use rlhf_kernels::train::ppo::{self, adapt_kl, explained_variance};
use rlhf_kernels::train::{builtin, plot, reward, sft, RunSummary};
use rlhf_kernels::Device;

fn root(name: &str) -> PathBuf {
    common::root("online", name)
}

#[test]
fn ppo_raises_the_reward_within_a_kl_bound() {
    let r = root("ppo");
    let (sft, rm) = sft_and_reward_model(&r);
    let mut p = ppo::PpoArgs::new(
        online_args(&sft, &r.join("data/prompts.jsonl"), &r.join("ppo"), 1e-4),
        rm.clone(),
    );
    p.iterations = 15;
    p.rollout_batch = 16;
    p.minibatch = 8;
    p.ppo_epochs = 2;
    p.max_new_tokens = 24;
    let run = ppo::train(&p).unwrap();
    for k in [
        "score",
        "kl",
        "entropy",
        "clip_fraction",
        "approx_kl",
        "vf_loss",
        "explained_variance",
        "response_length",
        "generation_tokens_per_s",
        "training_tokens_per_s",
        "logprob_mismatch",
    ] {
        assert!(run.last.contains_key(k), "missing metric {k}");
    }
    assert!(
        run.last["logprob_mismatch"] < 1e-3,
        "sampling and training log-probs disagree: {}",
        run.last["logprob_mismatch"]
    );
    // Held-out prompts: questions drawn fresh.
    let dev = Device::Cpu;
    let (before, after, rm) = (
        Model::load(&sft, &dev).unwrap(),
        Model::load(&run.final_dir, &dev).unwrap(),
        Model::load(&rm, &dev).unwrap(),
    );
    let tok = TextTokenizer::load(&sft).unwrap();
    let prompts: Vec<Vec<i32>> = (0..32u32)
        .map(|i| {
            tok.encode(
                &builtin::question((i * 13 + 5) % 50, (i * 7 + 3) % 50),
                false,
            )
            .unwrap()
        })
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: 24,
        temperature: 1.0,
        seed: 9,
        eos: vec![256],
        ..Default::default()
    };
    let (s0, _) = ppo::score_and_kl(&before, &before, &rm, &prompts, &opts).unwrap();
    let (s1, kl) = ppo::score_and_kl(&after, &before, &rm, &prompts, &opts).unwrap();
    println!("held-out reward-model score {s0:.3} -> {s1:.3}, KL to the SFT model {kl:.3} nats");
    assert!(s1 > s0 + 0.2, "score {s0} -> {s1}");
    assert!(kl < 3.0, "KL {kl} over the stated bound of 3 nats");
    // The same with a value head on the policy instead of a separate value model.
    let mut p = p.clone();
    p.train.out = r.join("ppo-shared");
    p.shared_value = true;
    let shared = ppo::train(&p).unwrap();
    assert!(shared.final_dir.join("value_head.safetensors").is_file());
    let (s2, kl2) = ppo::score_and_kl(
        &Model::load(&shared.final_dir, &dev).unwrap(),
        &before,
        &rm,
        &prompts,
        &opts,
    )
    .unwrap();
    println!("shared value head: score {s0:.3} -> {s2:.3}, KL {kl2:.3}");
    assert!(
        s2 > s0 + 0.2 && kl2 < 3.0,
        "shared value head: score {s0} -> {s2}, KL {kl2}"
    );
    std::fs::remove_dir_all(&r).ok();
}

/// Every parameter of the models in `a` and `b`, compared bit for bit.
fn assert_same_weights(a: &Path, b: &Path) {
    let (ma, mb) = (
        Model::load(a, &Device::Cpu).unwrap(),
        Model::load(b, &Device::Cpu).unwrap(),
    );
    for (i, (x, y)) in ma.params.named().iter().zip(mb.params.named()).enumerate() {
        let (x, y) = (x.to_f32_vec().unwrap(), y.to_f32_vec().unwrap());
        let same = x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "tensor {i} differs between {a:?} and {b:?}");
    }
}

/// Runs `train` once for all its iterations into `full`, and again into `split` stopping after
/// `first` iterations and resuming; the two must end bit for bit equal.
fn check_resume<A: Clone>(
    args: &A,
    out: impl Fn(&mut A) -> &mut rlhf_kernels::train::TrainArgs,
    train: impl Fn(&A) -> RunSummary,
    (full, split, first, total): (&Path, &Path, usize, usize),
) -> (RunSummary, RunSummary) {
    let mut a = args.clone();
    out(&mut a).out = full.to_path_buf();
    let whole = train(&a);
    assert_eq!(whole.steps, total);
    out(&mut a).out = split.to_path_buf();
    out(&mut a).stop_after = Some(first);
    let part = train(&a);
    assert_eq!(part.steps, first, "--stop-after {first}");
    assert!(!part.interrupted);
    assert!(split
        .join(format!("checkpoint-{first}/optimizer.safetensors"))
        .is_file());
    out(&mut a).stop_after = None;
    out(&mut a).resume = true;
    let rest = train(&a);
    assert_eq!(rest.steps, total);
    assert_same_weights(&whole.final_dir, &rest.final_dir);
    // The metrics of the resumed iterations repeat the uninterrupted run's.
    let log = |dir: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (lw, ls) = (log(full), log(split));
    assert_eq!(lw.len(), total);
    assert_eq!(ls.len(), total);
    for (w, s) in lw.iter().zip(&ls) {
        for (k, v) in w.as_object().unwrap() {
            if !k.ends_with("tokens_per_s") {
                assert_eq!(v, &s[k], "metric {k} at iteration {}", w["iteration"]);
            }
        }
    }
    (whole, rest)
}

#[test]
fn online_runs_resume_bit_for_bit() {
    let r = root("resume");
    builtin::write_synthetic_task(&r.join("data"), 40, 2).unwrap();
    let mut rm_args = train_args(
        &r.join("base"),
        &r.join("data/prefs.jsonl"),
        &r.join("rm"),
        1e-3,
        1,
    );
    rm_args.max_steps = Some(2);
    let rm = reward::train(&rm_args).unwrap().0.final_dir;
    let prompts = r.join("data/prompts.jsonl");
    for shared in [false, true] {
        let mut p = ppo::PpoArgs::new(
            online_args(&r.join("base"), &prompts, &r.join("unused"), 1e-3),
            rm.clone(),
        );
        p.iterations = 4;
        p.rollout_batch = 4;
        p.minibatch = 2;
        p.ppo_epochs = 2;
        p.max_new_tokens = 8;
        p.target_kl = Some(0.5);
        p.kl_horizon = 8.0;
        p.shared_value = shared;
        let tag = if shared { "shared" } else { "separate" };
        let (whole, rest) = check_resume(
            &p,
            |p| &mut p.train,
            |p| ppo::train(p).unwrap(),
            (
                &r.join(format!("ppo-{tag}")),
                &r.join(format!("ppo-{tag}-split")),
                2,
                4,
            ),
        );
        assert_ne!(
            whole.last["kl_coef"], 0.05,
            "the adaptive KL coefficient moved, so its restore is tested"
        );
        // The resumed run's curves continue on the iteration axis.
        let series = plot::read_metrics(&r.join(format!("ppo-{tag}-split/metrics.jsonl"))).unwrap();
        assert!(!series.contains_key("iteration"));
        let xs: Vec<f64> = series["score"].iter().map(|p| p.0).collect();
        assert_eq!(xs, [1.0, 2.0, 3.0, 4.0]);
        if shared {
            let head = |d: &Path| std::fs::read(d.join("value_head.safetensors")).unwrap();
            assert_eq!(head(&whole.final_dir), head(&rest.final_dir));
        } else {
            assert_same_weights(
                &r.join("ppo-separate/value"),
                &r.join("ppo-separate-split/value"),
            );
        }
    }
    let mut g = grpo::GrpoArgs::new(
        online_args(&r.join("base"), &prompts, &r.join("unused"), 1e-3),
        RewardRule::Exact,
    );
    g.reward_rule = None;
    g.reward_model = Some(rm);
    g.iterations = 3;
    g.prompts_per_step = 2;
    g.group_size = 3;
    g.updates_per_rollout = 2;
    g.beta = 0.04;
    g.max_new_tokens = 8;
    check_resume(
        &g,
        |g| &mut g.train,
        |g| grpo::train(g).unwrap(),
        (&r.join("grpo"), &r.join("grpo-split"), 1, 3),
    );
    // A checkpoint of one trainer does not resume another.
    let mut wrong = g.clone();
    wrong.train.out = r.join("ppo-shared");
    wrong.train.resume = true;
    let err = grpo::train(&wrong)
        .err()
        .expect("a PPO checkpoint is refused")
        .to_string();
    assert!(
        err.contains("trainer_state.json") && err.contains("not grpo"),
        "{err}"
    );
    // A group's responses run their prompt once (the default) or each its own copy: the same
    // iteration (sampled by the same weights) up to the order the prompt rows' gradients are
    // summed in, its two updates included.
    let mut runs = Vec::new();
    for no_share in [false, true] {
        let mut one = g.clone();
        one.iterations = 1;
        one.train.out = r.join(format!("grpo-whole-{no_share}"));
        one.train.no_shared_prompts = no_share;
        let dir = grpo::train(&one).unwrap().final_dir;
        runs.push((one.train.out, dir));
    }
    let ((so, sd), (wo, wd)) = (&runs[0], &runs[1]);
    common::assert_same_run("grpo", (so, sd), (wo, wd));
    std::fs::remove_dir_all(&r).ok();
}

/// Exact-match rate of sampled (temperature 1) answers on every digit, 4 samples each.
fn copy_accuracy(dir: &Path) -> f64 {
    let m = Model::load(dir, &Device::Cpu).unwrap();
    let tok = TextTokenizer::load(dir).unwrap();
    let prompts: Vec<Vec<i32>> = (0..40)
        .map(|k| {
            tok.encode(&format!("Repeat the digit {}.\nA:", k % 10), false)
                .unwrap()
        })
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: 20,
        temperature: 1.0,
        seed: 17,
        eos: vec![256],
        ..Default::default()
    };
    let g = m.generate(&prompts, &opts, |_, _| {}).unwrap();
    let ok = g
        .iter()
        .enumerate()
        .filter(|(k, x)| {
            rule_reward(
                RewardRule::Exact,
                &tok.decode(&x.tokens, true).unwrap(),
                Some(&(k % 10).to_string()),
            ) > 0.5
        })
        .count();
    ok as f64 / g.len() as f64
}

#[test]
fn grpo_solves_the_copy_task() {
    let r = root("grpo");
    builtin::write_copy_task(&r.join("data"), 400, 2).unwrap();
    let sft = sft::train(&train_args(
        &r.join("base"),
        &r.join("data/copy_sft.jsonl"),
        &r.join("sft"),
        3e-3,
        10,
    ))
    .unwrap()
    .0
    .final_dir;
    let before = copy_accuracy(&sft);
    let mut g = grpo::GrpoArgs::new(
        online_args(
            &sft,
            &r.join("data/copy_prompts.jsonl"),
            &r.join("grpo"),
            1e-3,
        ),
        RewardRule::Exact,
    );
    g.iterations = 30;
    g.max_new_tokens = 20;
    let run = grpo::train(&g).unwrap();
    let after = copy_accuracy(&run.final_dir);
    println!(
        "sampled exact-match {before:.2} -> {after:.2}; last {:?}",
        run.last
    );
    assert!(
        before < 0.75,
        "the SFT model is right only about half the time: {before}"
    );
    assert!(after >= 0.8, "GRPO exact-match {after}");
    std::fs::remove_dir_all(&r).ok();
}

#[test]
fn adaptive_kl_and_explained_variance() {
    assert!(
        (adapt_kl(0.1, 12.0, 6.0, 100, 1000.0) - 0.1 * (1.0 + 0.2 * 0.1)).abs() < 1e-12,
        "error clipped at +0.2"
    );
    assert!((adapt_kl(0.1, 5.4, 6.0, 100, 1000.0) - 0.1 * (1.0 - 0.1 * 0.1)).abs() < 1e-12);
    let mask = [1.0, 1.0, 1.0, 0.0];
    assert_eq!(
        explained_variance(&[1.0, 2.0, 3.0, 9.0], &[1.0, 2.0, 3.0, -5.0], &mask),
        1.0
    );
    assert!((explained_variance(&[0.0; 4], &[1.0, 2.0, 3.0, 0.0], &mask) - 0.0).abs() < 1e-12);
}

#[test]
fn group_advantages_and_rules() {
    let a = group_advantages(&[1.0, 0.0, 0.0, 2.0, 2.0, 2.0], 3);
    let std = (1.0f32 / 3.0).sqrt();
    assert!((a[0] - (2.0 / 3.0) / (std + 1e-4)).abs() < 1e-5);
    assert_eq!(
        &a[3..],
        &[0.0, 0.0, 0.0],
        "a group that agrees has no signal"
    );
    assert_eq!(last_integer("The answer is 12. Or -3?"), Some(-3));
    assert_eq!(last_integer("none"), None);
    assert_eq!(
        rule_reward(RewardRule::Exact, " The answer is 7.", Some("7")),
        1.0
    );
    assert_eq!(
        rule_reward(RewardRule::Exact, " The answer is 17.", Some("7")),
        0.0
    );
    assert_eq!(
        rule_reward(RewardRule::Format, " The answer is 17.", None),
        1.0
    );
    assert_eq!(
        rule_reward(RewardRule::Format, " I do not know.", None),
        0.0
    );
}

#[test]
fn grpo_token_gradient_matches_finite_differences() {
    let old = [-1.0f32, -2.0, -0.5, -3.0];
    let reference = [-1.2f32, -1.5, -0.7, -2.0];
    // New log-probs away from the clip boundaries (ratios 1.05, 0.6, 1.5, 1.0).
    let new: Vec<f64> = old
        .iter()
        .zip([0.05f64.ln_1p(), (0.6f64).ln(), (1.5f64).ln(), 0.0])
        .map(|(&o, d)| o as f64 + d)
        .collect();
    for adv in [1.3f32, -0.7] {
        let f = |x: &[f64]| {
            let x: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            grpo_token_terms(&x, &old, Some(&reference), adv, 0.2, 0.28, 0.04, 0.25).0
        };
        let x32: Vec<f32> = new.iter().map(|&v| v as f32).collect();
        let (_, g, _) = grpo_token_terms(&x32, &old, Some(&reference), adv, 0.2, 0.28, 0.04, 0.25);
        let g: Vec<f64> = g.iter().map(|&v| v as f64).collect();
        fd_check("grpo", f, &new, &g, 1e-3, 1e-3).unwrap();
    }
}

/// PPO sampling at temperature 0.7: the training forward scores softmax(logits / 0.7) too, so the
/// sampling and training log-probs agree (TRL's convention); responses cut at the length limit
/// without EOS lose --missing-eos-penalty from their score, and the logged score is after it.
#[test]
fn ppo_at_a_temperature_and_the_missing_eos_penalty() {
    let r = root("ppo_temp");
    let (sft, rm) = sft_and_reward_model(&r);
    let mut p = ppo::PpoArgs::new(
        online_args(&sft, &r.join("data/prompts.jsonl"), &r.join("ppo"), 1e-4),
        rm,
    );
    p.iterations = 1;
    p.rollout_batch = 16;
    p.minibatch = 8;
    p.ppo_epochs = 1;
    // Short enough that some responses are cut before their EOS.
    p.max_new_tokens = 4;
    p.temperature = 0.7;
    p.missing_eos_penalty = 2.0;
    let m = ppo::train(&p).unwrap().last;
    println!("{m:?}");
    assert!(
        m["logprob_mismatch"] < 1e-3,
        "sampling and training log-probs disagree at temperature 0.7: {}",
        m["logprob_mismatch"]
    );
    let cut = 1.0 - m["eos_fraction"];
    assert!(cut > 0.0, "no response hit the length limit");
    let penalty = m["score_raw"] - m["score"];
    assert!(
        (penalty - 2.0 * cut).abs() < 1e-4,
        "score drops by {penalty}, expected 2 x {cut} cut"
    );
    std::fs::remove_dir_all(&r).ok();
}

/// Bad online options are errors naming the flag, before any rollout.
#[test]
fn online_options_out_of_range_are_refused() {
    let r = root("options");
    let (sft, rm) = sft_and_reward_model(&r);
    let base = || {
        ppo::PpoArgs::new(
            online_args(&sft, &r.join("data/prompts.jsonl"), &r.join("o"), 1e-4),
            rm.clone(),
        )
    };
    type Setter = Box<dyn Fn(&mut ppo::PpoArgs)>;
    let cases: Vec<(Setter, &str)> = vec![
        (Box::new(|p| p.gamma = 2.0), "--gamma"),
        (Box::new(|p| p.lam = -0.1), "--lam"),
        (Box::new(|p| p.cliprange = 0.0), "--cliprange"),
        (Box::new(|p| p.kl_coef = f64::NAN), "--kl-coef"),
        (Box::new(|p| p.temperature = 0.0), "--temperature"),
        (Box::new(|p| p.ppo_epochs = 0), "--ppo-epochs"),
        (Box::new(|p| p.target_kl = Some(0.0)), "--target-kl"),
    ];
    for (set, flag) in cases {
        let mut p = base();
        set(&mut p);
        let err = ppo::train(&p).err().unwrap().to_string();
        assert!(err.contains(flag), "{flag}: {err}");
    }
    let g = |set: &dyn Fn(&mut grpo::GrpoArgs)| {
        let mut a = grpo::GrpoArgs::new(
            online_args(&sft, &r.join("data/prompts.jsonl"), &r.join("g"), 1e-4),
            RewardRule::Exact,
        );
        set(&mut a);
        grpo::train(&a).err().unwrap().to_string()
    };
    for (err, flag) in [
        (g(&|a| a.epsilon = -1.0), "--epsilon"),
        (g(&|a| a.epsilon_high = Some(f64::NAN)), "--epsilon-high"),
        (g(&|a| a.beta = -1.0), "--beta"),
        (g(&|a| a.prompts_per_step = 0), "--prompts-per-step"),
    ] {
        assert!(err.contains(flag), "{flag}: {err}");
    }
    std::fs::remove_dir_all(&r).ok();
}

/// ppo and grpo refuse the offline loop's options when given at all, even at their default value
/// (which the trainers alone cannot tell from absent).
/// `rlhf ARGS` exits with an error whose text holds `want`.
fn refused_on_the_command_line(args: &[&str], want: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "rlhf {args:?} ran");
    assert!(err.contains(want), "{err}");
}

#[test]
fn offline_options_on_the_command_line_are_refused() {
    for (trainer, extra) in [("ppo", "--reward-model"), ("grpo", "--reward-model")] {
        let args = [
            trainer,
            "--model",
            "m",
            "--data",
            "d",
            "--out",
            "o",
            extra,
            "rm",
            "--batch-size",
            "8",
        ];
        refused_on_the_command_line(&args, &format!("--batch-size does not apply to {trainer}"));
    }
    // PPO samples one response a prompt: no prompt to share.
    let want = "--no-shared-prompts does not apply to ppo";
    refused_on_the_command_line(
        &[
            "ppo",
            "--model",
            "m",
            "--data",
            "d",
            "--out",
            "o",
            "--reward-model",
            "rm",
            "--no-shared-prompts",
        ],
        want,
    );
    refused_on_the_command_line(
        &[
            "bench",
            "train",
            "--trainer",
            "ppo",
            "--device",
            "cpu",
            "--no-shared-prompts",
        ],
        want,
    );
}

/// Generating past the model's max_position_embeddings is allowed (rotary positions extrapolate, as
/// in transformers) but said on stderr.
#[test]
fn generation_past_the_context_is_warned_of() {
    let r = root("context");
    let dir = r.join("base");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let limit = cfg["max_position_embeddings"].as_u64().unwrap();
    let run = |new_tokens: u64| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"))
            .args([
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--device",
                "cpu",
            ])
            .args(["--prompt", "12 plus 30", "--max-new-tokens"])
            .arg(new_tokens.to_string())
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr)
            .contains("runs past this model's max_position_embeddings")
    };
    assert!(!run(8), "8 new tokens stay inside {limit}");
    assert!(run(limit + 8), "{} new tokens run past {limit}", limit + 8);
    std::fs::remove_dir_all(&r).ok();
}
