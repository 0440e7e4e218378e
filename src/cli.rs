//! The `rlhf` command line: clap subcommands over the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use std::path::PathBuf;

use crate::bench::{self, BenchSize};
use crate::device::cuda::unavailable_reason;
use crate::device::{kernels, CudaDevice, Device, DeviceChoice};
use crate::error::Result;
use crate::verify::Outcome;

#[derive(Parser, Debug)]
#[command(
    name = "rlhf",
    version,
    about = "Preference post-training (SFT, reward models, DPO family, KTO, PPO) on one GPU"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Report the build's CUDA toolchain, every embedded kernel's registers and spills, the GPU and cuBLAS.
    Doctor,
    /// The end-to-end demo. Until the trainers land it runs `doctor`.
    Demo,
    /// Check our kernels against reference-value files (safetensors with inputs, expected outputs and
    /// gradients; family and hyper-parameters in the metadata, as in ../shared/golden). Prints the max
    /// error of every output and gradient and PASS/FAIL; exits non-zero on any FAIL.
    Verify {
        /// Reference files, e.g. ../shared/golden/*.safetensors.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Where to run: the CPU references (f64) or the CUDA kernels.
        #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
        device: DeviceChoice,
    },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Time every kernel family at realistic shapes; report GB/s or TFLOP/s and the percentage of this
    /// device's copy bandwidth and GEMM rate, both measured in the same run.
    Kernels {
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
        /// Problem sizes [default: full on CUDA, small on the CPU].
        #[arg(long, value_enum)]
        size: Option<BenchSize>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Doctor | Command::Demo => {
            print!("{}", doctor_report());
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { files, device } => verify(&files, device),
        Command::Bench(BenchCommand::Kernels { device, size, json }) => {
            bench_kernels_cmd(device, size, json)
        }
    }
}

fn bench_kernels_cmd(
    choice: DeviceChoice,
    size: Option<BenchSize>,
    json: bool,
) -> Result<ExitCode> {
    let device = Device::from_choice(choice)?;
    let size = size.unwrap_or(if device.is_cuda() {
        BenchSize::Full
    } else {
        BenchSize::Small
    });
    let name = match &device {
        Device::Cpu => "cpu".to_owned(),
        Device::Cuda(d) => d.info()?.name,
    };
    eprintln!("measuring ceilings on {name} ...");
    let ceil = bench::measure_ceilings(&device, size)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"device": name, "copy_gbs": ceil.copy_gbs, "gemm_tflops": ceil.gemm_tflops})
        );
    } else {
        println!("device: {name}");
        println!(
            "ceilings: copy {:.0} GB/s (read + write), GEMM {:.1} TFLOP/s",
            ceil.copy_gbs, ceil.gemm_tflops
        );
        println!(
            "{:<26} {:<28} {:>10} {:>14} {:>9}",
            "kernel", "shape", "median ms", "rate", "% ceiling"
        );
    }
    bench::bench_kernels(&device, size, &ceil, |r| {
        let unit = if r.bound == bench::Bound::Memory {
            "GB/s"
        } else {
            "TFLOP/s"
        };
        if json {
            println!(
                "{}",
                serde_json::json!({"kernel": r.kernel, "shape": r.shape, "median_ms": r.median_ms, "rate": r.rate, "unit": unit, "percent_of_ceiling": r.percent_of_ceiling})
            );
        } else {
            println!(
                "{:<26} {:<28} {:>10.3} {:>9.2} {:<7} {:>6.1}%",
                r.kernel, r.shape, r.median_ms, r.rate, unit, r.percent_of_ceiling
            );
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

fn verify(files: &[PathBuf], choice: DeviceChoice) -> Result<ExitCode> {
    let device = Device::from_choice(choice)?;
    println!("verify on {device:?}");
    let (mut failed, mut passed, mut skipped) = (0usize, 0usize, 0usize);
    for path in files {
        let report = crate::verify::verify_file(path, &device)?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        match &report.outcome {
            Outcome::Skipped(why) => {
                skipped += 1;
                println!("SKIP {name} ({}): {why}", report.family);
            }
            Outcome::Checked(checks) => {
                for c in checks {
                    println!(
                        "{} {name} {:<26} max abs err {:.3e}  max rel err {:.3e}",
                        if c.pass { "PASS" } else { "FAIL" },
                        c.name,
                        c.max_abs_err,
                        c.max_rel_err
                    );
                    if c.pass {
                        passed += 1;
                    } else {
                        failed += 1;
                    }
                }
            }
        }
    }
    println!("verify: {passed} passed, {failed} failed, {skipped} files skipped");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Everything `rlhf doctor` prints, as one string.
pub fn doctor_report() -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "rlhf {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(s, "CUDA toolchain at build: {}", kernels::TOOLCHAIN);
    if kernels::compiled() {
        let families: Vec<&str> = kernels::KERNEL_IMAGES.iter().map(|(f, _)| *f).collect();
        let _ = writeln!(
            s,
            "kernel families embedded: {} ({})",
            families.len(),
            families.join(", ")
        );
        let _ = writeln!(
            s,
            "{:<12} {:<36} {:<7} {:>5} {:>8} {:>7} {:>7}",
            "family", "kernel", "arch", "regs", "smem B", "stack B", "spill B"
        );
        for r in kernels::KERNEL_RESOURCES {
            let _ = writeln!(
                s,
                "{:<12} {:<36} {:<7} {:>5} {:>8} {:>7} {:>7}{}",
                r.family,
                r.kernel,
                r.arch,
                r.registers,
                r.shared_bytes,
                r.stack_bytes,
                r.spill_stores + r.spill_loads,
                if r.spill_stores + r.spill_loads > 0 {
                    "  SPILLS"
                } else {
                    ""
                }
            );
        }
    } else {
        let _ = writeln!(
            s,
            "kernels: none embedded; this is a CPU-only build (run scripts/setup, then rebuild)"
        );
    }
    match unavailable_reason() {
        Some(why) => {
            let _ = writeln!(s, "GPU: none ({why}); ops run on the CPU reference path");
        }
        None => match CudaDevice::shared(0).and_then(|d| d.info().map(|i| (d, i))) {
            Ok((dev, info)) => {
                let _ = writeln!(
                    s,
                    "GPU 0: {} (compute capability {}.{}, {} SMs, {:.1} GiB, driver {}.{})",
                    info.name,
                    info.compute_capability.0,
                    info.compute_capability.1,
                    info.multiprocessors,
                    info.total_memory as f64 / (1u64 << 30) as f64,
                    info.driver_version / 1000,
                    (info.driver_version % 1000) / 10
                );
                match dev.blas() {
                    Ok(_) => {
                        let _ = writeln!(s, "cuBLAS: loaded");
                    }
                    Err(e) => {
                        let _ = writeln!(s, "cuBLAS: unavailable ({e})");
                    }
                }
            }
            Err(e) => {
                let _ = writeln!(s, "GPU: present but unusable ({e})");
            }
        },
    }
    s
}
