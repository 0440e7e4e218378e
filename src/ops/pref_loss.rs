//! Preference losses, the twin of `kernels/pref_loss.cu`: DPO and its variants, SimPO, ORPO and KTO,
//! from per-token log-probs to the batch loss, the logged rewards, and the gradient back to every token.
//!
//! Conventions are TRL's (../shared/LOSSES.md). Paired losses take `2B` rows: rows `0..B` are the
//! chosen responses, rows `B..2B` the rejected of the same pairs. A sequence's log-prob is the sum of
//! its per-token log-probs over `mask = 1` (the mean for IPO, sigmoid_norm, SimPO and ORPO). The batch
//! loss is the mean over pairs (over rows for KTO); `grad_policy_logps` is its gradient.
//!
//! Three steps, three launches on the GPU: per-row masked sums; per-pair losses, rewards and each
//! row's gradient coefficient (one block, so the batch mean needs no atomics); then the token gradient
//! `coef[row] · mask`, plus ORPO's NLL term.

use cudarc::driver::{DevicePtrMut, LaunchConfig, PushKernelArg};
use num_traits::Float;

use crate::device::profile;
use crate::device::{same_device, DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::stable::{log1mexp, log_sigmoid, sigmoid};
use crate::ops::{per_element, per_row, to_i32};

const OP: &str = "pref_loss";

/// TRL's `loss_type` for DPO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[clap(rename_all = "snake_case")]
pub enum DpoLoss {
    /// `−logσ(βΔ)`, with TRL's label smoothing (cDPO) when ε > 0.
    Sigmoid,
    /// SLiC: `relu(1 − βΔ)`.
    Hinge,
    /// `(clr/n_c − rlr/n_r − 1/(2β))²` on length-normalised log-ratios.
    Ipo,
    /// rDPO: `(−(1−ε)logσ(βΔ) + ε·logσ(−βΔ)) / (1−2ε)`.
    Robust,
    /// EXO with ε = label smoothing (TRL replaces ε = 0 by 1e-3).
    ExoPair,
    NcaPair,
    BcoPair,
    SppoHard,
    ApoZero,
    ApoDown,
    /// `−logσ(β(clr/n_c − rlr/n_r))`.
    SigmoidNorm,
}

impl DpoLoss {
    pub const ALL: [DpoLoss; 11] = [
        DpoLoss::Sigmoid,
        DpoLoss::Hinge,
        DpoLoss::Ipo,
        DpoLoss::Robust,
        DpoLoss::ExoPair,
        DpoLoss::NcaPair,
        DpoLoss::BcoPair,
        DpoLoss::SppoHard,
        DpoLoss::ApoZero,
        DpoLoss::ApoDown,
        DpoLoss::SigmoidNorm,
    ];

    /// TRL's name for it.
    pub fn name(self) -> &'static str {
        match self {
            DpoLoss::Sigmoid => "sigmoid",
            DpoLoss::Hinge => "hinge",
            DpoLoss::Ipo => "ipo",
            DpoLoss::Robust => "robust",
            DpoLoss::ExoPair => "exo_pair",
            DpoLoss::NcaPair => "nca_pair",
            DpoLoss::BcoPair => "bco_pair",
            DpoLoss::SppoHard => "sppo_hard",
            DpoLoss::ApoZero => "apo_zero",
            DpoLoss::ApoDown => "apo_down",
            DpoLoss::SigmoidNorm => "sigmoid_norm",
        }
    }

    pub fn from_name(name: &str) -> Option<DpoLoss> {
        DpoLoss::ALL.into_iter().find(|l| l.name() == name)
    }

    /// Whether sequence log-probs are means over the mask rather than sums.
    fn length_normalised(self) -> bool {
        matches!(self, DpoLoss::Ipo | DpoLoss::SigmoidNorm)
    }

    /// The kernel's code for this loss (see pref_loss.cu).
    fn code(self) -> i32 {
        DpoLoss::ALL.iter().position(|&l| l == self).unwrap() as i32
    }
}

