//! `rlhf verify`: runs our ops on reference-value files (the layout of `../shared/golden`: inputs,
//! expected outputs and gradients, the family and hyper-parameters in the metadata) and compares
//! every output and gradient.
//!
//! On the CPU the references run in f64 and must agree to 1e-5 relative (plus 1e-6 of the tensor's
//! largest magnitude, for entries near zero; of at least 1 for a scalar). On CUDA the kernels run in f32 and must agree to 2e-4
//! relative plus 2e-5 of the largest magnitude: f32 arithmetic over rows of a few thousand elements.

use std::path::Path;

use crate::device::{Device, Tensor};
use crate::error::{Error, Result};
use crate::golden::Golden;
use crate::ops::attention::{
    attention_bwd, attention_bwd_ref, attention_fwd, attention_fwd_ref, AttnBatch, Heads,
};
use crate::ops::kl::{
    kl_full_bwd, kl_full_bwd_ref, kl_full_fwd, kl_full_fwd_ref, kl_sampled_bwd, kl_sampled_fwd,
    kl_sampled_ref, KlEstimator,
};
use crate::ops::logprob::{logprob_bwd, logprob_bwd_ref, logprob_fwd, logprob_fwd_ref};
use crate::ops::ppo::{ppo_advantages, ppo_advantages_ref, ppo_loss, ppo_loss_ref, PpoConfig};
use crate::ops::pref_loss::{pref_loss, pref_loss_ref, DpoLoss, PrefExtras, PrefLoss};

/// One compared output.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub max_abs_err: f64,
    pub max_rel_err: f64,
    pub pass: bool,
}

#[derive(Debug)]
pub enum Outcome {
    Checked(Vec<Check>),
    /// The file's family has no op in this build yet; named, never counted as passed.
    Skipped(String),
}

#[derive(Debug)]
pub struct FileReport {
    pub family: String,
    pub outcome: Outcome,
}

impl FileReport {
    pub fn failed(&self) -> bool {
        matches!(&self.outcome, Outcome::Checked(c) if c.iter().any(|c| !c.pass))
    }
}

struct Tol {
    rtol: f64,
    atol_frac: f64,
}

const CPU_TOL: Tol = Tol {
    rtol: 1e-5,
    atol_frac: 1e-6,
};
const CUDA_TOL: Tol = Tol {
    rtol: 2e-4,
    atol_frac: 2e-5,
};

fn compare(name: &str, got: &[f64], want: &[f32], tol: &Tol) -> Check {
    let mut scale = want.iter().fold(0.0f64, |m, &w| m.max((w as f64).abs()));
    if want.len() == 1 {
        // A scalar output is a batch mean whose terms are O(1) even when the mean nearly cancels
        // (PPO's policy loss over whitened advantages is ~5e-4): measure it against unit scale, or
        // the inputs' own f32 rounding would decide the verdict.
        scale = scale.max(1.0);
    }
    let atol = tol.atol_frac * scale.max(1e-30);
    let (mut max_abs, mut max_rel, mut pass) = (0.0f64, 0.0f64, got.len() == want.len());
    for (&g, &w) in got.iter().zip(want) {
        let w = w as f64;
        let err = (g - w).abs();
        if err.is_nan() || err > atol + tol.rtol * w.abs() {
            pass = false;
        }
        max_abs = if err.is_nan() {
            f64::NAN
        } else {
            max_abs.max(err)
        };
        max_rel = if err.is_nan() {
            f64::NAN
        } else {
            max_rel.max(err / w.abs().max(scale * 1e-3).max(1e-30))
        };
    }
    Check {
        name: name.to_owned(),
        max_abs_err: max_abs,
        max_rel_err: max_rel,
        pass,
    }
}

/// Kernel families with no reader for their reference files yet: such a file is skipped and named,
/// where a family nobody knows is an error.
const UNVERIFIED_FAMILIES: [&str; 8] = [
    "norm",
    "rope",
    "mlp",
    "embed",
    "adamw",
    "matmul",
    "sample",
    "elementwise",
];

