//! Attention: the CPU reference against finite differences, the KV-cache path against the packed one,
//! and the CUDA kernels against the CPU on ragged GQA batches. The golden file runs in tests/golden.rs.

use rlhf_kernels::cuda_test;
use rlhf_kernels::device::{DType, Device, Tensor};
use rlhf_kernels::ops::attention::{
    attention_bwd, attention_bwd_ref, attention_fwd, attention_fwd_ref, AttnBatch, Heads,
};
use rlhf_kernels::testing::{assert_close, check_output, fd_check, fresh_seed, round_bf16, Rng};

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
}

fn check_cuda(
    dev: &Device,
    rng: &mut Rng,
    lens: &[usize],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
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
    let run = |d: &Device, dt: DType| {
        let batch = AttnBatch::packed(lens, d).unwrap();
        let t = |x: &[f32], w: usize| Tensor::from_f32_as(&[n, w], x, dt, d).unwrap();
        let (qt, kt, vt) = (
            t(&q, heads * head_dim),
            t(&k, kv_heads * head_dim),
            t(&v, kv_heads * head_dim),
        );
        let (o, l) = attention_fwd(&qt, &kt, &vt, &batch, hd, scale).unwrap();
        let (dq, dk, dv) = attention_bwd(
            &t(&g, heads * head_dim),
            &qt,
            &kt,
            &vt,
            &o,
            &l,
            &batch,
            hd,
            scale,
        )
        .unwrap();
        [o, l, dq, dk, dv].map(|x| x.to_f32_vec().unwrap())
    };
    let (want, got) = (run(&Device::Cpu, DType::F32), run(dev, dtype));
    let case = format!(
        "lens {lens:?} H{heads} KV{kv_heads} D{head_dim} {}",
        dtype.name()
    );
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
        "attention_fwd.lse",
        &case,
        &got[1],
        &want[1],
        DType::F32,
        1e-4,
        1e-5,
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

cuda_test! {
    fn cuda_matches_cpu_on_ragged_gqa_batches(dev) {
        let mut rng = Rng::new(fresh_seed("attention cuda_matches_cpu_on_ragged_gqa_batches"));
        for (lens, heads, kv) in [(vec![1usize], 4, 4), (vec![17, 1, 127], 9, 3), (vec![1000], 9, 1), (vec![300, 1100], 6, 2)] {
            for head_dim in [64, 128] {
                for dtype in [DType::F32, DType::BF16] {
                    check_cuda(&dev, &mut rng, &lens, heads, kv, head_dim, dtype);
                }
            }
        }
    }
}