/// A preference objective with its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PrefLoss {
    Dpo {
        loss: DpoLoss,
        beta: f64,
        label_smoothing: f64,
    },
    Simpo {
        beta: f64,
        gamma: f64,
        label_smoothing: f64,
    },
    Orpo {
        beta: f64,
    },
    Kto {
        beta: f64,
        desirable_weight: f64,
        undesirable_weight: f64,
    },
}

impl PrefLoss {
    fn needs_ref(&self) -> bool {
        matches!(self, PrefLoss::Dpo { .. } | PrefLoss::Kto { .. })
    }

    fn paired(&self) -> bool {
        !matches!(self, PrefLoss::Kto { .. })
    }

    fn mean_logps(&self) -> bool {
        match self {
            PrefLoss::Dpo { loss, .. } => loss.length_normalised(),
            PrefLoss::Simpo { .. } | PrefLoss::Orpo { .. } => true,
            PrefLoss::Kto { .. } => false,
        }
    }
}

/// What the loss needs beside the policy's per-token log-probs and mask.
#[derive(Default)]
pub struct PrefExtras<'a> {
    /// The frozen reference's per-token log-probs `[R, T]` (DPO family, KTO).
    pub ref_logps: Option<&'a Tensor>,
    /// ORPO's NLL mask `[R, T]`: prompt and response tokens of the chosen rows.
    pub nll_mask: Option<&'a Tensor>,
    /// KTO labels `[R]`: 1 desirable, 0 undesirable.
    pub labels: Option<&'a Tensor>,
    /// KTO's detached reference point z0 (≥ 0; see `kto_reference_point`).
    pub kto_ref_point: f64,
}

/// Everything a preference loss returns. Paired losses have `B` pairs; KTO has `R` rows and puts its
/// per-row values in the `chosen_*` fields.
pub struct PrefOut {
    pub loss: f64,
    /// Per pair (per row for KTO).
    pub per_sequence_loss: Vec<f32>,
    /// `β·(logp_c − ref_logp_c)` as TRL logs it (the policy's β·logp for reference-free losses).
    pub chosen_rewards: Vec<f32>,
    pub rejected_rewards: Vec<f32>,
    /// ORPO: the log odds ratio per pair.
    pub log_odds: Vec<f32>,
    /// ORPO: the NLL term of the loss.
    pub nll_loss: f64,
    /// `[R, T]` f32 on the inputs' device.
    pub grad_policy_logps: Tensor,
}

impl PrefOut {
    /// TRL's logged metrics: mean rewards, margin and accuracy (chosen reward above rejected).
    pub fn metrics(&self) -> (f64, f64, f64, f64) {
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
        let (c, r) = (mean(&self.chosen_rewards), mean(&self.rejected_rewards));
        let acc = self
            .chosen_rewards
            .iter()
            .zip(&self.rejected_rewards)
            .filter(|(c, r)| c > r)
            .count() as f64
            / self.chosen_rewards.len().max(1) as f64;
        (c, r, c - r, acc)
    }

    /// ORPO's logged log-odds metrics as TRL names them: `log_odds_ratio`, the mean of
    /// logσ(log_odds), and `log_odds_chosen`, the mean log odds ratio.
    pub fn log_odds_metrics(&self) -> (f64, f64) {
        let n = self.log_odds.len().max(1) as f64;
        let ratio = self
            .log_odds
            .iter()
            .map(|&x| super::stable::log_sigmoid(x as f64))
            .sum::<f64>();
        let chosen = self.log_odds.iter().map(|&x| x as f64).sum::<f64>();
        (ratio / n, chosen / n)
    }
}

/// One pair's loss, its derivatives with respect to the chosen and rejected sequence values as the loss
/// uses them (sums, or means where the loss normalises), and the logged rewards.
#[derive(Debug, Clone, Copy)]
pub struct PairTerms<F> {
    pub loss: F,
    pub d_chosen: F,
    pub d_rejected: F,
    pub reward_chosen: F,
    pub reward_rejected: F,
}