/// Every tensor a family's file may hold: its inputs, its optional inputs and the outputs and
/// gradients it compares.
fn family_tensors(family: &str) -> Option<&'static [&'static str]> {
    Some(match family {
        "logprob" => &[
            "logits",
            "target",
            "upstream_logp",
            "upstream_entropy",
            "logp",
            "logsumexp",
            "entropy",
            "grad_logits",
        ],
        "kl" => &[
            "policy_logits",
            "ref_logits",
            "upstream",
            "sampled_policy_logp",
            "sampled_ref_logp",
            "kl_full",
            "grad_policy_logits",
            "k1",
            "k2",
            "k3",
            "grad_sampled_policy_logp",
        ],
        "dpo" | "simpo" | "orpo" | "kto" => &[
            "policy_logps",
            "mask",
            "ref_logps",
            "nll_mask",
            "label",
            "kl",
            "loss",
            "grad_policy_logps",
            "per_sequence_loss",
            "chosen_rewards",
            "rejected_rewards",
            "log_odds",
            "nll_loss",
        ],
        "ppo" => &[
            "mask",
            "old_logps",
            "ref_logps",
            "old_values",
            "new_logps",
            "new_values",
            "scores",
            "rewards",
            "advantages",
            "returns",
            "whitened_advantages",
            "pg_loss",
            "vf_loss",
            "loss",
            "grad_new_logps",
            "grad_new_values",
        ],
        "attention" => &[
            "q", "k", "v", "grad_out", "out", "lse", "grad_q", "grad_k", "grad_v",
        ],
        _ => return None,
    })
}

/// Optional outputs are compared only when present, so a misspelt one would go unchecked while
/// the file reports PASS.
fn reject_stray_tensors(g: &Golden, family: &str, known: &[&str]) -> Result<()> {
    let mut stray: Vec<&String> = g
        .tensors
        .keys()
        .filter(|n| !known.contains(&n.as_str()))
        .collect();
    stray.sort();
    match stray.first() {
        None => Ok(()),
        Some(name) => Err(Error::file(
            &g.path,
            format!(
                "tensor `{name}` is not one the {family} family reads or checks (it reads: {})",
                known.join(", ")
            ),
        )),
    }
}

/// Checks every file; errors only when a file cannot be read or is malformed.
pub fn verify_file(path: &Path, device: &Device) -> Result<FileReport> {
    let g = Golden::open(path)?;
    let family = g.meta("family")?.to_owned();
    if let Some(known) = family_tensors(&family) {
        reject_stray_tensors(&g, &family, known)?;
    }
    let outputs = match family.as_str() {
        "logprob" => logprob(&g, device)?,
        "kl" => kl(&g, device)?,
        "dpo" | "simpo" | "orpo" | "kto" => preference(&g, &family, device)?,
        "ppo" => ppo(&g, device)?,
        "attention" => attention(&g, device)?,
        other if UNVERIFIED_FAMILIES.contains(&other) => {
            return Ok(FileReport {
                family: family.clone(),
                outcome: Outcome::Skipped(format!(
                    "no reader for `{other}` files in this build yet"
                )),
            })
        }
        // A typo in the family would otherwise read as a file we merely cannot check yet.
        other => {
            return Err(Error::file(
                &g.path,
                format!(
                    "metadata `family` = `{other}` is not a kernel family (verify reads logprob, \
                     kl, dpo, simpo, orpo, kto, ppo and attention; {} have no reader yet)",
                    UNVERIFIED_FAMILIES.join(", ")
                ),
            ))
        }
    };
    let tol = if device.is_cuda() {
        &CUDA_TOL
    } else {
        &CPU_TOL
    };
    let mut checks = Vec::new();
    for (name, got) in outputs {
        checks.push(compare(&name, &got, &g.tensor(&name)?.data, tol));
    }
    Ok(FileReport {
        family,
        outcome: Outcome::Checked(checks),
    })
}

type Named = Vec<(String, Vec<f64>)>;

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn upload(g: &Golden, name: &str, device: &Device) -> Result<Tensor> {
    let t = g.tensor(name)?;
    Tensor::from_f32(&t.shape, t.data.clone(), device)
}

