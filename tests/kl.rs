//! KL: the CPU reference against finite differences and the definition, and the CUDA kernels
//! against the CPU reference.

use rlhf_kernels::cuda_test;
use rlhf_kernels::device::{DType, Device, Tensor};
use rlhf_kernels::ops::kl::{
    kl_full_bwd, kl_full_bwd_ref, kl_full_fwd, kl_full_fwd_ref, kl_sampled_bwd, kl_sampled_fwd,
    kl_sampled_ref, KlEstimator,
};
use rlhf_kernels::testing::{
    check_against_exact, check_output, fd_check, fresh_seed, report, round_bf16, Rng,
};

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
fn full_kl_backward_matches_finite_differences() {
    let mut rng = Rng::new(fresh_seed("full_kl_backward_matches_finite_differences"));
    let (n, vocab) = (3, 17);
    let x = to64(&rng.normal_vec(n * vocab, 1.5));
    let y = to64(&rng.normal_vec(n * vocab, 1.5));
    let g = to64(&rng.normal_vec(n, 1.0));
    let loss = |xp: &[f64]| {
        let (mut k, mut a, mut b) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        kl_full_fwd_ref(&mut k, &mut a, &mut b, xp, &y, vocab);
        k.iter().zip(&g).map(|(k, g)| k * g).sum::<f64>()
    };
    let (mut k, mut lp, mut lq) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    kl_full_fwd_ref(&mut k, &mut lp, &mut lq, &x, &y, vocab);
    assert!(
        k.iter().all(|&v| v > 0.0),
        "KL of different distributions is positive"
    );
    let mut dx = vec![f64::NAN; n * vocab];
    kl_full_bwd_ref(&mut dx, &x, &y, &lp, &lq, &k, &g, vocab);
    fd_check("dpolicy", loss, &x, &dx, 1e-6, 1e-7).unwrap();
    // KL(p‖p) = 0.
    let (mut k0, mut a, mut b) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    kl_full_fwd_ref(&mut k0, &mut a, &mut b, &x, &x, vocab);
    assert!(k0.iter().all(|v| v.abs() < 1e-12), "{k0:?}");
}

#[test]
fn sampled_estimators_match_their_definitions_and_derivatives() {
    let mut rng = Rng::new(fresh_seed(
        "sampled_estimators_match_their_definitions_and_derivatives",
    ));
    for _ in 0..50 {
        let (p, r) = (rng.uniform(-5.0, 0.0) as f64, rng.uniform(-5.0, 0.0) as f64);
        let logr = r - p;
        for (est, want) in [
            (KlEstimator::K1, -logr),
            (KlEstimator::K2, 0.5 * logr * logr),
            (KlEstimator::K3, logr.exp() - 1.0 - logr),
        ] {
            let (k, d) = kl_sampled_ref(p, r, est);
            assert!((k - want).abs() < 1e-12, "{est:?}");
            let h = 1e-6;
            let fd =
                (kl_sampled_ref(p + h, r, est).0 - kl_sampled_ref(p - h, r, est).0) / (2.0 * h);
            assert!((fd - d).abs() < 1e-6, "{est:?}: fd {fd} vs {d}");
        }
        assert!(kl_sampled_ref(p, r, KlEstimator::K3).0 >= 0.0);
    }
    let t = |v: Vec<f32>| Tensor::from_f32(&[v.len()], v, &Device::Cpu).unwrap();
    let k = kl_sampled_fwd(&t(vec![-1.0, -2.0]), &t(vec![-1.5, -2.0]), KlEstimator::K1).unwrap();
    assert_eq!(k.to_f32_vec().unwrap(), vec![0.5, 0.0]);
    assert!(kl_sampled_fwd(&t(vec![-1.0]), &t(vec![-1.5, -2.0]), KlEstimator::K1).is_err());
}

