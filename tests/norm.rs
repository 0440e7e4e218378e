//! RMSNorm: the CPU reference against finite differences, the Tensor API on the CPU, and the CUDA
//! kernels against the CPU reference on random shapes; the same for the residual variants
//! (`add_rms_norm_fwd`, `rms_norm_bwd_add`).

use rlhf_kernels::cuda_test;
use rlhf_kernels::device::{DType, Device, Tensor};
use rlhf_kernels::ops::norm::{
    add_rms_norm_fwd, rms_norm_bwd, rms_norm_bwd_add, rms_norm_bwd_ref, rms_norm_fwd,
    rms_norm_fwd_ref,
};
use rlhf_kernels::testing::{
    assert_close, check_against_exact, fd_check, fresh_seed, poison_outputs, round_bf16, Rng,
};

/// Loss L = sum(y * g) for a fixed random g, so dL/dy = g.
fn loss_f64(x: &[f64], w: &[f64], g: &[f64], cols: usize, eps: f64) -> f64 {
    let rows = x.len() / cols;
    let (mut y, mut rstd) = (vec![0.0; x.len()], vec![0.0; rows]);
    rms_norm_fwd_ref(&mut y, &mut rstd, x, w, cols, eps);
    y.iter().zip(g).map(|(a, b)| a * b).sum()
}

#[test]
fn cpu_backward_matches_finite_differences() {
    let mut rng = Rng::new(fresh_seed("cpu_backward_matches_finite_differences"));
    for &(rows, cols) in &[(1, 1), (3, 7), (5, 64), (2, 129)] {
        let to64 = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
        let x = to64(rng.normal_vec(rows * cols, 1.0));
        let w = to64(rng.uniform_vec(cols, 0.5, 1.5));
        let g = to64(rng.normal_vec(rows * cols, 1.0));
        let eps = 1e-5;
        let (mut y, mut rstd) = (vec![0.0; rows * cols], vec![0.0; rows]);
        rms_norm_fwd_ref(&mut y, &mut rstd, &x, &w, cols, eps);
        let mut dx = vec![f64::NAN; rows * cols];
        let mut dw = vec![0.0; cols];
        rms_norm_bwd_ref(&mut dx, &mut dw, &g, &x, &w, &rstd, cols);
        fd_check(
            "dx",
            |xp| loss_f64(xp, &w, &g, cols, eps),
            &x,
            &dx,
            1e-6,
            1e-7,
        )
        .unwrap();
        fd_check(
            "dweight",
            |wp| loss_f64(&x, wp, &g, cols, eps),
            &w,
            &dw,
            1e-6,
            1e-7,
        )
        .unwrap();
    }
}

#[test]
fn cpu_forward_normalises_rows() {
    let mut rng = Rng::new(fresh_seed("cpu_forward_normalises_rows"));
    let (rows, cols) = (4, 33);
    let x = rng.normal_vec(rows * cols, 3.0);
    let ones = vec![1.0f32; cols];
    let out = rms_norm_fwd(
        &Tensor::from_f32(&[rows, cols], x.clone(), &Device::Cpu).unwrap(),
        &Tensor::from_f32(&[cols], ones, &Device::Cpu).unwrap(),
        0.0,
    )
    .unwrap();
    let y = out.y.to_f32_vec().unwrap();
    for r in 0..rows {
        let ms: f32 = y[r * cols..(r + 1) * cols]
            .iter()
            .map(|v| v * v)
            .sum::<f32>()
            / cols as f32;
        assert!((ms - 1.0).abs() < 1e-5, "row {r}: mean square {ms}");
    }
}