/// The shape of a primary input, which sets every other tensor's: `rank` dims, none of them zero
/// (an empty row or head would divide by zero in the references).
fn primary_shape(g: &Golden, name: &str, rank: usize, layout: &str) -> Result<Vec<usize>> {
    let shape = &g.tensor(name)?.shape;
    if shape.len() != rank || shape.contains(&0) {
        return Err(Error::file(
            &g.path,
            format!("tensor `{name}` has shape {shape:?}; expected {layout}, every dim at least 1"),
        ));
    }
    Ok(shape.clone())
}

fn dims2(g: &Golden, name: &str) -> Result<(usize, usize)> {
    let s = primary_shape(g, name, 2, "[rows, cols]")?;
    Ok((s[0], s[1]))
}

/// Checks an input, expected output or gradient against the shape the primary inputs imply, when
/// the file has it (a missing one is named where it is read): the references index by the primary
/// shapes and would panic, or compare a prefix, on a shorter tensor. `why` names the source.
fn expect_shape(g: &Golden, name: &str, want: &[usize], why: &str) -> Result<()> {
    match g.tensors.get(name) {
        Some(t) if t.shape != want => Err(Error::file(
            &g.path,
            format!(
                "tensor `{name}` has shape {:?}, expected {want:?} ({why})",
                t.shape
            ),
        )),
        _ => Ok(()),
    }
}

fn expect_scalar(g: &Golden, name: &str) -> Result<()> {
    match g.tensors.get(name) {
        Some(t) if t.data.len() != 1 => Err(Error::file(
            &g.path,
            format!(
                "tensor `{name}` has shape {:?}, expected a scalar ([1])",
                t.shape
            ),
        )),
        _ => Ok(()),
    }
}

fn logprob(g: &Golden, device: &Device) -> Result<Named> {
    let (n, vocab) = dims2(g, "logits")?;
    for name in [
        "target",
        "upstream_logp",
        "upstream_entropy",
        "logp",
        "logsumexp",
        "entropy",
    ] {
        expect_shape(g, name, &[n], "one per row of `logits`")?;
    }
    expect_shape(g, "grad_logits", &[n, vocab], "as `logits`")?;
    let targets = token_ids(g, "target", vocab)?;
    if let Device::Cpu = device {
        let x = f64s(&g.tensor("logits")?.data);
        let (mut lp, mut lse, mut ent) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        logprob_fwd_ref(&mut lp, &mut lse, &mut ent, &x, &targets, vocab, 1.0);
        let mut dx = vec![0.0; n * vocab];
        let (gl, ge) = (
            f64s(&g.tensor("upstream_logp")?.data),
            f64s(&g.tensor("upstream_entropy")?.data),
        );
        logprob_bwd_ref(&mut dx, &x, &targets, &lse, &ent, &gl, &ge, vocab, 1.0);
        return Ok(vec![
            ("logp".into(), lp),
            ("logsumexp".into(), lse),
            ("entropy".into(), ent),
            ("grad_logits".into(), dx),
        ]);
    }
    let logits = upload(g, "logits", device)?;
    let tgt = Tensor::from_i32(&[n], targets, device)?;
    let out = logprob_fwd(&logits, &tgt, 1.0)?;
    let dx = logprob_bwd(
        &logits,
        &tgt,
        &out,
        &upload(g, "upstream_logp", device)?,
        &upload(g, "upstream_entropy", device)?,
        1.0,
    )?;
    let v = |t: &Tensor| t.to_f32_vec().map(|v| f64s(&v));
    Ok(vec![
        ("logp".into(), v(&out.logp)?),
        ("logsumexp".into(), v(&out.lse)?),
        ("entropy".into(), v(&out.entropy)?),
        ("grad_logits".into(), v(&dx)?),
    ])
}

/// Target ids stored as floats: whole numbers below `vocab`; negative ones are ignored rows, as
/// PyTorch's ignore_index.
fn token_ids(g: &Golden, name: &str, vocab: usize) -> Result<Vec<i32>> {
    g.tensor(name)?
        .data
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            if t.fract() == 0.0 && t < vocab as f32 && t >= i32::MIN as f32 {
                Ok(t as i32)
            } else {
                Err(Error::file(
                    &g.path,
                    format!(
                        "tensor `{name}`[{i}] = {t} is not a token id below the {vocab} columns of `logits`"
                    ),
                ))
            }
        })
        .collect()
}

