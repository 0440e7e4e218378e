//! The transformer's small kernel families (rope, mlp, embed, elementwise, adamw): CPU references
//! against finite differences or their definitions, bad input, and CUDA against the CPU.

use rlhf_kernels::cuda_test;
use rlhf_kernels::device::{DType, Device, Tensor};
use rlhf_kernels::ops::adamw::{
    adamw_ref, adamw_step, clip_coefficient, global_grad_norm, AdamWConfig,
};
use rlhf_kernels::ops::elementwise::{add, bias_add, bias_grad, cast};
use rlhf_kernels::ops::embed::{
    embed_bwd, embed_fwd, rows_store, rows_store_pair, rows_sum, RowGroups,
};
use rlhf_kernels::ops::mlp::{
    swiglu_bwd, swiglu_bwd_and_h, swiglu_bwd_ref, swiglu_fwd, swiglu_fwd_ref,
};
use rlhf_kernels::ops::rope::{rope_bwd, rope_fwd, rope_qkv_bwd, rope_qkv_fwd, rope_ref};
use rlhf_kernels::ops::{join_columns, split_columns};
use rlhf_kernels::testing::{assert_close, check_output, fd_check, fresh_seed, round_bf16, Rng};

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn cpu(shape: &[usize], v: Vec<f32>) -> Tensor {
    Tensor::from_f32(shape, v, &Device::Cpu).unwrap()
}

fn inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32))
        .collect()
}

#[test]
fn rope_is_a_rotation_and_its_backward_the_transpose() {
    let mut rng = Rng::new(fresh_seed(
        "rope_is_a_rotation_and_its_backward_the_transpose",
    ));
    let (n, heads, d) = (5, 3, 8);
    let x = to64(&rng.normal_vec(n * heads * d, 1.0));
    let g = to64(&rng.normal_vec(n * heads * d, 1.0));
    let pos = vec![0, 1, 7, 100, 4095];
    let f = inv_freq(d, 10000.0);
    let fwd = |xp: &[f64]| {
        let mut y = vec![0.0; xp.len()];
        rope_ref(&mut y, xp, &pos, &f, heads, d, 1.0);
        y
    };
    let y = fwd(&x);
    let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
    assert!(
        (norm(&y) - norm(&x)).abs() < 1e-9,
        "a rotation keeps the norm"
    );
    assert_eq!(
        &y[..heads * d],
        &x[..heads * d],
        "position 0 is the identity"
    );
    let mut dx = vec![0.0; x.len()];
    rope_ref(&mut dx, &g, &pos, &f, heads, d, -1.0);
    fd_check(
        "rope dx",
        |xp| fwd(xp).iter().zip(&g).map(|(a, b)| a * b).sum(),
        &x,
        &dx,
        1e-6,
        1e-8,
    )
    .unwrap();
    let ids = Tensor::from_i32(&[n], pos.clone(), &Device::Cpu).unwrap();
    let err = rope_fwd(
        &cpu(&[n, 7], vec![0.0; n * 7]),
        &ids,
        &cpu(&[4], f.clone()),
        heads,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("heads"), "{err}");
    // The QKV projection's output, queries (3 heads), keys and values (2 each) side by side in
    // each row: split into rotated queries and keys and the values as they were; backward, the
    // inverse rotations joined back with the values' gradient.
    let kv = 2;
    let width = (heads + 2 * kv) * d;
    let qkv: Vec<f32> = rng.normal_vec(n * width, 1.0);
    let cols = |v: &[f32], from: usize, w: usize| -> Vec<f32> {
        v.chunks(width)
            .flat_map(|r| r[from..from + w].to_vec())
            .collect()
    };
    let (qw, kw) = (heads * d, kv * d);
    let parts = [
        cols(&qkv, 0, qw),
        cols(&qkv, qw, kw),
        cols(&qkv, qw + kw, kw),
    ];
    let fr = cpu(&[d / 2], f.clone());
    let err = rope_qkv_fwd(&cpu(&[n, width], qkv.clone()), &ids, &fr, heads, 1)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("qkv is [5, 56]"), "{err}");
    let (yq, yk, yv) = rope_qkv_fwd(&cpu(&[n, width], qkv.clone()), &ids, &fr, heads, kv).unwrap();
    let alone = |x: &[f32], h: usize, backward: bool| {
        let t = cpu(&[n, h * d], x.to_vec());
        let y = if backward {
            rope_bwd(&t, &ids, &fr, h)
        } else {
            rope_fwd(&t, &ids, &fr, h)
        };
        y.unwrap().to_f32_vec().unwrap()
    };
    assert_eq!(yq.to_f32_vec().unwrap(), alone(&parts[0], heads, false));
    assert_eq!(yk.to_f32_vec().unwrap(), alone(&parts[1], kv, false));
    assert_eq!(yv.to_f32_vec().unwrap(), parts[2]);
    let dqkv = rope_qkv_bwd(
        &cpu(&[n, qw], parts[0].clone()),
        &cpu(&[n, kw], parts[1].clone()),
        &cpu(&[n, kw], parts[2].clone()),
        &ids,
        &fr,
        heads,
        kv,
    )
    .unwrap()
    .to_f32_vec()
    .unwrap();
    let (dq, dk) = (alone(&parts[0], heads, true), alone(&parts[1], kv, true));
    assert_eq!(cols(&dqkv, 0, qw), dq);
    assert_eq!(cols(&dqkv, qw, kw), dk);
    assert_eq!(cols(&dqkv, qw + kw, kw), parts[2]);
    let err = rope_qkv_bwd(
        &cpu(&[n, qw], parts[0].clone()),
        &cpu(&[n, qw], parts[0].clone()),
        &cpu(&[n, kw], parts[2].clone()),
        &ids,
        &fr,
        heads,
        kv,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("dk is [5, 24]"), "{err}");
}

