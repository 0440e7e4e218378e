//! The `rlhf` binary as a user runs it.

use std::process::Command;

fn rlhf(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn doctor_reports_toolchain_kernels_and_gpu() {
    let (ok, stdout, stderr) = rlhf(&["doctor"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("CUDA toolchain at build:"), "{stdout}");
    assert!(stdout.contains("GPU"), "{stdout}");
    if rlhf_kernels::device::kernels::compiled() {
        assert!(
            stdout.contains("rms_norm_fwd_bf16") && stdout.contains("sm_90a"),
            "{stdout}"
        );
    } else {
        assert!(stdout.contains("CPU-only build"), "{stdout}");
    }
}

#[test]
fn unknown_subcommand_fails_with_usage() {
    let (ok, _, stderr) = rlhf(&["no-such-command"]);
    assert!(!ok);
    assert!(stderr.contains("Usage"), "{stderr}");
}

#[test]
fn bench_kernels_on_cpu_reports_every_family() {
    let (ok, stdout, stderr) = rlhf(&["bench", "kernels", "--device", "cpu", "--size", "small"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ceilings: copy"), "{stdout}");
    for kernel in [
        "rms_norm",
        "logprob fwd+bwd",
        "kl_full",
        "sample plain",
        "linear_logprob",
        "pref_loss",
        "ppo",
    ] {
        assert!(stdout.contains(kernel), "{kernel} missing:\n{stdout}");
    }
}

/// Every trainer and evaluation subcommand, as a user types it, on the built-in tiny model for a
/// few steps: the flags parse, the runs finish, and each prints what it promises.
#[test]
fn every_training_command_runs_from_the_command_line() {
    use rlhf_kernels::train::builtin;
    let root = std::env::temp_dir().join(format!("rlhf-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    builtin::write_tiny_model(&root.join("base"), 1).unwrap();
    builtin::write_synthetic_task(&root.join("data"), 64, 2).unwrap();
    builtin::write_calibration_task(&root.join("data"), 40, 2).unwrap();
    let p = |s: &str| root.join(s).display().to_string();
    let run = |args: Vec<String>| {
        let (ok, out, err) = rlhf(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "rlhf {}\n{out}\n{err}", args.join(" "));
        out
    };
    let online = |model: &str, data: &str, out: &str| -> Vec<String> {
        let flags = [
            "--model",
            model,
            "--data",
            data,
            "--out",
            out,
            "--device",
            "cpu",
            "--lr",
            "1e-3",
            "--max-len",
            "64",
            "--quiet",
        ];
        flags.iter().map(|s| s.to_string()).collect()
    };
    let common = |model: &str, data: &str, out: &str| -> Vec<String> {
        let mut v = online(model, data, out);
        v.extend(
            ["--max-steps", "2", "--batch-size", "4"]
                .iter()
                .map(|s| s.to_string()),
        );
        v
    };
    let with = |cmd: &str, rest: Vec<String>, extra: &[&str]| -> Vec<String> {
        let mut v = vec![cmd.to_string()];
        v.extend(rest);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let out = run(with(
        "sft",
        common(&p("base"), &p("data/sft.jsonl"), &p("sft")),
        &["--eval-fraction", "0.25", "--save-every", "1"],
    ));
    assert!(
        out.contains("2 steps") && out.contains("held-out loss"),
        "{out}"
    );
    let sft = p("sft/final");
    let out = run(with(
        "rm",
        common(&sft, &p("data/prefs.jsonl"), &p("rm")),
        &["--eval-fraction", "0.25"],
    ));
    assert!(out.contains("held-out accuracy"), "{out}");
    let rm = p("rm/final");
    let out = run(vec![
        "score".into(),
        "--model".into(),
        rm.clone(),
        "--data".into(),
        p("data/sft.jsonl"),
        "--device".into(),
        "cpu".into(),
    ]);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("{\"score\":")).count(),
        64
    );
    for (cmd, extra) in [
        (
            "dpo",
            vec![
                "--loss-type",
                "ipo",
                "--precompute-ref",
                "--eval-fraction",
                "0.25",
            ],
        ),
        ("orpo", vec![]),
        ("simpo", vec!["--gamma", "0.3"]),
    ] {
        let out = run(with(
            cmd,
            common(&sft, &p("data/prefs.jsonl"), &p(cmd)),
            &extra,
        ));
        assert!(out.contains("2 steps"), "{cmd}: {out}");
    }
    run(with(
        "kto",
        common(&sft, &p("data/kto.jsonl"), &p("kto")),
        &[],
    ));
    let out = run(vec!["plot".into(), p("dpo")]);
    assert!(out.trim().ends_with("metrics.png"));
    let out = run(vec![
        "eval".into(),
        "--model".into(),
        p("dpo/final"),
        "--data".into(),
        p("data/held_out.jsonl"),
        "--reference".into(),
        sft.clone(),
        "--reward-model".into(),
        rm.clone(),
        "--max-new-tokens".into(),
        "8".into(),
        "--device".into(),
        "cpu".into(),
    ]);
    assert!(
        out.contains("implicit reward accuracy") && out.contains("win rate"),
        "{out}"
    );
    let out = run(with(
        "ppo",
        online(&sft, &p("data/prompts.jsonl"), &p("ppo")),
        &[
            "--reward-model",
            &rm,
            "--iterations",
            "2",
            "--rollout-batch",
            "4",
            "--minibatch",
            "2",
            "--max-new-tokens",
            "8",
            "--kl-estimator",
            "k3",
            "--target-kl",
            "1.0",
        ],
    ));
    assert!(
        out.contains("2 iterations") && out.contains("logprob_mismatch"),
        "{out}"
    );
    let shared_flags = [
        "--reward-model",
        &rm,
        "--shared-value",
        "--iterations",
        "1",
        "--rollout-batch",
        "2",
        "--minibatch",
        "2",
        "--max-new-tokens",
        "8",
    ];
    let out = run(with(
        "ppo",
        online(&sft, &p("data/prompts.jsonl"), &p("ppo-shared")),
        &shared_flags,
    ));
    assert!(
        out.contains("1 iterations")
            && root
                .join("ppo-shared/final/value_head.safetensors")
                .is_file(),
        "{out}"
    );
    let out = run(with(
        "grpo",
        online(&sft, &p("data/prompts.jsonl"), &p("grpo")),
        &[
            "--reward-rule",
            "exact",
            "--iterations",
            "2",
            "--prompts-per-step",
            "2",
            "--group-size",
            "2",
            "--max-new-tokens",
            "8",
            "--beta",
            "0.04",
            "--loss-aggregation",
            "token",
        ],
    ));
    assert!(out.contains("2 iterations"), "{out}");
    let out = run(vec![
        "label".into(),
        "--model".into(),
        sft.clone(),
        "--prompts".into(),
        p("data/prompts.jsonl"),
        "--out".into(),
        p("labels.jsonl"),
        "--judge-reward-model".into(),
        rm.clone(),
        "--responses".into(),
        "2".into(),
        "--max-new-tokens".into(),
        "8".into(),
        "--device".into(),
        "cpu".into(),
    ]);
    assert!(out.contains("pairs written"), "{out}");
    let out = run(with(
        "dpo",
        common(&sft, &p("data/prompts.jsonl"), &p("online")),
        &[
            "--online-rounds",
            "1",
            "--judge-reward-model",
            &rm,
            "--precompute-ref",
        ],
    ));
    assert!(out.contains("online DPO, 1 rounds"), "{out}");
    let out = run(vec![
        "calibration".into(),
        "--model".into(),
        sft.clone(),
        "--data".into(),
        p("data/cal_qa.jsonl"),
        "--max-new-tokens".into(),
        "8".into(),
        "--plot".into(),
        p("rel.png"),
        "--device".into(),
        "cpu".into(),
    ]);
    assert!(
        out.contains("expected calibration error") && root.join("rel.png").is_file(),
        "{out}"
    );
    let out = run(vec![
        "suppression".into(),
        "--base".into(),
        sft.clone(),
        "--suppressed".into(),
        p("dpo/final"),
        "--prompts".into(),
        p("data/prompts.jsonl"),
        "--pattern".into(),
        "cannot".into(),
        "--relearn".into(),
        p("data/sft.jsonl"),
        "--steps".into(),
        "0,1".into(),
        "--max-new-tokens".into(),
        "8".into(),
        "--out".into(),
        p("supp"),
        "--device".into(),
        "cpu".into(),
    ]);
    assert!(out.contains("after    1 relearning steps"), "{out}");
    // Conflicting, missing or inapplicable choices are errors, not guesses.
    let (ok, _, err) = rlhf(
        &with(
            "ppo",
            common(&sft, &p("data/prompts.jsonl"), &p("p2")),
            &["--reward-model", &rm],
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    assert!(
        !ok && err.contains("--max-steps does not apply to ppo"),
        "{err}"
    );
    let (ok, _, err) = rlhf(
        &with(
            "grpo",
            online(&sft, &p("data/prompts.jsonl"), &p("g2")),
            &["--reward-rule", "exact", "--reward-model", &rm],
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    let (ok, _, err) = rlhf(
        &with("sft", common(&sft, &p("data/missing.jsonl"), &p("s2")), &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(!ok && err.contains("missing.jsonl"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}