const ESTIMATORS: [(KlEstimator, &str, f64); 3] = [
    (KlEstimator::K1, "k1", 1.0),
    (KlEstimator::K2, "k2", 2.0),
    (KlEstimator::K3, "k3", 3.0),
];

fn kl(g: &Golden, device: &Device) -> Result<Named> {
    let (n, vocab) = dims2(g, "policy_logits")?;
    for name in ["ref_logits", "grad_policy_logits"] {
        expect_shape(g, name, &[n, vocab], "as `policy_logits`")?;
    }
    for name in ["upstream", "kl_full"] {
        expect_shape(g, name, &[n], "one per row of `policy_logits`")?;
    }
    let sampled = primary_shape(g, "sampled_policy_logp", 1, "[samples]")?;
    for name in [
        "sampled_ref_logp",
        "k1",
        "k2",
        "k3",
        "grad_sampled_policy_logp",
    ] {
        expect_shape(g, name, &sampled, "as `sampled_policy_logp`")?;
    }
    let mut out: Named = Vec::new();
    // The file's sampled gradient is of sum(k1) + 2 sum(k2) + 3 sum(k3).
    if let Device::Cpu = device {
        let (x, y) = (
            f64s(&g.tensor("policy_logits")?.data),
            f64s(&g.tensor("ref_logits")?.data),
        );
        let (mut k, mut lp, mut lq) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        kl_full_fwd_ref(&mut k, &mut lp, &mut lq, &x, &y, vocab);
        let mut dx = vec![0.0; n * vocab];
        kl_full_bwd_ref(
            &mut dx,
            &x,
            &y,
            &lp,
            &lq,
            &k,
            &f64s(&g.tensor("upstream")?.data),
            vocab,
        );
        out.push(("kl_full".into(), k));
        out.push(("grad_policy_logits".into(), dx));
        let (p, r) = (
            f64s(&g.tensor("sampled_policy_logp")?.data),
            f64s(&g.tensor("sampled_ref_logp")?.data),
        );
        let mut grad = vec![0.0; p.len()];
        for (est, name, w) in ESTIMATORS {
            let vals: Vec<(f64, f64)> = p
                .iter()
                .zip(&r)
                .map(|(&p, &r)| kl_sampled_ref(p, r, est))
                .collect();
            for (gr, (_, d)) in grad.iter_mut().zip(&vals) {
                *gr += w * d;
            }
            out.push((name.into(), vals.iter().map(|v| v.0).collect()));
        }
        out.push(("grad_sampled_policy_logp".into(), grad));
        return Ok(out);
    }
    let (x, y) = (
        upload(g, "policy_logits", device)?,
        upload(g, "ref_logits", device)?,
    );
    let full = kl_full_fwd(&x, &y)?;
    let dx = kl_full_bwd(&x, &y, &full, &upload(g, "upstream", device)?)?;
    out.push(("kl_full".into(), f64s(&full.kl.to_f32_vec()?)));
    out.push(("grad_policy_logits".into(), f64s(&dx.to_f32_vec()?)));
    let (p, r) = (
        upload(g, "sampled_policy_logp", device)?,
        upload(g, "sampled_ref_logp", device)?,
    );
    let m = p.numel();
    let mut grad = vec![0.0; m];
    for (est, name, w) in ESTIMATORS {
        out.push((
            name.into(),
            f64s(&kl_sampled_fwd(&p, &r, est)?.to_f32_vec()?),
        ));
        let up = Tensor::from_f32(&[m], vec![w as f32; m], device)?;
        for (gr, d) in grad
            .iter_mut()
            .zip(kl_sampled_bwd(&p, &r, &up, est)?.to_f32_vec()?)
        {
            *gr += d as f64;
        }
    }
    out.push(("grad_sampled_policy_logp".into(), grad));
    Ok(out)
}

