//! Attention: the CPU reference against finite differences, the KV-cache path against the packed one,
//! and the CUDA kernels against the CPU on ragged GQA batches. The golden file runs in tests/golden.rs.

use rlhf_kernels::cuda_test;
use rlhf_kernels::device::{DType, Device, Tensor};
use rlhf_kernels::ops::attention::{
    attention_bwd, attention_bwd_ref, attention_fwd, attention_fwd_ref, AttnBatch, AttnKernel,
    Heads,
};
use rlhf_kernels::testing::{
    assert_close, check_lowp_rule, check_output, fd_check, fresh_seed, round_bf16, Rng,
};

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
fn cpu_backward_matches_finite_differences() {
    let mut rng = Rng::new(fresh_seed(
        "attention cpu_backward_matches_finite_differences",
    ));
    let hd = Heads {
        heads: 4,
        kv_heads: 2,
        head_dim: 3,
    };
    let lens = [3usize, 1, 4];
    let n: usize = lens.iter().sum();
    let batch = AttnBatch::packed(&lens, &Device::Cpu).unwrap();
    let scale = 0.7;
    let (q, k, v) = (
        to64(&rng.normal_vec(n * 12, 1.0)),
        to64(&rng.normal_vec(n * 6, 1.0)),
        to64(&rng.normal_vec(n * 6, 1.0)),
    );
    let g = to64(&rng.normal_vec(n * 12, 1.0));
    let fwd = |q: &[f64], k: &[f64], v: &[f64]| {
        let (mut o, mut l) = (vec![0.0; n * 12], vec![0.0; n * 4]);
        attention_fwd_ref(&mut o, &mut l, q, k, v, &batch, hd, scale);
        (o, l)
    };
    let loss = |q: &[f64], k: &[f64], v: &[f64]| {
        fwd(q, k, v)
            .0
            .iter()
            .zip(&g)
            .map(|(a, b)| a * b)
            .sum::<f64>()
    };
    let (o, l) = fwd(&q, &k, &v);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    attention_bwd_ref(
        &mut dq, &mut dk, &mut dv, &g, &q, &k, &v, &o, &l, &batch, hd, scale,
    );
    fd_check("dq", |x| loss(x, &k, &v), &q, &dq, 1e-6, 1e-7).unwrap();
    fd_check("dk", |x| loss(&q, x, &v), &k, &dk, 1e-6, 1e-7).unwrap();
    fd_check("dv", |x| loss(&q, &k, x), &v, &dv, 1e-6, 1e-7).unwrap();
    // The first token of a sequence attends only to itself: its output is its own value row.
    assert_eq!(&o[..3], &v[..3]);
}

#[test]
fn decoding_from_a_cache_matches_the_last_row_of_full_attention() {
    let mut rng = Rng::new(fresh_seed(
        "decoding_from_a_cache_matches_the_last_row_of_full_attention",
    ));
    let hd = Heads {
        heads: 6,
        kv_heads: 2,
        head_dim: 8,
    };
    let t = 9;
    let (q, k, v) = (
        rng.normal_vec(t * 48, 1.0),
        rng.normal_vec(t * 16, 1.0),
        rng.normal_vec(t * 16, 1.0),
    );
    let cpu =
        |shape: &[usize], x: &[f32]| Tensor::from_f32(shape, x.to_vec(), &Device::Cpu).unwrap();
    let full = AttnBatch::packed(&[t], &Device::Cpu).unwrap();
    let (o, _) = attention_fwd(
        &cpu(&[t, 48], &q),
        &cpu(&[t, 16], &k),
        &cpu(&[t, 16], &v),
        &full,
        hd,
        0.3,
    )
    .unwrap();
    // The cache holds room for 12 keys; the query is the last of 9.
    let mut kc = vec![f32::NAN; 12 * 16];
    let mut vc = vec![f32::NAN; 12 * 16];
    kc[..t * 16].copy_from_slice(&k);
    vc[..t * 16].copy_from_slice(&v);
    let step = AttnBatch::cached(&[1], &[0], &[t], &Device::Cpu).unwrap();
    let (o1, _) = attention_fwd(
        &cpu(&[1, 48], &q[(t - 1) * 48..]),
        &cpu(&[12, 16], &kc),
        &cpu(&[12, 16], &vc),
        &step,
        hd,
        0.3,
    )
    .unwrap();
    assert_close(
        "decode row",
        &o1.to_f32_vec().unwrap(),
        &o.to_f32_vec().unwrap()[(t - 1) * 48..],
        1e-6,
        1e-5,
    );
}