/// The DPO family for one pair. `pc, pr`: policy sequence values; `rc, rr`: reference ones (sums, or
/// means for the length-normalised losses; the rewards returned are β times their differences).
pub fn dpo_pair<F: Float>(
    kind: DpoLoss,
    beta: F,
    eps: F,
    pc: F,
    pr: F,
    rc: F,
    rr: F,
) -> PairTerms<F> {
    let one = F::one();
    let two = one + one;
    let half = one / two;
    let (clr, rlr) = (pc - rc, pr - rr);
    let u = beta * (clr - rlr);
    // σ'(x) = σ(x)σ(−x)
    let dsig = |x: F| sigmoid(x) * sigmoid(-x);
    // (loss, dL/dclr, dL/drlr)
    let (loss, dc, dr) = match kind {
        DpoLoss::Sigmoid | DpoLoss::SigmoidNorm => {
            let loss = -(one - eps) * log_sigmoid(u) - eps * log_sigmoid(-u);
            let du = -(one - eps) * sigmoid(-u) + eps * sigmoid(u);
            (loss, beta * du, -beta * du)
        }
        DpoLoss::Hinge => {
            let loss = (one - u).max(F::zero());
            let du = if u < one { -one } else { F::zero() };
            (loss, beta * du, -beta * du)
        }
        DpoLoss::Ipo => {
            let a = clr - rlr - one / (two * beta);
            (a * a, two * a, -two * a)
        }
        DpoLoss::Robust => {
            let den = one - two * eps;
            let loss = (-(one - eps) * log_sigmoid(u) + eps * log_sigmoid(-u)) / den;
            let du = (-(one - eps) * sigmoid(-u) - eps * sigmoid(u)) / den;
            (loss, beta * du, -beta * du)
        }
        DpoLoss::ExoPair => {
            let e = if eps == F::zero() {
                F::from(1e-3).unwrap()
            } else {
                eps
            };
            let loss = sigmoid(u) * (log_sigmoid(u) - (one - e).ln())
                + sigmoid(-u) * (log_sigmoid(-u) - e.ln());
            let du = dsig(u) * (u - (one - e).ln() + e.ln());
            (loss, beta * du, -beta * du)
        }
        DpoLoss::NcaPair => {
            let (c, r) = (beta * clr, beta * rlr);
            let loss = -log_sigmoid(c) - half * log_sigmoid(-c) - half * log_sigmoid(-r);
            (
                loss,
                beta * (-sigmoid(-c) + half * sigmoid(c)),
                beta * half * sigmoid(r),
            )
        }
        DpoLoss::BcoPair => {
            let (c, r) = (beta * clr, beta * rlr);
            (
                -log_sigmoid(c) - log_sigmoid(-r),
                -beta * sigmoid(-c),
                beta * sigmoid(r),
            )
        }
        DpoLoss::SppoHard => {
            let (a, b) = (clr - one / (two * beta), rlr + one / (two * beta));
            (a * a + b * b, two * a, two * b)
        }
        DpoLoss::ApoZero => {
            let (c, r) = (beta * clr, beta * rlr);
            (
                one - sigmoid(c) + sigmoid(r),
                -beta * dsig(c),
                beta * dsig(r),
            )
        }
        DpoLoss::ApoDown => {
            let c = beta * clr;
            (
                sigmoid(c) + one - sigmoid(u),
                beta * dsig(c) - beta * dsig(u),
                beta * dsig(u),
            )
        }
    };
    PairTerms {
        loss,
        d_chosen: dc,
        d_rejected: dr,
        reward_chosen: beta * clr,
        reward_rejected: beta * rlr,
    }
}

/// SimPO for one pair of mean log-probs.
pub fn simpo_pair<F: Float>(beta: F, gamma: F, eps: F, ac: F, ar: F) -> PairTerms<F> {
    let one = F::one();
    let z = beta * ((ac - ar) - gamma / beta);
    let loss = -(one - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
    let dz = -(one - eps) * sigmoid(-z) + eps * sigmoid(z);
    PairTerms {
        loss,
        d_chosen: beta * dz,
        d_rejected: -beta * dz,
        reward_chosen: beta * ac,
        reward_rejected: beta * ar,
    }
}

/// ORPO's odds-ratio term `−β·logσ(log_odds)` for one pair of mean log-probs; returns the terms and
/// the log odds.
pub fn orpo_pair<F: Float>(beta: F, ac: F, ar: F) -> (PairTerms<F>, F) {
    let one = F::one();
    let log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar));
    // d log1mexp(a)/da = −e^a/(1 − e^a), so d log_odds/da_c = 1/(1 − e^{a_c}) = −1/expm1(a_c).
    let dl = -beta * sigmoid(-log_odds);
    let terms = PairTerms {
        loss: -beta * log_sigmoid(log_odds),
        d_chosen: dl * (-one / ac.exp_m1()),
        d_rejected: dl * (one / ar.exp_m1()),
        reward_chosen: beta * ac,
        reward_rejected: beta * ar,
    };
    (terms, log_odds)
}

