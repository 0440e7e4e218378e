//! Compiles every `kernels/*.cu` into a fatbin (PTX for compute_80, SASS for sm_80 and sm_90a) with
//! nvcc, embeds the images, and records ptxas's per-kernel resource report.
//!
//! Without nvcc the crate still builds, CPU-only, and says so; `RLHF_REQUIRE_KERNELS=1` turns a missing
//! nvcc or a kernel that fails to compile into a build error (CI sets it).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const GENCODES: &[&str] = &[
    "arch=compute_80,code=[compute_80,sm_80]",
    "arch=compute_90a,code=sm_90a",
];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernel_dir = manifest.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    // scripts/setup creates it; a CPU-only build then picks up nvcc without a `cargo clean`.
    println!("cargo:rerun-if-changed=.toolchain");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "RLHF_REQUIRE_KERNELS",
        "PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let require = env::var("RLHF_REQUIRE_KERNELS").is_ok_and(|v| v == "1");

    let mut sources: Vec<PathBuf> = fs::read_dir(&kernel_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"))
                .collect()
        })
        .unwrap_or_default();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    let cu_files: Vec<PathBuf> = sources
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();

    let mut generated = String::new();
    let nvcc = find_nvcc(&manifest);
    let Some(nvcc) = nvcc else {
        let why = "no nvcc found (looked at NVCC, CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH, .toolchain/); run scripts/setup";
        if require {
            panic!("RLHF_REQUIRE_KERNELS=1 but {why}");
        }
        println!("cargo:warning=building a CPU-only rlhf: {why}");
        write_generated(
            &out_dir,
            &mut generated,
            None,
            &format!("none: {why}"),
            &[],
            &[],
        );
        return;
    };
    let version = Command::new(&nvcc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find(|l| l.contains("release"))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown version".to_owned());
    let toolchain = format!("{} ({})", nvcc.display(), version.trim());

    // One thread per file: nvcc is single-threaded and ptxas dominates.
    let handles: Vec<_> = cu_files
        .iter()
        .map(|src| {
            let nvcc = nvcc.clone();
            let src = src.clone();
            let out_dir = out_dir.clone();
            let kernel_dir = kernel_dir.clone();
            std::thread::spawn(move || compile(&nvcc, &src, &kernel_dir, &out_dir))
        })
        .collect();
    let mut images = Vec::new();
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for (src, h) in cu_files.iter().zip(handles) {
        let family = src.file_stem().unwrap().to_string_lossy().into_owned();
        match h.join().unwrap() {
            Ok((image, report)) => {
                for r in &report {
                    if r.spill_stores > 0 || r.spill_loads > 0 || r.stack_bytes > 0 {
                        println!(
                            "cargo:warning=kernel {} ({}) spills: {} B stack, {} B spill stores, {} B spill loads",
                            r.kernel, r.arch, r.stack_bytes, r.spill_stores, r.spill_loads
                        );
                    }
                    if r.wgmma_serialized {
                        println!(
                            "cargo:warning=kernel {} ({}): ptxas serialised its wgmma instructions (C7514)",
                            r.kernel, r.arch
                        );
                    }
                }
                images.push((family.clone(), image));
                reports.extend(report.into_iter().map(|r| (family.clone(), r)));
            }
            Err(msg) => failures.push((family, msg)),
        }
    }
    if !failures.is_empty() {
        let text: Vec<String> = failures
            .iter()
            .map(|(f, m)| format!("kernels/{f}.cu failed to compile:\n{m}"))
            .collect();
        if require {
            panic!("{}", text.join("\n"));
        }
        for t in &text {
            for line in t.lines() {
                println!("cargo:warning={line}");
            }
        }
    }
    write_generated(
        &out_dir,
        &mut generated,
        Some(&nvcc),
        &toolchain,
        &images,
        &reports,
    );
}

fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    let exe = |p: PathBuf| p.is_file().then_some(p);
    if let Ok(p) = env::var("NVCC") {
        return exe(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env::var_os(var).and_then(|h| exe(PathBuf::from(h).join("bin/nvcc"))) {
            return Some(p);
        }
    }
    if let Some(p) = exe(PathBuf::from("/usr/local/cuda/bin/nvcc")) {
        return Some(p);
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            if let Some(p) = exe(dir.join("nvcc")) {
                return Some(p);
            }
        }
    }
    // scripts/setup installs the pinned wheels into .toolchain/venv.
    let lib = manifest.join(".toolchain/venv/lib");
    let pythons = fs::read_dir(&lib).ok()?;
    for py in pythons.filter_map(|e| e.ok()) {
        if let Some(p) = exe(py.path().join("site-packages/nvidia/cu13/bin/nvcc")) {
            return Some(p);
        }
    }
    None
}