#[test]
fn cpu_backward_accumulates_into_dweight() {
    let mut rng = Rng::new(fresh_seed("cpu_backward_accumulates_into_dweight"));
    let (rows, cols) = (6, 10);
    let dev = Device::Cpu;
    let x = Tensor::from_f32(&[rows, cols], rng.normal_vec(rows * cols, 1.0), &dev).unwrap();
    let w = Tensor::from_f32(&[cols], rng.uniform_vec(cols, 0.5, 1.5), &dev).unwrap();
    let dy = Tensor::from_f32(&[rows, cols], rng.normal_vec(rows * cols, 1.0), &dev).unwrap();
    let out = rms_norm_fwd(&x, &w, 1e-6).unwrap();
    let mut once = Tensor::zeros(&[cols], DType::F32, &dev).unwrap();
    rms_norm_bwd(&dy, &x, &w, &out.rstd, &mut once).unwrap();
    let mut twice = Tensor::zeros(&[cols], DType::F32, &dev).unwrap();
    rms_norm_bwd(&dy, &x, &w, &out.rstd, &mut twice).unwrap();
    rms_norm_bwd(&dy, &x, &w, &out.rstd, &mut twice).unwrap();
    let doubled: Vec<f32> = once.to_f32_vec().unwrap().iter().map(|v| 2.0 * v).collect();
    assert_close(
        "dweight accumulated twice",
        &twice.to_f32_vec().unwrap(),
        &doubled,
        1e-6,
        1e-6,
    );
}

#[test]
fn shape_errors_name_the_tensor() {
    let dev = Device::Cpu;
    let x = Tensor::from_f32(&[2, 4], vec![1.0; 8], &dev).unwrap();
    let w = Tensor::from_f32(&[3], vec![1.0; 3], &dev).unwrap();
    let err = rms_norm_fwd(&x, &w, 1e-6)
        .err()
        .expect("mismatched weight must fail")
        .to_string();
    assert!(err.contains("weight") && err.contains("[3]"), "{err}");
}

/// CUDA against the CPU reference for one shape and dtype; returns nothing, panics on a mismatch.
fn check_cuda(dev: &Device, rng: &mut Rng, rows: usize, cols: usize, dtype: DType) {
    let cpu = Device::Cpu;
    let scale = rng.uniform(0.1, 10.0);
    // Inputs are rounded to the storage dtype first, so both paths see identical values.
    let round = |v: Vec<f32>| {
        if dtype == DType::BF16 {
            round_bf16(&v)
        } else {
            v
        }
    };
    let x = round(rng.normal_vec(rows * cols, scale));
    let w = round(rng.uniform_vec(cols, 0.5, 1.5));
    let dy = round(rng.normal_vec(rows * cols, 1.0));
    let dw0 = rng.normal_vec(cols, 1.0);
    let on = |d: &Device, shape: &[usize], v: &[f32], dt: DType| {
        Tensor::from_f32_as(shape, v, dt, d).unwrap()
    };

    let ref_out = rms_norm_fwd(
        &on(&cpu, &[rows, cols], &x, DType::F32),
        &on(&cpu, &[cols], &w, DType::F32),
        1e-5,
    )
    .unwrap();
    let mut ref_dw = on(&cpu, &[cols], &dw0, DType::F32);
    let ref_dx = rms_norm_bwd(
        &on(&cpu, &[rows, cols], &dy, DType::F32),
        &on(&cpu, &[rows, cols], &x, DType::F32),
        &on(&cpu, &[cols], &w, DType::F32),
        &ref_out.rstd,
        &mut ref_dw,
    )
    .unwrap();

    let (gx, gw) = (
        on(dev, &[rows, cols], &x, dtype),
        on(dev, &[cols], &w, dtype),
    );
    let out = rms_norm_fwd(&gx, &gw, 1e-5).unwrap();
    let mut dw = on(dev, &[cols], &dw0, DType::F32);
    let dx = rms_norm_bwd(
        &on(dev, &[rows, cols], &dy, dtype),
        &gx,
        &gw,
        &out.rstd,
        &mut dw,
    )
    .unwrap();

    let f64s = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
    let (x64, w64, dy64) = (f64s(&x), f64s(&w), f64s(&dy));
    let (mut y64, mut rstd64) = (vec![0.0; rows * cols], vec![0.0; rows]);
    rms_norm_fwd_ref(&mut y64, &mut rstd64, &x64, &w64, cols, 1e-5);
    let (mut dx64, mut dw64) = (vec![0.0; rows * cols], f64s(&dw0));
    rms_norm_bwd_ref(&mut dx64, &mut dw64, &dy64, &x64, &w64, &rstd64, cols);

    let tag = format!("{rows}x{cols} {}", dtype.name());
    let v = |t: &Tensor| t.to_f32_vec().unwrap();
    check_against_exact(
        "rms_norm_fwd.rstd",
        &tag,
        &v(&out.rstd),
        &v(&ref_out.rstd),
        &rstd64,
        DType::F32,
        0.0,
        1e-5,
    );
    check_against_exact(
        "rms_norm_bwd.dweight",
        &tag,
        &v(&dw),
        &v(&ref_dw),
        &dw64,
        DType::F32,
        1e-4,
        1e-4,
    );
    check_against_exact(
        "rms_norm_fwd.y",
        &tag,
        &v(&out.y),
        &v(&ref_out.y),
        &y64,
        dtype,
        1e-5,
        1e-5,
    );
    check_against_exact(
        "rms_norm_bwd.dx",
        &tag,
        &v(&dx),
        &v(&ref_dx),
        &dx64,
        dtype,
        1e-5,
        1e-4,
    );
}