#[test]
fn swiglu_reads_gate_and_up_side_by_side() {
    let mut rng = Rng::new(fresh_seed("swiglu_reads_gate_and_up_side_by_side"));
    let (rows, inter) = (4, 7);
    let gate_up = rng.normal_vec(rows * 2 * inter, 2.0);
    let dh = rng.normal_vec(rows * inter, 1.0);
    let [g, u]: [Vec<f32>; 2] = split_columns(&gate_up, &[inter, inter]).try_into().unwrap();
    assert_eq!(g[inter..2 * inter], gate_up[2 * inter..3 * inter]);
    assert_eq!(u[..inter], gate_up[inter..2 * inter]);
    assert_eq!(join_columns(&[&g, &u], &[inter, inter]), gate_up);
    let gu = cpu(&[rows, 2 * inter], gate_up.clone());
    let mut h = vec![0.0f32; rows * inter];
    swiglu_fwd_ref(&mut h, &g, &u);
    assert_eq!(swiglu_fwd(&gu).unwrap().to_f32_vec().unwrap(), h);
    let (mut dg, mut du) = (vec![0.0f32; rows * inter], vec![0.0f32; rows * inter]);
    swiglu_bwd_ref(&mut dg, &mut du, &dh, &g, &u);
    let dgu = swiglu_bwd(&cpu(&[rows, inter], dh.clone()), &gu).unwrap();
    assert_eq!(dgu.shape(), &[rows, 2 * inter]);
    assert_eq!(
        dgu.to_f32_vec().unwrap(),
        join_columns(&[&dg, &du], &[inter, inter])
    );
    let err = swiglu_fwd(&cpu(&[rows, 5], vec![0.0; rows * 5]))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("even"), "{err}");
    let err = swiglu_bwd(&cpu(&[rows, 2 * inter], gate_up.clone()), &gu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("dh"), "{err}");
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    let mut rng = Rng::new(fresh_seed("swiglu_backward_matches_finite_differences"));
    let n = 40;
    let (gate, up, dh) = (
        to64(&rng.normal_vec(n, 3.0)),
        to64(&rng.normal_vec(n, 1.0)),
        to64(&rng.normal_vec(n, 1.0)),
    );
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    swiglu_bwd_ref(&mut dg, &mut du, &dh, &gate, &up);
    let loss = |g: &[f64], u: &[f64]| {
        let mut h = vec![0.0; n];
        swiglu_fwd_ref(&mut h, g, u);
        h.iter().zip(&dh).map(|(a, b)| a * b).sum::<f64>()
    };
    fd_check("dgate", |g| loss(g, &up), &gate, &dg, 1e-6, 1e-8).unwrap();
    fd_check("dup", |u| loss(&gate, u), &up, &du, 1e-6, 1e-8).unwrap();
}