/// KTO for one row: (loss, dL/dlr, reward) with `lr = logp − ref_logp`.
pub fn kto_row<F: Float>(beta: F, w_d: F, w_u: F, z0: F, lr: F, desirable: bool) -> (F, F, F) {
    let one = F::one();
    let x = if desirable {
        beta * (lr - z0)
    } else {
        beta * (z0 - lr)
    };
    let w = if desirable { w_d } else { w_u };
    let s = sigmoid(x) * sigmoid(-x);
    let d = if desirable {
        -w * beta * s
    } else {
        w * beta * s
    };
    (w * (one - sigmoid(x)), d, beta * lr)
}

/// KTO's reference point from mismatched (prompt, completion) pairs: the mean of `logp − ref_logp`
/// over those rows, clamped at 0 (and detached: it carries no gradient).
pub fn kto_reference_point(mismatched_logp: &[f64], mismatched_ref_logp: &[f64]) -> f64 {
    let n = mismatched_logp.len().max(1) as f64;
    let mean = mismatched_logp
        .iter()
        .zip(mismatched_ref_logp)
        .map(|(p, r)| p - r)
        .sum::<f64>()
        / n;
    mean.max(0.0)
}

/// Masked per-row sums `Σ mask·x` and counts `Σ mask`.
fn row_sums<F: Float>(x: &[F], mask: &[F], cols: usize) -> (Vec<F>, Vec<F>) {
    x.chunks_exact(cols)
        .zip(mask.chunks_exact(cols))
        .map(|(x, m)| {
            x.iter()
                .zip(m)
                .fold((F::zero(), F::zero()), |(s, c), (&x, &m)| {
                    (s + m * x, c + m)
                })
        })
        .unzip()
}

/// Everything the CPU reference computes, generic so the f64 instance checks the f32 one and the
/// golden files.
pub struct PrefRef<F> {
    pub loss: F,
    pub per_sequence_loss: Vec<F>,
    pub chosen_rewards: Vec<F>,
    pub rejected_rewards: Vec<F>,
    pub log_odds: Vec<F>,
    pub nll_loss: F,
    pub grad: Vec<F>,
}