fn pref_kind(g: &Golden, family: &str) -> Result<PrefLoss> {
    Ok(match family {
        "dpo" => {
            let name = g.meta("loss_type")?;
            let loss = DpoLoss::from_name(name)
                .ok_or_else(|| Error::file(&g.path, format!("unknown DPO loss_type `{name}`")))?;
            PrefLoss::Dpo {
                loss,
                beta: g.meta_f64("beta")?,
                label_smoothing: g.meta_f64_or("label_smoothing", 0.0)?,
            }
        }
        "simpo" => PrefLoss::Simpo {
            beta: g.meta_f64("beta")?,
            gamma: g.meta_f64("simpo_gamma")?,
            label_smoothing: g.meta_f64_or("label_smoothing", 0.0)?,
        },
        "orpo" => PrefLoss::Orpo {
            beta: g.meta_f64("beta")?,
        },
        _ => PrefLoss::Kto {
            beta: g.meta_f64("beta")?,
            desirable_weight: g.meta_f64_or("desirable_weight", 1.0)?,
            undesirable_weight: g.meta_f64_or("undesirable_weight", 1.0)?,
        },
    })
}

fn preference(g: &Golden, family: &str, device: &Device) -> Result<Named> {
    let kind = pref_kind(g, family)?;
    let (rows, cols) = dims2(g, "policy_logps")?;
    check_preference_shapes(g, family, rows, cols)?;
    let opt = |name: &str| {
        g.tensors
            .contains_key(name)
            .then(|| f64s(&g.tensors[name].data))
    };
    let z0 = opt("kl").map_or(0.0, |v| v[0]);
    let (loss, per_seq, chosen, rejected, log_odds, nll, grad) = if let Device::Cpu = device {
        let r = pref_loss_ref(
            &kind,
            &f64s(&g.tensor("policy_logps")?.data),
            opt("ref_logps").as_deref(),
            &f64s(&g.tensor("mask")?.data),
            opt("nll_mask").as_deref(),
            opt("label").as_deref(),
            z0,
            cols,
        );
        (
            r.loss,
            r.per_sequence_loss,
            r.chosen_rewards,
            r.rejected_rewards,
            r.log_odds,
            r.nll_loss,
            r.grad,
        )
    } else {
        let up = |name: &str| -> Result<Option<Tensor>> {
            g.tensors
                .contains_key(name)
                .then(|| upload(g, name, device))
                .transpose()
        };
        let (ref_logps, nll_mask, labels) = (up("ref_logps")?, up("nll_mask")?, up("label")?);
        let ex = PrefExtras {
            ref_logps: ref_logps.as_ref(),
            nll_mask: nll_mask.as_ref(),
            labels: labels.as_ref(),
            kto_ref_point: z0,
        };
        let r = pref_loss(
            &kind,
            &upload(g, "policy_logps", device)?,
            &upload(g, "mask", device)?,
            &ex,
        )?;
        (
            r.loss,
            f64s(&r.per_sequence_loss),
            f64s(&r.chosen_rewards),
            f64s(&r.rejected_rewards),
            f64s(&r.log_odds),
            r.nll_loss,
            f64s(&r.grad_policy_logps.to_f32_vec()?),
        )
    };
    let mut out: Named = vec![
        ("loss".into(), vec![loss]),
        ("grad_policy_logps".into(), grad),
    ];
    let mut add = |name: &str, v: Vec<f64>| {
        if g.tensors.contains_key(name) {
            out.push((name.into(), v));
        }
    };
    add("per_sequence_loss", per_seq);
    add("chosen_rewards", chosen);
    add("rejected_rewards", rejected);
    add("log_odds", log_odds);
    add("nll_loss", vec![nll]);
    Ok(out)
}

/// The CPU reference trusts its inputs; the kernel's launcher checks these same rules.
fn check_preference_shapes(g: &Golden, family: &str, rows: usize, cols: usize) -> Result<()> {
    let kto = family == "kto";
    if !kto && !rows.is_multiple_of(2) {
        return Err(Error::file(
            &g.path,
            format!(
                "tensor `policy_logps` has {rows} rows; a paired loss needs the chosen rows, then \
                 as many rejected"
            ),
        ));
    }
    // Optional to the CPU reference, which without them would assume a zero reference, skip
    // ORPO's NLL term or panic for want of KTO's labels.
    let required: &[&str] = match family {
        "dpo" => &["ref_logps"],
        "kto" => &["ref_logps", "label"],
        "orpo" => &["nll_mask"],
        _ => &[],
    };
    for name in required {
        g.tensor(name)?;
    }
    for name in ["mask", "ref_logps", "nll_mask", "grad_policy_logps"] {
        expect_shape(g, name, &[rows, cols], "as `policy_logps`")?;
    }
    expect_shape(g, "label", &[rows], "one per row of `policy_logps`")?;
    let (per_seq, why) = if kto {
        (rows, "one per row of `policy_logps`".to_owned())
    } else {
        (
            rows / 2,
            format!("one per pair of the {rows} rows of `policy_logps`"),
        )
    };
    for name in [
        "per_sequence_loss",
        "chosen_rewards",
        "rejected_rewards",
        "log_odds",
    ] {
        expect_shape(g, name, &[per_seq], &why)?;
    }
    for name in ["kl", "loss", "nll_loss"] {
        expect_scalar(g, name)?;
    }
    Ok(())
}