/// With `mask_every` > 0 every such entry (from the second) is -inf in both rows.
fn check_cuda(
    dev: &Device,
    rng: &mut Rng,
    n: usize,
    vocab: usize,
    dtype: DType,
    mask_every: usize,
) {
    let round = |v: Vec<f32>| {
        if dtype == DType::BF16 {
            round_bf16(&v)
        } else {
            v
        }
    };
    let masked = |i: usize| mask_every > 0 && i % vocab % mask_every == 1;
    let x: Vec<f32> = round(rng.normal_vec(n * vocab, 2.0))
        .into_iter()
        .enumerate()
        .map(|(i, v)| if masked(i) { f32::NEG_INFINITY } else { v })
        .collect();
    let y: Vec<f32> = round(x.iter().map(|&v| v + rng.normal() * 0.5).collect());
    let g = rng.normal_vec(n, 1.0);
    let run = |d: &Device, dt: DType| {
        let (xt, yt) = (
            Tensor::from_f32_as(&[n, vocab], &x, dt, d).unwrap(),
            Tensor::from_f32_as(&[n, vocab], &y, dt, d).unwrap(),
        );
        let out = kl_full_fwd(&xt, &yt).unwrap();
        let dx = kl_full_bwd(
            &xt,
            &yt,
            &out,
            &Tensor::from_f32(&[n], g.clone(), d).unwrap(),
        )
        .unwrap();
        (out.kl.to_f32_vec().unwrap(), dx.to_f32_vec().unwrap())
    };
    let (plain_kl, plain_dx) = run(&Device::Cpu, DType::F32);
    let (got_kl, got_dx) = run(dev, dtype);
    let (x64, y64, g64) = (to64(&x), to64(&y), to64(&g));
    let (mut kl, mut lp, mut lq) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    kl_full_fwd_ref(&mut kl, &mut lp, &mut lq, &x64, &y64, vocab);
    let mut dx = vec![0.0; n * vocab];
    kl_full_bwd_ref(&mut dx, &x64, &y64, &lp, &lq, &kl, &g64, vocab);
    let case = format!("{n}x{vocab} {} mask {mask_every}", dtype.name());
    check_against_exact(
        "kl_full_fwd",
        &case,
        &got_kl,
        &plain_kl,
        &kl,
        DType::F32,
        1e-5,
        1e-4,
    );
    if dtype == DType::F32 {
        // dx = g·p·(x − lse_p − y + lse_q − kl): the bracket cancels terms of a few units, so a
        // kernel whose lse differs from the plain loop's by its last bit (another summation order)
        // is off by g·p·ε·(those terms), which can pass twice the plain loop's worst element. Each
        // element is allowed 8 roundings of the terms it cancels.
        let eps = f32::EPSILON as f64;
        let mut max_err = 0.0f64;
        for r in 0..n {
            for v in 0..vocab {
                let i = r * vocab + v;
                if dx[i] == 0.0 && got_dx[i] == 0.0 {
                    continue;
                }
                let p = (x64[i] - lp[r]).exp();
                let terms = x64[i].abs() + lp[r].abs() + y64[i].abs() + lq[r].abs() + kl[r].abs();
                let allowed = 1e-7 + 1e-4 * dx[i].abs() + 8.0 * eps * g64[r].abs() * p * terms;
                let err = (got_dx[i] as f64 - dx[i]).abs();
                max_err = max_err.max(err);
                assert!(
                    err <= allowed,
                    "kl_full_bwd {case}: [{i}] got {:e}, exact {:e}, error {err:e} over {allowed:e}",
                    got_dx[i],
                    dx[i]
                );
            }
        }
        report(
            "kl_full_bwd",
            &case,
            max_err,
            "1e-7 + 1e-4|exact| + 8 eps g p |terms|",
        );
        return;
    }
    check_against_exact(
        "kl_full_bwd",
        &case,
        &got_dx,
        &plain_dx,
        &dx,
        dtype,
        1e-7,
        1e-4,
    );
}