/// CPU reference. policy, reference, mask, nll_mask: [R, T]; labels: [R].
#[allow(clippy::too_many_arguments)]
pub fn pref_loss_ref<F: Float>(
    kind: &PrefLoss,
    policy: &[F],
    reference: Option<&[F]>,
    mask: &[F],
    nll_mask: Option<&[F]>,
    labels: Option<&[F]>,
    kto_ref_point: F,
    cols: usize,
) -> PrefRef<F> {
    let f = |v: f64| F::from(v).unwrap();
    let rows = mask.len() / cols;
    let (mut seq, counts) = row_sums(policy, mask, cols);
    let mut ref_seq = match reference {
        Some(r) => row_sums(r, mask, cols).0,
        None => vec![F::zero(); rows],
    };
    // TRL logs DPO rewards from the summed log-ratios, also for the length-normalised losses.
    let raw_ratio: Vec<F> = seq.iter().zip(&ref_seq).map(|(&p, &r)| p - r).collect();
    if kind.mean_logps() {
        for r in 0..rows {
            seq[r] = seq[r] / counts[r];
            ref_seq[r] = ref_seq[r] / counts[r];
        }
    }
    // d loss / d (the row's sequence value), before the chain rule to tokens.
    let mut coef = vec![F::zero(); rows];
    let mut out = PrefRef {
        loss: F::zero(),
        per_sequence_loss: Vec::new(),
        chosen_rewards: Vec::new(),
        rejected_rewards: Vec::new(),
        log_odds: Vec::new(),
        nll_loss: F::zero(),
        grad: vec![F::zero(); rows * cols],
    };
    if let PrefLoss::Kto {
        beta,
        desirable_weight,
        undesirable_weight,
    } = *kind
    {
        let labels = labels.expect("KTO needs labels");
        let n = f(rows as f64);
        for r in 0..rows {
            let (loss, d, reward) = kto_row(
                f(beta),
                f(desirable_weight),
                f(undesirable_weight),
                kto_ref_point,
                seq[r] - ref_seq[r],
                labels[r] > F::zero(),
            );
            out.per_sequence_loss.push(loss);
            out.chosen_rewards.push(reward);
            out.loss = out.loss + loss / n;
            coef[r] = d / n;
        }
    } else {
        let pairs = rows / 2;
        let n = f(pairs as f64);
        for i in 0..pairs {
            let (c, r) = (i, i + pairs);
            let t = match *kind {
                PrefLoss::Dpo {
                    loss,
                    beta,
                    label_smoothing,
                } => PairTerms {
                    reward_chosen: f(beta) * raw_ratio[c],
                    reward_rejected: f(beta) * raw_ratio[r],
                    ..dpo_pair(
                        loss,
                        f(beta),
                        f(label_smoothing),
                        seq[c],
                        seq[r],
                        ref_seq[c],
                        ref_seq[r],
                    )
                },
                PrefLoss::Simpo {
                    beta,
                    gamma,
                    label_smoothing,
                } => simpo_pair(f(beta), f(gamma), f(label_smoothing), seq[c], seq[r]),
                PrefLoss::Orpo { beta } => {
                    let (t, lo) = orpo_pair(f(beta), seq[c], seq[r]);
                    out.log_odds.push(lo);
                    t
                }
                PrefLoss::Kto { .. } => unreachable!(),
            };
            out.per_sequence_loss.push(t.loss);
            out.chosen_rewards.push(t.reward_chosen);
            out.rejected_rewards.push(t.reward_rejected);
            out.loss = out.loss + t.loss / n;
            coef[c] = t.d_chosen / n;
            coef[r] = t.d_rejected / n;
        }
    }
    for r in 0..rows {
        if kind.mean_logps() {
            coef[r] = coef[r] / counts[r];
        }
        for t in 0..cols {
            out.grad[r * cols + t] = coef[r] * mask[r * cols + t];
        }
    }
    if let (PrefLoss::Orpo { .. }, Some(nll_mask)) = (kind, nll_mask) {
        let (nll_sum, nll_count) = row_sums(policy, nll_mask, cols);
        let total = nll_count.iter().fold(F::zero(), |a, &b| a + b);
        out.nll_loss = -nll_sum.iter().fold(F::zero(), |a, &b| a + b) / total;
        out.loss = out.loss + out.nll_loss;
        for (g, &m) in out.grad.iter_mut().zip(nll_mask) {
            *g = *g - m / total;
        }
    }
    out
}

struct Checked {
    rows: usize,
    cols: usize,
}

fn check(kind: &PrefLoss, policy: &Tensor, mask: &Tensor, ex: &PrefExtras) -> Result<Checked> {
    let (rows, cols) = policy.dims2(OP)?;
    policy.expect_dtype(OP, DType::F32)?;
    mask.expect_shape(OP, "mask", policy.shape())?;
    mask.expect_dtype(OP, DType::F32)?;
    if kind.paired() && rows % 2 != 0 {
        return Err(Error::shape(
            OP,
            format!("paired losses need 2B rows (chosen then rejected), got {rows}"),
        ));
    }
    match (kind.needs_ref(), ex.ref_logps) {
        (true, None) => {
            return Err(Error::Unsupported {
                op: OP,
                detail: "this loss needs the reference's log-probs".into(),
            })
        }
        (_, Some(r)) => {
            r.expect_shape(OP, "ref_logps", policy.shape())?;
            r.expect_dtype(OP, DType::F32)?;
        }
        _ => {}
    }
    if let PrefLoss::Orpo { .. } = kind {
        let m = ex.nll_mask.ok_or_else(|| Error::Unsupported {
            op: OP,
            detail: "ORPO needs nll_mask".into(),
        })?;
        m.expect_shape(OP, "nll_mask", policy.shape())?;
        m.expect_dtype(OP, DType::F32)?;
    }
    if let PrefLoss::Kto { .. } = kind {
        let l = ex.labels.ok_or_else(|| Error::Unsupported {
            op: OP,
            detail: "KTO needs labels".into(),
        })?;
        l.expect_shape(OP, "labels", &[rows])?;
        l.expect_dtype(OP, DType::F32)?;
    }
    if let PrefLoss::Dpo {
        label_smoothing, ..
    }
    | PrefLoss::Simpo {
        label_smoothing, ..
    } = kind
    {
        if !(0.0..0.5).contains(label_smoothing) {
            return Err(Error::Unsupported {
                op: OP,
                detail: format!("label_smoothing must be in [0, 0.5), got {label_smoothing}"),
            });
        }
    }
    Ok(Checked { rows, cols })
}

