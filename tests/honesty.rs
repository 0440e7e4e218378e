//! Honesty evaluations: ECE on a hand-computed example, calibration trained with DPO on the built-in
//! abstention preferences, suppression and relearning, and RLAIF labelling.

mod common;

use std::path::{Path, PathBuf};

use common::{sft_and_reward_model, train_args};

use rlhf_kernels::model::generate::GenerateOptions;
use rlhf_kernels::model::tokenizer::TextTokenizer;
use rlhf_kernels::model::Model;
use rlhf_kernels::ops::pref_loss::DpoLoss;
use rlhf_kernels::train::data::{load_prompts, Encoder, Limits};
use rlhf_kernels::train::dpo::{self, PrefTrainer};
use rlhf_kernels::train::honesty::{
    calibration, expected_calibration_error, is_abstention, is_correct, percent, suppression, Bin,
};
use rlhf_kernels::train::label::{label, Judge};
use rlhf_kernels::train::{builtin, sft};
use rlhf_kernels::Device;

#[test]
fn ece_matches_a_hand_computed_example() {
    // Bin [0.9, 1.0): confidences 0.95, 0.95, 1.0 with 2 right -> |2/3 - 0.9667| = 0.3
    // Bin [0.5, 0.6): confidences 0.5, 0.55 with 1 right -> |0.5 - 0.525| = 0.025
    let conf = [0.95, 0.95, 1.0, 0.5, 0.55];
    let right = [true, true, false, true, false];
    let (ece, bins) = expected_calibration_error(&conf, &right, 10);
    let want = 3.0 / 5.0 * (2.0f64 / 3.0 - (0.95 + 0.95 + 1.0) / 3.0).abs()
        + 2.0 / 5.0 * (0.5f64 - 0.525).abs();
    assert!((ece - want).abs() < 1e-12, "{ece} vs {want}");
    assert_eq!(bins.len(), 2);
    assert_eq!(
        bins[0],
        Bin {
            lo: 0.5,
            hi: 0.6,
            count: 2,
            mean_confidence: 0.525,
            accuracy: 0.5
        }
    );
    assert!(is_abstention(" I'm NOT sure.") && !is_abstention(" The answer is 3."));
    assert!(is_correct(" The answer is 42.", "42") && !is_correct(" The answer is 142.", "42"));
    assert!(is_correct("It is Paris.", "paris"));
    // A ratio whose condition never occurred (no right answers to abstain on) prints as n/a.
    assert_eq!(percent(f64::NAN), "n/a");
    assert_eq!(percent(0.125), "12.5%");
}

fn root(name: &str) -> PathBuf {
    common::root("honesty", name)
}

fn qa(dir: &Path, model: &Path) -> Vec<(Vec<i32>, String)> {
    let tok = TextTokenizer::load(model).unwrap();
    let enc = Encoder {
        tok: &tok,
        limits: Limits::default(),
        eos: 256,
    };
    let (p, _) = load_prompts(&dir.join("cal_qa.jsonl"), &enc, false).unwrap();
    p.into_iter()
        .take(80)
        .map(|p| (p.tokens, p.answer.unwrap()))
        .collect()
}

