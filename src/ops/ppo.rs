//! PPO's per-token maths, the twin of `kernels/ppo.cu`: KL-penalised rewards, GAE, masked whitening
//! (one pass per rollout, `ppo_advantages`), and the clipped policy and value losses with their
//! gradients (every minibatch, `ppo_loss`). Conventions: TRL's (../shared/LOSSES.md).
//!
//! Rows are responses `[B, T]` with `mask = 1` on the response tokens, a prefix of each row.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use num_traits::Float;

use crate::device::profile;
use crate::device::{same_device, DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::kl::KlEstimator;
use crate::ops::{per_row, to_i32};

const OP_ADV: &str = "ppo_advantages";
const OP_LOSS: &str = "ppo_loss";
const WHITEN_EPS: f64 = 1e-8;
/// Threads of a `ppo_gae` block (GAE_THREADS in kernels/ppo.cu).
const GAE_THREADS: u32 = 256;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PpoConfig {
    pub kl_coef: f64,
    /// The per-token KL estimate in the reward: k1 (`old − ref`, InstructGPT's) or k3.
    pub kl_estimator: KlEstimator,
    pub gamma: f64,
    pub lam: f64,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
}

impl Default for PpoConfig {
    /// InstructGPT's values, as TRL's defaults.
    fn default() -> Self {
        PpoConfig {
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
        }
    }
}

/// CPU reference of the rollout side. Outputs rewards, advantages, returns, whitened: [B, T].
pub struct AdvantagesRef<F> {
    pub rewards: Vec<F>,
    pub advantages: Vec<F>,
    pub returns: Vec<F>,
    pub whitened: Vec<F>,
    pub mean: F,
    pub var: F,
}

pub fn ppo_advantages_ref<F: Float>(
    cfg: &PpoConfig,
    old_lp: &[F],
    ref_lp: &[F],
    values: &[F],
    scores: &[F],
    mask: &[F],
    cols: usize,
) -> AdvantagesRef<F> {
    let f = |v: f64| F::from(v).unwrap();
    let n = mask.len();
    let (mut rewards, mut adv, mut ret) =
        (vec![F::zero(); n], vec![F::zero(); n], vec![F::zero(); n]);
    for (row, &score) in scores.iter().enumerate() {
        let o = row * cols;
        let on = |t: usize| mask[o + t] > F::zero();
        let last = (0..cols).rev().find(|&t| on(t));
        let (mut next_v, mut next_a) = (F::zero(), F::zero());
        for t in (0..cols).rev() {
            if !on(t) {
                next_v = F::zero();
                next_a = F::zero();
                continue;
            }
            let i = o + t;
            let penalty = match cfg.kl_estimator {
                KlEstimator::K3 => {
                    crate::ops::kl::kl_sampled_ref(old_lp[i], ref_lp[i], KlEstimator::K3).0
                }
                // k2 is refused by `ppo_advantages`; the reference computes k1 for it.
                KlEstimator::K1 | KlEstimator::K2 => old_lp[i] - ref_lp[i],
            };
            let mut r = -f(cfg.kl_coef) * penalty;
            if Some(t) == last {
                r = r + score;
            }
            let delta = r + f(cfg.gamma) * next_v - values[i];
            let a = delta + f(cfg.gamma) * f(cfg.lam) * next_a;
            rewards[i] = r;
            adv[i] = a;
            ret[i] = a + values[i];
            next_v = values[i];
            next_a = a;
        }
    }
    let count = mask.iter().filter(|&&m| m > F::zero()).count();
    let cnt = f(count as f64);
    let mean = adv
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m > F::zero())
        .fold(F::zero(), |s, (&a, _)| s + a)
        / cnt;
    let ss = adv
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m > F::zero())
        .fold(F::zero(), |s, (&a, _)| s + (a - mean) * (a - mean));
    let var = if count > 1 {
        ss / (cnt - F::one())
    } else {
        F::zero()
    };
    let inv_std = F::one() / (var + f(WHITEN_EPS)).sqrt();
    let whitened = adv
        .iter()
        .zip(mask)
        .map(|(&a, &m)| {
            if m > F::zero() {
                (a - mean) * inv_std
            } else {
                F::zero()
            }
        })
        .collect();
    AdvantagesRef {
        rewards,
        advantages: adv,
        returns: ret,
        whitened,
        mean,
        var,
    }
}

/// CPU reference of the loss side.
pub struct LossRef<F> {
    pub loss: F,
    pub pg_loss: F,
    pub vf_loss: F,
    pub clip_fraction: F,
    pub approx_kl: F,
    pub grad_new_logps: Vec<F>,
    pub grad_new_values: Vec<F>,
}

