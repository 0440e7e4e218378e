//! Every reference-value file in ../shared/golden through `rlhf verify`'s checks, on the CPU and (on a
//! GPU machine) on CUDA; and the command itself, including a file it must reject.

use std::collections::HashMap;
use std::process::Command;

use rlhf_kernels::cuda_test;
use rlhf_kernels::device::Device;
use rlhf_kernels::testing::{golden_dir, report};
use rlhf_kernels::verify::{verify_file, Outcome};

fn golden_files() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(golden_dir())
        .expect("../shared/golden is readable")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

fn verify_all(device: &Device) {
    let files = golden_files();
    assert!(
        files.len() >= 17,
        "expected the 17+ golden files, found {}",
        files.len()
    );
    let (mut checked, mut failures) = (0, Vec::new());
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let r = verify_file(path, device).unwrap_or_else(|e| panic!("{name}: {e}"));
        match r.outcome {
            Outcome::Skipped(why) => panic!("{name} ({}) skipped: {why}", r.family),
            Outcome::Checked(checks) => {
                checked += 1;
                for c in checks {
                    if c.pass {
                        report(
                            &format!("verify.{}", r.family),
                            &format!("{name}:{}", c.name),
                            c.max_abs_err,
                            "verify tolerance",
                        );
                    } else {
                        failures.push(format!(
                            "{name} {}: max abs err {:e}",
                            c.name, c.max_abs_err
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "golden mismatches on {device:?}:\n{}",
        failures.join("\n")
    );
    assert_eq!(checked, files.len());
}

#[test]
fn every_golden_file_passes_on_cpu() {
    verify_all(&Device::Cpu);
}

cuda_test! {
    fn every_golden_file_passes_on_cuda(dev) {
        verify_all(&dev);
    }
}

fn rlhf(args: &[&str]) -> (bool, String) {
    let bin = std::env::var("RLHF_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_rlhf").to_owned());
    let out = Command::new(bin).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn verify_command_passes_every_golden_file() {
    let files: Vec<String> = golden_files()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let mut args = vec!["verify"];
    args.extend(files.iter().map(String::as_str));
    let (ok, out) = rlhf(&args);
    assert!(ok, "{out}");
    assert!(out.contains("PASS dpo_sigmoid.safetensors loss"), "{out}");
    assert!(out.contains("0 files skipped"), "{out}");
    assert!(!out.contains("FAIL"), "{out}");
}

#[test]
fn verify_command_fails_on_a_wrong_value() {
    // Copy a golden file with its loss changed by 1%: verify must report FAIL and exit non-zero.
    let src = golden_dir().join("dpo_sigmoid.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut data = view.data().to_vec();
        if name == "loss" {
            let v = f32::from_le_bytes(data[..4].try_into().unwrap()) * 1.01;
            data[..4].copy_from_slice(&v.to_le_bytes());
        }
        tensors.push((name, data, view.shape().to_vec()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    let meta: HashMap<String, String> = header.metadata().clone().unwrap();
    let out_path =
        std::env::temp_dir().join(format!("rlhf-tampered-{}.safetensors", std::process::id()));
    safetensors::serialize_to_file(views, Some(meta), &out_path).unwrap();
    let (ok, out) = rlhf(&["verify", out_path.to_str().unwrap()]);
    std::fs::remove_file(&out_path).ok();
    assert!(!ok, "{out}");
    assert!(out.contains("FAIL") && out.contains(" loss "), "{out}");
    assert!(
        out.contains("PASS") && out.contains("grad_policy_logps"),
        "{out}"
    );
}

#[test]
fn verify_command_names_a_missing_file() {
    let (ok, out) = rlhf(&["verify", "/nonexistent/case.safetensors"]);
    assert!(!ok);
    assert!(out.contains("/nonexistent/case.safetensors"), "{out}");
}