#[test]
fn bad_geometry_is_an_error() {
    let cpu =
        |r: usize, c: usize| Tensor::from_f32(&[r, c], vec![0.0; r * c], &Device::Cpu).unwrap();
    let batch = AttnBatch::packed(&[4], &Device::Cpu).unwrap();
    let hd = Heads {
        heads: 4,
        kv_heads: 3,
        head_dim: 2,
    };
    let err = attention_fwd(&cpu(4, 8), &cpu(4, 6), &cpu(4, 6), &batch, hd, 1.0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("multiple"), "{err}");
    let hd = Heads {
        heads: 4,
        kv_heads: 2,
        head_dim: 2,
    };
    let err = attention_fwd(&cpu(3, 8), &cpu(3, 4), &cpu(3, 4), &batch, hd, 1.0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("rows"), "{err}");
    let (q4, k4) = (cpu(4, 8), cpu(4, 4));
    for scale in [0.0, -0.5, f32::NAN] {
        let err = attention_fwd(&q4, &k4, &k4, &batch, hd, scale)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("scale"), "{err}");
    }
}

fn bf(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Attention forward and backward as eager bf16 code computes it (PyTorch's math path): every
/// matrix product's output and the softmax's output and gradient rounded to bf16, accumulation in
/// f32. Returns [out, dq, dk, dv] for a packed batch; the bar for the kernels' bf16 error.
#[allow(clippy::too_many_arguments)]
fn attention_bf16_eager(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    lens: &[usize],
    hd: Heads,
    scale: f32,
) -> [Vec<f32>; 4] {
    let (h_n, kv_n, d) = (hd.heads, hd.kv_heads, hd.head_dim);
    let group = h_n / kv_n;
    let (mut o, mut dq) = (vec![0.0f32; q.len()], vec![0.0f32; q.len()]);
    let (mut dk, mut dv) = (vec![0.0f32; k.len()], vec![0.0f32; v.len()]);
    let qa = |i: usize, h: usize| &q[(i * h_n + h) * d..][..d];
    let kva = |x: &'static str, i: usize, g: usize| -> &[f32] {
        let src = if x == "k" { k } else { v };
        &src[(i * kv_n + g) * d..][..d]
    };
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let mut start = 0;
    for &len in lens {
        for h in 0..h_n {
            let g = h / group;
            let (mut dk_h, mut dv_h) = (vec![0.0f32; len * d], vec![0.0f32; len * d]);
            for i in 0..len {
                let s: Vec<f32> = (0..=i)
                    .map(|j| bf(scale * dot(qa(start + i, h), kva("k", start + j, g))))
                    .collect();
                let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = s.iter().map(|&x| (x - m).exp()).sum();
                let p: Vec<f32> = s.iter().map(|&x| bf((x - m).exp() / z)).collect();
                let orow = &mut o[((start + i) * h_n + h) * d..][..d];
                for (c, out) in orow.iter_mut().enumerate() {
                    *out = bf((0..=i).map(|j| p[j] * kva("v", start + j, g)[c]).sum());
                }
                let dorow = &dout[((start + i) * h_n + h) * d..][..d];
                let dp: Vec<f32> = (0..=i)
                    .map(|j| bf(dot(dorow, kva("v", start + j, g))))
                    .collect();
                let pdp: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                let ds: Vec<f32> = p
                    .iter()
                    .zip(&dp)
                    .map(|(&a, &b)| bf(a * (b - pdp)))
                    .collect();
                let dqrow = &mut dq[((start + i) * h_n + h) * d..][..d];
                for (c, out) in dqrow.iter_mut().enumerate() {
                    *out = bf(scale
                        * (0..=i)
                            .map(|j| ds[j] * kva("k", start + j, g)[c])
                            .sum::<f32>());
                }
                for j in 0..=i {
                    for c in 0..d {
                        dk_h[j * d + c] += ds[j] * qa(start + i, h)[c];
                        dv_h[j * d + c] += p[j] * dorow[c];
                    }
                }
            }
            for j in 0..len {
                for c in 0..d {
                    dk[((start + j) * kv_n + g) * d + c] += bf(scale * dk_h[j * d + c]);
                    dv[((start + j) * kv_n + g) * d + c] += bf(dv_h[j * d + c]);
                }
            }
        }
        start += len;
    }
    [
        o,
        dq,
        dk.iter().map(|&x| bf(x)).collect(),
        dv.iter().map(|&x| bf(x)).collect(),
    ]
}

/// The FLOPs the profiler credits attention with: 4·H·D per (query, visible key) pair.
#[test]
fn kernel_names_parse_and_unknown_ones_do_not() {
    for (name, kernel) in [
        ("auto", AttnKernel::Auto),
        ("mma", AttnKernel::Mma),
        ("narrow", AttnKernel::Narrow),
        ("simple", AttnKernel::Simple),
    ] {
        assert_eq!(AttnKernel::parse(name), Some(kernel));
    }
    for bad in ["", "MMA", "narrow-bwd", "flash"] {
        assert_eq!(AttnKernel::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn forward_flops_count_the_visible_pairs() {
    let hd = Heads {
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
    };
    let per_pair = 4.0 * 4.0 * 64.0;
    let packed = AttnBatch::packed(&[3, 5], &Device::Cpu).unwrap();
    assert_eq!(packed.forward_flops(hd), per_pair * (6.0 + 15.0));
    // One new row against 100 cached keys sees them all; two new rows see 99 and 100.
    let cached = AttnBatch::cached(&[1, 2], &[0, 200], &[100, 100], &Device::Cpu).unwrap();
    assert_eq!(cached.forward_flops(hd), per_pair * (100.0 + 99.0 + 100.0));
    // Dead rows (a shared prompt's repeats) count nothing: the first two of three see 1 + 2 keys.
    let live = packed.with_live_from(&[2, 0]).unwrap();
    assert_eq!(live.forward_flops(hd), per_pair * (3.0 + 15.0));
    // A sequence must keep a live row; the list must cover the sequences of a packed batch.
    let packed = || AttnBatch::packed(&[3, 5], &Device::Cpu).unwrap();
    for (rows, want) in [
        (vec![3, 0], "sequence 0: first live row 3 of 3 rows"),
        (
            vec![1],
            "1 first live rows for a packed batch of 2 sequences",
        ),
    ] {
        let err = packed().with_live_from(&rows).err().unwrap().to_string();
        assert!(err.contains(want), "{err}");
    }
    let err = cached.with_live_from(&[0, 0]).err().unwrap().to_string();
    assert!(err.contains("for a KV-cache batch"), "{err}");
}

#[test]
fn decode_kernels_take_cache_batches_and_split_them_whole() {
    let hd = |heads, kv_heads, head_dim| Heads {
        heads,
        kv_heads,
        head_dim,
    };
    let cached = |q: &[usize], k: &[usize]| {
        let starts: Vec<usize> = k
            .iter()
            .scan(0, |s, &l| {
                *s += l;
                Some(*s - l)
            })
            .collect();
        AttnBatch::cached(q, &starts, k, &Device::Cpu).unwrap()
    };
    for (q, k, h) in [
        (vec![1], vec![16_384], hd(32, 8, 128)),
        (vec![1; 64], vec![1024; 64], hd(9, 3, 64)),
        (vec![2, 1, 3], vec![5, 64, 33], hd(4, 4, 128)),
        (vec![1, 1], vec![1, 31], hd(16, 1, 64)),
    ] {
        let plan = cached(&q, &k).decode_split(h).expect("a decode batch");
        let max_keys = *k.iter().max().unwrap();
        assert_eq!(plan.split_len % 32, 0, "{plan:?}");
        assert!(
            plan.splits * plan.split_len >= max_keys,
            "{plan:?} leaves keys out"
        );
        assert!(
            (plan.splits - 1) * plan.split_len < max_keys,
            "{plan:?} has an empty split"
        );
        let blocks = q.len() * h.kv_heads * plan.splits;
        assert!(
            blocks <= 512 + q.len() * h.kv_heads || plan.split_len == 32,
            "{plan:?}: {blocks} blocks"
        );
    }
    // Not for them: packed training batches, too many rows per group, other head sizes, Simple.
    assert!(AttnBatch::packed(&[5, 7], &Device::Cpu)
        .unwrap()
        .decode_split(hd(4, 4, 64))
        .is_none());
    assert!(
        cached(&[2], &[100]).decode_split(hd(9, 1, 64)).is_none(),
        "18 rows"
    );
    assert!(cached(&[1], &[100]).decode_split(hd(4, 4, 96)).is_none());
    let simple = cached(&[1], &[100]).with_kernel(AttnKernel::Simple);
    assert!(simple.decode_split(hd(4, 4, 64)).is_none());
}

#[test]
fn a_cache_with_a_capacity_keeps_one_decode_plan_as_it_fills() {
    // A recorded decode step replays one launch shape, so the plan must follow the cache's
    // capacity, not the lengths of the moment; and lengths past it are refused, not planned for.
    let hd = Heads {
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
    };
    let capacity = 1500;
    let starts = [0, capacity, 2 * capacity];
    let at = |lens: &[usize]| {
        AttnBatch::cached(&[1, 1, 1], &starts, lens, &Device::Cpu)
            .unwrap()
            .with_key_capacity(capacity)
            .unwrap()
    };
    let full = AttnBatch::cached(&[1, 1, 1], &starts, &[capacity; 3], &Device::Cpu).unwrap();
    let want = full.decode_split(hd).unwrap();
    let mut batch = at(&[1, 7, 3]);
    assert_eq!(batch.decode_split(hd), Some(want));
    for lens in [[2, 8, 4], [700, 1, 1499], [capacity; 3]] {
        batch.set_key_lens(&lens).unwrap();
        assert_eq!(batch.k_len, lens.map(|l| l as i32));
        assert_eq!(batch.decode_split(hd), Some(want), "at {lens:?}");
    }
    let short = AttnBatch::cached(&[1, 1, 1], &starts, &[1, 7, 3], &Device::Cpu).unwrap();
    assert_ne!(
        short.decode_split(hd),
        Some(want),
        "without a capacity the plan follows the lengths"
    );
    let e = batch
        .set_key_lens(&[capacity + 1, 1, 1])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sequence 0") && e.contains("capacity 1500"),
        "{e}"
    );
    assert!(
        batch.set_key_lens(&[0, 1, 1]).is_err(),
        "fewer keys than queries"
    );
    assert!(
        batch.set_key_lens(&[1, 1]).is_err(),
        "two lengths for three sequences"
    );
    assert_eq!(
        batch.k_len,
        vec![capacity as i32; 3],
        "a refused update changes nothing"
    );
    assert!(AttnBatch::cached(&[1], &[0], &[10], &Device::Cpu)
        .unwrap()
        .with_key_capacity(9)
        .is_err());
    assert!(AttnBatch::packed(&[5], &Device::Cpu)
        .unwrap()
        .with_key_capacity(9)
        .is_err());
}

/// q, k, v and an output gradient for `n` rows, normal and rounded to bf16 (exact in either dtype).
fn bf16_inputs(rng: &mut Rng, n: usize, hd: Heads) -> [Vec<f32>; 4] {
    let (qw, kw) = (hd.heads * hd.head_dim, hd.kv_heads * hd.head_dim);
    [qw, kw, kw, qw].map(|w| round_bf16(&rng.normal_vec(n * w, 1.0)))
}

/// Every flash path: the default kernels (wgmma on Hopper), one-warpgroup Hopper blocks and
/// mma.sync, each with the fast and the deterministic backward.
const FLASH_PATHS: [(AttnKernel, bool); 6] = [
    (AttnKernel::Auto, false),
    (AttnKernel::Auto, true),
    (AttnKernel::Narrow, false),
    (AttnKernel::Narrow, true),
    (AttnKernel::Mma, false),
    (AttnKernel::Mma, true),
];

/// CUDA against the CPU reference on one packed batch, with every kernel choice and both flash
/// backward modes; the decode path (the last `decode_rows` rows of each sequence as queries against
/// a KV cache) against the same rows; and the backward run twice, bitwise equal unless it is the fast
/// flash backward (whose dQ atomics may add in any order).
#[allow(clippy::too_many_arguments)]
fn check_cuda(
    dev: &Device,
    rng: &mut Rng,
    lens: &[usize],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    decode_rows: usize,
) {
    let n: usize = lens.iter().sum();
    let hd = Heads {
        heads,
        kv_heads,
        head_dim,
    };
    let round = |v: Vec<f32>| {
        if dtype == DType::BF16 {
            round_bf16(&v)
        } else {
            v
        }
    };
    let (q, k, v) = (
        round(rng.normal_vec(n * heads * head_dim, 1.0)),
        round(rng.normal_vec(n * kv_heads * head_dim, 1.0)),
        round(rng.normal_vec(n * kv_heads * head_dim, 1.0)),
    );
    let g = round(rng.normal_vec(n * heads * head_dim, 1.0));
    let scale = 1.0 / (head_dim as f32).sqrt();
    let run = |d: &Device, dt: DType, kernel: AttnKernel, deterministic: bool| {
        let batch = AttnBatch::packed(lens, d)
            .unwrap()
            .with_kernel(kernel)
            .with_deterministic(deterministic);
        let bitwise = deterministic || kernel == AttnKernel::Simple || dt != DType::BF16;
        let t = |x: &[f32], w: usize| Tensor::from_f32_as(&[n, w], x, dt, d).unwrap();
        let (qt, kt, vt) = (
            t(&q, heads * head_dim),
            t(&k, kv_heads * head_dim),
            t(&v, kv_heads * head_dim),
        );
        let (o, l) = attention_fwd(&qt, &kt, &vt, &batch, hd, scale).unwrap();
        let gt = t(&g, heads * head_dim);
        let (dq, dk, dv) = attention_bwd(&gt, &qt, &kt, &vt, &o, &l, &batch, hd, scale).unwrap();
        let grads = [&dq, &dk, &dv].map(|x| x.to_f32_vec().unwrap());
        if !matches!(d, Device::Cpu) && bitwise {
            let again = attention_bwd(&gt, &qt, &kt, &vt, &o, &l, &batch, hd, scale).unwrap();
            let grads_again = [&again.0, &again.1, &again.2].map(|x| x.to_f32_vec().unwrap());
            for (a, b) in grads.iter().zip(&grads_again) {
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{kernel:?} (deterministic: {deterministic}): two backward runs differ"
                );
            }
        }
        // Decode: the last (up to) `decode_rows` rows of each sequence against the whole sequence
        // as a cache. New rows times the GQA group up to 16 take the decode kernels (the cache
        // split into parts that one more kernel merges), more take the flash kernels.
        let q_lens: Vec<usize> = lens.iter().map(|&l| l.min(decode_rows)).collect();
        let starts: Vec<usize> = lens
            .iter()
            .scan(0, |s, &l| {
                *s += l;
                Some(*s - l)
            })
            .collect();
        let rows: Vec<usize> = lens
            .iter()
            .zip(&starts)
            .zip(&q_lens)
            .flat_map(|((&l, &s), &ql)| (s + l - ql)..(s + l))
            .collect();
        let width = heads * head_dim;
        let q_dec: Vec<f32> = rows
            .iter()
            .flat_map(|&r| q[r * width..][..width].to_vec())
            .collect();
        let cached = AttnBatch::cached(&q_lens, &starts, lens, d)
            .unwrap()
            .with_kernel(kernel);
        let (o_dec, _) = attention_fwd(
            &Tensor::from_f32_as(&[rows.len(), width], &q_dec, dt, d).unwrap(),
            &kt,
            &vt,
            &cached,
            hd,
            scale,
        )
        .unwrap();
        let [o, l] = [o, l].map(|x| x.to_f32_vec().unwrap());
        let [dq, dk, dv] = grads;
        ([o, l, dq, dk, dv], o_dec.to_f32_vec().unwrap(), rows)
    };
    let (want, _, rows) = run(&Device::Cpu, DType::F32, AttnKernel::Auto, true);
    let lowp =
        (dtype == DType::BF16).then(|| attention_bf16_eager(&q, &k, &v, &g, lens, hd, scale));
    let width = heads * head_dim;
    let pick = |x: &[f32]| -> Vec<f32> {
        rows.iter()
            .flat_map(|&r| x[r * width..][..width].to_vec())
            .collect()
    };
    // On a Hopper GPU, Auto runs the wgmma kernels (Narrow too, on one-warpgroup blocks) and Mma the
    // mma.sync ones.
    for (kernel, deterministic) in [
        (AttnKernel::Auto, false),
        (AttnKernel::Auto, true),
        (AttnKernel::Narrow, false),
        (AttnKernel::Mma, false),
        (AttnKernel::Simple, true),
    ] {
        if dtype != DType::BF16
            && (!deterministic || matches!(kernel, AttnKernel::Mma | AttnKernel::Narrow))
        {
            continue; // f32 runs neither the flash kernels nor their fast backward
        }
        let (got, got_dec, _) = run(dev, dtype, kernel, deterministic);
        let case = format!(
            "lens {lens:?} H{heads} KV{kv_heads} D{head_dim} {} {kernel:?} deterministic {deterministic}",
            dtype.name()
        );
        check_output(
            "attention_fwd.lse",
            &case,
            &got[1],
            &want[1],
            DType::F32,
            1e-4,
            1e-5,
        );
        match &lowp {
            None => {
                check_output(
                    "attention_fwd.out",
                    &case,
                    &got[0],
                    &want[0],
                    dtype,
                    1e-5,
                    1e-4,
                );
                check_output(
                    "attention_decode.out",
                    &case,
                    &got_dec,
                    &pick(&want[0]),
                    dtype,
                    1e-5,
                    1e-4,
                );
                for (i, name) in [(2, "dq"), (3, "dk"), (4, "dv")] {
                    check_output(
                        &format!("attention_bwd.{name}"),
                        &case,
                        &got[i],
                        &want[i],
                        dtype,
                        1e-4,
                        1e-3,
                    );
                }
            }
            Some(lp) => {
                check_lowp_rule("attention_fwd.out", &case, &got[0], &lp[0], &want[0], 1e-5);
                check_lowp_rule(
                    "attention_decode.out",
                    &case,
                    &got_dec,
                    &pick(&lp[0]),
                    &pick(&want[0]),
                    1e-5,
                );
                for (i, name) in [(2, "dq"), (3, "dk"), (4, "dv")] {
                    check_lowp_rule(
                        &format!("attention_bwd.{name}"),
                        &case,
                        &got[i],
                        &lp[i - 1],
                        &want[i],
                        1e-4,
                    );
                }
            }
        }
    }
}

cuda_test! {
    fn cuda_matches_cpu_on_ragged_gqa_batches(dev) {
        let mut rng = Rng::new(fresh_seed("attention cuda_matches_cpu_on_ragged_gqa_batches"));
        let cases = [
            (vec![1usize], 4, 4, 3),
            (vec![17, 1, 127], 9, 3, 3),
            (vec![1000], 9, 1, 3),
            (vec![300, 1100], 6, 2, 3),
            (vec![4097], 2, 2, 3),
            // One new row for each of 16 and 9 query heads on one KV head: the decode kernels' widest groups.
            (vec![600, 3, 1], 16, 1, 1),
            (vec![700, 40], 9, 1, 1),
        ];
        for (lens, heads, kv, decode_rows) in cases {
            for head_dim in [64, 128] {
                // The longest sequence is checked in bf16 only (the flash kernels' dtype): its f32
                // CPU reference dominates the test's time.
                for dtype in [DType::F32, DType::BF16] {
                    if lens[0] > 4096 && dtype == DType::F32 {
                        continue;
                    }
                    check_cuda(&dev, &mut rng, &lens, heads, kv, head_dim, dtype, decode_rows);
                }
            }
        }
    }
}

cuda_test! {
    /// Every flash path (forward on wgmma or mma.sync, backward fast or deterministic, Hopper dK/dV
    /// blocks of two warpgroups or one) on one small ragged GQA batch, each judged by the bf16 rule
    /// and all reported before the verdict, so that one run shows which of the paths (each a kernel
    /// of its own on Hopper) is wrong.
    fn cuda_every_flash_path_reported_together(dev) {
        let mut rng = Rng::new(fresh_seed("attention cuda_every_flash_path_reported_together"));
        let lens = [200usize, 70];
        let n: usize = lens.iter().sum();
        let mut failures = Vec::new();
        for head_dim in [64usize, 128] {
            let hd = Heads { heads: 6, kv_heads: 2, head_dim };
            let (qw, kw) = (hd.heads * head_dim, hd.kv_heads * head_dim);
            let [q, k, v, g] = bf16_inputs(&mut rng, n, hd);
            let scale = 1.0 / (head_dim as f32).sqrt();
            let cpu = AttnBatch::packed(&lens, &Device::Cpu).unwrap();
            let t = |x: &[f32], w: usize, d: &Device, dt: DType| {
                Tensor::from_f32_as(&[n, w], x, dt, d).unwrap()
            };
            let (o, l) = attention_fwd(
                &t(&q, qw, &Device::Cpu, DType::F32),
                &t(&k, kw, &Device::Cpu, DType::F32),
                &t(&v, kw, &Device::Cpu, DType::F32),
                &cpu,
                hd,
                scale,
            )
            .unwrap();
            let (dq, dk, dv) = attention_bwd(
                &t(&g, qw, &Device::Cpu, DType::F32),
                &t(&q, qw, &Device::Cpu, DType::F32),
                &t(&k, kw, &Device::Cpu, DType::F32),
                &t(&v, kw, &Device::Cpu, DType::F32),
                &o,
                &l,
                &cpu,
                hd,
                scale,
            )
            .unwrap();
            let want = [&o, &dq, &dk, &dv].map(|x| x.to_f32_vec().unwrap());
            let lowp = attention_bf16_eager(&q, &k, &v, &g, &lens, hd, scale);
            let max_err = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| if x.is_finite() { (x - y).abs() as f64 } else { f64::INFINITY })
                    .fold(0.0f64, f64::max)
            };
            for (kernel, deterministic) in FLASH_PATHS {
                let batch = AttnBatch::packed(&lens, &dev)
                    .unwrap()
                    .with_kernel(kernel)
                    .with_deterministic(deterministic);
                let (qt, kt, vt, gt) = (
                    t(&q, qw, &dev, DType::BF16),
                    t(&k, kw, &dev, DType::BF16),
                    t(&v, kw, &dev, DType::BF16),
                    t(&g, qw, &dev, DType::BF16),
                );
                let got = attention_fwd(&qt, &kt, &vt, &batch, hd, scale).and_then(|(o, l)| {
                    let (dq, dk, dv) = attention_bwd(&gt, &qt, &kt, &vt, &o, &l, &batch, hd, scale)?;
                    Ok([&o, &dq, &dk, &dv].map(|x| x.to_f32_vec()))
                });
                let path = format!("D{head_dim} {kernel:?} deterministic {deterministic}");
                let got = match got {
                    Ok(got) => got,
                    Err(e) => {
                        failures.push(format!("{path}: {e}"));
                        continue;
                    }
                };
                for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
                    let got = match &got[i] {
                        Ok(x) => x,
                        Err(e) => {
                            failures.push(format!("{path} {name}: {e}"));
                            continue;
                        }
                    };
                    let (err, bar) = (max_err(got, &want[i]), 2.0 * max_err(&lowp[i], &want[i]) + 1e-4);
                    let verdict = if err <= bar { "ok" } else { "FAIL" };
                    println!("PATH|{path} {name}: max error {err:.3e}, bar {bar:.3e} {verdict}");
                    if err > bar {
                        failures.push(format!("{path} {name}: max error {err:.3e} over {bar:.3e}"));
                    }
                }
            }
        }
        assert!(failures.is_empty(), "flash paths off the reference:\n{}", failures.join("\n"));
    }
}