fn ppo(g: &Golden, device: &Device) -> Result<Named> {
    let cfg = PpoConfig {
        kl_coef: g.meta_f64("kl_coef")?,
        kl_estimator: crate::ops::kl::KlEstimator::K1,
        gamma: g.meta_f64("gamma")?,
        lam: g.meta_f64("lam")?,
        cliprange: g.meta_f64("cliprange")?,
        cliprange_value: g.meta_f64("cliprange_value")?,
        vf_coef: g.meta_f64("vf_coef")?,
    };
    let (rows, cols) = dims2(g, "mask")?;
    for name in [
        "old_logps",
        "ref_logps",
        "old_values",
        "new_logps",
        "new_values",
        "rewards",
        "advantages",
        "returns",
        "whitened_advantages",
        "grad_new_logps",
        "grad_new_values",
    ] {
        expect_shape(g, name, &[rows, cols], "as `mask`")?;
    }
    expect_shape(g, "scores", &[rows], "one per row of `mask`")?;
    for name in ["pg_loss", "vf_loss", "loss"] {
        expect_scalar(g, name)?;
    }
    if let Device::Cpu = device {
        let t = |name: &str| g.tensor(name).map(|t| f64s(&t.data));
        let mask = t("mask")?;
        let a = ppo_advantages_ref(
            &cfg,
            &t("old_logps")?,
            &t("ref_logps")?,
            &t("old_values")?,
            &t("scores")?,
            &mask,
            cols,
        );
        let l = ppo_loss_ref(
            &cfg,
            &t("new_logps")?,
            &t("new_values")?,
            &t("old_logps")?,
            &t("old_values")?,
            &a.whitened,
            &a.returns,
            &mask,
        );
        return Ok(vec![
            ("rewards".into(), a.rewards),
            ("advantages".into(), a.advantages),
            ("returns".into(), a.returns),
            ("whitened_advantages".into(), a.whitened),
            ("pg_loss".into(), vec![l.pg_loss]),
            ("vf_loss".into(), vec![l.vf_loss]),
            ("loss".into(), vec![l.loss]),
            ("grad_new_logps".into(), l.grad_new_logps),
            ("grad_new_values".into(), l.grad_new_values),
        ]);
    }
    let t = |name: &str| upload(g, name, device);
    let (mask, old_lp, old_v) = (t("mask")?, t("old_logps")?, t("old_values")?);
    let a = ppo_advantages(
        &cfg,
        &old_lp,
        &t("ref_logps")?,
        &old_v,
        &t("scores")?,
        &mask,
    )?;
    let l = ppo_loss(
        &cfg,
        &t("new_logps")?,
        &t("new_values")?,
        &old_lp,
        &old_v,
        &a.whitened,
        &a.returns,
        &mask,
    )?;
    let v = |t: &Tensor| t.to_f32_vec().map(|v| f64s(&v));
    Ok(vec![
        ("rewards".into(), v(&a.rewards)?),
        ("advantages".into(), v(&a.advantages)?),
        ("returns".into(), v(&a.returns)?),
        ("whitened_advantages".into(), v(&a.whitened)?),
        ("pg_loss".into(), vec![l.pg_loss]),
        ("vf_loss".into(), vec![l.vf_loss]),
        ("loss".into(), vec![l.loss]),
        ("grad_new_logps".into(), v(&l.grad_new_logps)?),
        ("grad_new_values".into(), v(&l.grad_new_values)?),
    ])
}