#[allow(clippy::too_many_arguments)]
pub fn ppo_loss_ref<F: Float>(
    cfg: &PpoConfig,
    new_lp: &[F],
    new_v: &[F],
    old_lp: &[F],
    old_v: &[F],
    whitened: &[F],
    returns: &[F],
    mask: &[F],
) -> LossRef<F> {
    let f = |v: f64| F::from(v).unwrap();
    let (one, half) = (F::one(), f(0.5));
    let (c, cv) = (f(cfg.cliprange), f(cfg.cliprange_value));
    let m_total = mask.iter().fold(F::zero(), |s, &m| s + m);
    let inv_m = one / m_total;
    let (mut pg, mut vf, mut clipped, mut kl2) = (F::zero(), F::zero(), F::zero(), F::zero());
    let n = mask.len();
    let (mut g_lp, mut g_v) = (vec![F::zero(); n], vec![F::zero(); n]);
    for i in 0..n {
        let m = mask[i];
        if m <= F::zero() {
            continue;
        }
        let diff = new_lp[i] - old_lp[i];
        let ratio = diff.exp();
        let a = whitened[i];
        let pg1 = -a * ratio;
        let pg2 = -a * ratio.max(one - c).min(one + c);
        let vclip = old_v[i] + (new_v[i] - old_v[i]).max(-cv).min(cv);
        let vf1 = (new_v[i] - returns[i]) * (new_v[i] - returns[i]);
        let vf2 = (vclip - returns[i]) * (vclip - returns[i]);
        pg = pg + m * pg1.max(pg2);
        vf = vf + m * vf1.max(vf2);
        if pg2 > pg1 {
            clipped = clipped + m;
        }
        kl2 = kl2 + m * diff * diff;
        // Where the clipped term is strictly larger the ratio is outside the clip range, whose
        // derivative is 0; on ties both terms have the unclipped derivative.
        if pg1 >= pg2 {
            g_lp[i] = m * inv_m * pg1;
        }
        if vf1 >= vf2 {
            g_v[i] = f(cfg.vf_coef) * m * inv_m * (new_v[i] - returns[i]);
        }
    }
    let pg_loss = pg * inv_m;
    let vf_loss = half * vf * inv_m;
    LossRef {
        loss: pg_loss + f(cfg.vf_coef) * vf_loss,
        pg_loss,
        vf_loss,
        clip_fraction: clipped * inv_m,
        approx_kl: half * kl2 * inv_m,
        grad_new_logps: g_lp,
        grad_new_values: g_v,
    }
}

/// The rollout's advantages, all `[B, T]` f32 on the inputs' device.
pub struct PpoAdvantages {
    pub rewards: Tensor,
    pub advantages: Tensor,
    pub returns: Tensor,
    pub whitened: Tensor,
}

fn check_bt(op: &'static str, shape: &[usize], named: &[(&str, &Tensor)]) -> Result<()> {
    for (name, t) in named {
        t.expect_shape(op, name, shape)?;
        t.expect_dtype(op, DType::F32)?;
    }
    Ok(())
}

