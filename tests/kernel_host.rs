//! The loss kernels' per-thread arithmetic, compiled for the CPU and checked against
//! double-precision loops (tests/host/kernel_check.cu says what it covers), RoPE's sine and cosine
//! (tests/host/rope_check.cu), the Hopper attention
//! kernels' shared-memory layouts against the wgmma layouts (tests/host/attention_layout_check.cu),
//! and every attention kernel run whole on a CPU emulator of CUDA blocks (tests/host/emulation.h,
//! tests/host/attention_emulation.cpp). These run on every machine with nvcc, GPU or not, so a logic
//! error in a kernel's row split, rescaling, masking, tile addressing or synchronisation shows up in
//! CI rather than on the next GPU session.

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

/// Builds tests/host/`file` with nvcc for the host (a `.cpp` file as plain C++ with CUDA's headers)
/// and runs it with `args`; its output must end in
/// " 0 failed". Skips (with a note) where no nvcc is here, unless RLHF_REQUIRE_KERNELS=1.
fn build_and_run(file: &str, args: &[String]) {
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
    let stem = file.trim_end_matches(".cu").trim_end_matches(".cpp");
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join(stem);
    let mut cmd = Command::new(nvcc);
    // Kernels type-pun (a uint4 load read as floats), which nvcc allows and -O2 host code may not.
    cmd.args([
        "-std=c++17",
        "-O2",
        "-arch=sm_80",
        "-Xcompiler",
        "-fno-strict-aliasing",
        "-o",
    ])
    .arg(&exe)
    .arg(manifest.join("tests/host").join(file));
    if let Some(lib) = wheel_lib_dir(nvcc) {
        cmd.arg("-L").arg(lib);
    }
    let built = cmd.output().expect("run nvcc");
    assert!(
        built.status.success(),
        "nvcc could not build tests/host/{file}:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&exe)
        .args(args)
        .output()
        .expect("run the check");
    let out = String::from_utf8_lossy(&run.stdout);
    println!("{out}");
    assert!(run.status.success(), "{file} failed:\n{out}");
    assert!(out.contains(" 0 failed"), "{out}");
}

#[test]
fn loss_kernel_arithmetic_matches_f64_loops_on_the_host() {
    let seed = fresh_seed("kernel host check") as u32;
    build_and_run("kernel_check.cu", &[seed.to_string()]);
}

/// RoPE's sine and cosine (computed without sincosf) within an f32 ulp of double precision, over
/// random angles up to 2e6 radians and every angle a 128-wide head forms up to position 131,072.
#[test]
fn rope_sines_and_cosines_match_f64_on_the_host() {
    let seed = fresh_seed("rope host check") as u32;
    build_and_run("rope_check.cu", &[seed.to_string()]);
}

/// The Hopper attention kernels' tile loads and wgmma descriptors against PTX's 128-byte-swizzle
/// layouts (tests/host/attention_layout_check.cu): every operand element read where the kernels
/// stored it, every tile row written once.
#[test]
fn hopper_attention_layouts_match_the_wgmma_canonical_layouts() {
    build_and_run("attention_layout_check.cu", &[]);
}

/// Every kernel of kernels/attention.cu (simple, mma.sync flash, Hopper wgmma in both block widths,
/// fast and deterministic backward, decode) run on the CPU emulator against f64 loops, each launch
/// in two schedules that must agree bit for bit, with the emulator checking barriers, cp.async
/// waits, wgmma waits and fences, and shared-memory bounds (tests/host/emulation.h says how).
#[test]
fn attention_kernels_match_f64_loops_on_the_cuda_emulator() {
    let seed = fresh_seed("attention emulation") as u32;
    build_and_run("attention_emulation.cpp", &[seed.to_string()]);
}