#[test]
fn dpo_on_abstention_preferences_improves_calibration() {
    let r = root("cal");
    builtin::write_calibration_task(&r.join("data"), 400, 3).unwrap();
    let sft = sft::train(&train_args(
        &r.join("base"),
        &r.join("data/cal_sft.jsonl"),
        &r.join("sft"),
        3e-3,
        6,
    ))
    .unwrap()
    .0
    .final_dir;
    let dev = Device::Cpu;
    let tok = TextTokenizer::load(&sft).unwrap();
    let questions = qa(&r.join("data"), &sft);
    let before = calibration(
        &Model::load(&sft, &dev).unwrap(),
        &tok,
        &questions,
        " The answer is",
        20,
        &[256],
    )
    .unwrap();
    let which = PrefTrainer::Dpo {
        loss: DpoLoss::Sigmoid,
        beta: 0.1,
        label_smoothing: 0.0,
        precompute_ref: true,
    };
    let tuned = dpo::train(
        &train_args(
            &sft,
            &r.join("data/cal_prefs.jsonl"),
            &r.join("dpo"),
            3e-4,
            1,
        ),
        which,
    )
    .unwrap()
    .0
    .final_dir;
    let after = calibration(
        &Model::load(&tuned, &dev).unwrap(),
        &tok,
        &questions,
        " The answer is",
        20,
        &[256],
    )
    .unwrap();
    println!("before: {before:?}\nafter: {after:?}");
    assert!(
        after.ece < before.ece,
        "ECE {} -> {}",
        before.ece,
        after.ece
    );
    assert!(
        after.abstain_when_wrong > 0.8,
        "abstains when wrong {}",
        after.abstain_when_wrong
    );
    assert!(
        after.abstain_when_right < 0.2,
        "abstains when right {}",
        after.abstain_when_right
    );
    std::fs::remove_dir_all(&r).ok();
}

#[test]
fn suppressed_behaviour_returns_after_a_little_fine_tuning() {
    let r = root("suppress");
    builtin::write_synthetic_task(&r.join("data"), 300, 2).unwrap();
    let sft = sft::train(&train_args(
        &r.join("base"),
        &r.join("data/sft.jsonl"),
        &r.join("sft"),
        3e-3,
        3,
    ))
    .unwrap()
    .0
    .final_dir;
    let which = PrefTrainer::Dpo {
        loss: DpoLoss::Sigmoid,
        beta: 0.1,
        label_smoothing: 0.0,
        precompute_ref: true,
    };
    let suppressed = dpo::train(
        &train_args(&sft, &r.join("data/prefs.jsonl"), &r.join("dpo"), 3e-4, 1),
        which,
    )
    .unwrap()
    .0
    .final_dir;
    // A few examples of the suppressed behaviour (refusing).
    let relearn = r.join("relearn.jsonl");
    let lines: String = (0..8u32).map(|i| format!("{}\n", serde_json::json!({"prompt": builtin::question(i, i + 1), "completion": " I cannot help with that."}))).collect();
    std::fs::write(&relearn, lines).unwrap();
    let tok = TextTokenizer::load(&sft).unwrap();
    let prompts: Vec<Vec<i32>> = (0..16u32)
        .map(|i| {
            tok.encode(&builtin::question(i * 3 % 50, i * 7 % 50), false)
                .unwrap()
        })
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: 24,
        temperature: 1.0,
        seed: 5,
        eos: vec![256],
        ..Default::default()
    };
    let mut train = train_args(&sft, &relearn, &r.join("unused"), 1e-3, 1);
    train.batch_size = 8;
    let rep = suppression(
        &sft,
        &suppressed,
        &relearn,
        &[0, 5, 20],
        &prompts,
        "cannot help",
        &r,
        &train,
        &opts,
    )
    .unwrap();
    println!("{rep:?}");
    assert!(
        rep.suppressed < rep.base,
        "training against it lowers the rate: {} -> {}",
        rep.base,
        rep.suppressed
    );
    let last = rep.after_relearning.last().unwrap().1;
    assert!(
        last > rep.suppressed,
        "a few steps bring it back: {} -> {last}",
        rep.suppressed
    );
    std::fs::remove_dir_all(&r).ok();
}