cuda_test! {
    fn cuda_matches_cpu_on_random_shapes(dev) {
        let mut rng = Rng::new(fresh_seed("cuda_matches_cpu_on_random_shapes"));
        // (2000, 4096) gives each backward block of the vector path about 16 rows in f32 (128
        // partial rows) and 8 in bf16 (256), unevenly; more rows only cost emulator time.
        for &(rows, cols) in &[(1, 1), (37, 576), (7, 1000), (3, 4097), (1000, 2048), (2000, 4096), (5, 12288)] {
            for dtype in [DType::F32, DType::BF16] {
                check_cuda(&dev, &mut rng, rows, cols, dtype);
            }
        }
    }
}

cuda_test! {
    fn cuda_backward_is_deterministic(dev) {
        let mut rng = Rng::new(fresh_seed("cuda_backward_is_deterministic"));
        let (rows, cols) = (3000, 1024);
        let x = Tensor::from_f32_as(&[rows, cols], &rng.normal_vec(rows * cols, 1.0), DType::BF16, &dev).unwrap();
        let w = Tensor::from_f32_as(&[cols], &rng.uniform_vec(cols, 0.5, 1.5), DType::BF16, &dev).unwrap();
        let dy = Tensor::from_f32_as(&[rows, cols], &rng.normal_vec(rows * cols, 1.0), DType::BF16, &dev).unwrap();
        let out = rms_norm_fwd(&x, &w, 1e-5).unwrap();
        let run = || {
            let mut dw = Tensor::zeros(&[cols], DType::F32, &dev).unwrap();
            let dx = rms_norm_bwd(&dy, &x, &w, &out.rstd, &mut dw).unwrap();
            (dx.to_f32_vec().unwrap(), dw.to_f32_vec().unwrap())
        };
        let (a, b) = (run(), run());
        assert!(a.0.iter().zip(&b.0).all(|(p, q)| p.to_bits() == q.to_bits()), "dx differs between runs");
        assert!(a.1.iter().zip(&b.1).all(|(p, q)| p.to_bits() == q.to_bits()), "dweight differs between runs");
    }
}

#[test]
fn poisoned_cpu_outputs_are_overwritten() {
    poison_outputs();
    let mut rng = Rng::new(fresh_seed("poisoned_cpu_outputs_are_overwritten"));
    let x = Tensor::from_f32(&[3, 5], rng.normal_vec(15, 1.0), &Device::Cpu).unwrap();
    let w = Tensor::from_f32(&[5], rng.uniform_vec(5, 0.5, 1.5), &Device::Cpu).unwrap();
    let out = rms_norm_fwd(&x, &w, 1e-6).unwrap();
    assert!(out.y.to_f32_vec().unwrap().iter().all(|v| v.is_finite()));
    assert!(out.rstd.to_f32_vec().unwrap().iter().all(|v| v.is_finite()));
}

/// L = sum(rmsnorm(x + d) * g) + sum((x + d) * g2): the residual forward's two outputs, each
/// weighted, so dL/dx is the residual backward's dx (dy = g, dres = g2).
fn residual_loss_f64(x: &[f64], d: &[f64], w: &[f64], g: &[f64], g2: &[f64], cols: usize) -> f64 {
    let h: Vec<f64> = x.iter().zip(d).map(|(a, b)| a + b).collect();
    loss_f64(&h, w, g, cols, 1e-5) + h.iter().zip(g2).map(|(a, b)| a * b).sum::<f64>()
}