/// `[B, H, T, D]` to packed rows `[B·T, H·D]` and back.
fn to_rows(x: &[f32], b: usize, h: usize, t: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                let src = ((bi * h + hi) * t + ti) * d;
                let dst = ((bi * t + ti) * h + hi) * d;
                out[dst..dst + d].copy_from_slice(&x[src..src + d]);
            }
        }
    }
    out
}

fn from_rows(x: &[f64], b: usize, h: usize, t: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                let dst = ((bi * h + hi) * t + ti) * d;
                let src = ((bi * t + ti) * h + hi) * d;
                out[dst..dst + d].copy_from_slice(&x[src..src + d]);
            }
        }
    }
    out
}

fn attention(g: &Golden, device: &Device) -> Result<Named> {
    let q = primary_shape(g, "q", 4, "[B, H, T, D]")?;
    let (b, h, t, d) = (q[0], q[1], q[2], q[3]);
    let kvh = primary_shape(g, "k", 4, "[B, KVH, T, D]")?[1];
    let (q_shape, kv_shape) = ([b, h, t, d], [b, kvh, t, d]);
    expect_shape(g, "k", &kv_shape, "as `q` but for its KV heads")?;
    if !h.is_multiple_of(kvh) {
        return Err(Error::file(
            &g.path,
            format!("tensor `q` has {h} heads, not a multiple of the {kvh} KV heads of `k`"),
        ));
    }
    for name in ["grad_out", "out", "grad_q"] {
        expect_shape(g, name, &q_shape, "as `q`")?;
    }
    for name in ["v", "grad_k", "grad_v"] {
        expect_shape(g, name, &kv_shape, "as `k`")?;
    }
    expect_shape(g, "lse", &[b, h, t], "one per query row of `q`")?;
    let hd = Heads {
        heads: h,
        kv_heads: kvh,
        head_dim: d,
    };
    let scale = 1.0 / (d as f64).sqrt();
    let rows = |name: &str, heads: usize| g.tensor(name).map(|x| to_rows(&x.data, b, heads, t, d));
    let (q, k, v, dout) = (
        rows("q", h)?,
        rows("k", kvh)?,
        rows("v", kvh)?,
        rows("grad_out", h)?,
    );
    let batch = AttnBatch::packed(&vec![t; b], device)?;
    // lse [B, H, T] from per-row [B·T, H].
    let lse_to_golden = |l: &[f64]| {
        let mut o = vec![0.0; l.len()];
        for bi in 0..b {
            for ti in 0..t {
                for hi in 0..h {
                    o[(bi * h + hi) * t + ti] = l[(bi * t + ti) * h + hi];
                }
            }
        }
        o
    };
    let (out, lse, dq, dk, dv) = if let Device::Cpu = device {
        let (q, k, v, dout) = (f64s(&q), f64s(&k), f64s(&v), f64s(&dout));
        let (mut out, mut lse) = (vec![0.0; q.len()], vec![0.0; b * t * h]);
        attention_fwd_ref(&mut out, &mut lse, &q, &k, &v, &batch, hd, scale);
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        attention_bwd_ref(
            &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, &batch, hd, scale,
        );
        (out, lse, dq, dk, dv)
    } else {
        let up = |x: Vec<f32>, heads: usize| Tensor::from_f32(&[b * t, heads * d], x, device);
        let (qt, kt, vt) = (up(q, h)?, up(k, kvh)?, up(v, kvh)?);
        let (out, lse) = attention_fwd(&qt, &kt, &vt, &batch, hd, scale as f32)?;
        let (dq, dk, dv) = attention_bwd(
            &up(dout, h)?,
            &qt,
            &kt,
            &vt,
            &out,
            &lse,
            &batch,
            hd,
            scale as f32,
        )?;
        let v = |t: &Tensor| t.to_f32_vec().map(|v| f64s(&v));
        (v(&out)?, v(&lse)?, v(&dq)?, v(&dk)?, v(&dv)?)
    };
    Ok(vec![
        ("out".into(), from_rows(&out, b, h, t, d)),
        ("lse".into(), lse_to_golden(&lse)),
        ("grad_q".into(), from_rows(&dq, b, h, t, d)),
        ("grad_k".into(), from_rows(&dk, b, kvh, t, d)),
        ("grad_v".into(), from_rows(&dv, b, kvh, t, d)),
    ])
}