#[test]
fn embed_looks_up_and_scatters() {
    let table = cpu(&[4, 3], (0..12).map(|x| x as f32).collect());
    let ids = Tensor::from_i32(&[3], vec![2, 0, 2], &Device::Cpu).unwrap();
    assert_eq!(
        embed_fwd(&table, &ids).unwrap().to_f32_vec().unwrap(),
        vec![6., 7., 8., 0., 1., 2., 6., 7., 8.]
    );
    let mut dt = Tensor::zeros(&[4, 3], DType::F32, &Device::Cpu).unwrap();
    embed_bwd(&mut dt, &cpu(&[3, 3], vec![1.0; 9]), &ids).unwrap();
    assert_eq!(
        dt.to_f32_vec().unwrap(),
        vec![1., 1., 1., 0., 0., 0., 2., 2., 2., 0., 0., 0.]
    );
    let bad = Tensor::from_i32(&[1], vec![4], &Device::Cpu).unwrap();
    let err = embed_fwd(&table, &bad).err().unwrap().to_string();
    assert!(err.contains("token id 4 at position 0"), "{err}");
    // The row store writes each source row to its slot and leaves the others.
    let mut dst = cpu(&[4, 2], vec![0.0; 8]);
    let src = cpu(&[2, 2], vec![1., 2., 3., 4.]);
    let slots = Tensor::from_i32(&[2], vec![3, 1], &Device::Cpu).unwrap();
    rows_store(&mut dst, &src, &slots).unwrap();
    assert_eq!(
        dst.to_f32_vec().unwrap(),
        vec![0., 0., 3., 4., 0., 0., 1., 2.]
    );
    let err = rows_store(
        &mut dst,
        &src,
        &Tensor::from_i32(&[2], vec![0, 4], &Device::Cpu).unwrap(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("row 4 at position 1"), "{err}");
    // The pair stores both sources with the same slots, and checks the second pair's shapes.
    let (mut k, mut v) = (cpu(&[4, 2], vec![0.0; 8]), cpu(&[4, 2], vec![-1.0; 8]));
    let src2 = cpu(&[2, 2], vec![5., 6., 7., 8.]);
    rows_store_pair(&mut k, &src, &mut v, &src2, &slots).unwrap();
    assert_eq!(
        k.to_f32_vec().unwrap(),
        vec![0., 0., 3., 4., 0., 0., 1., 2.]
    );
    assert_eq!(
        v.to_f32_vec().unwrap(),
        vec![-1., -1., 7., 8., -1., -1., 5., 6.]
    );
    let err = rows_store_pair(&mut k, &src, &mut cpu(&[3, 2], vec![0.0; 6]), &src2, &slots)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("dst2"), "{err}");
}

/// Groups for `rows_sum` over `src_rows` source rows: each source row in exactly one of `n` groups
/// (some groups empty, some of many rows), in a shuffled order, as the model's shared prefixes make
/// them.
fn random_groups(rng: &mut Rng, n: usize, src_rows: usize) -> Vec<Vec<usize>> {
    let mut groups = vec![Vec::new(); n];
    for r in 0..src_rows {
        // A third of the rows go to the first eighth of the groups: long groups beside empty ones.
        let g = if rng.below(3) == 0 {
            rng.below(n.div_ceil(8))
        } else {
            rng.below(n)
        };
        groups[g].push(r);
    }
    for g in &mut groups {
        for i in (1..g.len()).rev() {
            g.swap(i, rng.below(i + 1));
        }
    }
    groups
}

