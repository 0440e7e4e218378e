//! The loss kernels' per-thread arithmetic, compiled for the CPU and checked against
//! double-precision loops (tests/host/kernel_check.cu says what it covers). This runs on every
//! machine with nvcc, GPU or not, so a logic error in a kernel's row split, rescaling or masking
//! shows up in CI rather than on the next GPU session.

use std::path::{Path, PathBuf};
use std::process::Command;

use rlhf_kernels::device::kernels::NVCC;
use rlhf_kernels::testing::fresh_seed;

/// nvcc's own library folder: the pinned pip wheels keep libcudart_static there, off nvcc's default
/// search path.
fn wheel_lib_dir(nvcc: &Path) -> Option<PathBuf> {
    let lib = nvcc.parent()?.parent()?.join("lib");
    lib.join("libcudart_static.a").is_file().then_some(lib)
}

#[test]
fn loss_kernel_arithmetic_matches_f64_loops_on_the_host() {
    // The executable may run on another machine than the one that built it (scripts/gpu-bundle).
    let Some(nvcc) = NVCC.map(Path::new).filter(|p| p.is_file()) else {
        assert!(
            std::env::var("RLHF_REQUIRE_KERNELS").as_deref() != Ok("1"),
            "RLHF_REQUIRE_KERNELS=1 but no nvcc is here (build found {NVCC:?})"
        );
        println!("skipped: no nvcc here (build found {NVCC:?}); run scripts/setup");
        return;
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel_check");
    let mut cmd = Command::new(nvcc);
    cmd.args(["-std=c++17", "-O2", "-arch=sm_80", "-o"])
        .arg(&exe)
        .arg(manifest.join("tests/host/kernel_check.cu"));
    if let Some(lib) = wheel_lib_dir(nvcc) {
        cmd.arg("-L").arg(lib);
    }
    let built = cmd.output().expect("run nvcc");
    assert!(
        built.status.success(),
        "nvcc could not build tests/host/kernel_check.cu:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let seed = fresh_seed("kernel host check") as u32;
    let run = Command::new(&exe)
        .arg(seed.to_string())
        .output()
        .expect("run kernel_check");
    let out = String::from_utf8_lossy(&run.stdout);
    println!("{out}");
    assert!(run.status.success(), "kernel_check failed:\n{out}");
    assert!(out.contains(" 0 failed"), "{out}");
}