#[test]
fn cpu_residual_variants_match_finite_differences_and_the_composition() {
    let mut rng = Rng::new(fresh_seed(
        "cpu_residual_variants_match_finite_differences_and_the_composition",
    ));
    let cpu = Device::Cpu;
    for &(rows, cols) in &[(1, 1), (3, 7), (4, 129)] {
        let n = rows * cols;
        let (x, d, w) = (
            rng.normal_vec(n, 1.0),
            rng.normal_vec(n, 1.0),
            rng.uniform_vec(cols, 0.5, 1.5),
        );
        let (g, g2) = (rng.normal_vec(n, 1.0), rng.normal_vec(n, 1.0));
        let t = |v: &[f32], shape: &[usize]| Tensor::from_f32(shape, v.to_vec(), &cpu).unwrap();
        let fused = add_rms_norm_fwd(
            &t(&x, &[rows, cols]),
            &t(&d, &[rows, cols]),
            &t(&w, &[cols]),
            1e-5,
        )
        .unwrap();
        let sum: Vec<f32> = x.iter().zip(&d).map(|(a, b)| a + b).collect();
        let plain = rms_norm_fwd(&t(&sum, &[rows, cols]), &t(&w, &[cols]), 1e-5).unwrap();
        let v = |t: &Tensor| t.to_f32_vec().unwrap();
        assert_eq!(v(&fused.h), sum, "h = x + delta");
        assert_eq!(v(&fused.norm.y), v(&plain.y), "the norm of the sum");
        assert_eq!(v(&fused.norm.rstd), v(&plain.rstd), "its rstd");

        let (mut dw_fused, mut dw_plain) =
            (t(&vec![0.0; cols], &[cols]), t(&vec![0.0; cols], &[cols]));
        let h = t(&sum, &[rows, cols]);
        let dx = rms_norm_bwd_add(
            &t(&g, &[rows, cols]),
            &h,
            &t(&w, &[cols]),
            &fused.norm.rstd,
            &mut dw_fused,
            &t(&g2, &[rows, cols]),
        )
        .unwrap();
        let dx_plain = rms_norm_bwd(
            &t(&g, &[rows, cols]),
            &h,
            &t(&w, &[cols]),
            &plain.rstd,
            &mut dw_plain,
        )
        .unwrap();
        let want: Vec<f32> = v(&dx_plain).iter().zip(&g2).map(|(a, b)| a + b).collect();
        assert_eq!(v(&dx), want, "dx + dres");
        assert_eq!(v(&dw_fused), v(&dw_plain), "dweight");

        let to64 = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        let (x64, d64, w64, g64, g264) = (to64(&x), to64(&d), to64(&w), to64(&g), to64(&g2));
        fd_check(
            "dx",
            |xp| residual_loss_f64(xp, &d64, &w64, &g64, &g264, cols),
            &x64,
            &to64(&v(&dx)),
            1e-6,
            1e-4,
        )
        .unwrap();
    }
}

#[test]
fn residual_variants_reject_mismatched_deltas() {
    let cpu = Device::Cpu;
    let x = Tensor::from_f32(&[2, 3], vec![1.0; 6], &cpu).unwrap();
    let w = Tensor::from_f32(&[3], vec![1.0; 3], &cpu).unwrap();
    let bad = Tensor::from_f32(&[3, 2], vec![1.0; 6], &cpu).unwrap();
    let err = add_rms_norm_fwd(&x, &bad, &w, 1e-5)
        .err()
        .expect("a shape error")
        .to_string();
    assert!(err.contains("delta"), "{err}");
    let out = rms_norm_fwd(&x, &w, 1e-5).unwrap();
    let mut dw = Tensor::from_f32(&[3], vec![0.0; 3], &cpu).unwrap();
    let err = rms_norm_bwd_add(&x, &x, &w, &out.rstd, &mut dw, &bad)
        .err()
        .expect("a shape error")
        .to_string();
    assert!(err.contains("dres"), "{err}");
}

