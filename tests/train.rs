//! The trainers on the built-in tiny model and synthetic task, on the CPU: each learns, resuming
//! equals not stopping, checkpoints are complete, and bad data is reported by file, line and field.

mod common;

use std::path::{Path, PathBuf};

use rlhf_kernels::device::DeviceChoice;
use rlhf_kernels::model::tokenizer::TextTokenizer;
use rlhf_kernels::model::Model;
use rlhf_kernels::ops::pref_loss::DpoLoss;
use rlhf_kernels::train::data::{load_pairs, load_sft, Encoder, Limits};
use rlhf_kernels::train::dpo::{pair_logps, PrefTrainer};
use rlhf_kernels::train::{builtin, dpo, kto, latest_checkpoint, reward, sft, TrainArgs};

/// A fresh folder with the tiny model and the synthetic data.
fn setup(name: &str, examples: usize) -> PathBuf {
    let root = std::env::temp_dir().join(format!("rlhf-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    builtin::write_tiny_model(&root.join("base"), 1).unwrap();
    builtin::write_synthetic_task(&root.join("data"), examples, 2).unwrap();
    root
}

fn args(root: &Path, model: &Path, data: &str, out: &str, lr: f64) -> TrainArgs {
    let mut a = TrainArgs::new(model, &root.join("data").join(data), &root.join(out));
    a.device = DeviceChoice::Cpu;
    a.lr = lr;
    a.batch_size = 16;
    a.warmup_steps = 5;
    a.max_len = 96;
    a
}

/// SFT for 3 epochs: the starting point of the preference trainers.
fn sft_model(root: &Path) -> PathBuf {
    let mut a = args(root, &root.join("base"), "sft.jsonl", "sft", 3e-3);
    a.epochs = 3;
    sft::train(&a).unwrap().0.final_dir
}

#[test]
fn sft_loss_falls_below_half_a_nat() {
    let root = setup("sft", 300);
    let mut a = args(&root, &root.join("base"), "sft.jsonl", "sft", 3e-3);
    a.epochs = 3;
    a.eval_fraction = 0.1;
    let (run, eval) = sft::train(&a).unwrap();
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(root.join("sft/metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let start = first["loss"].as_f64().unwrap();
    let eval = eval.unwrap();
    println!(
        "sft loss {start:.3} -> held-out {eval:.3} in {} steps",
        run.steps
    );
    assert!(
        start > 4.0,
        "a random byte model starts near ln(259): {start}"
    );
    assert!(eval < 0.5, "held-out loss per completion token {eval}");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn reward_model_and_dpo_reach_90_percent_held_out() {
    let root = setup("rm-dpo", 300);
    let sft = sft_model(&root);
    let mut a = args(&root, &sft, "prefs.jsonl", "rm", 1e-3);
    a.eval_fraction = 0.2;
    let (rm_run, held) = reward::train(&a).unwrap();
    let (acc, margin) = held.unwrap();
    println!("reward model held-out accuracy {acc}, margin {margin}");
    assert!(acc >= 0.9 && margin > 0.0);
    // A reward model is no policy: the trainers that generate or score text refuse it.
    let b = args(&root, &rm_run.final_dir, "sft.jsonl", "sft-on-rm", 1e-4);
    let err = sft::train(&b).err().unwrap().to_string();
    assert!(err.contains("is a reward model"), "{err}");
    for precompute_ref in [false, true] {
        let mut a = args(
            &root,
            &sft,
            "prefs.jsonl",
            if precompute_ref { "dpo-pre" } else { "dpo" },
            1e-4,
        );
        a.eval_fraction = 0.2;
        let which = PrefTrainer::Dpo {
            loss: DpoLoss::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            precompute_ref,
        };
        let (run, held) = dpo::train(&a, which).unwrap();
        let (acc, margin) = held.unwrap();
        println!("dpo (precompute_ref {precompute_ref}) held-out implicit accuracy {acc}, margin {margin}; last {:?}", run.last);
        assert!(acc >= 0.9 && margin > 0.0);
        for key in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ] {
            assert!(run.last.contains_key(key), "missing TRL metric {key}");
        }
    }
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn every_dpo_loss_type_trains() {
    let root = setup("losses", 120);
    let sft = sft_model(&root);
    for loss in DpoLoss::ALL {
        let mut a = args(
            &root,
            &sft,
            "prefs.jsonl",
            &format!("dpo-{}", loss.name()),
            1e-4,
        );
        a.max_steps = Some(4);
        a.eval_fraction = 0.2;
        let smoothing = if matches!(loss, DpoLoss::Robust | DpoLoss::ExoPair) {
            0.1
        } else {
            0.0
        };
        let which = PrefTrainer::Dpo {
            loss,
            beta: 0.1,
            label_smoothing: smoothing,
            precompute_ref: true,
        };
        let (run, held) = dpo::train(&a, which).unwrap();
        let (acc, _) = held.unwrap();
        assert!(run.last["loss"].is_finite(), "{}", loss.name());
        assert!(
            acc > 0.5,
            "{}: held-out implicit accuracy {acc} after 4 steps",
            loss.name()
        );
    }
    std::fs::remove_dir_all(&root).ok();
}

/// Mean log π(chosen) − log π(rejected) on the pairs.
fn mean_gap(model: &Path, root: &Path) -> f64 {
    let m = Model::load(model, &rlhf_kernels::Device::Cpu).unwrap();
    let tok = TextTokenizer::load(model).unwrap();
    let enc = Encoder {
        tok: &tok,
        limits: Limits {
            max_len: 96,
            max_prompt_len: 48,
        },
        eos: 256,
    };
    let (pairs, _) = load_pairs(&root.join("data/held_out.jsonl"), &enc, false).unwrap();
    let lp = pair_logps(&m, &pairs[..40], 16).unwrap();
    lp.iter().map(|(c, r)| (c - r) as f64).sum::<f64>() / lp.len() as f64
}

#[test]
fn kto_orpo_and_simpo_move_rewards_the_right_way() {
    let root = setup("ref-free", 240);
    let sft = sft_model(&root);
    let before = mean_gap(&sft, &root);
    let mut a = args(&root, &sft, "kto.jsonl", "kto", 1e-4);
    a.eval_fraction = 0.2;
    let (_, held) = kto::train(&a, 0.1, 1.0, 1.0).unwrap();
    let (desirable, undesirable) = held.unwrap();
    println!("kto held-out implicit rewards: desirable {desirable}, undesirable {undesirable}");
    assert!(desirable > 0.0 && undesirable < 0.0 && desirable > undesirable);
    for (name, which, lr) in [
        ("orpo", PrefTrainer::Orpo { beta: 0.1 }, 3e-4),
        (
            "simpo",
            PrefTrainer::Simpo {
                beta: 2.0,
                gamma: 0.5,
                label_smoothing: 0.0,
            },
            1e-4,
        ),
    ] {
        let (run, _) = dpo::train(&args(&root, &sft, "prefs.jsonl", name, lr), which).unwrap();
        let after = mean_gap(&run.final_dir, &root);
        println!("{name}: held-out log-prob gap chosen - rejected {before:.2} -> {after:.2}");
        assert!(after > before + 1.0, "{name}: {before} -> {after}");
    }
    std::fs::remove_dir_all(&root).ok();
}

fn params(dir: &Path) -> Vec<Vec<f32>> {
    let m = Model::load(dir, &rlhf_kernels::Device::Cpu).unwrap();
    m.params
        .named()
        .iter()
        .map(|t| t.to_f32_vec().unwrap())
        .collect()
}

#[test]
fn resuming_equals_not_stopping() {
    let root = setup("resume", 200);
    let mut a = args(&root, &root.join("base"), "sft.jsonl", "straight", 3e-3);
    a.max_steps = Some(10);
    a.batch_size = 8;
    a.grad_accum = 2;
    let straight = sft::train(&a).unwrap().0;
    let mut b = a.clone();
    b.out = root.join("resumed");
    b.stop_after = Some(5);
    let first = sft::train(&b).unwrap().0;
    assert_eq!(first.steps, 5);
    assert_eq!(latest_checkpoint(&b.out).unwrap().0, 5);
    b.stop_after = None;
    b.resume = true;
    let second = sft::train(&b).unwrap().0;
    assert_eq!(second.steps, 10);
    assert_eq!(
        params(&straight.final_dir),
        params(&second.final_dir),
        "10 steps straight == 5 + 5 resumed, bit for bit"
    );
    let ckpt = latest_checkpoint(&b.out).unwrap().1;
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(ckpt.join(f).is_file(), "checkpoint lacks {f}");
    }
    assert!(!std::fs::read_dir(&b.out).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));
    let lines = std::fs::read_to_string(b.out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(lines, 10, "metrics continue across the resume");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn bad_lines_name_file_line_and_field() {
    let root = setup("bad", 10);
    let tok = TextTokenizer::load(&root.join("base")).unwrap();
    let enc = Encoder {
        tok: &tok,
        limits: Limits::default(),
        eos: 256,
    };
    let cases = [
        ("{not json", "line 2: invalid JSON"),
        (r#"{"prompt": "a"}"#, "line 2: missing field `chosen`"),
        (
            r#"{"prompt": "a", "chosen": 3, "rejected": "b"}"#,
            "line 2: field `chosen` must be a string or a list of messages",
        ),
        (
            r#"{"prompt": "a", "chosen": "  ", "rejected": "b"}"#,
            "line 2: field `chosen` is empty",
        ),
        (
            r#"{"prompt": "a", "chosen": "x", "rejected": "b", "margin": "big"}"#,
            "line 2: field `margin` must be a number",
        ),
        (
            r#"{"prompt": [{"role": "user", "content": "a"}], "chosen": "x", "rejected": "b"}"#,
            "must both be plain text or both be chat",
        ),
        ("[1, 2]", "line 2: expected a JSON object"),
        (
            r#"{"prompt": "a", "chosen": "x", "rejected": "b", "margin": 1e308}"#,
            "line 2: field `margin` is 1e308, beyond what an f32 holds",
        ),
        (
            r#"{"prompt": [{"role": "usr", "content": "a"}], "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]}"#,
            "line 2: field `prompt`[0] has role `usr`",
        ),
        (
            r#"{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "more"}], "rejected": [{"role": "assistant", "content": "y"}]}"#,
            "line 2: field `chosen`: the completion holds a `user` turn",
        ),
        (
            r#"{"prompt": "", "chosen": "x", "rejected": "b"}"#,
            "line 2: field `prompt` is empty",
        ),
    ];
    let good = r#"{"prompt": "Q", "chosen": " yes", "rejected": " no"}"#;
    let path = root.join("bad.jsonl");
    for (bad, want) in cases {
        std::fs::write(&path, format!("{good}\n{bad}\n{good}\n")).unwrap();
        let err = load_pairs(&path, &enc, false).err().unwrap().to_string();
        assert!(
            err.contains("bad.jsonl") && err.contains(want),
            "{bad}: {err}"
        );
        let (ok, report) = load_pairs(&path, &enc, true).unwrap();
        assert_eq!(
            (ok.len(), report.skipped.len()),
            (2, 1),
            "--skip-invalid counts the bad line"
        );
        assert!(report.summary(&path).contains("1 invalid lines skipped"));
    }
    std::fs::write(
        &path,
        r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
    )
    .unwrap();
    let err = load_sft(&path, &enc, false).err().unwrap().to_string();
    assert!(
        err.contains("line 1: field `messages` has no assistant turn"),
        "{err}"
    );
    // A turn after the last assistant one would be trained as the model's own words.
    std::fs::write(
        &path,
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"}]}"#,
    )
    .unwrap();
    let err = load_sft(&path, &enc, false).err().unwrap().to_string();
    assert!(
        err.contains("line 1: field `messages`: the completion holds a `user` turn"),
        "{err}"
    );
    std::fs::write(&path, "\n\n").unwrap();
    assert!(load_sft(&path, &enc, false)
        .err()
        .unwrap()
        .to_string()
        .contains("no usable examples"));
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn chat_data_and_truncation() {
    let root = setup("chat", 10);
    let tok = TextTokenizer::load(&root.join("base")).unwrap();
    let path = root.join("chat.jsonl");
    let long = "x".repeat(100);
    std::fs::write(
        &path,
        format!(
            "{}\n{}\n{}\n",
            serde_json::json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
            serde_json::json!({"prompt": long, "completion": long}),
            serde_json::json!({"prompt": "a", "completion": "b"})
        ),
    )
    .unwrap();
    let enc = Encoder {
        tok: &tok,
        limits: Limits {
            max_len: 64,
            max_prompt_len: 24,
        },
        eos: 256,
    };
    let (ex, report) = load_sft(&path, &enc, false).unwrap();
    assert_eq!(
        tok.decode(&ex[0].prompt, false).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        tok.decode(&ex[0].completion, false).unwrap(),
        "hello<|im_end|>\n<|endoftext|>"
    );
    // Where the template's end of turn is the EOS (SmolLM2's <|im_end|>), nothing is appended: the
    // turn ends as the template renders it, as TRL trains it.
    let im_end = tok.token_id("<|im_end|>").unwrap();
    let enc_im_end = Encoder { eos: im_end, ..enc };
    let (ex2, _) = load_sft(&path, &enc_im_end, false).unwrap();
    assert_eq!(
        tok.decode(&ex2[0].completion, false).unwrap(),
        "hello<|im_end|>\n"
    );
    assert_eq!(
        ex2[2].completion.last(),
        Some(&im_end),
        "plain completions still end with EOS"
    );
    assert_eq!(
        ex[1].prompt.len(),
        24,
        "prompts keep their last max_prompt_len tokens"
    );
    assert_eq!(ex[1].prompt.len() + ex[1].completion.len(), 64);
    assert_eq!(report.truncated, 1);
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn demo_runs_and_plots() {
    let root = std::env::temp_dir().join(format!("rlhf-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let opts = rlhf_kernels::train::demo::DemoOptions {
        out: root.clone(),
        model: None,
        device: DeviceChoice::Cpu,
        examples: 400,
        seed: 0,
        quiet: true,
    };
    let r = rlhf_kernels::train::demo::run(&opts).unwrap();
    let table = rlhf_kernels::train::demo::render(&r);
    println!("{table}");
    assert!(r.rm_heldout_accuracy >= 0.9);
    assert!(r.after.implicit_accuracy.unwrap() >= 0.9);
    assert_eq!(
        r.before.implicit_accuracy,
        Some(0.5),
        "the SFT model against itself ties on every pair"
    );
    let png = std::fs::read(&r.plot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(table.contains("samples that refuse") && table.contains("expected calibration error"));
    let (before, after) = &r.calibration;
    assert!(
        after.ece < before.ece,
        "calibration ECE {} -> {}",
        before.ece,
        after.ece
    );
    std::fs::remove_dir_all(&root).ok();
}

/// ORPO's NLL as LOSSES.md and TRL define it: the token mean of −log p over the chosen rows' prompts
/// (every token after the first) and responses, over the whole accumulated step (micro-batches of
/// one pair here), checked against a log-softmax of the model's logits computed here; the step's
/// loss is that NLL plus the pair mean of the odds-ratio term.
#[test]
fn orpo_nll_covers_prompts_and_responses_over_the_whole_step() {
    use rlhf_kernels::device::{DType, Device};
    use rlhf_kernels::model::{Batch, Params};
    use rlhf_kernels::ops::pref_loss::PrefLoss;
    use rlhf_kernels::train::data::PairExample;
    use rlhf_kernels::train::dpo::{PrefObjective, Reference};
    use rlhf_kernels::train::Objective;

    let root = setup("orpo_nll", 8);
    let model = Model::load(&root.join("base"), &Device::Cpu).unwrap();
    let seed = rlhf_kernels::testing::fresh_seed("orpo_nll");
    let mut rng = rlhf_kernels::rng::Rng::new(seed);
    let v = model.cfg.vocab_size;
    let mut draw = |n: usize| -> Vec<i32> { (0..n).map(|_| rng.below(v) as i32).collect() };
    // Prompts and responses of different lengths, so a per-micro-batch mean would differ.
    let pairs: Vec<PairExample> = [(3, 2, 5), (9, 7, 1), (1, 4, 4)]
        .iter()
        .map(|&(p, c, r)| PairExample {
            prompt: draw(p),
            chosen: draw(c),
            rejected: draw(r),
            margin: 0.0,
        })
        .collect();

    // −Σ log p of every token after the first of prompt + chosen, by hand.
    let mut nll_sum = 0.0f64;
    let mut nll_tokens = 0usize;
    for p in &pairs {
        let seq: Vec<i32> = p.prompt.iter().chain(&p.chosen).copied().collect();
        let hidden = model
            .forward_frozen(&Batch::new(std::slice::from_ref(&seq)))
            .unwrap();
        let rows: Vec<usize> = (0..seq.len() - 1).collect();
        let logits = model.logits_rows(&hidden, &rows).unwrap();
        for (j, row) in logits.chunks(v).enumerate() {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            nll_sum -= row[seq[j + 1] as usize] as f64 - lse;
            nll_tokens += 1;
        }
    }
    let expected_nll = nll_sum / nll_tokens as f64;

    let mut obj = PrefObjective {
        pairs: pairs.clone(),
        kind: PrefLoss::Orpo { beta: 0.1 },
        reference: Reference::None,
    };
    let mut grads = Params::zeros(&model.cfg, &Device::Cpu, DType::F32).unwrap();
    let m = obj.step(&model, &[0, 1, 2], 1, &mut grads).unwrap();
    let nll = m["nll_loss"];
    println!("seed {seed}: nll {nll:.6}, by hand {expected_nll:.6} over {nll_tokens} tokens");
    assert!(
        (nll - expected_nll).abs() <= 1e-4 * expected_nll.abs(),
        "ORPO's NLL {nll} against {expected_nll} by hand (seed {seed})"
    );
    // The same step in one micro-batch: the NLL, the loss and the gradient agree.
    let mut grads1 = Params::zeros(&model.cfg, &Device::Cpu, DType::F32).unwrap();
    let m1 = obj.step(&model, &[0, 1, 2], 3, &mut grads1).unwrap();
    for k in ["nll_loss", "loss", "log_odds_ratio"] {
        assert!(
            (m[k] - m1[k]).abs() <= 1e-5 * m1[k].abs().max(1.0),
            "{k}: {} with micro-batches of one against {} in one (seed {seed})",
            m[k],
            m1[k]
        );
    }
    let flat = |p: &Params| -> Vec<f32> {
        p.named()
            .iter()
            .flat_map(|t| t.to_f32_vec().unwrap())
            .collect()
    };
    let (g, g1) = (flat(&grads), flat(&grads1));
    let scale = g1.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let worst = g
        .iter()
        .zip(&g1)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        scale > 0.0 && worst <= 1e-4 * scale,
        "gradients differ by {worst} (largest {scale}) between accumulation and one batch (seed {seed})"
    );
    std::fs::remove_dir_all(&root).ok();
}

/// The first step's logged loss and gradient norm with micro-batches of 2 accumulated twice equal
/// those of one micro-batch of 4 (the same 4 examples): the loss is normalised over the whole step,
/// by tokens for SFT and by pairs for DPO, not per micro-batch.
#[test]
fn gradient_accumulation_normalises_over_the_whole_step() {
    let root = setup("accum", 40);
    let first = |dir: &Path| -> serde_json::Value {
        let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        serde_json::from_str(text.lines().next().unwrap()).unwrap()
    };
    let sft_start = sft_model(&root);
    for trainer in ["sft", "dpo"] {
        let mut logged = Vec::new();
        for (batch, accum) in [(4, 1), (2, 2)] {
            let out = format!("{trainer}-{batch}x{accum}");
            let (model, data) = match trainer {
                "sft" => (root.join("base"), "sft.jsonl"),
                _ => (sft_start.clone(), "prefs.jsonl"),
            };
            let mut a = args(&root, &model, data, &out, 1e-4);
            a.max_steps = Some(1);
            a.batch_size = batch;
            a.grad_accum = accum;
            match trainer {
                "sft" => drop(sft::train(&a).unwrap()),
                _ => drop(
                    dpo::train(
                        &a,
                        PrefTrainer::Dpo {
                            loss: DpoLoss::Sigmoid,
                            beta: 0.1,
                            label_smoothing: 0.0,
                            precompute_ref: false,
                        },
                    )
                    .unwrap(),
                ),
            }
            logged.push(first(&root.join(&out)));
        }
        for k in ["loss", "grad_norm"] {
            let (one, two) = (
                logged[0][k].as_f64().unwrap(),
                logged[1][k].as_f64().unwrap(),
            );
            println!("{trainer} {k}: 4x1 {one:.6}, 2x2 {two:.6}");
            assert!(
                (one - two).abs() <= 1e-5 * one.abs().max(1e-3),
                "{trainer} {k}: one micro-batch {one}, two accumulated {two}"
            );
        }
    }
    std::fs::remove_dir_all(&root).ok();
}

/// A new run refuses a folder that holds another run; --resume refuses a checkpoint of another
/// trainer, or one whose batch size (and so data order) differs.
#[test]
fn runs_never_write_over_a_run_and_resume_only_their_own() {
    let root = setup("guard", 40);
    let mut a = args(&root, &root.join("base"), "sft.jsonl", "run", 1e-4);
    a.max_steps = Some(2);
    sft::train(&a).unwrap();
    let err = sft::train(&a).err().unwrap().to_string();
    assert!(err.contains("already holds a run"), "{err}");
    assert!(
        latest_checkpoint(&a.out).is_some(),
        "the earlier run's checkpoint is still there"
    );
    let mut r = a.clone();
    r.resume = true;
    r.batch_size = 4;
    let err = sft::train(&r).err().unwrap().to_string();
    assert!(
        err.contains("trainer_state.json")
            && err.contains("`batch_size` is 16 there but 4 now: --batch-size must match"),
        "{err}"
    );
    let mut d = args(&root, &root.join("base"), "prefs.jsonl", "run", 1e-4);
    d.resume = true;
    let err = dpo::train(&d, PrefTrainer::Orpo { beta: 0.1 })
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`trainer` is \"sft\", not orpo"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}

/// The loop's options out of range are errors naming the flag, before any work.
#[test]
fn loop_options_out_of_range_are_refused() {
    let root = setup("loop_opts", 10);
    let base = args(&root, &root.join("base"), "sft.jsonl", "o", 1e-4);
    type Setter<'a> = &'a dyn Fn(&mut TrainArgs);
    let cases: [(Setter, &str); 7] = [
        (&|a| a.epochs = 0, "--epochs"),
        (&|a| a.max_steps = Some(0), "--max-steps"),
        (&|a| a.stop_after = Some(0), "--stop-after"),
        (&|a| a.weight_decay = -5.0, "--weight-decay"),
        (&|a| a.max_grad_norm = f64::NAN, "--max-grad-norm"),
        (&|a| a.max_prompt_len = 0, "--max-prompt-len"),
        (&|a| a.batch_size = 0, "--batch-size"),
    ];
    for (set, flag) in cases {
        let mut a = base.clone();
        set(&mut a);
        let err = sft::train(&a).err().unwrap().to_string();
        assert!(err.contains(flag), "{flag}: {err}");
    }
    let mut a = base.clone();
    a.batch_size = 1;
    let err = kto::train(&a, 0.1, 1.0, 1.0).err().unwrap().to_string();
    assert!(err.contains("--batch-size must be at least 2"), "{err}");
    let dpo_err = |which| dpo::train(&base, which).err().unwrap().to_string();
    let err = dpo_err(PrefTrainer::Dpo {
        loss: DpoLoss::Hinge,
        beta: 0.1,
        label_smoothing: 0.1,
        precompute_ref: true,
    });
    assert!(err.contains("--label-smoothing"), "{err}");
    let err = dpo_err(PrefTrainer::Orpo { beta: 0.0 });
    assert!(err.contains("--beta"), "{err}");
    // Trainers whose sequences share no prompt refuse the option that turns sharing off.
    let mut a = base.clone();
    a.no_shared_prompts = true;
    for (trainer, err) in [
        ("sft", sft::train(&a).err().map(|e| e.to_string())),
        (
            "kto",
            kto::train(&a, 0.1, 1.0, 1.0).err().map(|e| e.to_string()),
        ),
    ] {
        let err = err.unwrap_or_else(|| panic!("{trainer} ran with --no-shared-prompts"));
        assert!(
            err.contains(&format!("--no-shared-prompts does not apply to {trainer}")),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&root).ok();
}

/// KTO's logged rewards are class means over the whole step, so micro-batches that hold one class
/// each log what one batch of both does (against a reference that differs from the policy).
#[test]
fn kto_rewards_are_class_means_over_the_whole_step() {
    use rlhf_kernels::device::{DType, Device};
    use rlhf_kernels::model::Params;
    use rlhf_kernels::train::data::KtoExample;
    use rlhf_kernels::train::kto::KtoObjective;
    use rlhf_kernels::train::Objective;
    let root = setup("kto_means", 8);
    builtin::write_tiny_model(&root.join("other"), 7).unwrap();
    let policy = Model::load(&root.join("base"), &Device::Cpu).unwrap();
    let seed = rlhf_kernels::testing::fresh_seed("kto_means");
    let mut rng = rlhf_kernels::rng::Rng::new(seed);
    let v = policy.cfg.vocab_size;
    let mut draw = |n: usize| -> Vec<i32> { (0..n).map(|_| rng.below(v) as i32).collect() };
    // Desirable, desirable, undesirable, undesirable: micro-batches of 2 hold one class each.
    let examples: Vec<KtoExample> = [true, true, false, false]
        .iter()
        .enumerate()
        .map(|(i, &desirable)| KtoExample {
            prompt: draw(2 + i),
            completion: draw(3 + 2 * i),
            desirable,
        })
        .collect();
    let mut obj = KtoObjective {
        examples,
        reference: Model::load(&root.join("other"), &Device::Cpu).unwrap(),
        beta: 0.1,
        desirable_weight: 1.0,
        undesirable_weight: 1.0,
    };
    let mut logged = Vec::new();
    for micro in [2, 4] {
        let mut g = Params::zeros(&policy.cfg, &Device::Cpu, DType::F32).unwrap();
        logged.push(obj.step(&policy, &[0, 1, 2, 3], micro, &mut g).unwrap());
    }
    for k in ["rewards/chosen", "rewards/rejected"] {
        let (split, whole) = (logged[0][k], logged[1][k]);
        println!("{k}: micro-batches {split:.6}, one batch {whole:.6} (seed {seed})");
        assert!(
            whole != 0.0,
            "{k}: the reference differs, so rewards do too"
        );
        assert!(
            (split - whole).abs() <= 1e-5 * whole.abs(),
            "{k}: {split} in class-pure micro-batches, {whole} in one (seed {seed})"
        );
    }
    // A micro-batch of one pairs its prompt with its own completion for z0 (TRL's rotation), so
    // swapping policy and reference negates the unclamped difference: one of the two logs it, the
    // other logs 0. A z0 left at 0 for a singleton logs 0 both ways.
    let kl_of = |policy: &Model, obj: &mut KtoObjective| {
        let mut g = Params::zeros(&policy.cfg, &Device::Cpu, DType::F32).unwrap();
        obj.step(policy, &[2], 1, &mut g).unwrap()["kl"]
    };
    let forward = kl_of(&policy, &mut obj);
    let other = std::mem::replace(
        &mut obj.reference,
        Model::load(&root.join("base"), &Device::Cpu).unwrap(),
    );
    let backward = kl_of(&other, &mut obj);
    println!("singleton z0: {forward} one way, {backward} the other (seed {seed})");
    assert!(forward >= 0.0 && backward >= 0.0, "z0 is clamped at 0");
    assert!(
        (forward > 0.0) != (backward > 0.0),
        "exactly one direction has a positive z0: {forward}, {backward} (seed {seed})"
    );
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn only_scored_rows_go_through_the_lm_head() {
    // The policy's scoring gathers the rows that predict a scored token before the LM head and
    // spreads the results back; it must give what the head over every packed row gives: the same
    // log-probs and entropies, and the same gradient of every parameter.
    use rlhf_kernels::device::{DType, Device, Tensor};
    use rlhf_kernels::model::Params;
    use rlhf_kernels::ops::logprob::{linear_logprob_bwd, linear_logprob_fwd};
    use rlhf_kernels::testing::{fresh_seed, Rng};
    use rlhf_kernels::train::{score, score_backward, ScoredBatch};
    let mut rng = Rng::new(fresh_seed("only_scored_rows_go_through_the_lm_head"));
    let model = Model::random(&builtin::tiny_config(), rng.next_u64(), &Device::Cpu).unwrap();
    let tok =
        |rng: &mut Rng, n: usize| -> Vec<i32> { (0..n).map(|_| rng.below(250) as i32).collect() };
    let (p1, c1, p2, c2) = (
        tok(&mut rng, 7),
        tok(&mut rng, 4),
        tok(&mut rng, 3),
        tok(&mut rng, 9),
    );
    let sb = ScoredBatch::new(&[
        (p1.as_slice(), c1.as_slice()),
        (p2.as_slice(), c2.as_slice()),
    ]);
    let n = sb.batch.len();
    assert!(sb.targets.iter().any(|&t| t < 0), "some rows are unscored");
    let upstream = rng.normal_vec(n, 1.0);

    let s = score(&model, &sb).unwrap();
    let mut grads = Params::zeros(&model.cfg, &Device::Cpu, DType::F32).unwrap();
    score_backward(&model, &s, upstream.clone(), &mut grads).unwrap();

    // Every row through the head: unscored rows give 0 and take no gradient.
    let acts = model.forward(&sb.batch).unwrap();
    let targets = Tensor::from_i32(&[n], sb.targets.clone(), &Device::Cpu).unwrap();
    let out = linear_logprob_fwd(&acts.hidden, model.lm_head(), &targets, 1.0).unwrap();
    let mut want = Params::zeros(&model.cfg, &Device::Cpu, DType::F32).unwrap();
    let g = Tensor::from_f32(&[n], upstream, &Device::Cpu).unwrap();
    let zero = Tensor::zeros(&[n], DType::F32, &Device::Cpu).unwrap();
    let dh = linear_logprob_bwd(
        &acts.hidden,
        model.lm_head(),
        &targets,
        &out,
        &g,
        &zero,
        1.0,
        want.lm_head_mut(),
    )
    .unwrap();
    model.backward(&acts, &dh, &mut want).unwrap();

    assert_eq!(s.per_token, out.logp.to_f32_vec().unwrap());
    // GRPO takes its first update's log-probs as the rollout's old ones, and PPO its old
    // log-probs, entropies and (shared critic) hidden states from the frozen forward: the same.
    assert_eq!(
        rlhf_kernels::train::frozen_logps(&model, &sb).unwrap(),
        s.per_token
    );
    let frozen = rlhf_kernels::train::frozen_score_at(&model, &sb, 1.0).unwrap();
    assert_eq!(frozen.per_token, s.per_token);
    assert_eq!(frozen.entropy, s.entropy().unwrap());
    assert_eq!(
        frozen.hidden.to_f32_vec().unwrap(),
        s.acts.hidden.to_f32_vec().unwrap()
    );
    let entropy: Vec<f32> = out
        .entropy
        .to_f32_vec()
        .unwrap()
        .iter()
        .zip(&sb.targets)
        .map(|(&e, &t)| if t >= 0 { e } else { 0.0 })
        .collect();
    assert_eq!(s.entropy().unwrap(), entropy);
    for ((name, _, a), (_, _, b)) in grads
        .hf_tensors(&model.cfg)
        .unwrap()
        .into_iter()
        .zip(want.hf_tensors(&model.cfg).unwrap())
    {
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn shared_prompts_train_as_whole_sequences() {
    // Chosen and rejected run their prompt once (the default) or each its own copy: the same run
    // up to the order the prompt rows' gradients are summed in. DPO with a reference model on the
    // device, ORPO (whose chosen rows score their prompts, so only the rejected rows share), and
    // the reward model.
    let root = setup("shared-prompts", 64);
    let base = root.join("base");
    let dpo = || PrefTrainer::Dpo {
        loss: DpoLoss::Sigmoid,
        beta: 0.1,
        label_smoothing: 0.0,
        precompute_ref: false,
    };
    type Trainer<'a> = &'a dyn Fn(&TrainArgs) -> PathBuf;
    let runs: [(&str, Trainer); 3] = [
        ("dpo", &|a| dpo::train(a, dpo()).unwrap().0.final_dir),
        ("orpo", &|a| {
            dpo::train(a, PrefTrainer::Orpo { beta: 0.1 })
                .unwrap()
                .0
                .final_dir
        }),
        ("rm", &|a| reward::train(a).unwrap().0.final_dir),
    ];
    for (name, train) in runs {
        let mut got = Vec::new();
        for no_share in [false, true] {
            let out = format!("{name}-{no_share}");
            let mut a = args(&root, &base, "prefs.jsonl", &out, 1e-3);
            a.max_steps = Some(3);
            a.no_shared_prompts = no_share;
            got.push((a.out.clone(), train(&a)));
        }
        let ((so, sd), (wo, wd)) = (&got[0], &got[1]);
        assert_eq!(common::logged_metrics(so).len(), 3);
        common::assert_same_run(name, (so, sd), (wo, wd));
        if name == "rm" {
            // Scoring responses (GRPO's and the labeller's rewards, eval's win rate) shares each
            // prompt too: the rewards of the sequences written out whole, bit for bit on the CPU.
            let mut rm = Model::load(sd, &rlhf_kernels::Device::Cpu).unwrap();
            let (p, q) = (vec![5, 9, 14, 3, 7], vec![8, 2]);
            let responses = [vec![11, 4], vec![6], vec![12, 13, 1], vec![10, 3]];
            let seqs: Vec<(&[i32], &[i32])> = [&p, &p, &q, &p]
                .iter()
                .zip(&responses)
                .map(|(a, b)| (a.as_slice(), b.as_slice()))
                .collect();
            let whole: Vec<Vec<i32>> = seqs.iter().map(|(a, b)| [*a, *b].concat()).collect();
            let want = reward::sequence_rewards(&rm, &whole).unwrap();
            assert_eq!(reward::response_rewards(&rm, &seqs).unwrap(), want);
            rm.share_prompts = false;
            assert_eq!(reward::response_rewards(&rm, &seqs).unwrap(), want);
        }
    }
    std::fs::remove_dir_all(&root).ok();
}
