//! logprob: the CPU reference against finite differences, the LM-head-fused form against the plain
//! one, bad input, extreme logits, and the CUDA kernels against the CPU reference.

use rlhf_kernels::cuda_test;
use rlhf_kernels::device::{DType, Device, Tensor};
use rlhf_kernels::ops::logprob::{
    linear_logprob_bwd, linear_logprob_fwd, linear_logprob_scratch_bytes, logprob_bwd,
    logprob_bwd_ref, logprob_fwd, logprob_fwd_ref, vocab_tile, LogprobOut,
};
use rlhf_kernels::testing::{
    assert_close, check_against_exact, fd_check, fresh_seed, poison_outputs, round_bf16, Rng,
};

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// L = Σ g_lp·logp + g_ent·H in f64.
fn loss(x: &[f64], targets: &[i32], g_lp: &[f64], g_ent: &[f64], vocab: usize, scale: f64) -> f64 {
    let n = targets.len();
    let (mut lp, mut lse, mut ent) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    logprob_fwd_ref(&mut lp, &mut lse, &mut ent, x, targets, vocab, scale);
    (0..n).map(|i| g_lp[i] * lp[i] + g_ent[i] * ent[i]).sum()
}

#[test]
fn cpu_backward_matches_finite_differences() {
    let mut rng = Rng::new(fresh_seed("cpu_backward_matches_finite_differences"));
    let (n, vocab) = (4, 13);
    let x = to64(&rng.normal_vec(n * vocab, 2.0));
    let targets = vec![3, -100, 12, 0];
    let (g_lp, g_ent) = (to64(&rng.normal_vec(n, 1.0)), to64(&rng.normal_vec(n, 1.0)));
    for scale in [1.0, 1.0 / 0.7] {
        let (mut lp, mut lse, mut ent) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        logprob_fwd_ref(&mut lp, &mut lse, &mut ent, &x, &targets, vocab, scale);
        assert_eq!(lp[1], 0.0, "an ignored target has logp 0");
        let mut dx = vec![f64::NAN; n * vocab];
        logprob_bwd_ref(
            &mut dx, &x, &targets, &lse, &ent, &g_lp, &g_ent, vocab, scale,
        );
        fd_check(
            "dlogits",
            |xp| loss(xp, &targets, &g_lp, &g_ent, vocab, scale),
            &x,
            &dx,
            1e-6,
            1e-7,
        )
        .unwrap();
    }
}

fn cpu_tensor(shape: &[usize], v: Vec<f32>) -> Tensor {
    Tensor::from_f32(shape, v, &Device::Cpu).unwrap()
}

#[test]
fn cpu_op_handles_logits_near_1e4() {
    let mut rng = Rng::new(fresh_seed("cpu_op_handles_logits_near_1e4"));
    let (n, vocab) = (5, 300);
    let x: Vec<f32> = rng
        .normal_vec(n * vocab, 1.0)
        .iter()
        .map(|v| v * 1e4)
        .collect();
    let targets: Vec<i32> = (0..n).map(|_| rng.below(vocab) as i32).collect();
    let logits = cpu_tensor(&[n, vocab], x.clone());
    let tgt = Tensor::from_i32(&[n], targets.clone(), &Device::Cpu).unwrap();
    let out = logprob_fwd(&logits, &tgt, 1.0).unwrap();
    let g = cpu_tensor(&[n], vec![1.0; n]);
    let dx = logprob_bwd(&logits, &tgt, &out, &g, &g, 1.0).unwrap();
    let (mut lp, mut lse, mut ent) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    logprob_fwd_ref(&mut lp, &mut lse, &mut ent, &to64(&x), &targets, vocab, 1.0);
    let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
    // f32 logits of 1e4 carry ~1e-3 of rounding; logp is exact to that.
    assert_close(
        "logp",
        &out.logp.to_f32_vec().unwrap(),
        &f32s(&lp),
        4e-3,
        1e-6,
    );
    assert_close(
        "lse",
        &out.lse.to_f32_vec().unwrap(),
        &f32s(&lse),
        4e-3,
        1e-6,
    );
    assert!(out
        .entropy
        .to_f32_vec()
        .unwrap()
        .iter()
        .all(|h| h.is_finite() && *h >= -1e-3));
    assert!(dx.to_f32_vec().unwrap().iter().all(|v| v.is_finite()));
}