/// The residual variants on CUDA against the exact values from the same rounded inputs: h is x + d
/// rounded to the dtype (as both devices store it) and the norm and its backward run on that h.
fn check_cuda_residual(dev: &Device, rng: &mut Rng, rows: usize, cols: usize, dtype: DType) {
    let n = rows * cols;
    let round = |v: Vec<f32>| {
        if dtype == DType::BF16 {
            round_bf16(&v)
        } else {
            v
        }
    };
    let x = round(rng.normal_vec(n, 2.0));
    let d = round(rng.normal_vec(n, 1.0));
    let w = round(rng.uniform_vec(cols, 0.5, 1.5));
    let dy = round(rng.normal_vec(n, 1.0));
    let dres = round(rng.normal_vec(n, 1.0));
    let h = round(x.iter().zip(&d).map(|(a, b)| a + b).collect());
    let on = |dv: &Device, shape: &[usize], v: &[f32], dt: DType| {
        Tensor::from_f32_as(shape, v, dt, dv).unwrap()
    };

    let cpu = Device::Cpu;
    let plain = rms_norm_fwd(
        &on(&cpu, &[rows, cols], &h, DType::F32),
        &on(&cpu, &[cols], &w, DType::F32),
        1e-5,
    )
    .unwrap();
    let mut plain_dw = on(&cpu, &[cols], &vec![0.0; cols], DType::F32);
    let plain_dx = rms_norm_bwd_add(
        &on(&cpu, &[rows, cols], &dy, DType::F32),
        &on(&cpu, &[rows, cols], &h, DType::F32),
        &on(&cpu, &[cols], &w, DType::F32),
        &plain.rstd,
        &mut plain_dw,
        &on(&cpu, &[rows, cols], &dres, DType::F32),
    )
    .unwrap();

    let gw = on(dev, &[cols], &w, dtype);
    let out = add_rms_norm_fwd(
        &on(dev, &[rows, cols], &x, dtype),
        &on(dev, &[rows, cols], &d, dtype),
        &gw,
        1e-5,
    )
    .unwrap();
    let mut dw = on(dev, &[cols], &vec![0.0; cols], DType::F32);
    let dx = rms_norm_bwd_add(
        &on(dev, &[rows, cols], &dy, dtype),
        &out.h,
        &gw,
        &out.norm.rstd,
        &mut dw,
        &on(dev, &[rows, cols], &dres, dtype),
    )
    .unwrap();

    let f64s = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
    let (h64, w64, dy64) = (f64s(&h), f64s(&w), f64s(&dy));
    let (mut y64, mut rstd64) = (vec![0.0; n], vec![0.0; rows]);
    rms_norm_fwd_ref(&mut y64, &mut rstd64, &h64, &w64, cols, 1e-5);
    let (mut dx64, mut dw64) = (vec![0.0; n], vec![0.0; cols]);
    rms_norm_bwd_ref(&mut dx64, &mut dw64, &dy64, &h64, &w64, &rstd64, cols);
    for (a, b) in dx64.iter_mut().zip(&dres) {
        *a += *b as f64;
    }

    let tag = format!("{rows}x{cols} {}", dtype.name());
    let v = |t: &Tensor| t.to_f32_vec().unwrap();
    assert_eq!(
        v(&out.h),
        h,
        "add_rms_norm_fwd.h {tag}: x + delta as the dtype rounds it"
    );
    check_against_exact(
        "add_rms_norm_fwd.rstd",
        &tag,
        &v(&out.norm.rstd),
        &v(&plain.rstd),
        &rstd64,
        DType::F32,
        0.0,
        1e-5,
    );
    check_against_exact(
        "add_rms_norm_fwd.y",
        &tag,
        &v(&out.norm.y),
        &v(&plain.y),
        &y64,
        dtype,
        1e-5,
        1e-5,
    );
    check_against_exact(
        "rms_norm_bwd_add.dx",
        &tag,
        &v(&dx),
        &v(&plain_dx),
        &dx64,
        dtype,
        1e-5,
        1e-4,
    );
    check_against_exact(
        "rms_norm_bwd_add.dweight",
        &tag,
        &v(&dw),
        &v(&plain_dw),
        &dw64,
        DType::F32,
        1e-4,
        1e-4,
    );
}

cuda_test! {
    fn cuda_residual_variants_match_cpu(dev) {
        poison_outputs();
        let mut rng = Rng::new(fresh_seed("cuda_residual_variants_match_cpu"));
        for &(rows, cols) in &[(1, 1), (37, 576), (7, 1000), (3, 4097), (1000, 2048), (5, 12288)] {
            for dtype in [DType::F32, DType::BF16] {
                check_cuda_residual(&dev, &mut rng, rows, cols, dtype);
            }
        }
    }
}
