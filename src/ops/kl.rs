//! KL divergence, the twin of `kernels/kl.cu`.
//!
//! Full: `KL(softmax(policy) ‖ softmax(ref))` per row of two `[N, V]` logit tensors, and its gradient
//! with respect to the policy logits (the reference is frozen). Sampled: Schulman's k1, k2, k3
//! estimators from per-token log-probs, with their gradients with respect to the policy's log-prob.

use cudarc::driver::PushKernelArg;
use half::bf16;
use num_traits::Float;

use crate::device::profile;
use crate::device::tensor::{host_f32, CudaElem};
use crate::device::{same_device, DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::{per_element, per_row, to_i32};

const OP_FWD: &str = "kl_full_fwd";
const OP_BWD: &str = "kl_full_bwd";
const OP_SAMPLED: &str = "kl_sampled";
const THREADS: u32 = 512;

fn lse<F: Float>(x: &[F]) -> F {
    let m = x.iter().copied().fold(F::neg_infinity(), F::max);
    m + x.iter().fold(F::zero(), |s, &v| s + (v - m).exp()).ln()
}

/// CPU reference forward. policy, reference: [N, V]; kl, lse_p, lse_q: [N].
pub fn kl_full_fwd_ref<F: Float>(
    kl: &mut [F],
    lse_p: &mut [F],
    lse_q: &mut [F],
    policy: &[F],
    reference: &[F],
    vocab: usize,
) {
    for (row, (x, y)) in policy
        .chunks_exact(vocab)
        .zip(reference.chunks_exact(vocab))
        .enumerate()
    {
        let (lp, lq) = (lse(x), lse(y));
        let mut k = F::zero();
        for (&xv, &yv) in x.iter().zip(y) {
            if xv == F::neg_infinity() {
                continue; // p = 0: no term, whatever the reference holds there
            }
            let logp = xv - lp;
            k = k + logp.exp() * (logp - (yv - lq));
        }
        kl[row] = k;
        lse_p[row] = lp;
        lse_q[row] = lq;
    }
}

/// CPU reference backward: dpolicy [N, V] (overwritten) for upstream [N].
#[allow(clippy::too_many_arguments)]
pub fn kl_full_bwd_ref<F: Float>(
    dpolicy: &mut [F],
    policy: &[F],
    reference: &[F],
    lse_p: &[F],
    lse_q: &[F],
    kl: &[F],
    upstream: &[F],
    vocab: usize,
) {
    for (row, ((x, y), dx)) in policy
        .chunks_exact(vocab)
        .zip(reference.chunks_exact(vocab))
        .zip(dpolicy.chunks_exact_mut(vocab))
        .enumerate()
    {
        for v in 0..vocab {
            let logp = x[v] - lse_p[row];
            let p = logp.exp();
            dx[v] = if p == F::zero() {
                F::zero()
            } else {
                upstream[row] * p * (logp - (y[v] - lse_q[row]) - kl[row])
            };
        }
    }
}

/// Per-row outputs, all `[N]` f32; the log-sum-exps are kept for the backward.
pub struct KlFullOut {
    pub kl: Tensor,
    pub lse_policy: Tensor,
    pub lse_ref: Tensor,
}

pub fn kl_full_fwd(policy: &Tensor, reference: &Tensor) -> Result<KlFullOut> {
    let device = same_device(OP_FWD, &[policy, reference])?;
    let _profile = profile::scope(device, OP_FWD);
    let (n, vocab) = policy.dims2(OP_FWD)?;
    reference.expect_shape(OP_FWD, "reference logits", policy.shape())?;
    reference.expect_dtype(OP_FWD, policy.dtype())?;
    match device {
        Device::Cpu => {
            let (x, y) = (host_f32(policy, OP_FWD)?, host_f32(reference, OP_FWD)?);
            let (mut kl, mut lp, mut lq) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
            kl_full_fwd_ref(&mut kl, &mut lp, &mut lq, &x, &y, vocab);
            Ok(KlFullOut {
                kl: Tensor::from_f32(&[n], kl, device)?,
                lse_policy: Tensor::from_f32(&[n], lp, device)?,
                lse_ref: Tensor::from_f32(&[n], lq, device)?,
            })
        }
        Device::Cuda(_) => match policy.dtype() {
            DType::F32 => fwd_cuda::<f32>(policy, reference, n, vocab),
            DType::BF16 => fwd_cuda::<bf16>(policy, reference, n, vocab),
            DType::I32 => Err(Error::DType {
                op: OP_FWD,
                dtype: "i32",
            }),
        },
    }
}

/// Gradient of `Σ upstream·KL` with respect to the policy logits, in their dtype.
pub fn kl_full_bwd(
    policy: &Tensor,
    reference: &Tensor,
    out: &KlFullOut,
    upstream: &Tensor,
) -> Result<Tensor> {
    let device = same_device(OP_BWD, &[policy, reference, &out.kl, upstream])?;
    let _profile = profile::scope(device, OP_BWD);
    let (n, vocab) = policy.dims2(OP_BWD)?;
    reference.expect_shape(OP_BWD, "reference logits", policy.shape())?;
    reference.expect_dtype(OP_BWD, policy.dtype())?;
    for (name, t) in [
        ("kl", &out.kl),
        ("lse_policy", &out.lse_policy),
        ("lse_ref", &out.lse_ref),
        ("upstream", upstream),
    ] {
        t.expect_shape(OP_BWD, name, &[n])?;
        t.expect_dtype(OP_BWD, DType::F32)?;
    }
    match device {
        Device::Cpu => {
            let (x, y) = (host_f32(policy, OP_BWD)?, host_f32(reference, OP_BWD)?);
            let mut dx = vec![0.0f32; n * vocab];
            kl_full_bwd_ref(
                &mut dx,
                &x,
                &y,
                out.lse_policy.cpu_f32(OP_BWD)?,
                out.lse_ref.cpu_f32(OP_BWD)?,
                out.kl.cpu_f32(OP_BWD)?,
                upstream.cpu_f32(OP_BWD)?,
                vocab,
            );
            Tensor::from_f32_as(&[n, vocab], &dx, policy.dtype(), device)
        }
        Device::Cuda(_) => match policy.dtype() {
            DType::F32 => bwd_cuda::<f32>(policy, reference, out, upstream, n, vocab),
            DType::BF16 => bwd_cuda::<bf16>(policy, reference, out, upstream, n, vocab),
            DType::I32 => Err(Error::DType {
                op: OP_BWD,
                dtype: "i32",
            }),
        },
    }
}

fn fwd_cuda<T: CudaElem>(
    policy: &Tensor,
    reference: &Tensor,
    n: usize,
    vocab: usize,
) -> Result<KlFullOut> {
    let dev = policy.device().as_cuda(OP_FWD)?;
    let mut out = KlFullOut {
        kl: Tensor::empty(&[n], DType::F32, policy.device())?,
        lse_policy: Tensor::empty(&[n], DType::F32, policy.device())?,
        lse_ref: Tensor::empty(&[n], DType::F32, policy.device())?,
    };
    if n == 0 {
        return Ok(out);
    }
    let v = to_i32(OP_FWD, "vocab", vocab)?;
    let f = dev.function("kl", T::pick("kl_full_fwd_f32", "kl_full_fwd_bf16"))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(out.kl.cuda_f32_mut(OP_FWD)?)
        .arg(out.lse_policy.cuda_f32_mut(OP_FWD)?)
        .arg(out.lse_ref.cuda_f32_mut(OP_FWD)?)
        .arg(T::slice(policy, OP_FWD)?)
        .arg(T::slice(reference, OP_FWD)?)
        .arg(&v);
    // SAFETY: both logit tensors hold n*vocab elements, the outputs n; one block per row.
    unsafe { b.launch(per_row(OP_FWD, n, THREADS, 0)?) }?;
    Ok(out)
}

fn bwd_cuda<T: CudaElem>(
    policy: &Tensor,
    reference: &Tensor,
    out: &KlFullOut,
    upstream: &Tensor,
    n: usize,
    vocab: usize,
) -> Result<Tensor> {
    let dev = policy.device().as_cuda(OP_BWD)?;
    let mut dx = Tensor::empty(&[n, vocab], T::DTYPE, policy.device())?;
    if n == 0 {
        return Ok(dx);
    }
    let v = to_i32(OP_BWD, "vocab", vocab)?;
    let f = dev.function("kl", T::pick("kl_full_bwd_f32", "kl_full_bwd_bf16"))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(T::slice_mut(&mut dx, OP_BWD)?)
        .arg(T::slice(policy, OP_BWD)?)
        .arg(T::slice(reference, OP_BWD)?)
        .arg(out.lse_policy.cuda_f32(OP_BWD)?)
        .arg(out.lse_ref.cuda_f32(OP_BWD)?)
        .arg(out.kl.cuda_f32(OP_BWD)?)
        .arg(upstream.cuda_f32(OP_BWD)?)
        .arg(&v);
    // SAFETY: dx, policy, reference hold n*vocab elements, the per-row inputs n; one block per row.
    unsafe { b.launch(per_row(OP_BWD, n, THREADS, 0)?) }?;
    Ok(dx)
}

/// Which sampled estimator of KL(policy ‖ ref).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KlEstimator {
    /// `−logr`: unbiased, high variance, can be negative.
    K1,
    /// `½·logr²`: biased, low variance.
    K2,
    /// `exp(logr) − 1 − logr`: unbiased, low variance, never negative.
    K3,
}