cuda_test! {
    fn cuda_dead_rows_are_skipped_on_every_flash_path(dev) {
        // Leading rows of a sequence marked dead (`with_live_from`: a shared prompt repeated in a
        // sequence that reads it): two whole 64-row tiles and part of a third in the first
        // sequence, none in the second, one tile and a row in the third; their output gradients
        // zero. The forward skips the dead tiles and must still give every live row's output and
        // lse; the backward (fed, as the model does, a forward of every row for out and lse) must
        // give every key's dK and dV and every live row's dQ: all against the CPU reference on
        // every flash path, by the bf16 rule of cuda_every_flash_path_reported_together.
        let mut rng = Rng::new(fresh_seed("attention cuda_dead_rows_are_skipped_on_every_flash_path"));
        let lens = [200usize, 70, 150];
        let live = [130usize, 0, 65];
        let n: usize = lens.iter().sum();
        let offsets: Vec<usize> = std::iter::once(0).chain(lens.iter().scan(0, |a, &l| { *a += l; Some(*a) })).collect();
        let dead = |r: usize| (0..lens.len()).any(|b| r >= offsets[b] && r < offsets[b] + live[b]);
        let mut failures = Vec::new();
        for head_dim in [64usize, 128] {
            let hd = Heads { heads: 6, kv_heads: 2, head_dim };
            let (qw, kw) = (hd.heads * head_dim, hd.kv_heads * head_dim);
            let [q, k, v, mut g] = bf16_inputs(&mut rng, n, hd);
            for r in (0..n).filter(|&r| dead(r)) {
                g[r * qw..(r + 1) * qw].fill(0.0);
            }
            let scale = 1.0 / (head_dim as f32).sqrt();
            let t = |x: &[f32], w: usize, d: &Device, dt: DType| Tensor::from_f32_as(&[n, w], x, dt, d).unwrap();
            let cpu = AttnBatch::packed(&lens, &Device::Cpu).unwrap();
            let f32s = |x: &[f32], w: usize| t(x, w, &Device::Cpu, DType::F32);
            let (o, l) = attention_fwd(&f32s(&q, qw), &f32s(&k, kw), &f32s(&v, kw), &cpu, hd, scale).unwrap();
            let (dq, dk, dv) =
                attention_bwd(&f32s(&g, qw), &f32s(&q, qw), &f32s(&k, kw), &f32s(&v, kw), &o, &l, &cpu, hd, scale).unwrap();
            let want = [&o, &dq, &dk, &dv].map(|x| x.to_f32_vec().unwrap());
            let lowp = attention_bf16_eager(&q, &k, &v, &g, &lens, hd, scale);
            // Live rows only for out and dq (widths qw); every row for dk and dv.
            let max_err = |a: &[f32], b: &[f32], w: usize, rows_live_only: bool| {
                (0..n)
                    .filter(|&r| !(rows_live_only && dead(r)))
                    .flat_map(|r| r * w..(r + 1) * w)
                    .map(|i| if a[i].is_finite() { (a[i] - b[i]).abs() as f64 } else { f64::INFINITY })
                    .fold(0.0f64, f64::max)
            };
            for (kernel, deterministic) in FLASH_PATHS {
                let all = AttnBatch::packed(&lens, &dev).unwrap().with_kernel(kernel).with_deterministic(deterministic);
                let batch = AttnBatch::packed(&lens, &dev)
                    .unwrap()
                    .with_kernel(kernel)
                    .with_deterministic(deterministic)
                    .with_live_from(&live)
                    .unwrap();
                let (qt, kt, vt, gt) = (
                    t(&q, qw, &dev, DType::BF16),
                    t(&k, kw, &dev, DType::BF16),
                    t(&v, kw, &dev, DType::BF16),
                    t(&g, qw, &dev, DType::BF16),
                );
                let path = format!("D{head_dim} {kernel:?} deterministic {deterministic}");
                let got = attention_fwd(&qt, &kt, &vt, &batch, hd, scale).and_then(|(o_live, _)| {
                    let (o, l) = attention_fwd(&qt, &kt, &vt, &all, hd, scale)?;
                    let (dq, dk, dv) = attention_bwd(&gt, &qt, &kt, &vt, &o, &l, &batch, hd, scale)?;
                    [&o_live, &dq, &dk, &dv].map(|x| x.to_f32_vec()).into_iter().collect::<Result<Vec<_>, _>>()
                });
                let got = match got {
                    Ok(got) => got,
                    Err(e) => {
                        failures.push(format!("{path}: {e}"));
                        continue;
                    }
                };
                for (i, (name, w, live_only)) in
                    [("out", qw, true), ("dq", qw, true), ("dk", kw, false), ("dv", kw, false)].into_iter().enumerate()
                {
                    let err = max_err(&got[i], &want[i], w, live_only);
                    let bar = 2.0 * max_err(&lowp[i], &want[i], w, live_only) + 1e-4;
                    let verdict = if err <= bar { "ok" } else { "FAIL" };
                    println!("DEAD|{path} {name}: max error {err:.3e}, bar {bar:.3e} {verdict}");
                    if err > bar {
                        failures.push(format!("{path} {name}: max error {err:.3e} over {bar:.3e}"));
                    }
                }
            }
        }
        assert!(failures.is_empty(), "flash paths with dead rows off the reference:\n{}", failures.join("\n"));
    }
}
