//! Setup shared by the trainer tests that run the built-in tiny model on the CPU.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rlhf_kernels::device::DeviceChoice;
use rlhf_kernels::train::{builtin, reward, sft, TrainArgs};

/// A fresh temporary folder holding the tiny model in `base/`.
pub fn root(suite: &str, name: &str) -> PathBuf {
    let r = std::env::temp_dir().join(format!("rlhf-{suite}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&r);
    builtin::write_tiny_model(&r.join("base"), 1).unwrap();
    r
}

/// The online trainers' options: no offline batch sizes or epochs.
pub fn online_args(model: &Path, data: &Path, out: &Path, lr: f64) -> TrainArgs {
    let mut a = TrainArgs::new(model, data, out);
    a.device = DeviceChoice::Cpu;
    a.lr = lr;
    a.warmup_steps = 5;
    a.max_len = 96;
    a
}

/// The offline trainers' options: micro-batches of 16 for `epochs` epochs.
pub fn train_args(model: &Path, data: &Path, out: &Path, lr: f64, epochs: usize) -> TrainArgs {
    let mut a = online_args(model, data, out, lr);
    a.batch_size = 16;
    a.epochs = epochs;
    a
}

/// The synthetic arithmetic task in `r/data`, an SFT model on it and a reward model from that:
/// returns (SFT folder, reward model folder).
pub fn sft_and_reward_model(r: &Path) -> (PathBuf, PathBuf) {
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
    let rm = reward::train(&train_args(
        &sft,
        &r.join("data/prefs.jsonl"),
        &r.join("rm"),
        1e-3,
        1,
    ))
    .unwrap()
    .0
    .final_dir;
    (sft, rm)
}

/// Every metric of every line of a run's metrics.jsonl but the timings (`..._per_s`).
pub fn logged_metrics(out: &Path) -> Vec<Vec<(String, f64)>> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| !k.contains("per_s"))
                .map(|(k, x)| (k.clone(), x.as_f64().unwrap()))
                .collect()
        })
        .collect()
}

/// Every parameter tensor of the model saved in `dir`.
pub fn parameters(dir: &Path) -> Vec<Vec<f32>> {
    let m = rlhf_kernels::model::Model::load(dir, &rlhf_kernels::Device::Cpu).unwrap();
    m.params
        .named()
        .iter()
        .map(|t| t.to_f32_vec().unwrap())
        .collect()
}

/// Two runs that differ only in whether sequences share their prompt (`out` folders, final model
/// folders): the same run up to the order the shared rows' gradients are summed in, so every
/// logged metric within 1e-4 relative and every parameter tensor within 1e-5 relative L2.
pub fn assert_same_run(what: &str, shared: (&Path, &Path), whole: (&Path, &Path)) {
    let (ls, lw) = (logged_metrics(shared.0), logged_metrics(whole.0));
    assert_eq!(ls.len(), lw.len(), "{what}: logged lines");
    for (step, (s, w)) in ls.iter().zip(&lw).enumerate() {
        assert_eq!(s.len(), w.len(), "{what} line {step}: metrics");
        for ((k, a), (k2, b)) in s.iter().zip(w) {
            assert_eq!(k, k2);
            assert!(
                (a - b).abs() <= 1e-4 * a.abs().max(b.abs()) + 1e-6,
                "{what} line {step} {k}: {a} shared, {b} whole"
            );
        }
    }
    for (i, (s, w)) in parameters(shared.1)
        .iter()
        .zip(parameters(whole.1))
        .enumerate()
    {
        let e = rlhf_kernels::testing::rel_l2(s, &w);
        assert!(e <= 1e-5, "{what} parameter tensor {i}: relative L2 {e:e}");
    }
}