#[test]
fn reward_model_labels_agree_with_the_known_preference() {
    let r = root("label");
    let (sft, rm) = sft_and_reward_model(&r);
    let dev = Device::Cpu;
    let policy = Model::load(&sft, &dev).unwrap();
    let tok = TextTokenizer::load(&sft).unwrap();
    let enc = Encoder {
        tok: &tok,
        limits: Limits::default(),
        eos: 256,
    };
    let (prompts, _) = load_prompts(&r.join("data/prompts.jsonl"), &enc, false).unwrap();
    let judge = Judge::load(Some(&rm), None, &dev).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 24,
        temperature: 1.0,
        seed: 3,
        eos: vec![256],
        ..Default::default()
    };
    let (pairs, _) = label(&policy, &tok, &judge, &prompts[..48], 4, &opts).unwrap();
    // Where one response answers and the other refuses, the known preference is the answer.
    let decisive: Vec<_> = pairs
        .iter()
        .filter(|p| builtin::is_refusal(&p.chosen) != builtin::is_refusal(&p.rejected))
        .collect();
    let agree = decisive
        .iter()
        .filter(|p| !builtin::is_refusal(&p.chosen))
        .count();
    println!(
        "{} pairs, {} decisive, {agree} agree",
        pairs.len(),
        decisive.len()
    );
    assert!(decisive.len() >= 10);
    assert!(agree as f64 / decisive.len() as f64 >= 0.9);
    assert!(pairs.iter().all(|p| (0.5..=1.0).contains(&p.confidence)));
    std::fs::remove_dir_all(&r).ok();
}

/// The LLM judge: asked in both orders, its preferences for (x, y) and (y, x) sum to 1 and lie in
/// (0, 1); labelling chat prompts with it writes pairs in TRL's conversational format (assistant
/// turns for chosen and rejected) that the DPO loader reads back.
#[test]
fn llm_judge_is_order_symmetric_and_its_chat_pairs_load() {
    use rlhf_kernels::train::data::load_pairs;
    use rlhf_kernels::train::label::{llm_preference, write_jsonl};
    let r = root("llm_judge");
    let (sft, _) = sft_and_reward_model(&r);
    let dev = Device::Cpu;
    let policy = Model::load(&sft, &dev).unwrap();
    let tok = TextTokenizer::load(&sft).unwrap();
    let judge = Judge::load(None, Some(&sft), &dev).unwrap();
    let Judge::Llm {
        model: jm,
        tok: jtok,
    } = &judge
    else {
        panic!("--judge-model loads an LLM judge");
    };
    let q = builtin::question(12, 30);
    let (x, y) = (" 42", " I am not sure.");
    let (pxy, pyx) = (
        llm_preference(jm, jtok, &q, x, y).unwrap(),
        llm_preference(jm, jtok, &q, y, x).unwrap(),
    );
    println!("P(x > y) {pxy:.6}, P(y > x) {pyx:.6}");
    assert!((pxy + pyx - 1.0).abs() < 1e-9);
    assert!(pxy > 0.0 && pxy < 1.0);

    let chat = r.join("chat_prompts.jsonl");
    let lines: String = (0..6u32)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"prompt": [{"role": "user", "content": builtin::question(i * 7 % 50, i * 3 % 50)}]})
            )
        })
        .collect();
    std::fs::write(&chat, lines).unwrap();
    let enc = Encoder {
        tok: &tok,
        limits: Limits::default(),
        eos: 256,
    };
    let (prompts, _) = load_prompts(&chat, &enc, false).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 8,
        temperature: 1.0,
        seed: 5,
        eos: vec![256],
        ..Default::default()
    };
    let (pairs, skipped) = label(&policy, &tok, &judge, &prompts, 3, &opts).unwrap();
    assert!(!pairs.is_empty(), "every prompt skipped ({skipped})");
    assert!(pairs.iter().all(|p| (0.5..=1.0).contains(&p.confidence)));
    let out = r.join("chat_pairs.jsonl");
    write_jsonl(&out, &pairs).unwrap();
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["chosen"][0]["role"], "assistant", "{first}");
    let (loaded, report) = load_pairs(&out, &enc, false).unwrap();
    assert_eq!((loaded.len(), report.skipped.len()), (pairs.len(), 0));
    std::fs::remove_dir_all(&r).ok();
}