impl KlEstimator {
    fn code(self) -> i32 {
        match self {
            KlEstimator::K1 => 1,
            KlEstimator::K2 => 2,
            KlEstimator::K3 => 3,
        }
    }
}

/// CPU reference: the estimator for one token and its derivative with respect to policy_lp.
pub fn kl_sampled_ref<F: Float>(policy_lp: F, ref_lp: F, est: KlEstimator) -> (F, F) {
    let logr = ref_lp - policy_lp;
    let half = F::from(0.5).unwrap();
    match est {
        KlEstimator::K1 => (-logr, F::one()),
        KlEstimator::K2 => (half * logr * logr, -logr),
        KlEstimator::K3 => (logr.exp_m1() - logr, -logr.exp_m1()),
    }
}

fn check_sampled(policy_lp: &Tensor, others: &[(&str, &Tensor)]) -> Result<usize> {
    let n = policy_lp.numel();
    policy_lp.expect_dtype(OP_SAMPLED, DType::F32)?;
    for (name, t) in others {
        t.expect_shape(OP_SAMPLED, name, policy_lp.shape())?;
        t.expect_dtype(OP_SAMPLED, DType::F32)?;
    }
    Ok(n)
}

/// The estimator per token, shaped like `policy_lp`.
pub fn kl_sampled_fwd(policy_lp: &Tensor, ref_lp: &Tensor, est: KlEstimator) -> Result<Tensor> {
    let device = same_device(OP_SAMPLED, &[policy_lp, ref_lp])?;
    let _profile = profile::scope(device, OP_SAMPLED);
    let n = check_sampled(policy_lp, &[("ref_lp", ref_lp)])?;
    match device {
        Device::Cpu => {
            let (p, r) = (policy_lp.cpu_f32(OP_SAMPLED)?, ref_lp.cpu_f32(OP_SAMPLED)?);
            let k = p
                .iter()
                .zip(r)
                .map(|(&p, &r)| kl_sampled_ref(p, r, est).0)
                .collect();
            Tensor::from_f32(policy_lp.shape(), k, device)
        }
        Device::Cuda(dev) => {
            let mut k = Tensor::empty(policy_lp.shape(), DType::F32, device)?;
            let (kind, n_i) = (est.code(), to_i32(OP_SAMPLED, "tokens", n)?);
            let f = dev.function("kl", "kl_sampled_fwd")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(k.cuda_f32_mut(OP_SAMPLED)?)
                .arg(policy_lp.cuda_f32(OP_SAMPLED)?)
                .arg(ref_lp.cuda_f32(OP_SAMPLED)?)
                .arg(&kind)
                .arg(&n_i);
            // SAFETY: all three buffers hold n floats; one thread per element, bounds-checked.
            unsafe { b.launch(per_element(OP_SAMPLED, n)?) }?;
            Ok(k)
        }
    }
}