#[test]
fn bad_targets_and_temperature_are_errors() {
    let logits = cpu_tensor(&[2, 4], vec![0.5; 8]);
    let tgt = Tensor::from_i32(&[2], vec![1, 4], &Device::Cpu).unwrap();
    let err = logprob_fwd(&logits, &tgt, 1.0).err().unwrap().to_string();
    assert!(err.contains("target id 4 at row 1"), "{err}");
    let tgt = Tensor::from_i32(&[2], vec![1, 2], &Device::Cpu).unwrap();
    let err = logprob_fwd(&logits, &tgt, 0.0).err().unwrap().to_string();
    assert!(err.contains("temperature"), "{err}");
    let wrong = Tensor::from_i32(&[3], vec![1, 2, 0], &Device::Cpu).unwrap();
    assert!(logprob_fwd(&logits, &wrong, 1.0).is_err());
}

#[test]
fn fused_tile_memory_does_not_grow_with_vocab() {
    let n = 8192;
    for vocab in [49_152, 128_256, 262_144] {
        let tile_bytes = vocab_tile(n, vocab) * n * 4;
        let logits_bytes = vocab * n * 4;
        assert!(
            tile_bytes * 20 < logits_bytes,
            "V={vocab}: tile {tile_bytes} B vs logits {logits_bytes} B"
        );
        assert_eq!(
            tile_bytes,
            vocab_tile(n, 1 << 20) * n * 4,
            "tile size must not depend on V"
        );
    }
    // The backward's whole scratch (bf16 tile and gradient group) at the shape.
    let scratch = linear_logprob_scratch_bytes(n, 128_256, DType::BF16);
    assert!(
        scratch * 20 < 128_256 * n * 4,
        "scratch {scratch} B is over 5% of f32 logits"
    );
    assert_eq!(
        scratch,
        linear_logprob_scratch_bytes(n, 1 << 20, DType::BF16),
        "scratch must not depend on V"
    );
}

/// The fused op against logits materialised in f64 and the plain reference.
#[test]
fn fused_matches_unfused_on_cpu() {
    poison_outputs();
    let mut rng = Rng::new(fresh_seed("fused_matches_unfused_on_cpu"));
    let (n, d, vocab, temperature) = (70, 16, 301, 0.8f32);
    let scale = 1.0 / temperature as f64;
    let h = rng.normal_vec(n * d, 1.0);
    let w = rng.normal_vec(vocab * d, 0.3);
    let mut targets: Vec<i32> = (0..n).map(|_| rng.below(vocab) as i32).collect();
    targets[5] = -100;
    let (g_lp, g_ent) = (rng.normal_vec(n, 1.0), rng.normal_vec(n, 1.0));
    // f64 composition: z = scale·h·wᵀ, plain reference, then dh = dz·w·scale, dw = dzᵀ·h·scale.
    let (h64, w64) = (to64(&h), to64(&w));
    let mut z = vec![0.0f64; n * vocab];
    for i in 0..n {
        for v in 0..vocab {
            z[i * vocab + v] = scale * (0..d).map(|k| h64[i * d + k] * w64[v * d + k]).sum::<f64>();
        }
    }
    let (mut lp, mut lse, mut ent) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    logprob_fwd_ref(&mut lp, &mut lse, &mut ent, &z, &targets, vocab, 1.0);
    let mut dz = vec![0.0; n * vocab];
    logprob_bwd_ref(
        &mut dz,
        &z,
        &targets,
        &lse,
        &ent,
        &to64(&g_lp),
        &to64(&g_ent),
        vocab,
        1.0,
    );
    let mut dh = vec![0.0f64; n * d];
    let mut dw = vec![0.0f64; vocab * d];
    for i in 0..n {
        for v in 0..vocab {
            for k in 0..d {
                dh[i * d + k] += scale * dz[i * vocab + v] * w64[v * d + k];
                dw[v * d + k] += scale * dz[i * vocab + v] * h64[i * d + k];
            }
        }
    }
    let dev = Device::Cpu;
    let (ht, wt) = (cpu_tensor(&[n, d], h), cpu_tensor(&[vocab, d], w));
    let tgt = Tensor::from_i32(&[n], targets, &dev).unwrap();
    let out = linear_logprob_fwd(&ht, &wt, &tgt, temperature).unwrap();
    let dw0 = rng.normal_vec(vocab * d, 1.0);
    let mut dwt = cpu_tensor(&[vocab, d], dw0.clone());
    let dht = linear_logprob_bwd(
        &ht,
        &wt,
        &tgt,
        &out,
        &cpu_tensor(&[n], g_lp),
        &cpu_tensor(&[n], g_ent),
        temperature,
        &mut dwt,
    )
    .unwrap();
    let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
    assert_close(
        "logp",
        &out.logp.to_f32_vec().unwrap(),
        &f32s(&lp),
        1e-5,
        1e-5,
    );
    assert_close(
        "lse",
        &out.lse.to_f32_vec().unwrap(),
        &f32s(&lse),
        1e-5,
        1e-5,
    );
    assert_close(
        "entropy",
        &out.entropy.to_f32_vec().unwrap(),
        &f32s(&ent),
        1e-5,
        1e-5,
    );
    assert_close(
        "dhidden",
        &dht.to_f32_vec().unwrap(),
        &f32s(&dh),
        1e-5,
        1e-4,
    );
    let want_dw: Vec<f32> = dw
        .iter()
        .zip(&dw0)
        .map(|(a, &b)| (a + b as f64) as f32)
        .collect();
    assert_close(
        "dweight (accumulated)",
        &dwt.to_f32_vec().unwrap(),
        &want_dw,
        1e-5,
        1e-4,
    );
}

