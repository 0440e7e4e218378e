//! The test support itself must be able to fail: comparisons catch NaN and wrong values, the
//! finite-difference check catches a wrong gradient, the golden reader reads metadata.

use rlhf_kernels::device::{DType, Device, Tensor};
use rlhf_kernels::golden::Golden;
use rlhf_kernels::ops::matmul::{gemm_ref, matmul, Trans};
use rlhf_kernels::testing::{compare, fd_check, golden_dir, rel_l2, Rng};

#[test]
fn compare_rejects_nan_and_names_the_element() {
    let want = [1.0, 2.0, 3.0];
    assert!(compare("ok", &[1.0, 2.0, 3.0], &want, 0.0, 0.0).is_ok());
    let err = compare("nan", &[1.0, f32::NAN, 3.0], &want, 1.0, 1.0).unwrap_err();
    assert!(err.contains("[1]"), "{err}");
    let err = compare("off", &[1.0, 2.0, 3.5], &want, 1e-3, 1e-3).unwrap_err();
    assert!(err.contains("[2]") && err.contains("1 of 3"), "{err}");
    assert!(rel_l2(&[f32::INFINITY], &[1.0]).is_nan());
}

#[test]
fn fd_check_catches_a_wrong_gradient() {
    let f = |x: &[f64]| x[0] * x[0] + 3.0 * x[1];
    let x = [0.7, -1.2];
    assert!(fd_check("right", f, &x, &[1.4, 3.0], 1e-6, 1e-7).is_ok());
    assert!(fd_check("wrong", f, &x, &[1.4, 3.001], 1e-6, 1e-7).is_err());
}

#[test]
fn golden_reader_reads_tensors_and_metadata() {
    let g = Golden::open(golden_dir().join("dpo_sigmoid.safetensors")).unwrap();
    assert_eq!(g.meta("family").unwrap(), "dpo");
    assert_eq!(g.meta_f64("beta").unwrap(), 0.1);
    let lp = g.tensor("policy_logps").unwrap();
    assert_eq!(lp.shape, vec![10, 17]);
    assert_eq!(lp.data.len(), 170);
    assert!(lp.data.iter().all(|v| v.is_finite()));
    let err = g.tensor("nope").err().unwrap().to_string();
    assert!(
        err.contains("dpo_sigmoid.safetensors") && err.contains("nope"),
        "{err}"
    );
}

#[test]
fn golden_reader_rejects_a_non_safetensors_file() {
    let path = std::env::temp_dir().join(format!(
        "rlhf-not-golden-{}.safetensors",
        std::process::id()
    ));
    std::fs::write(&path, b"definitely not safetensors").unwrap();
    let err = Golden::open(&path).err().unwrap().to_string();
    std::fs::remove_file(&path).ok();
    assert!(err.contains("not a safetensors file"), "{err}");
}