cuda_test! {
    fn cuda_matches_cpu_on_random_shapes(dev) {
        let mut rng = Rng::new(fresh_seed("kl cuda_matches_cpu_on_random_shapes"));
        for &(n, vocab, mask_every) in &[(1, 1, 0), (37, 50_257, 0), (16, 128_256, 0), (200, 1000, 0), (37, 50_257, 7), (8, 49_152, 5)] {
            for dtype in [DType::F32, DType::BF16] {
                check_cuda(&dev, &mut rng, n, vocab, dtype, mask_every);
            }
        }
        for n in [1usize, 1000, 65_537] {
            let p = rng.uniform_vec(n, -6.0, 0.0);
            let r = rng.uniform_vec(n, -6.0, 0.0);
            let g = rng.normal_vec(n, 1.0);
            for est in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
                let run = |d: &Device| {
                    let t = |v: &Vec<f32>| Tensor::from_f32(&[n], v.clone(), d).unwrap();
                    (
                        kl_sampled_fwd(&t(&p), &t(&r), est).unwrap().to_f32_vec().unwrap(),
                        kl_sampled_bwd(&t(&p), &t(&r), &t(&g), est).unwrap().to_f32_vec().unwrap(),
                    )
                };
                let (want, got) = (run(&Device::Cpu), run(&dev));
                check_output("kl_sampled_fwd", &format!("{est:?} n{n}"), &got.0, &want.0, DType::F32, 1e-6, 1e-5);
                check_output("kl_sampled_bwd", &format!("{est:?} n{n}"), &got.1, &want.1, DType::F32, 1e-6, 1e-5);
            }
        }
    }
}

/// Entries masked (-inf) in the policy add nothing to the KL and get a zero gradient, whether or not
/// the reference masks them too; a reference that masks a token the policy allows gives KL = +inf.
#[test]
fn masked_policy_entries_drop_out_of_the_kl() {
    let mut rng = Rng::new(fresh_seed("masked_policy_entries_drop_out_of_the_kl"));
    let vocab = 30;
    let masked = |v: usize| v % 4 == 2;
    let x = to64(&rng.normal_vec(vocab, 1.5));
    let y = to64(&rng.normal_vec(vocab, 1.5));
    let kept =
        |r: &[f64]| -> Vec<f64> { (0..vocab).filter(|&v| !masked(v)).map(|v| r[v]).collect() };
    let mask = |r: &[f64]| -> Vec<f64> {
        (0..vocab)
            .map(|v| if masked(v) { f64::NEG_INFINITY } else { r[v] })
            .collect()
    };
    let run = |xr: &[f64], yr: &[f64]| {
        let n = xr.len();
        let (mut k, mut lp, mut lq) = (vec![0.0], vec![0.0], vec![0.0]);
        kl_full_fwd_ref(&mut k, &mut lp, &mut lq, xr, yr, n);
        let mut dx = vec![f64::NAN; n];
        kl_full_bwd_ref(&mut dx, xr, yr, &lp, &lq, &k, &[0.9], n);
        (k[0], dx)
    };
    let (xk, yk) = (kept(&x), kept(&y));
    let (want, dwant) = run(&xk, &yk);
    // Masked in both rows, or in the policy only (the reference's value there must not matter
    // beyond its normaliser, so compare against the reduced pair with the same normaliser).
    let (both, dboth) = run(&mask(&x), &mask(&y));
    assert!((both - want).abs() < 1e-12, "{both} vs {want}");
    let mut kept_grads = Vec::new();
    for (v, &d) in dboth.iter().enumerate() {
        if masked(v) {
            assert_eq!(d, 0.0, "masked entry {v} gets gradient {d}");
        } else {
            kept_grads.push(d);
        }
    }
    for (a, b) in kept_grads.iter().zip(&dwant) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
    let (policy_only, dpol) = run(&mask(&x), &y);
    assert!(policy_only.is_finite(), "{policy_only}");
    assert!(dpol.iter().all(|d| d.is_finite()));
    let (ref_only, _) = run(&x, &mask(&y));
    assert_eq!(ref_only, f64::INFINITY);
}