/// The loss, its logged values, and the gradient with respect to every per-token policy log-prob.
pub fn pref_loss(
    kind: &PrefLoss,
    policy_logps: &Tensor,
    mask: &Tensor,
    ex: &PrefExtras,
) -> Result<PrefOut> {
    let mut all = vec![policy_logps, mask];
    all.extend(ex.ref_logps.iter().copied());
    all.extend(ex.nll_mask.iter().copied());
    all.extend(ex.labels.iter().copied());
    let device = same_device(OP, &all)?.clone();
    let _profile = profile::scope(&device, OP);
    let Checked { rows, cols } = check(kind, policy_logps, mask, ex)?;
    match &device {
        Device::Cpu => {
            let r = pref_loss_ref(
                kind,
                policy_logps.cpu_f32(OP)?,
                ex.ref_logps.map(|t| t.cpu_f32(OP)).transpose()?,
                mask.cpu_f32(OP)?,
                ex.nll_mask.map(|t| t.cpu_f32(OP)).transpose()?,
                ex.labels.map(|t| t.cpu_f32(OP)).transpose()?,
                ex.kto_ref_point as f32,
                cols,
            );
            Ok(PrefOut {
                loss: r.loss as f64,
                per_sequence_loss: r.per_sequence_loss,
                chosen_rewards: r.chosen_rewards,
                rejected_rewards: r.rejected_rewards,
                log_odds: r.log_odds,
                nll_loss: r.nll_loss as f64,
                grad_policy_logps: Tensor::from_f32(&[rows, cols], r.grad, &device)?,
            })
        }
        Device::Cuda(_) => pref_loss_cuda(kind, policy_logps, mask, ex, rows, cols),
    }
}

/// Kernel parameters, in the order `pref_pair_loss` takes them.
fn kernel_params(kind: &PrefLoss, kto_ref_point: f64) -> (i32, i32, [f32; 4]) {
    // family: 0 DPO, 1 SimPO, 2 ORPO, 3 KTO
    match *kind {
        PrefLoss::Dpo {
            loss,
            beta,
            label_smoothing,
        } => (
            0,
            loss.code(),
            [beta as f32, label_smoothing as f32, 0.0, 0.0],
        ),
        PrefLoss::Simpo {
            beta,
            gamma,
            label_smoothing,
        } => (
            1,
            0,
            [beta as f32, label_smoothing as f32, gamma as f32, 0.0],
        ),
        PrefLoss::Orpo { beta } => (2, 0, [beta as f32, 0.0, 0.0, 0.0]),
        PrefLoss::Kto {
            beta,
            desirable_weight,
            undesirable_weight,
        } => (
            3,
            0,
            [
                beta as f32,
                desirable_weight as f32,
                undesirable_weight as f32,
                kto_ref_point as f32,
            ],
        ),
    }
}