pub fn ppo_advantages(
    cfg: &PpoConfig,
    old_logps: &Tensor,
    ref_logps: &Tensor,
    old_values: &Tensor,
    scores: &Tensor,
    mask: &Tensor,
) -> Result<PpoAdvantages> {
    let device = same_device(OP_ADV, &[old_logps, ref_logps, old_values, scores, mask])?;
    let _profile = profile::scope(device, OP_ADV);
    if cfg.kl_estimator == KlEstimator::K2 {
        return Err(Error::Unsupported {
            op: OP_ADV,
            detail: "the k2 estimator is biased; PPO rewards take k1 or k3".into(),
        });
    }
    let (rows, cols) = mask.dims2(OP_ADV)?;
    check_bt(
        OP_ADV,
        mask.shape(),
        &[
            ("old_logps", old_logps),
            ("ref_logps", ref_logps),
            ("old_values", old_values),
            ("mask", mask),
        ],
    )?;
    check_bt(OP_ADV, &[rows], &[("scores", scores)])?;
    let shape = [rows, cols];
    match device {
        Device::Cpu => {
            let r = ppo_advantages_ref(
                cfg,
                old_logps.cpu_f32(OP_ADV)?,
                ref_logps.cpu_f32(OP_ADV)?,
                old_values.cpu_f32(OP_ADV)?,
                scores.cpu_f32(OP_ADV)?,
                mask.cpu_f32(OP_ADV)?,
                cols,
            );
            Ok(PpoAdvantages {
                rewards: Tensor::from_f32(&shape, r.rewards, device)?,
                advantages: Tensor::from_f32(&shape, r.advantages, device)?,
                returns: Tensor::from_f32(&shape, r.returns, device)?,
                whitened: Tensor::from_f32(&shape, r.whitened, device)?,
            })
        }
        Device::Cuda(dev) => {
            let mut out = PpoAdvantages {
                rewards: Tensor::empty(&shape, DType::F32, device)?,
                advantages: Tensor::empty(&shape, DType::F32, device)?,
                returns: Tensor::empty(&shape, DType::F32, device)?,
                whitened: Tensor::empty(&shape, DType::F32, device)?,
            };
            if rows == 0 {
                return Ok(out);
            }
            let mut stats = Tensor::empty(&[rows, 3], DType::F32, device)?;
            let mut moments = Tensor::empty(&[2], DType::F32, device)?;
            let (b_i, t_i) = (to_i32(OP_ADV, "rows", rows)?, to_i32(OP_ADV, "cols", cols)?);
            let (kl, gamma, lam, eps) = (
                cfg.kl_coef as f32,
                cfg.gamma as f32,
                cfg.lam as f32,
                WHITEN_EPS as f32,
            );
            let kl_kind: i32 = if cfg.kl_estimator == KlEstimator::K3 {
                3
            } else {
                1
            };
            let f = dev.function("ppo", "ppo_gae")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(out.rewards.cuda_f32_mut(OP_ADV)?)
                .arg(out.advantages.cuda_f32_mut(OP_ADV)?)
                .arg(out.returns.cuda_f32_mut(OP_ADV)?)
                .arg(stats.cuda_f32_mut(OP_ADV)?)
                .arg(old_logps.cuda_f32(OP_ADV)?)
                .arg(ref_logps.cuda_f32(OP_ADV)?)
                .arg(old_values.cuda_f32(OP_ADV)?)
                .arg(scores.cuda_f32(OP_ADV)?)
                .arg(mask.cuda_f32(OP_ADV)?)
                .arg(&b_i)
                .arg(&t_i)
                .arg(&kl)
                .arg(&gamma)
                .arg(&lam)
                .arg(&kl_kind);
            // SAFETY: [B, T] buffers hold rows*cols floats, scores rows, stats rows*3; one block of
            // GAE_THREADS (kernels/ppo.cu) per row.
            unsafe { b.launch(per_row(OP_ADV, rows, GAE_THREADS, 0)?) }?;
            let f = dev.function("ppo", "ppo_whiten")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(out.whitened.cuda_f32_mut(OP_ADV)?)
                .arg(moments.cuda_f32_mut(OP_ADV)?)
                .arg(out.advantages.cuda_f32(OP_ADV)?)
                .arg(stats.cuda_f32(OP_ADV)?)
                .arg(mask.cuda_f32(OP_ADV)?)
                .arg(&b_i)
                .arg(&t_i)
                .arg(&eps);
            // SAFETY: as above; moments holds 2 floats; one block per row.
            unsafe { b.launch(per_row(OP_ADV, rows, 128, 0)?) }?;
            Ok(out)
        }
    }
}

/// The minibatch loss and its gradients (`[B, T]` f32) with respect to the new log-probs and values.
pub struct PpoLossOut {
    pub loss: f64,
    pub pg_loss: f64,
    pub vf_loss: f64,
    pub clip_fraction: f64,
    pub approx_kl: f64,
    pub grad_new_logps: Tensor,
    pub grad_new_values: Tensor,
}

