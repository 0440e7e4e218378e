//! PPO: GAE on a hand-computed example, the loss gradients against finite differences, and the CUDA
//! kernels against the CPU reference.

use rlhf_kernels::cuda_test;
use rlhf_kernels::device::{DType, Device, Tensor};
use rlhf_kernels::ops::ppo::{
    ppo_advantages, ppo_advantages_ref, ppo_loss, ppo_loss_ref, PpoConfig,
};
use rlhf_kernels::testing::{check_output, fd_check, fresh_seed, Rng};

#[test]
fn gae_matches_a_hand_computed_example() {
    let cfg = PpoConfig {
        kl_coef: 0.1,
        gamma: 0.9,
        lam: 0.5,
        ..PpoConfig::default()
    };
    // One row, three response tokens then one pad.
    let old = [-1.0, -2.0, -0.5, 0.0];
    let reference = [-1.5, -1.0, -0.5, 0.0];
    let values = [0.2, -0.1, 0.4, 9.0];
    let mask = [1.0, 1.0, 1.0, 0.0];
    let a = ppo_advantages_ref(&cfg, &old, &reference, &values, &[2.0], &mask, 4);
    let r = [-0.1 * 0.5, -0.1 * -1.0, 2.0];
    let d2 = r[2] - 0.4;
    let d1 = r[1] + 0.9 * 0.4 - (-0.1);
    let d0 = r[0] + 0.9 * -0.1 - 0.2;
    let a2 = d2;
    let a1 = d1 + 0.45 * a2;
    let a0 = d0 + 0.45 * a1;
    let close = |x: f64, y: f64| (x - y).abs() < 1e-12;
    assert!(
        close(a.rewards[0], r[0])
            && close(a.rewards[1], r[1])
            && close(a.rewards[2], r[2])
            && a.rewards[3] == 0.0
    );
    assert!(
        close(a.advantages[0], a0)
            && close(a.advantages[1], a1)
            && close(a.advantages[2], a2)
            && a.advantages[3] == 0.0
    );
    assert!(close(a.returns[1], a1 - 0.1));
    let mean = (a0 + a1 + a2) / 3.0;
    let var = ((a0 - mean).powi(2) + (a1 - mean).powi(2) + (a2 - mean).powi(2)) / 2.0;
    assert!(close(a.whitened[0], (a0 - mean) / (var + 1e-8).sqrt()) && a.whitened[3] == 0.0);
}

struct Rollout {
    rows: usize,
    cols: usize,
    old_lp: Vec<f32>,
    ref_lp: Vec<f32>,
    old_v: Vec<f32>,
    scores: Vec<f32>,
    mask: Vec<f32>,
    new_lp: Vec<f32>,
    new_v: Vec<f32>,
}