/// CUDA against the CPU reference on the same (dtype-rounded) inputs; with `mask_every` > 0 every
/// such entry (from the second) is masked to -inf, targets excepted.
fn check_cuda(
    dev: &Device,
    rng: &mut Rng,
    n: usize,
    vocab: usize,
    dtype: DType,
    scale: f32,
    mask_every: usize,
) {
    let round = |v: Vec<f32>| {
        if dtype == DType::BF16 {
            round_bf16(&v)
        } else {
            v
        }
    };
    let mut x = round(rng.normal_vec(n * vocab, scale));
    let mut targets: Vec<i32> = (0..n).map(|_| rng.below(vocab) as i32).collect();
    if n > 2 {
        targets[1] = -100;
    }
    if mask_every > 0 {
        for (i, v) in x.iter_mut().enumerate() {
            let (row, col) = (i / vocab, i % vocab);
            if col % mask_every == 1 && targets[row] != col as i32 {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    let (g_lp, g_ent) = (rng.normal_vec(n, 1.0), rng.normal_vec(n, 1.0));
    let temperature = 0.9;
    let run = |d: &Device, dt: DType| -> (LogprobOut, Vec<f32>) {
        let logits = Tensor::from_f32_as(&[n, vocab], &x, dt, d).unwrap();
        let tgt = Tensor::from_i32(&[n], targets.clone(), d).unwrap();
        let out = logprob_fwd(&logits, &tgt, temperature).unwrap();
        let gl = Tensor::from_f32(&[n], g_lp.clone(), d).unwrap();
        let ge = Tensor::from_f32(&[n], g_ent.clone(), d).unwrap();
        let dx = logprob_bwd(&logits, &tgt, &out, &gl, &ge, temperature)
            .unwrap()
            .to_f32_vec()
            .unwrap();
        (out, dx)
    };
    let (plain, plain_dx) = run(&Device::Cpu, DType::F32);
    let (got, got_dx) = run(dev, dtype);
    let scale64 = (1.0 / temperature) as f64;
    let x64 = to64(&x);
    let (mut lp, mut lse, mut ent) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    logprob_fwd_ref(&mut lp, &mut lse, &mut ent, &x64, &targets, vocab, scale64);
    let mut dx = vec![0.0; n * vocab];
    logprob_bwd_ref(
        &mut dx,
        &x64,
        &targets,
        &lse,
        &ent,
        &to64(&g_lp),
        &to64(&g_ent),
        vocab,
        scale64,
    );
    let case = format!(
        "{n}x{vocab} {} scale {scale} mask {mask_every}",
        dtype.name()
    );
    let v = |t: &Tensor| t.to_f32_vec().unwrap();
    let tol = 1e-5 * (1.0 + scale as f64 * 10.0);
    for (name, g, p, e) in [
        ("logprob_fwd.logp", &got.logp, &plain.logp, &lp),
        ("logprob_fwd.lse", &got.lse, &plain.lse, &lse),
        ("logprob_fwd.entropy", &got.entropy, &plain.entropy, &ent),
    ] {
        check_against_exact(name, &case, &v(g), &v(p), e, DType::F32, tol, 1e-5);
    }
    check_against_exact(
        "logprob_bwd.dlogits",
        &case,
        &got_dx,
        &plain_dx,
        &dx,
        dtype,
        1e-6,
        1e-4,
    );
}

cuda_test! {
    fn cuda_matches_cpu_on_random_shapes(dev) {
        let mut rng = Rng::new(fresh_seed("logprob cuda_matches_cpu_on_random_shapes"));
        let cases = [
            (1, 1, 1.0, 0),
            (37, 50_257, 2.0, 0),
            (64, 49_152, 1.0, 0),
            (5, 128_256, 3.0, 0),
            (300, 1000, 1.0, 0),
            (3, 77, 1e3, 0),
            (37, 50_257, 2.0, 7),
            (8, 49_152, 1.0, 5),
        ];
        for &(n, vocab, scale, mask_every) in &cases {
            for dtype in [DType::F32, DType::BF16] {
                check_cuda(&dev, &mut rng, n, vocab, dtype, scale, mask_every);
            }
        }
    }
}

fn check_fused_cuda(dev: &Device, rng: &mut Rng, n: usize, d: usize, vocab: usize, dtype: DType) {
    let round = |v: Vec<f32>| {
        if dtype == DType::BF16 {
            round_bf16(&v)
        } else {
            v
        }
    };
    let h = round(rng.normal_vec(n * d, 1.0));
    let w = round(rng.normal_vec(vocab * d, 1.0 / (d as f32).sqrt()));
    let targets: Vec<i32> = (0..n).map(|_| rng.below(vocab) as i32).collect();
    let (g_lp, g_ent) = (rng.normal_vec(n, 1.0), rng.normal_vec(n, 0.3));
    let run = |dv: &Device, dt: DType| {
        let ht = Tensor::from_f32_as(&[n, d], &h, dt, dv).unwrap();
        let wt = Tensor::from_f32_as(&[vocab, d], &w, dt, dv).unwrap();
        let tgt = Tensor::from_i32(&[n], targets.clone(), dv).unwrap();
        let out = linear_logprob_fwd(&ht, &wt, &tgt, 1.0).unwrap();
        let mut dw = Tensor::zeros(&[vocab, d], DType::F32, dv).unwrap();
        let gl = Tensor::from_f32(&[n], g_lp.clone(), dv).unwrap();
        let ge = Tensor::from_f32(&[n], g_ent.clone(), dv).unwrap();
        let dh = linear_logprob_bwd(&ht, &wt, &tgt, &out, &gl, &ge, 1.0, &mut dw).unwrap();
        let v = |t: &Tensor| t.to_f32_vec().unwrap();
        (v(&out.logp), v(&out.lse), v(&out.entropy), v(&dh), v(&dw))
    };
    let want = run(&Device::Cpu, DType::F32);
    let got = run(dev, dtype);
    let case = format!("n{n} d{d} V{vocab} {}", dtype.name());
    // bf16 operands through cuBLAS with f32 accumulation: METHOD.md's bf16 band, by relative L2.
    let band = if dtype == DType::BF16 { 1e-2 } else { 1e-3 };
    for (name, g, w) in [
        ("logp", &got.0, &want.0),
        ("lse", &got.1, &want.1),
        ("entropy", &got.2, &want.2),
        ("dhidden", &got.3, &want.3),
        ("dweight", &got.4, &want.4),
    ] {
        let e = rlhf_kernels::testing::rel_l2(g, w);
        assert!(
            e <= band,
            "linear_logprob {name} {case}: relative L2 error {e:e} over {band:e}"
        );
        rlhf_kernels::testing::report(
            &format!("linear_logprob.{name}"),
            &case,
            e,
            &format!("rel L2 <= {band:e}"),
        );
    }
}

cuda_test! {
    fn cuda_fused_matches_cpu(dev) {
        let mut rng = Rng::new(fresh_seed("cuda_fused_matches_cpu"));
        // n = 4096 makes the tile 4096 wide, so V = 10,000 spans three tiles, the last one ragged,
        // in one backward gradient group. V = 20,003 spans five: two groups in bf16 (four tiles a
        // group), three in f32 (two), the last group 3,619 wide, an odd row stride. The tiling
        // depends on n and V alone, so those two take d = 16: the emulated GPU's GEMMs, most of
        // this test's time, scale with d.
        for &(n, d, vocab) in &[(37, 64, 1000), (4096, 16, 10_000), (4096, 16, 20_003), (5, 576, 49_152)] {
            for dtype in [DType::F32, DType::BF16] {
                check_fused_cuda(&dev, &mut rng, n, d, vocab, dtype);
            }
        }
    }
}

/// A masked (-inf) logit leaves the row as if it were not there, and gets a zero gradient rather
/// than 0 * -inf = NaN.
#[test]
fn masked_logits_drop_out_of_the_row() {
    let mut rng = Rng::new(fresh_seed("masked_logits_drop_out_of_the_row"));
    let vocab = 40;
    let masked = |v: usize| v % 3 == 1;
    let x = to64(&rng.normal_vec(vocab, 2.0));
    let kept: Vec<f64> = (0..vocab).filter(|&v| !masked(v)).map(|v| x[v]).collect();
    let mut xm = x.clone();
    for (v, val) in xm.iter_mut().enumerate() {
        if masked(v) {
            *val = f64::NEG_INFINITY;
        }
    }
    // Target 3 is kept entry 2 of the reduced row.
    let (g_lp, g_ent) = (vec![0.8], vec![-1.3]);
    let scale = 1.0 / 0.7;
    let run = |row: &[f64], target: i32| {
        let (mut lp, mut lse, mut ent) = (vec![0.0], vec![0.0], vec![0.0]);
        logprob_fwd_ref(
            &mut lp,
            &mut lse,
            &mut ent,
            row,
            &[target],
            row.len(),
            scale,
        );
        let mut dx = vec![f64::NAN; row.len()];
        logprob_bwd_ref(
            &mut dx,
            row,
            &[target],
            &lse,
            &ent,
            &g_lp,
            &g_ent,
            row.len(),
            scale,
        );
        ((lp[0], lse[0], ent[0]), dx)
    };
    let (full, dfull) = run(&xm, 3);
    let (reduced, dreduced) = run(&kept, 2);
    assert_eq!(
        full, reduced,
        "masked entries must not change logp, lse or entropy"
    );
    let mut kept_grads = Vec::new();
    for (v, &d) in dfull.iter().enumerate() {
        if masked(v) {
            assert_eq!(d, 0.0, "masked entry {v} gets gradient {d}");
        } else {
            kept_grads.push(d);
        }
    }
    assert_eq!(kept_grads, dreduced);
    // The op (f32) agrees on the masked row too.
    let xf: Vec<f32> = xm.iter().map(|&v| v as f32).collect();
    let logits = cpu_tensor(&[1, vocab], xf);
    let tgt = Tensor::from_i32(&[1], vec![3], &Device::Cpu).unwrap();
    let out = logprob_fwd(&logits, &tgt, 0.7).unwrap();
    let gl = cpu_tensor(&[1], vec![0.8]);
    let ge = cpu_tensor(&[1], vec![-1.3]);
    let dx = logprob_bwd(&logits, &tgt, &out, &gl, &ge, 0.7)
        .unwrap()
        .to_f32_vec()
        .unwrap();
    assert!((out.lse.to_f32_vec().unwrap()[0] as f64 - reduced.1).abs() < 1e-5);
    assert!(dx.iter().all(|d| d.is_finite()), "{dx:?}");
}