#[allow(clippy::too_many_arguments)]
pub fn ppo_loss(
    cfg: &PpoConfig,
    new_logps: &Tensor,
    new_values: &Tensor,
    old_logps: &Tensor,
    old_values: &Tensor,
    whitened: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
) -> Result<PpoLossOut> {
    let all = [
        new_logps, new_values, old_logps, old_values, whitened, returns, mask,
    ];
    let device = same_device(OP_LOSS, &all)?;
    let _profile = profile::scope(device, OP_LOSS);
    let (rows, cols) = mask.dims2(OP_LOSS)?;
    check_bt(
        OP_LOSS,
        mask.shape(),
        &[
            ("new_logps", new_logps),
            ("new_values", new_values),
            ("old_logps", old_logps),
            ("old_values", old_values),
            ("whitened advantages", whitened),
            ("returns", returns),
        ],
    )?;
    let shape = [rows, cols];
    match device {
        Device::Cpu => {
            fn cpu(t: &Tensor) -> Result<&[f32]> {
                t.cpu_f32(OP_LOSS)
            }
            let mask_v = cpu(mask)?;
            if !mask_v.iter().any(|&m| m > 0.0) {
                return Err(Error::Unsupported {
                    op: OP_LOSS,
                    detail: "the mask selects no token".into(),
                });
            }
            let r = ppo_loss_ref(
                cfg,
                cpu(new_logps)?,
                cpu(new_values)?,
                cpu(old_logps)?,
                cpu(old_values)?,
                cpu(whitened)?,
                cpu(returns)?,
                mask_v,
            );
            Ok(PpoLossOut {
                loss: r.loss as f64,
                pg_loss: r.pg_loss as f64,
                vf_loss: r.vf_loss as f64,
                clip_fraction: r.clip_fraction as f64,
                approx_kl: r.approx_kl as f64,
                grad_new_logps: Tensor::from_f32(&shape, r.grad_new_logps, device)?,
                grad_new_values: Tensor::from_f32(&shape, r.grad_new_values, device)?,
            })
        }
        Device::Cuda(dev) => {
            let mut g_lp = Tensor::empty(&shape, DType::F32, device)?;
            let mut g_v = Tensor::empty(&shape, DType::F32, device)?;
            let mut row_sums = Tensor::empty(&[rows, 5], DType::F32, device)?;
            let mut count = Tensor::empty(&[1], DType::F32, device)?;
            let mut totals = Tensor::empty(&[5], DType::F32, device)?;
            let one_block = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (512, 1, 1),
                shared_mem_bytes: 0,
            };
            let (n_i, b_i, t_i) = (
                to_i32(OP_LOSS, "tokens", rows * cols)?,
                to_i32(OP_LOSS, "rows", rows)?,
                to_i32(OP_LOSS, "cols", cols)?,
            );
            let (c, cv, vf_coef) = (
                cfg.cliprange as f32,
                cfg.cliprange_value as f32,
                cfg.vf_coef as f32,
            );

            let f = dev.function("ppo", "ppo_mask_count")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(count.cuda_f32_mut(OP_LOSS)?)
                .arg(mask.cuda_f32(OP_LOSS)?)
                .arg(&n_i);
            // SAFETY: mask holds rows*cols floats, count 1; one block.
            unsafe { b.launch(one_block) }?;

            let f = dev.function("ppo", "ppo_loss_rows")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(g_lp.cuda_f32_mut(OP_LOSS)?)
                .arg(g_v.cuda_f32_mut(OP_LOSS)?)
                .arg(row_sums.cuda_f32_mut(OP_LOSS)?)
                .arg(new_logps.cuda_f32(OP_LOSS)?)
                .arg(new_values.cuda_f32(OP_LOSS)?)
                .arg(old_logps.cuda_f32(OP_LOSS)?)
                .arg(old_values.cuda_f32(OP_LOSS)?)
                .arg(whitened.cuda_f32(OP_LOSS)?)
                .arg(returns.cuda_f32(OP_LOSS)?)
                .arg(mask.cuda_f32(OP_LOSS)?)
                .arg(count.cuda_f32(OP_LOSS)?)
                .arg(&t_i)
                .arg(&c)
                .arg(&cv)
                .arg(&vf_coef);
            // SAFETY: [B, T] buffers hold rows*cols floats, row_sums rows*5; one block per row.
            unsafe { b.launch(per_row(OP_LOSS, rows, 128, 0)?) }?;

            let f = dev.function("ppo", "ppo_loss_total")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(totals.cuda_f32_mut(OP_LOSS)?)
                .arg(row_sums.cuda_f32(OP_LOSS)?)
                .arg(&b_i)
                .arg(&vf_coef);
            // SAFETY: row_sums holds rows*5 floats, totals 5; one block.
            unsafe { b.launch(one_block) }?;
            let t = totals.to_f32_vec()?;
            if !t[1].is_finite() {
                return Err(Error::Unsupported {
                    op: OP_LOSS,
                    detail: "the mask selects no token".into(),
                });
            }
            Ok(PpoLossOut {
                loss: t[0] as f64,
                pg_loss: t[1] as f64,
                vf_loss: t[2] as f64,
                clip_fraction: t[3] as f64,
                approx_kl: t[4] as f64,
                grad_new_logps: g_lp,
                grad_new_values: g_v,
            })
        }
    }
}