/// Gradient of `Σ upstream·k` with respect to `policy_lp`.
pub fn kl_sampled_bwd(
    policy_lp: &Tensor,
    ref_lp: &Tensor,
    upstream: &Tensor,
    est: KlEstimator,
) -> Result<Tensor> {
    let device = same_device(OP_SAMPLED, &[policy_lp, ref_lp, upstream])?;
    let _profile = profile::scope(device, OP_SAMPLED);
    let n = check_sampled(policy_lp, &[("ref_lp", ref_lp), ("upstream", upstream)])?;
    match device {
        Device::Cpu => {
            let (p, r, g) = (
                policy_lp.cpu_f32(OP_SAMPLED)?,
                ref_lp.cpu_f32(OP_SAMPLED)?,
                upstream.cpu_f32(OP_SAMPLED)?,
            );
            let d = p
                .iter()
                .zip(r)
                .zip(g)
                .map(|((&p, &r), &g)| g * kl_sampled_ref(p, r, est).1)
                .collect();
            Tensor::from_f32(policy_lp.shape(), d, device)
        }
        Device::Cuda(dev) => {
            let mut d = Tensor::empty(policy_lp.shape(), DType::F32, device)?;
            let (kind, n_i) = (est.code(), to_i32(OP_SAMPLED, "tokens", n)?);
            let f = dev.function("kl", "kl_sampled_bwd")?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(d.cuda_f32_mut(OP_SAMPLED)?)
                .arg(policy_lp.cuda_f32(OP_SAMPLED)?)
                .arg(ref_lp.cuda_f32(OP_SAMPLED)?)
                .arg(upstream.cuda_f32(OP_SAMPLED)?)
                .arg(&kind)
                .arg(&n_i);
            // SAFETY: all four buffers hold n floats; one thread per element, bounds-checked.
            unsafe { b.launch(per_element(OP_SAMPLED, n)?) }?;
            Ok(d)
        }
    }
}