#[test]
fn rows_sum_adds_each_group_and_is_the_adjoint_of_the_gather() {
    let mut rng = Rng::new(fresh_seed(
        "rows_sum_adds_each_group_and_is_the_adjoint_of_the_gather",
    ));
    let src = cpu(&[4, 2], vec![1., 2., 3., 4., 5., 6., 7., 8.]);
    let groups = RowGroups::new(&[vec![3, 0], vec![], vec![1, 2]], 4, &Device::Cpu).unwrap();
    assert_eq!(
        rows_sum(&src, &groups).unwrap().to_f32_vec().unwrap(),
        vec![8., 10., 0., 0., 8., 10.]
    );
    let err = RowGroups::new(&[vec![0, 4]], 4, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("group 0 lists row 4 of a source of 4 rows"),
        "{err}"
    );
    let err = rows_sum(&cpu(&[3, 2], vec![0.0; 6]), &groups)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("source of 4 rows; src has 3"), "{err}");
    // Its gradient is the gather of each source row's group row (embed_fwd with those ids): the
    // finite differences of Σ w·rows_sum(x) against it.
    let (n, rows, d) = (5, 13, 3);
    let g = random_groups(&mut rng, n, rows);
    let groups = RowGroups::new(&g, rows, &Device::Cpu).unwrap();
    let mut owner = vec![0i32; rows];
    for (u, members) in g.iter().enumerate() {
        for &r in members {
            owner[r] = u as i32;
        }
    }
    let w = rng.normal_vec(n * d, 1.0);
    let x = to64(&rng.normal_vec(rows * d, 1.0));
    let loss = |x: &[f64]| {
        let t = Tensor::from_f32(
            &[rows, d],
            x.iter().map(|&v| v as f32).collect(),
            &Device::Cpu,
        )
        .unwrap();
        let y = rows_sum(&t, &groups).unwrap().to_f32_vec().unwrap();
        y.iter().zip(&w).map(|(&a, &b)| (a * b) as f64).sum::<f64>()
    };
    let ids = Tensor::from_i32(&[rows], owner, &Device::Cpu).unwrap();
    let grad = to64(
        &embed_fwd(&cpu(&[n, d], w.clone()), &ids)
            .unwrap()
            .to_f32_vec()
            .unwrap(),
    );
    fd_check("rows_sum", loss, &x, &grad, 1e-2, 1e-3).unwrap();
}

#[test]
fn elementwise_ops_follow_their_definitions() {
    let a = cpu(&[2, 3], vec![1., 2., 3., 4., 5., 6.]);
    let b = cpu(&[2, 3], vec![0.5; 6]);
    assert_eq!(
        add(&a, &b).unwrap().to_f32_vec().unwrap(),
        vec![1.5, 2.5, 3.5, 4.5, 5.5, 6.5]
    );
    let bias = cpu(&[3], vec![10., 20., 30.]);
    assert_eq!(
        bias_add(&a, &bias).unwrap().to_f32_vec().unwrap(),
        vec![11., 22., 33., 14., 25., 36.]
    );
    let mut db = cpu(&[3], vec![1.0; 3]);
    bias_grad(&mut db, &a).unwrap();
    assert_eq!(db.to_f32_vec().unwrap(), vec![6., 8., 10.]);
    let h = cast(&cpu(&[2], vec![1.0 / 3.0, 1e-3]), DType::BF16).unwrap();
    assert_eq!(h.dtype(), DType::BF16);
    assert_eq!(h.to_f32_vec().unwrap(), round_bf16(&[1.0 / 3.0, 1e-3]));
    assert!(add(&a, &bias).is_err());
}

