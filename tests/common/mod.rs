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