fn pref_loss_cuda(
    kind: &PrefLoss,
    policy: &Tensor,
    mask: &Tensor,
    ex: &PrefExtras,
    rows: usize,
    cols: usize,
) -> Result<PrefOut> {
    let device = policy.device();
    let dev = device.as_cuda(OP)?.clone();
    let stream = dev.stream().clone();
    let (rows_i, cols_i) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
    let has_ref = i32::from(ex.ref_logps.is_some());
    let has_nll = i32::from(ex.nll_mask.is_some() && matches!(kind, PrefLoss::Orpo { .. }));
    // Absent optional inputs are passed as the policy/mask buffers and never read (flags above).
    let ref_logps = ex.ref_logps.unwrap_or(policy);
    let nll_mask = ex.nll_mask.unwrap_or(mask);
    let labels = ex.labels.unwrap_or(mask);

    // 1. Per-row sums: [rows, 5] = (Σ m·lp, Σ m·ref, Σ m, Σ nll·lp, Σ nll).
    let mut sums = Tensor::empty(&[rows, 5], DType::F32, device)?;
    let f = dev.function("pref_loss", "pref_row_sums")?;
    let mut b = stream.launch_builder(&f);
    b.arg(sums.cuda_f32_mut(OP)?)
        .arg(policy.cuda_f32(OP)?)
        .arg(ref_logps.cuda_f32(OP)?)
        .arg(mask.cuda_f32(OP)?)
        .arg(nll_mask.cuda_f32(OP)?)
        .arg(&cols_i)
        .arg(&has_ref)
        .arg(&has_nll);
    // SAFETY: the four inputs hold rows*cols floats, sums rows*5; one block per row.
    unsafe { b.launch(per_row(OP, rows, 256, 0)?) }?;

    // 2. Per pair (per row for KTO): loss, rewards, row coefficients; one block reduces the batch.
    let items = if kind.paired() { rows / 2 } else { rows };
    // One buffer for everything the host reads back, so one copy (and one wait) returns it:
    // [items, 4] (loss, reward_c, reward_r, log_odds), then 3 scalars (loss, nll_loss, nll tokens).
    let mut report = Tensor::empty(&[items * 4 + 3], DType::F32, device)?;
    let (per_item, report_guard) = report.cuda_f32_mut(OP)?.device_ptr_mut(&stream);
    let scalars = per_item + (items * 4 * 4) as u64;
    let mut coef = Tensor::empty(&[rows], DType::F32, device)?;
    let (family, loss_code, p) = kernel_params(kind, ex.kto_ref_point);
    let f = dev.function("pref_loss", "pref_pair_loss")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&per_item)
        .arg(coef.cuda_f32_mut(OP)?)
        .arg(&scalars)
        .arg(sums.cuda_f32(OP)?)
        .arg(labels.cuda_f32(OP)?)
        .arg(&rows_i)
        .arg(&family)
        .arg(&loss_code)
        .arg(&p[0])
        .arg(&p[1])
        .arg(&p[2])
        .arg(&p[3])
        .arg(&has_nll);
    let one_block = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: sums holds rows*5 floats, labels rows (read for KTO only), coef rows, per_item items*4,
    // scalars 3; a single block loops over every pair.
    unsafe { b.launch(one_block) }?;

    // 3. Token gradients.
    let mut grad = Tensor::empty(&[rows, cols], DType::F32, device)?;
    let f = dev.function("pref_loss", "pref_token_grad")?;
    let mut b = stream.launch_builder(&f);
    let n_i = to_i32(OP, "tokens", rows * cols)?;
    b.arg(grad.cuda_f32_mut(OP)?)
        .arg(coef.cuda_f32(OP)?)
        .arg(mask.cuda_f32(OP)?)
        .arg(nll_mask.cuda_f32(OP)?)
        .arg(&scalars)
        .arg(&cols_i)
        .arg(&n_i)
        .arg(&has_nll);
    // SAFETY: grad, mask and nll_mask hold rows*cols floats, coef rows, scalars 3.
    unsafe { b.launch(per_element(OP, rows * cols)?) }?;

    drop(report_guard);
    let mut per_item = report.to_f32_vec()?;
    let scalars = per_item.split_off(items * 4);
    let col = |k: usize| per_item.chunks_exact(4).map(|c| c[k]).collect::<Vec<f32>>();
    Ok(PrefOut {
        loss: scalars[0] as f64,
        per_sequence_loss: col(0),
        chosen_rewards: col(1),
        rejected_rewards: if kind.paired() { col(2) } else { Vec::new() },
        log_odds: if matches!(kind, PrefLoss::Orpo { .. }) {
            col(3)
        } else {
            Vec::new()
        },
        nll_loss: scalars[1] as f64,
        grad_policy_logps: grad,
    })
}