#[test]
fn adamw_matches_its_definition_and_clips() {
    let cfg = AdamWConfig {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let (mut w, mut m, mut v) = (vec![1.0f32, -2.0], vec![0.0f32; 2], vec![0.0f32; 2]);
    adamw_ref(&mut w, &mut m, &mut v, &[0.5, -0.25], &cfg, 1, 1.0);
    // Step 1: m̂ = g, v̂ = g², so the update is lr·sign(g) (up to eps) plus decay.
    let want = [
        1.0 * (1.0 - 0.1 * 0.01) - 0.1,
        -2.0 * (1.0 - 0.1 * 0.01) + 0.1,
    ];
    assert_close(
        "w after one step",
        &w,
        &[want[0] as f32, want[1] as f32],
        1e-6,
        1e-6,
    );
    let g = cpu(&[2], vec![3.0, 4.0]);
    assert!((global_grad_norm(&[&g]).unwrap() - 5.0).abs() < 1e-12);
    assert!((clip_coefficient(5.0, 1.0) - 1.0 / 5.000001).abs() < 1e-9);
    assert_eq!(clip_coefficient(0.5, 1.0), 1.0);
    let (mut wt, mut mt, mut vt) = (
        cpu(&[2], vec![1.0, -2.0]),
        cpu(&[2], vec![0.0; 2]),
        cpu(&[2], vec![0.0; 2]),
    );
    let mut copy = Tensor::zeros(&[2], DType::BF16, &Device::Cpu).unwrap();
    adamw_step(
        &mut wt,
        &mut mt,
        &mut vt,
        Some(&mut copy),
        &cpu(&[2], vec![0.5, -0.25]),
        &cfg,
        1,
        1.0,
    )
    .unwrap();
    assert_eq!(wt.to_f32_vec().unwrap(), w);
    assert_eq!(copy.to_f32_vec().unwrap(), round_bf16(&w));
    assert!(adamw_step(&mut wt, &mut mt, &mut vt, None, &g, &cfg, 0, 1.0).is_err());
}

cuda_test! {
    fn cuda_small_ops_match_cpu(dev) {
        let mut rng = Rng::new(fresh_seed("cuda_small_ops_match_cpu"));
        let cpu_dev = Device::Cpu;
        for dtype in [DType::F32, DType::BF16] {
            let round = |v: Vec<f32>| if dtype == DType::BF16 { round_bf16(&v) } else { v };
            let on = |d: &Device, shape: &[usize], v: &[f32]| Tensor::from_f32_as(shape, v, dtype, d).unwrap();
            // The bf16 rule measures against the exact result: the CPU's f32 one from the same
            // (bf16-valued) inputs, not the CPU's result rounded to bf16, which one rounding flipped
            // by a last-bit difference in f32 would fail.
            let exact_as = |d: &Device| if d.is_cuda() { dtype } else { DType::F32 };
            let tag = dtype.name();
            // rope, queries and keys in one launch: 16-byte runs of frequencies (head_dim 64, 96;
            // 72 in f32), element by element where half a head is no multiple of the run (72 in
            // bf16, 4); positions past 105,615 where the angle's reduction matters most.
            for (n, heads, kv_heads, d, max_pos) in [
                (37, 9, 3, 64, 8192),
                (5, 3, 1, 96, 8192),
                (7, 2, 2, 72, 400_000),
                (9, 4, 2, 4, 1_000_000),
            ] {
                let width = (heads + 2 * kv_heads) * d;
                let qkv = round(rng.normal_vec(n * width, 1.0));
                let dq = round(rng.normal_vec(n * heads * d, 1.0));
                let (dk, dv) = (round(rng.normal_vec(n * kv_heads * d, 1.0)), round(rng.normal_vec(n * kv_heads * d, 1.0)));
                let pos: Vec<i32> = (0..n).map(|_| rng.below(max_pos) as i32).collect();
                let f = inv_freq(d, 100_000.0);
                let run = |dv_: &Device| {
                    let p = Tensor::from_i32(&[n], pos.clone(), dv_).unwrap();
                    let fr = Tensor::from_f32(&[d / 2], f.clone(), dv_).unwrap();
                    let on = |shape: &[usize], v: &[f32]| Tensor::from_f32_as(shape, v, exact_as(dv_), dv_).unwrap();
                    let (yq, yk, yv) = rope_qkv_fwd(&on(&[n, width], &qkv), &p, &fr, heads, kv_heads).unwrap();
                    let (gq, gk, gv) = (on(&[n, heads * d], &dq), on(&[n, kv_heads * d], &dk), on(&[n, kv_heads * d], &dv));
                    let dqkv = rope_qkv_bwd(&gq, &gk, &gv, &p, &fr, heads, kv_heads).unwrap();
                    let alone = rope_fwd(&gq, &p, &fr, heads).unwrap();
                    let alone_bwd = rope_bwd(&gk, &p, &fr, kv_heads).unwrap();
                    [yq, yk, yv, dqkv, alone, alone_bwd].map(|t| t.to_f32_vec().unwrap())
                };
                let (want, got) = (run(&cpu_dev), run(&dev));
                let case = format!("{tag} n{n} heads{heads}/{kv_heads} d{d}");
                for (i, name) in ["rope_qkv_fwd.q", "rope_qkv_fwd.k", "rope_qkv_fwd.v", "rope_qkv_bwd", "rope_fwd", "rope_bwd"]
                    .into_iter()
                    .enumerate()
                {
                    check_output(name, &case, &got[i], &want[i], dtype, 1e-5, 1e-4);
                }
                // Values and their gradients are carried, not computed: exactly.
                assert_eq!(got[2], want[2], "rope_qkv_fwd.v {case}");
            }
            // swiglu, gate and up side by side: 16-byte vectors (I a multiple of 8), and element by
            // element (I odd)
            for (rows, inter) in [(37, 1000), (5, 1001)] {
                let m = rows * inter;
                let (gu, dh) = (round(rng.normal_vec(2 * m, 1.5)), round(rng.normal_vec(m, 1.0)));
                let run = |dv: &Device| {
                    let on = |shape: &[usize], v: &[f32]| Tensor::from_f32_as(shape, v, exact_as(dv), dv).unwrap();
                    let gut = on(&[rows, 2 * inter], &gu);
                    let h = swiglu_fwd(&gut).unwrap();
                    let dgu = swiglu_bwd(&on(&[rows, inter], &dh), &gut).unwrap();
                    let (dgu2, h2) = swiglu_bwd_and_h(&on(&[rows, inter], &dh), &gut).unwrap();
                    [h, dgu, h2, dgu2].map(|t| t.to_f32_vec().unwrap())
                };
                let (want, got) = (run(&cpu_dev), run(&dev));
                let case = format!("{tag} {rows}x{inter}");
                for (i, name) in ["swiglu_fwd", "swiglu_bwd.dgate_up"].into_iter().enumerate() {
                    check_output(name, &case, &got[i], &want[i], dtype, 1e-6, 1e-5);
                    // With h from the backward's pass: the same values, bit for bit.
                    assert_eq!(got[i + 2], got[i], "swiglu_bwd_and_h {case}: {name}");
                    assert_eq!(want[i + 2], want[i], "swiglu_bwd_and_h {case} on the CPU: {name}");
                }
            }
            // embed
            let (vocab, width, toks) = (1000, 576, 333);
            let table = round(rng.normal_vec(vocab * width, 1.0));
            let ids: Vec<i32> = (0..toks).map(|_| rng.below(vocab) as i32).collect();
            let dout = round(rng.normal_vec(toks * width, 1.0));
            let run = |dv: &Device| {
                let idt = Tensor::from_i32(&[toks], ids.clone(), dv).unwrap();
                let e = embed_fwd(&on(dv, &[vocab, width], &table), &idt).unwrap().to_f32_vec().unwrap();
                let mut dt = Tensor::zeros(&[vocab, width], DType::F32, dv).unwrap();
                embed_bwd(&mut dt, &on(dv, &[toks, width], &dout), &idt).unwrap();
                (e, dt.to_f32_vec().unwrap())
            };
            let (want, got) = (run(&cpu_dev), run(&dev));
            check_output("embed_fwd", tag, &got.0, &want.0, DType::F32, 0.0, 0.0);
            check_output("embed_bwd", tag, &got.1, &want.1, DType::F32, 1e-6, 1e-5);
            // rows_store: 333 rows scattered into distinct slots of a 1000-row cache, the rest kept.
            let mut slots: Vec<i32> = (0..vocab as i32).collect();
            for i in (1..slots.len()).rev() {
                slots.swap(i, rng.below(i + 1));
            }
            slots.truncate(toks);
            // The pair: keys and values of a layer into their two caches in one launch.
            let values = round(rng.normal_vec(toks * width, 1.0));
            let value_cache = round(rng.normal_vec(vocab * width, 1.0));
            let run = |dv: &Device| {
                let mut cache = on(dv, &[vocab, width], &table);
                let rt = Tensor::from_i32(&[toks], slots.clone(), dv).unwrap();
                let src = on(dv, &[toks, width], &dout);
                rows_store(&mut cache, &src, &rt).unwrap();
                let (mut k, mut v) = (on(dv, &[vocab, width], &table), on(dv, &[vocab, width], &value_cache));
                rows_store_pair(&mut k, &src, &mut v, &on(dv, &[toks, width], &values), &rt).unwrap();
                [cache, k, v].map(|t| t.to_f32_vec().unwrap())
            };
            let (want, got) = (run(&cpu_dev), run(&dev));
            for (i, name) in ["rows_store", "rows_store_pair.1", "rows_store_pair.2"].into_iter().enumerate() {
                check_output(name, tag, &got[i], &want[i], DType::F32, 0.0, 0.0);
            }
            // rows_sum: 16-byte vectors (576 wide) and element by element (an odd width), groups of
            // up to dozens of rows and empty ones, summed in f32 in list order: bit for bit the
            // CPU's f32 sums, then one rounding to the dtype.
            for width in [576, 75] {
                let (n, src_rows) = (97, 333);
                let g = random_groups(&mut rng, n, src_rows);
                let x = round(rng.normal_vec(src_rows * width, 1.0));
                let run = |dv: &Device| {
                    let groups = RowGroups::new(&g, src_rows, dv).unwrap();
                    rows_sum(&on(dv, &[src_rows, width], &x), &groups).unwrap().to_f32_vec().unwrap()
                };
                let (want, got) = (run(&cpu_dev), run(&dev));
                let want = if dtype == DType::BF16 { round_bf16(&want) } else { want };
                check_output("rows_sum", &format!("{tag} {n}x{width} from {src_rows}"), &got, &want, DType::F32, 0.0, 0.0);
            }
            // elementwise
            let (r, c) = (129, 333);
            let (a, b, bias) = (round(rng.normal_vec(r * c, 1.0)), round(rng.normal_vec(r * c, 1.0)), round(rng.normal_vec(c, 1.0)));
            let run = |dv: &Device| {
                let at = on(dv, &[r, c], &a);
                let s = add(&at, &on(dv, &[r, c], &b)).unwrap().to_f32_vec().unwrap();
                let ba = bias_add(&at, &on(dv, &[c], &bias)).unwrap().to_f32_vec().unwrap();
                let mut db = Tensor::from_f32(&[c], vec![0.5; c], dv).unwrap();
                bias_grad(&mut db, &at).unwrap();
                let c32 = cast(&at, DType::F32).unwrap().to_f32_vec().unwrap();
                let c16 = cast(&at, DType::BF16).unwrap().to_f32_vec().unwrap();
                (s, ba, db.to_f32_vec().unwrap(), c32, c16)
            };
            let (want, got) = (run(&cpu_dev), run(&dev));
            check_output("add", tag, &got.0, &want.0, dtype, 0.0, 0.0);
            check_output("bias_add", tag, &got.1, &want.1, dtype, 0.0, 0.0);
            check_output("bias_grad", tag, &got.2, &want.2, DType::F32, 1e-5, 1e-5);
            check_output("cast_f32", tag, &got.3, &want.3, DType::F32, 0.0, 0.0);
            check_output("cast_bf16", tag, &got.4, &want.4, DType::F32, 0.0, 0.0);
        }
        // adamw with clipping and the bf16 copy
        let n = 100_003;
        let cfg = AdamWConfig { lr: 1e-3, weight_decay: 0.1, ..AdamWConfig::default() };
        let (w0, g) = (rng.normal_vec(n, 1.0), rng.normal_vec(n, 1.0));
        let run = |dv: &Device| {
            let t = |v: &[f32]| Tensor::from_f32(&[n], v.to_vec(), dv).unwrap();
            let (mut w, mut m, mut v) = (t(&w0), t(&vec![0.0; n]), t(&vec![0.0; n]));
            let mut copy = Tensor::zeros(&[n], DType::BF16, dv).unwrap();
            let gt = t(&g);
            let norm = global_grad_norm(&[&gt]).unwrap();
            for step in 1..=3 {
                adamw_step(&mut w, &mut m, &mut v, Some(&mut copy), &gt, &cfg, step, clip_coefficient(norm, 1.0)).unwrap();
            }
            (norm, w.to_f32_vec().unwrap(), copy.to_f32_vec().unwrap())
        };
        let (want, got) = (run(&cpu_dev), run(&dev));
        assert!((want.0 - got.0).abs() <= 1e-5 * want.0, "grad norm {} vs {}", got.0, want.0);
        check_output("adamw.w", "n100003", &got.1, &want.1, DType::F32, 1e-6, 1e-5);
        // The copy is the device's own weights rounded once.
        check_output("adamw.copy", "n100003", &got.2, &round_bf16(&got.1), DType::F32, 0.0, 0.0);
        // The global norm over buffers of several sizes (one block's worth, many blocks, past the
        // block cap), their partial sums read back together.
        let parts: Vec<Vec<f32>> = [70_001, 3, 1, 262_144, 5_000_000].iter().map(|&k| rng.normal_vec(k, 2.0)).collect();
        let norm_on = |dv: &Device| {
            let ts: Vec<Tensor> = parts.iter().map(|p| Tensor::from_f32(&[p.len()], p.clone(), dv).unwrap()).collect();
            global_grad_norm(&ts.iter().collect::<Vec<_>>()).unwrap()
        };
        let exact = parts.iter().flatten().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        let (want, got) = (norm_on(&cpu_dev), norm_on(&dev));
        assert!((want - exact).abs() <= 1e-12 * exact, "CPU grad norm {want} vs {exact}");
        assert!((got - exact).abs() <= 1e-6 * exact, "grad norm over several buffers {got} vs {exact}");
        rlhf_kernels::testing::report("global_grad_norm", "5 buffers", (got - exact).abs() / exact, "rel 1e-6");
    }
}