struct KernelReport {
    kernel: String,
    arch: String,
    registers: u32,
    shared_bytes: u32,
    stack_bytes: u32,
    spill_stores: u32,
    spill_loads: u32,
    /// ptxas warned (C7514) that it made every wgmma wait for the one before.
    wgmma_serialized: bool,
}

fn compile(
    nvcc: &Path,
    src: &Path,
    include: &Path,
    out_dir: &Path,
) -> Result<(PathBuf, Vec<KernelReport>), String> {
    let stem = src.file_stem().unwrap().to_string_lossy();
    let out = out_dir.join(format!("{stem}.fatbin"));
    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin")
        .arg("-O3")
        .arg("-std=c++17")
        .arg("-Xptxas=-v")
        .arg("-I")
        .arg(include);
    for g in GENCODES {
        cmd.arg("-gencode").arg(g);
    }
    cmd.arg(src).arg("-o").arg(&out);
    let output = cmd
        .output()
        .map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(stderr.into_owned());
    }
    Ok((out, parse_ptxas(&stderr)))
}

/// Reads nvcc's `-Xptxas -v` chatter: an "entry function" line opens each kernel, and the
/// "stack frame"/"Used N registers" lines that follow describe it; a C7514 line names the function
/// whose wgmma instructions ptxas serialised.
fn parse_ptxas(text: &str) -> Vec<KernelReport> {
    let num_before = |line: &str, word: &str| -> u32 {
        let Some(pos) = line.find(word) else { return 0 };
        line[..pos]
            .split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let mut out: Vec<KernelReport> = Vec::new();
    let mut serialised: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let kernel = parts.next().unwrap_or("").to_owned();
            let arch = parts.nth(1).unwrap_or("").to_owned();
            out.push(KernelReport {
                kernel,
                arch,
                registers: 0,
                shared_bytes: 0,
                stack_bytes: 0,
                spill_stores: 0,
                spill_loads: 0,
                wgmma_serialized: false,
            });
        } else if line.contains("C7514") {
            // The line can come before the entry lines of its pass, so it is matched afterwards.
            let named = line.split("in the function '").nth(1);
            serialised.push(
                named
                    .and_then(|r| r.split('\'').next())
                    .unwrap_or("")
                    .to_owned(),
            );
        } else if let Some(r) = out.last_mut() {
            if line.contains("stack frame") {
                r.stack_bytes = num_before(line, "bytes stack frame");
                r.spill_stores = num_before(line, "bytes spill stores");
                r.spill_loads = num_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                r.registers = num_before(line, "registers");
                r.shared_bytes = num_before(line, "bytes smem");
            }
        }
    }
    // Only arch-specific targets (sm_90a) have wgmma; a name matching none of them marks them all.
    for name in serialised {
        let wgmma_arch = |r: &KernelReport| r.kernel == name && r.arch.ends_with('a');
        let any = out.iter().any(wgmma_arch);
        for r in out.iter_mut() {
            if r.kernel == name && (!any || r.arch.ends_with('a')) {
                r.wgmma_serialized = true;
            }
        }
    }
    out
}

fn write_generated(
    out_dir: &Path,
    s: &mut String,
    nvcc: Option<&Path>,
    toolchain: &str,
    images: &[(String, PathBuf)],
    reports: &[(String, KernelReport)],
) {
    writeln!(s, "pub const TOOLCHAIN: &str = {toolchain:?};").unwrap();
    let nvcc = nvcc.map(|p| p.display().to_string());
    writeln!(s, "pub const NVCC: Option<&str> = {nvcc:?};").unwrap();
    writeln!(s, "pub const KERNEL_IMAGES: &[(&str, &[u8])] = &[").unwrap();
    for (family, path) in images {
        writeln!(
            s,
            "    ({family:?}, include_bytes!({:?})),",
            path.display().to_string()
        )
        .unwrap();
    }
    writeln!(s, "];").unwrap();
    writeln!(s, "pub const KERNEL_RESOURCES: &[KernelResources] = &[").unwrap();
    for (family, r) in reports {
        writeln!(
            s,
            "    KernelResources {{ family: {family:?}, kernel: {:?}, arch: {:?}, registers: {}, shared_bytes: {}, stack_bytes: {}, spill_stores: {}, spill_loads: {}, wgmma_serialized: {} }},",
            r.kernel, r.arch, r.registers, r.shared_bytes, r.stack_bytes, r.spill_stores, r.spill_loads, r.wgmma_serialized
        )
        .unwrap();
    }
    writeln!(s, "];").unwrap();
    fs::write(out_dir.join("kernels.rs"), s.as_bytes()).unwrap();
}
