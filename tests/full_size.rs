//! The GPU run's benchmarks at their full sizes, through every host path they take, with nothing run
//! on the device: the emulated GPU's count mode (`RLHF_EMULATED_MODE=count`, tests/host/emulated_driver.cpp)
//! allocates and launches but runs no kernel or GEMM. What a benchmark does on the host at full
//! size (launch shapes, tile lists, graph capture, the memory it keeps alive) is then checked here in
//! seconds instead of on a GPU's borrowed minutes. The tensor bytes a DPO step keeps alive depend
//! only on the host code, so their bound below holds on any card. On a real GPU the test skips, and
//! its name keeps it out of `scripts/gpu-bundle`, which carries the executables with `cuda` tests.

use std::path::Path;
use std::process::Command;

use rlhf_kernels::cuda_test;
use rlhf_kernels::device::kernels::KERNEL_RESOURCES;
use rlhf_kernels::device::Device;

/// Every launch shape in `file` ("kernel threads dynamic_shared_bytes" lines) fits an SM by ptxas's
/// report of the kernel for `arch`: its registers for every thread of the block (64K a block,
/// allocated 256 a warp) and its static shared memory beside the dynamic (`shared_limit` bytes:
/// 227 KiB on an H100, 163 KiB on an A100). The driver refuses any other launch, which the emulator
/// cannot see.
fn check_launch_shapes(file: &Path, arch: &str, shared_limit: u32) -> usize {
    let text = std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("no launch shapes at {} ({e})", file.display()));
    let mut checked = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (name, threads, dynamic): (&str, u32, u32) =
            (f[0], f[1].parse().unwrap(), f[2].parse().unwrap());
        let r = KERNEL_RESOURCES
            .iter()
            .find(|r| r.kernel == name && r.arch == arch)
            .unwrap_or_else(|| panic!("{name} launched but ptxas reported no {arch} build of it"));
        let per_warp = (r.registers * 32).div_ceil(256) * 256;
        let registers = threads.div_ceil(32) * per_warp;
        assert!(
            registers <= 65_536,
            "{name} ({arch}): {threads} threads of {} registers need {registers} of 65,536",
            r.registers
        );
        let shared = r.shared_bytes + dynamic;
        assert!(
            shared <= shared_limit,
            "{name} ({arch}): {} B static + {dynamic} B dynamic shared memory, over {shared_limit} B",
            r.shared_bytes
        );
        checked += 1;
    }
    checked
}

/// `rlhf ARGS` in count mode with the driver's tally written to `tally` and its launch shapes
/// appended to `tally`.launches; its stdout and stderr.
fn count_mode(args: &[&str], tally: &Path) -> String {
    let _ = std::fs::remove_file(tally);
    let out = Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(args)
        .env("RLHF_EMULATED_MODE", "count")
        .env("RLHF_EMULATED_TALLY", tally)
        .env("RLHF_EMULATED_LAUNCHES", tally.with_extension("launches"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "rlhf {}:\n{text}", args.join(" "));
    text
}

/// The number after `key=` in the driver's tally line.
fn tally_count(tally: &Path, key: &str) -> usize {
    let line = std::fs::read_to_string(tally)
        .unwrap_or_else(|e| panic!("no tally at {} ({e})", tally.display()));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in the tally {line}"))
        .parse()
        .unwrap()
}

/// The first number after `after` on the line that contains it.
fn number_after(text: &str, after: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.contains(after))
        .unwrap_or_else(|| panic!("no line with {after:?} in\n{text}"));
    let rest = &line[line.find(after).unwrap() + after.len()..];
    let num: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse()
        .unwrap_or_else(|_| panic!("no number after {after:?} in {line:?}"))
}

cuda_test!(
    fn emulated_benchmarks_run_at_full_size_in_count_mode(dev) {
        let Device::Cuda(cuda) = &dev else {
            unreachable!()
        };
        if !cuda.is_emulated() {
            println!(
                "emulated_benchmarks_run_at_full_size_in_count_mode: skipped: a real GPU runs the \
                 benchmarks for real (scripts/gpu-run)"
            );
            return;
        }
        let tally = std::env::temp_dir().join(format!("rlhf-tally-{}", std::process::id()));
        let launches = tally.with_extension("launches");
        let _ = std::fs::remove_file(&launches);

        // The DPO step of issue 6: 16 pairs x 1,024 tokens of SmolLM2-135M's shape.
        let dpo = count_mode(
            &["bench", "train", "--trainer", "dpo", "--device", "cuda", "--reps", "1"],
            &tally,
        );
        assert_eq!(number_after(&dpo, "the layers run"), 24_592.0, "{dpo}");
        // 10.94 GiB when the bench took on the optimizer (8.00 of them the policy's saved
        // activations, 1.50 the f32 master weights and AdamW's moments); the bound leaves room for
        // small changes and fails on a new per-token tensor kept through the step.
        let tensors = number_after(&dpo, "max_memory_allocated counts the same):");
        assert!(tensors <= 11.5, "DPO step tensor peak {tensors} GiB, over 11.5 GiB:\n{dpo}");
        let saved = number_after(&dpo, "keeps for its backward:");
        println!("DPO step in count mode: tensor peak {tensors} GiB, saved activations {saved} GiB");
        assert!(saved <= 8.5, "policy activations {saved} GiB, over 8.5 GiB:\n{dpo}");

        // The online benches: 64 responses of 512 new tokens, each decode step after the first two
        // replayed as a graph. The bench generates twice, from graphs (one wait for the device a
        // step: the copy back of tokens and log-probs) and op by op (two: tokens, log-probs); the
        // rest of the iteration (its updates read the gradient norm back once each) waited 45 (grpo)
        // and 29 (ppo) times when the bench took on the optimizer. A wait more a step
        // on either path fails.
        for trainer in ["grpo", "ppo"] {
            let out = count_mode(
                &["bench", "train", "--trainer", trainer, "--device", "cuda", "--reps", "1"],
                &tally,
            );
            let replays = tally_count(&tally, "graph_launches");
            assert_eq!(replays, 510, "{trainer}: decode steps replayed as graphs\n{out}");
            let waits = tally_count(&tally, "waits");
            println!("{trainer} bench in count mode: {replays} graph replays, {waits} waits");
            assert!(
                waits <= 512 + 2 * 512 + 64,
                "{trainer}: {waits} waits for the device over 2 x 512 decode steps\n{out}"
            );
        }

        // As scripts/gpu-run runs them, --profile aside.
        count_mode(
            &["bench", "kernels", "--device", "cuda", "--size", "full"],
            &tally,
        );
        count_mode(&["bench", "attention", "--device", "cuda"], &tally);
        count_mode(&["bench", "model", "--device", "cuda", "--reps", "1"], &tally);
        // The builds the emulated device ran: sm_90a at compute capability 9.0 (the default),
        // sm_80 under RLHF_EMULATED_CC=8.0.
        let (arch, shared_limit) = match cuda.compute_capability().0 {
            9 => ("sm_90a", 227 * 1024),
            _ => ("sm_80", 163 * 1024),
        };
        let shapes = check_launch_shapes(&launches, arch, shared_limit);
        println!("{shapes} launch shapes fit an SM by ptxas's {arch} report");
        let _ = std::fs::remove_file(&tally);
        let _ = std::fs::remove_file(&launches);
    }
);
