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
        "linear_logprob",
        "pref_loss",
        "ppo",
    ] {
        assert!(stdout.contains(kernel), "{kernel} missing:\n{stdout}");
    }
}