fn rollout(rng: &mut Rng, rows: usize, cols: usize) -> Rollout {
    let n = rows * cols;
    let mut mask = vec![0.0; n];
    for r in 0..rows {
        let len = 1 + rng.below(cols);
        for t in 0..len {
            mask[r * cols + t] = 1.0;
        }
    }
    let old_lp = rng.uniform_vec(n, -3.0, -0.01);
    let old_v = rng.normal_vec(n, 1.0);
    Rollout {
        rows,
        cols,
        new_lp: old_lp.iter().map(|&v| v + rng.normal() * 0.3).collect(),
        new_v: old_v.iter().map(|&v| v + rng.normal() * 0.3).collect(),
        ref_lp: rng.uniform_vec(n, -3.0, -0.01),
        scores: rng.normal_vec(rows, 1.0),
        old_lp,
        old_v,
        mask,
    }
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
fn loss_gradients_match_finite_differences() {
    let mut rng = Rng::new(fresh_seed("loss_gradients_match_finite_differences"));
    let cfg = PpoConfig::default();
    let r = rollout(&mut rng, 3, 6);
    let (old_lp, old_v, mask) = (to64(&r.old_lp), to64(&r.old_v), to64(&r.mask));
    let a = ppo_advantages_ref(
        &cfg,
        &old_lp,
        &to64(&r.ref_lp),
        &old_v,
        &to64(&r.scores),
        &mask,
        r.cols,
    );
    let (new_lp, new_v) = (to64(&r.new_lp), to64(&r.new_v));
    let l = ppo_loss_ref(
        &cfg,
        &new_lp,
        &new_v,
        &old_lp,
        &old_v,
        &a.whitened,
        &a.returns,
        &mask,
    );
    let f_lp = |x: &[f64]| {
        ppo_loss_ref(
            &cfg,
            x,
            &new_v,
            &old_lp,
            &old_v,
            &a.whitened,
            &a.returns,
            &mask,
        )
        .loss
    };
    let f_v = |x: &[f64]| {
        ppo_loss_ref(
            &cfg,
            &new_lp,
            x,
            &old_lp,
            &old_v,
            &a.whitened,
            &a.returns,
            &mask,
        )
        .loss
    };
    fd_check(
        "grad_new_logps",
        f_lp,
        &new_lp,
        &l.grad_new_logps,
        1e-7,
        1e-6,
    )
    .unwrap();
    fd_check(
        "grad_new_values",
        f_v,
        &new_v,
        &l.grad_new_values,
        1e-7,
        1e-6,
    )
    .unwrap();
    assert!((l.loss - (l.pg_loss + cfg.vf_coef * l.vf_loss)).abs() < 1e-12);
    assert!((0.0..=1.0).contains(&l.clip_fraction) && l.approx_kl >= 0.0);
}

#[test]
fn an_empty_mask_is_an_error() {
    let t = |v: Vec<f32>| Tensor::from_f32(&[1, 3], v, &Device::Cpu).unwrap();
    let z = || t(vec![0.0; 3]);
    let err = ppo_loss(
        &PpoConfig::default(),
        &z(),
        &z(),
        &z(),
        &z(),
        &z(),
        &z(),
        &z(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("no token"), "{err}");
}

fn run(r: &Rollout, d: &Device) -> Vec<Vec<f32>> {
    let cfg = PpoConfig::default();
    let t = |v: &[f32]| Tensor::from_f32(&[r.rows, r.cols], v.to_vec(), d).unwrap();
    let (old_lp, old_v, mask) = (t(&r.old_lp), t(&r.old_v), t(&r.mask));
    let scores = Tensor::from_f32(&[r.rows], r.scores.clone(), d).unwrap();
    let a = ppo_advantages(&cfg, &old_lp, &t(&r.ref_lp), &old_v, &scores, &mask).unwrap();
    let l = ppo_loss(
        &cfg,
        &t(&r.new_lp),
        &t(&r.new_v),
        &old_lp,
        &old_v,
        &a.whitened,
        &a.returns,
        &mask,
    )
    .unwrap();
    let v = |t: &Tensor| t.to_f32_vec().unwrap();
    vec![
        v(&a.rewards),
        v(&a.advantages),
        v(&a.returns),
        v(&a.whitened),
        vec![
            l.loss as f32,
            l.pg_loss as f32,
            l.vf_loss as f32,
            l.clip_fraction as f32,
            l.approx_kl as f32,
        ],
        v(&l.grad_new_logps),
        v(&l.grad_new_values),
    ]
}

cuda_test! {
    fn cuda_matches_cpu_on_random_rollouts(dev) {
        let mut rng = Rng::new(fresh_seed("ppo cuda_matches_cpu_on_random_rollouts"));
        let names = ["rewards", "advantages", "returns", "whitened", "scalars", "grad_new_logps", "grad_new_values"];
        // 2,500 columns span three of the GAE kernel's 1,024-token chunks, carried from one to the next.
        for &(rows, cols) in &[(1, 1), (4, 13), (64, 512), (37, 1000), (5, 2500)] {
            let r = rollout(&mut rng, rows, cols);
            let (want, got) = (run(&r, &Device::Cpu), run(&r, &dev));
            for ((name, g), w) in names.iter().zip(&got).zip(&want) {
                check_output(&format!("ppo.{name}"), &format!("{rows}x{cols}"), g, w, DType::F32, 1e-5, 1e-4);
            }
        }
    }
}