#[test]
fn tensor_round_trips_and_checks_lengths() {
    let v = vec![1.5f32, -2.25, 3.0, 0.1];
    let t = Tensor::from_f32_as(&[2, 2], &v, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(t.dtype(), DType::BF16);
    let back = t.to_f32_vec().unwrap();
    assert_eq!(&back[..3], &v[..3]);
    assert!((back[3] - 0.1).abs() < 1e-3 && back[3] != 0.1);
    let err = Tensor::from_f32(&[3, 2], v, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("4 values for shape [3, 2]"), "{err}");
}

#[test]
fn cpu_gemm_matches_naive_loops_for_every_transpose() {
    let mut rng = Rng::new(7);
    let (m, n, k) = (5, 7, 3);
    let a = rng.normal_vec(m * k, 1.0);
    let b = rng.normal_vec(k * n, 1.0);
    let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect(); // [k, m]
    let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect(); // [n, k]
    let mut want = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            want[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    for (av, ta, ashape) in [(&a, Trans::N, [m, k]), (&at, Trans::T, [k, m])] {
        for (bv, tb, bshape) in [(&b, Trans::N, [k, n]), (&bt, Trans::T, [n, k])] {
            let mut c = vec![f32::NAN; m * n];
            gemm_ref(&mut c, av, ta, bv, tb, m, n, k, 1.0, 0.0);
            rlhf_kernels::testing::assert_close(&format!("{ta:?}{tb:?}"), &c, &want, 1e-5, 1e-5);
            let ct = matmul(
                &Tensor::from_f32(&ashape, av.clone(), &Device::Cpu).unwrap(),
                ta,
                &Tensor::from_f32(&bshape, bv.clone(), &Device::Cpu).unwrap(),
                tb,
            )
            .unwrap();
            rlhf_kernels::testing::assert_close(
                "matmul",
                &ct.to_f32_vec().unwrap(),
                &want,
                1e-5,
                1e-5,
            );
        }
    }
}

/// The CPU GEMM's three routes (dot products for a few rows against a `[n, k]` weight, one thread
/// or several; the library with swapped operands for m < n; the library as called) against f64
/// loops, with alpha and beta: beta = 0 must ignore a NaN in c, beta = 1 must add to it.
#[test]
fn cpu_gemm_routes_match_f64_loops() {
    let mut rng = Rng::new(rlhf_kernels::testing::fresh_seed(
        "cpu_gemm_routes_match_f64_loops",
    ));
    // (1, 1000, 600) and (3, 700, 601) split over threads; (9, 40, 13) and (40, 9, 13) take the
    // library with and without the swap.
    let shapes = [
        (1, 7, 5),
        (4, 33, 17),
        (1, 1000, 600),
        (3, 700, 601),
        (5, 40, 13),
        (9, 40, 13),
        (40, 9, 13),
    ];
    for (m, n, k) in shapes {
        let a = rng.normal_vec(m * k, 1.0);
        let b = rng.normal_vec(n * k, 1.0); // [n, k]: used transposed
        let c0 = rng.normal_vec(m * n, 1.0);
        let (alpha, beta) = (0.75f32, 1.0f32);
        let exact = |i: usize, j: usize| -> f64 {
            (0..k)
                .map(|p| a[i * k + p] as f64 * b[j * k + p] as f64)
                .sum()
        };
        let mut want = vec![0.0f32; m * n];
        let mut want_acc = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (alpha as f64 * exact(i, j)) as f32;
                want_acc[i * n + j] =
                    (alpha as f64 * exact(i, j) + beta as f64 * c0[i * n + j] as f64) as f32;
            }
        }
        let tol = 1e-5 * (k as f64).sqrt();
        let mut c = vec![f32::NAN; m * n];
        gemm_ref(&mut c, &a, Trans::N, &b, Trans::T, m, n, k, alpha, 0.0);
        rlhf_kernels::testing::assert_close(&format!("m{m} n{n} k{k} beta 0"), &c, &want, tol, tol);
        let mut c = c0.clone();
        gemm_ref(&mut c, &a, Trans::N, &b, Trans::T, m, n, k, alpha, beta);
        rlhf_kernels::testing::assert_close(
            &format!("m{m} n{n} k{k} beta 1"),
            &c,
            &want_acc,
            tol,
            tol,
        );
    }
}

#[test]
fn cuda_choice_without_a_gpu_is_a_clear_error_not_a_panic() {
    if rlhf_kernels::device::cuda::unavailable_reason().is_none() {
        println!("skipped: a CUDA device is present");
        return;
    }
    let err = Device::from_choice(rlhf_kernels::DeviceChoice::Cuda)
        .err()
        .unwrap()
        .to_string();
    assert!(err.starts_with("no CUDA device"), "{err}");
    assert!(!Device::from_choice(rlhf_kernels::DeviceChoice::Auto)
        .unwrap()
        .is_cuda());
}

/// ptxas's report for every embedded kernel: no spills and no stack frame on any architecture (a
/// register array indexed at run time, or too many live values, shows up here before it shows up
/// as a slow kernel), and no wgmma serialised (ptxas's C7514: each one waits for the last).
#[test]
fn every_kernel_compiles_without_spills_stack_or_serialised_wgmma() {
    use rlhf_kernels::device::kernels::{KERNEL_IMAGES, KERNEL_RESOURCES};
    if KERNEL_IMAGES.is_empty() {
        assert!(
            std::env::var("RLHF_REQUIRE_KERNELS").as_deref() != Ok("1"),
            "RLHF_REQUIRE_KERNELS=1 but this build embedded no kernels"
        );
        println!("skipped: this build has no kernels (no nvcc)");
        return;
    }
    assert!(
        KERNEL_RESOURCES.len() >= 2 * KERNEL_IMAGES.len(),
        "ptxas's report is missing: {} entries for {} families",
        KERNEL_RESOURCES.len(),
        KERNEL_IMAGES.len()
    );
    let bad: Vec<String> = KERNEL_RESOURCES
        .iter()
        .filter(|r| r.spill_stores + r.spill_loads + r.stack_bytes > 0 || r.wgmma_serialized)
        .map(|r| {
            format!(
                "{}/{} {}: stack {} B, spill stores {} B, loads {} B, wgmma serialised: {}",
                r.family,
                r.kernel,
                r.arch,
                r.stack_bytes,
                r.spill_stores,
                r.spill_loads,
                r.wgmma_serialized
            )
        })
        .collect();
    assert!(
        bad.is_empty(),
        "kernels with spills, a stack frame or serialised wgmma:\n{}",
        bad.join("\n")
    );
}
