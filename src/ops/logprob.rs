//! Fused log-softmax-gather, the twin of `kernels/logprob.cu`.
//!
//! From logits `[N, V]` and target ids `[N]`: per-token `logp = z[target] − logsumexp(z)`, the
//! logsumexp and the entropy `−Σ p log p`, with `z = logits / temperature`; and the backward of
//! `Σ g_lp·logp + g_ent·H` into `dlogits`. A negative target is ignored (logp = 0, no gradient).
//!
//! The LM-head-fused form takes hidden states `[N, d]` and the head `[V, d]` instead of logits and
//! computes the logits one vocabulary tile at a time (cuBLAS on the GPU), so the `[N, V]` logits never
//! exist: extra memory is one `[N, tile]` f32 buffer whatever V is, and in the backward a gradient
//! buffer for a group of tiles (at most 128 MiB). Its backward gives `dhidden` (f32, overwritten) and
//! accumulates `dweight` (f32, `+=`).

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;
use num_traits::Float;

use crate::device::profile;
use crate::device::tensor::{host_f32, CudaElem};
use crate::device::{same_device, CudaDevice, DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::matmul::{gemm_raw, gemm_ref, GemmShape, Trans};
use crate::ops::{per_row, to_i32};

const OP_FWD: &str = "logprob_fwd";
const OP_BWD: &str = "logprob_bwd";
const OP_LIN_FWD: &str = "linear_logprob_fwd";
const OP_LIN_BWD: &str = "linear_logprob_bwd";
const THREADS: u32 = 512;
/// Rows per block of the tile kernels, a warp each (CHUNK_ROWS in kernels/logprob.cu).
const CHUNK_ROWS: usize = 8;

/// The tile kernels' launch: a warp per row, CHUNK_ROWS rows a block.
fn chunk_config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(CHUNK_ROWS) as u32, 1, 1),
        block_dim: (CHUNK_ROWS as u32 * 32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Elements of one logits tile in the fused form: 16 Mi (32 MiB in bf16, 64 MiB in f32), so at
/// N = 8,192 a tile is 2,048 vocabulary entries wide, 1.6% of V = 128,256.
const TILE_ELEMS: usize = 1 << 24;

/// Vocabulary entries per tile for `n` rows: a multiple of 256 (whole GEMM tiles), at least 256.
pub fn vocab_tile(n: usize, vocab: usize) -> usize {
    let t = (TILE_ELEMS / n.max(1)) / 256 * 256;
    t.clamp(256, vocab.max(1).next_multiple_of(256))
}

/// The backward's dlogits buffer holds this many bytes at most: at N = 8,192 in bf16, four 2,048-wide
/// tiles. `dhidden += dz · W` then runs once per group instead of once per tile; each run reads and
/// writes all of dhidden (f32, 134 MB at d = 4,096), so at V = 128,256 grouping four tiles cuts that
/// traffic from about 17 GB to 4.3 GB a backward. With the bf16 tile the extra memory is 3.2% of what
/// f32 logits would take.
const DZ_GROUP_BYTES: usize = 128 << 20;

/// Tiles per backward gradient group for `n` rows, tiles of `tile` entries and `elem`-byte dlogits.
fn dz_group_tiles(n: usize, tile: usize, vocab: usize, elem: usize) -> usize {
    (DZ_GROUP_BYTES / (n.max(1) * tile * elem)).clamp(1, vocab.div_ceil(tile).max(1))
}

/// Bytes the fused backward allocates beyond its inputs and outputs on a GPU (the logits tile and
/// the gradient group, both in the operands' dtype), for `n` rows, `vocab` entries and `dtype`
/// operands; the forward needs the tile alone. Independent of V once V spans a full group.
pub fn linear_logprob_scratch_bytes(n: usize, vocab: usize, dtype: DType) -> usize {
    let tile = vocab_tile(n, vocab);
    let group = dz_group_tiles(n, tile, vocab, dtype.size());
    n * tile * dtype.size() + n * group * tile * dtype.size()
}

/// One row of the CPU reference forward: returns (logp, lse, entropy).
fn row_fwd_ref<F: Float>(z: impl Iterator<Item = F> + Clone, target_z: Option<F>) -> (F, F, F) {
    let m = z.clone().fold(F::neg_infinity(), F::max);
    let (mut s, mut t) = (F::zero(), F::zero());
    for v in z {
        if v == F::neg_infinity() {
            continue;
        }
        let e = (v - m).exp();
        s = s + e;
        t = t + e * (v - m);
    }
    let lse = m + s.ln();
    let entropy = s.ln() - t / s;
    (target_z.map_or(F::zero(), |tz| tz - lse), lse, entropy)
}

/// CPU reference forward. logits: [N, V]; targets: [N]; logp, lse, entropy: [N].
#[allow(clippy::too_many_arguments)]
pub fn logprob_fwd_ref<F: Float>(
    logp: &mut [F],
    lse: &mut [F],
    entropy: &mut [F],
    logits: &[F],
    targets: &[i32],
    vocab: usize,
    scale: F,
) {
    for (row, x) in logits.chunks_exact(vocab).enumerate() {
        let tgt = targets[row];
        let tz = (tgt >= 0).then(|| x[tgt as usize] * scale);
        let (lp, l, h) = row_fwd_ref(x.iter().map(|&v| v * scale), tz);
        logp[row] = lp;
        lse[row] = l;
        entropy[row] = h;
    }
}

/// The gradient of one logit: `scale·(g_lp·(onehot − p) − g_ent·p·(log p + H))`.
fn logit_grad<F: Float>(z: F, onehot: bool, lse: F, entropy: F, g_lp: F, g_ent: F, scale: F) -> F {
    let logp = z - lse;
    let p = logp.exp();
    let oh = if onehot { F::one() } else { F::zero() };
    // p log p -> 0 as p -> 0: a masked (-inf) logit gets no entropy gradient, not 0 * -inf = NaN.
    let ent = if p == F::zero() {
        F::zero()
    } else {
        p * (logp + entropy)
    };
    scale * (g_lp * (oh - p) - g_ent * ent)
}

/// CPU reference backward: dlogits [N, V] (overwritten).
#[allow(clippy::too_many_arguments)]
pub fn logprob_bwd_ref<F: Float>(
    dlogits: &mut [F],
    logits: &[F],
    targets: &[i32],
    lse: &[F],
    entropy: &[F],
    grad_logp: &[F],
    grad_entropy: &[F],
    vocab: usize,
    scale: F,
) {
    for (row, (x, dx)) in logits
        .chunks_exact(vocab)
        .zip(dlogits.chunks_exact_mut(vocab))
        .enumerate()
    {
        let tgt = targets[row];
        let g_lp = if tgt < 0 { F::zero() } else { grad_logp[row] };
        for v in 0..vocab {
            dx[v] = logit_grad(
                x[v] * scale,
                v as i32 == tgt,
                lse[row],
                entropy[row],
                g_lp,
                grad_entropy[row],
                scale,
            );
        }
    }
}

/// Per-row outputs, all `[N]` f32.
pub struct LogprobOut {
    pub logp: Tensor,
    pub lse: Tensor,
    pub entropy: Tensor,
}

impl LogprobOut {
    /// The CPU path's three per-row vectors as tensors on `device`.
    fn from_host(
        logp: Vec<f32>,
        lse: Vec<f32>,
        entropy: Vec<f32>,
        device: &Device,
    ) -> Result<LogprobOut> {
        let n = logp.len();
        Ok(LogprobOut {
            logp: Tensor::from_f32(&[n], logp, device)?,
            lse: Tensor::from_f32(&[n], lse, device)?,
            entropy: Tensor::from_f32(&[n], entropy, device)?,
        })
    }
}

fn check_temperature(op: &'static str, temperature: f32) -> Result<f32> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::Unsupported {
            op,
            detail: format!("temperature must be positive and finite, got {temperature}"),
        });
    }
    Ok(1.0 / temperature)
}

/// Targets must be i32 `[n]` and below `vocab` (negative = ignored). Checked on the CPU path; on the
/// GPU an id >= vocab yields NaN in logp instead of a read out of bounds.
fn check_targets(op: &'static str, targets: &Tensor, n: usize, vocab: usize) -> Result<()> {
    targets.expect_shape(op, "targets", &[n])?;
    targets.expect_dtype(op, DType::I32)?;
    if let Device::Cpu = targets.device() {
        if let Some((row, &t)) = targets
            .cpu_i32(op)?
            .iter()
            .enumerate()
            .find(|(_, &t)| t >= vocab as i32)
        {
            return Err(Error::Unsupported {
                op,
                detail: format!("target id {t} at row {row} is outside the vocabulary of {vocab}"),
            });
        }
    }
    Ok(())
}

fn scalar_outputs(n: usize, device: &Device) -> Result<LogprobOut> {
    Ok(LogprobOut {
        logp: Tensor::empty(&[n], DType::F32, device)?,
        lse: Tensor::empty(&[n], DType::F32, device)?,
        entropy: Tensor::empty(&[n], DType::F32, device)?,
    })
}

pub fn logprob_fwd(logits: &Tensor, targets: &Tensor, temperature: f32) -> Result<LogprobOut> {
    let device = same_device(OP_FWD, &[logits, targets])?;
    let _profile = profile::scope(device, OP_FWD);
    let (n, vocab) = logits.dims2(OP_FWD)?;
    check_targets(OP_FWD, targets, n, vocab)?;
    let scale = check_temperature(OP_FWD, temperature)?;
    match device {
        Device::Cpu => {
            let x = host_f32(logits, OP_FWD)?;
            let (mut lp, mut lse, mut ent) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
            logprob_fwd_ref(
                &mut lp,
                &mut lse,
                &mut ent,
                &x,
                targets.cpu_i32(OP_FWD)?,
                vocab,
                scale,
            );
            LogprobOut::from_host(lp, lse, ent, device)
        }
        Device::Cuda(_) => match logits.dtype() {
            DType::F32 => fwd_cuda::<f32>(logits, targets, n, vocab, scale),
            DType::BF16 => fwd_cuda::<bf16>(logits, targets, n, vocab, scale),
            DType::I32 => Err(Error::DType {
                op: OP_FWD,
                dtype: "i32",
            }),
        },
    }
}

/// dlogits `[N, V]` in the logits' dtype, for upstream gradients `grad_logp`, `grad_entropy` `[N]` f32.
pub fn logprob_bwd(
    logits: &Tensor,
    targets: &Tensor,
    out: &LogprobOut,
    grad_logp: &Tensor,
    grad_entropy: &Tensor,
    temperature: f32,
) -> Result<Tensor> {
    let device = same_device(
        OP_BWD,
        &[
            logits,
            targets,
            &out.lse,
            &out.entropy,
            grad_logp,
            grad_entropy,
        ],
    )?;
    let _profile = profile::scope(device, OP_BWD);
    let (n, vocab) = logits.dims2(OP_BWD)?;
    check_targets(OP_BWD, targets, n, vocab)?;
    let scale = check_temperature(OP_BWD, temperature)?;
    for (name, t) in [
        ("lse", &out.lse),
        ("entropy", &out.entropy),
        ("grad_logp", grad_logp),
        ("grad_entropy", grad_entropy),
    ] {
        t.expect_shape(OP_BWD, name, &[n])?;
        t.expect_dtype(OP_BWD, DType::F32)?;
    }
    match device {
        Device::Cpu => {
            let x = host_f32(logits, OP_BWD)?;
            let mut dx = vec![0.0f32; n * vocab];
            logprob_bwd_ref(
                &mut dx,
                &x,
                targets.cpu_i32(OP_BWD)?,
                out.lse.cpu_f32(OP_BWD)?,
                out.entropy.cpu_f32(OP_BWD)?,
                grad_logp.cpu_f32(OP_BWD)?,
                grad_entropy.cpu_f32(OP_BWD)?,
                vocab,
                scale,
            );
            Tensor::from_f32_as(&[n, vocab], &dx, logits.dtype(), device)
        }
        Device::Cuda(_) => match logits.dtype() {
            DType::F32 => bwd_cuda::<f32>(
                logits,
                targets,
                out,
                grad_logp,
                grad_entropy,
                n,
                vocab,
                scale,
            ),
            DType::BF16 => bwd_cuda::<bf16>(
                logits,
                targets,
                out,
                grad_logp,
                grad_entropy,
                n,
                vocab,
                scale,
            ),
            DType::I32 => Err(Error::DType {
                op: OP_BWD,
                dtype: "i32",
            }),
        },
    }
}

fn fwd_cuda<T: CudaElem>(
    logits: &Tensor,
    targets: &Tensor,
    n: usize,
    vocab: usize,
    scale: f32,
) -> Result<LogprobOut> {
    let dev = logits.device().as_cuda(OP_FWD)?;
    let mut out = scalar_outputs(n, logits.device())?;
    if n == 0 {
        return Ok(out);
    }
    let v = to_i32(OP_FWD, "vocab", vocab)?;
    let f = dev.function("logprob", T::pick("logprob_fwd_f32", "logprob_fwd_bf16"))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(out.logp.cuda_f32_mut(OP_FWD)?)
        .arg(out.lse.cuda_f32_mut(OP_FWD)?)
        .arg(out.entropy.cuda_f32_mut(OP_FWD)?)
        .arg(T::slice(logits, OP_FWD)?)
        .arg(targets.cuda_i32(OP_FWD)?)
        .arg(&v)
        .arg(&scale);
    // SAFETY: logits hold n*vocab elements, targets and the three outputs n; one block per row.
    unsafe { b.launch(per_row(OP_FWD, n, THREADS, 0)?) }?;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn bwd_cuda<T: CudaElem>(
    logits: &Tensor,
    targets: &Tensor,
    out: &LogprobOut,
    grad_logp: &Tensor,
    grad_entropy: &Tensor,
    n: usize,
    vocab: usize,
    scale: f32,
) -> Result<Tensor> {
    let dev = logits.device().as_cuda(OP_BWD)?;
    let mut dlogits = Tensor::empty(&[n, vocab], T::DTYPE, logits.device())?;
    if n == 0 {
        return Ok(dlogits);
    }
    let v = to_i32(OP_BWD, "vocab", vocab)?;
    let f = dev.function("logprob", T::pick("logprob_bwd_f32", "logprob_bwd_bf16"))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(T::slice_mut(&mut dlogits, OP_BWD)?)
        .arg(T::slice(logits, OP_BWD)?)
        .arg(targets.cuda_i32(OP_BWD)?)
        .arg(out.lse.cuda_f32(OP_BWD)?)
        .arg(out.entropy.cuda_f32(OP_BWD)?)
        .arg(grad_logp.cuda_f32(OP_BWD)?)
        .arg(grad_entropy.cuda_f32(OP_BWD)?)
        .arg(&v)
        .arg(&scale);
    // SAFETY: logits and dlogits hold n*vocab elements, the per-row inputs n; one block per row.
    unsafe { b.launch(per_row(OP_BWD, n, THREADS, 0)?) }?;
    Ok(dlogits)
}

// ---------------------------------------------------------------------------------------------------
// Fused with the LM head.

/// Rows of hidden states per CPU tile: bounds the CPU path's logits buffer to `ROWS × V` floats.
const CPU_ROWS: usize = 64;

/// CPU reference forward of the fused form. hidden: [N, d]; weight: [V, d].
#[allow(clippy::too_many_arguments)]
pub fn linear_logprob_fwd_ref(
    logp: &mut [f32],
    lse: &mut [f32],
    entropy: &mut [f32],
    hidden: &[f32],
    weight: &[f32],
    targets: &[i32],
    d: usize,
    vocab: usize,
    scale: f32,
) {
    let n = targets.len();
    let mut z = vec![0.0f32; CPU_ROWS.min(n) * vocab];
    for r0 in (0..n).step_by(CPU_ROWS) {
        let rows = CPU_ROWS.min(n - r0);
        let z = &mut z[..rows * vocab];
        gemm_ref(
            z,
            &hidden[r0 * d..(r0 + rows) * d],
            Trans::N,
            weight,
            Trans::T,
            rows,
            vocab,
            d,
            scale,
            0.0,
        );
        logprob_fwd_ref(
            &mut logp[r0..r0 + rows],
            &mut lse[r0..r0 + rows],
            &mut entropy[r0..r0 + rows],
            z,
            &targets[r0..r0 + rows],
            vocab,
            1.0,
        );
    }
}

/// CPU reference backward of the fused form: dhidden [N, d] (overwritten), dweight [V, d] (+=).
#[allow(clippy::too_many_arguments)]
pub fn linear_logprob_bwd_ref(
    dhidden: &mut [f32],
    dweight: &mut [f32],
    hidden: &[f32],
    weight: &[f32],
    targets: &[i32],
    lse: &[f32],
    entropy: &[f32],
    grad_logp: &[f32],
    grad_entropy: &[f32],
    d: usize,
    vocab: usize,
    scale: f32,
) {
    let n = targets.len();
    let mut z = vec![0.0f32; CPU_ROWS.min(n) * vocab];
    let mut dz = z.clone();
    for r0 in (0..n).step_by(CPU_ROWS) {
        let rows = CPU_ROWS.min(n - r0);
        let (z, dz) = (&mut z[..rows * vocab], &mut dz[..rows * vocab]);
        let h = &hidden[r0 * d..(r0 + rows) * d];
        gemm_ref(z, h, Trans::N, weight, Trans::T, rows, vocab, d, scale, 0.0);
        let r = r0..r0 + rows;
        // dz holds d loss / d z; the GEMMs apply the chain rule's `scale`.
        logprob_bwd_ref(
            dz,
            z,
            &targets[r.clone()],
            &lse[r.clone()],
            &entropy[r.clone()],
            &grad_logp[r.clone()],
            &grad_entropy[r],
            vocab,
            1.0,
        );
        gemm_ref(
            &mut dhidden[r0 * d..(r0 + rows) * d],
            dz,
            Trans::N,
            weight,
            Trans::N,
            rows,
            d,
            vocab,
            scale,
            0.0,
        );
        gemm_ref(
            dweight,
            dz,
            Trans::T,
            h,
            Trans::N,
            vocab,
            d,
            rows,
            scale,
            1.0,
        );
    }
}

fn check_linear(
    op: &'static str,
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
) -> Result<(usize, usize, usize)> {
    let (n, d) = hidden.dims2(op)?;
    let (vocab, dw) = weight.dims2(op)?;
    if weight.shape().len() != 2 || dw != d {
        return Err(Error::shape(
            op,
            format!(
                "weight has shape {:?}, expected [vocab, {d}]",
                weight.shape()
            ),
        ));
    }
    weight.expect_dtype(op, hidden.dtype())?;
    check_targets(op, targets, n, vocab)?;
    Ok((n, d, vocab))
}

/// `logprob_fwd` of `hidden · weightᵀ / temperature` without materialising the logits.
pub fn linear_logprob_fwd(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    temperature: f32,
) -> Result<LogprobOut> {
    let device = same_device(OP_LIN_FWD, &[hidden, weight, targets])?;
    let (n, d, vocab) = check_linear(OP_LIN_FWD, hidden, weight, targets)?;
    let flops = 2.0 * (n * d * vocab) as f64;
    let _profile = profile::scope_counting(device, || OP_LIN_FWD.into(), flops);
    let scale = check_temperature(OP_LIN_FWD, temperature)?;
    match device {
        Device::Cpu => {
            let (h, w) = (host_f32(hidden, OP_LIN_FWD)?, host_f32(weight, OP_LIN_FWD)?);
            let (mut lp, mut lse, mut ent) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
            linear_logprob_fwd_ref(
                &mut lp,
                &mut lse,
                &mut ent,
                &h,
                &w,
                targets.cpu_i32(OP_LIN_FWD)?,
                d,
                vocab,
                scale,
            );
            LogprobOut::from_host(lp, lse, ent, device)
        }
        Device::Cuda(_) => match hidden.dtype() {
            DType::F32 => linear_fwd_cuda::<f32>(hidden, weight, targets, n, d, vocab, scale),
            DType::BF16 => linear_fwd_cuda::<bf16>(hidden, weight, targets, n, d, vocab, scale),
            DType::I32 => Err(Error::DType {
                op: OP_LIN_FWD,
                dtype: "i32",
            }),
        },
    }
}

/// Backward of the fused form: returns dhidden `[N, d]` f32; adds into `dweight` `[V, d]` f32.
#[allow(clippy::too_many_arguments)]
pub fn linear_logprob_bwd(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    out: &LogprobOut,
    grad_logp: &Tensor,
    grad_entropy: &Tensor,
    temperature: f32,
    dweight: &mut Tensor,
) -> Result<Tensor> {
    let device = same_device(
        OP_LIN_BWD,
        &[
            hidden,
            weight,
            targets,
            &out.lse,
            &out.entropy,
            grad_logp,
            grad_entropy,
            dweight,
        ],
    )?
    .clone();
    let (n, d, vocab) = check_linear(OP_LIN_BWD, hidden, weight, targets)?;
    // The recomputed logits, dhidden and dweight: three GEMMs of the forward's size.
    let flops = 6.0 * (n * d * vocab) as f64;
    let _profile = profile::scope_counting(&device, || OP_LIN_BWD.into(), flops);
    let scale = check_temperature(OP_LIN_BWD, temperature)?;
    for (name, t) in [
        ("lse", &out.lse),
        ("entropy", &out.entropy),
        ("grad_logp", grad_logp),
        ("grad_entropy", grad_entropy),
    ] {
        t.expect_shape(OP_LIN_BWD, name, &[n])?;
        t.expect_dtype(OP_LIN_BWD, DType::F32)?;
    }
    dweight.expect_shape(OP_LIN_BWD, "dweight", &[vocab, d])?;
    dweight.expect_dtype(OP_LIN_BWD, DType::F32)?;
    match &device {
        Device::Cpu => {
            let (h, w) = (host_f32(hidden, OP_LIN_BWD)?, host_f32(weight, OP_LIN_BWD)?);
            let mut dh = vec![0.0f32; n * d];
            linear_logprob_bwd_ref(
                &mut dh,
                dweight.cpu_f32_mut(OP_LIN_BWD)?,
                &h,
                &w,
                targets.cpu_i32(OP_LIN_BWD)?,
                out.lse.cpu_f32(OP_LIN_BWD)?,
                out.entropy.cpu_f32(OP_LIN_BWD)?,
                grad_logp.cpu_f32(OP_LIN_BWD)?,
                grad_entropy.cpu_f32(OP_LIN_BWD)?,
                d,
                vocab,
                scale,
            );
            Tensor::from_f32(&[n, d], dh, &device)
        }
        Device::Cuda(_) => match hidden.dtype() {
            DType::F32 => linear_bwd_cuda::<f32>(
                hidden,
                weight,
                targets,
                out,
                grad_logp,
                grad_entropy,
                dweight,
                n,
                d,
                vocab,
                scale,
            ),
            DType::BF16 => linear_bwd_cuda::<bf16>(
                hidden,
                weight,
                targets,
                out,
                grad_logp,
                grad_entropy,
                dweight,
                n,
                d,
                vocab,
                scale,
            ),
            DType::I32 => Err(Error::DType {
                op: OP_LIN_BWD,
                dtype: "i32",
            }),
        },
    }
}

/// `z[n, vc] = scale · hidden · weight[v0..v0+vc, :]ᵀ` in the operands' dtype (f32 accumulation,
/// one rounding): one vocabulary tile of the logits.
#[allow(clippy::too_many_arguments)]
fn tile_logits<T: CudaElem>(
    dev: &CudaDevice,
    z: &mut Tensor,
    hidden: &Tensor,
    weight: &Tensor,
    v0: usize,
    vc: usize,
    d: usize,
    scale: f32,
) -> Result<()> {
    let stream = dev.stream();
    let n = hidden.shape()[0];
    let (h_ptr, _h) = T::slice(hidden, OP_LIN_FWD)?.device_ptr(stream);
    let (w_ptr, _w) = T::slice(weight, OP_LIN_FWD)?.device_ptr(stream);
    let (z_ptr, _z) = T::slice_mut(z, OP_LIN_FWD)?.device_ptr_mut(stream);
    let shape = GemmShape {
        m: n,
        n: vc,
        k: d,
        ta: Trans::N,
        tb: Trans::T,
    };
    let w_tile = w_ptr + (v0 * d * T::DTYPE.size()) as u64;
    // SAFETY: hidden is [n, d]; rows v0..v0+vc of weight [vocab, d] are a dense [vc, d] block starting
    // v0*d elements in; z holds at least n*vc elements of T.
    unsafe {
        gemm_raw(
            dev,
            shape,
            z_ptr,
            T::DTYPE,
            h_ptr,
            w_tile,
            T::DTYPE,
            scale,
            0.0,
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn linear_fwd_cuda<T: CudaElem>(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    n: usize,
    d: usize,
    vocab: usize,
    scale: f32,
) -> Result<LogprobOut> {
    let device = hidden.device();
    let dev = device.as_cuda(OP_LIN_FWD)?.clone();
    let mut out = scalar_outputs(n, device)?;
    if n == 0 {
        return Ok(out);
    }
    let tile = vocab_tile(n, vocab);
    let mut z = Tensor::empty(&[n, tile], T::DTYPE, device)?;
    let mut state = Tensor::empty(&[n, 3], DType::F32, device)?;
    let mut target_z = Tensor::empty(&[n], DType::F32, device)?;
    let f = dev.function(
        "logprob",
        T::pick("logprob_chunk_fwd_f32", "logprob_chunk_fwd_bf16"),
    )?;
    let stream = dev.stream().clone();
    let v_i = to_i32(OP_LIN_FWD, "vocab", vocab)?;
    let n_i = to_i32(OP_LIN_FWD, "rows", n)?;
    for v0 in (0..vocab).step_by(tile) {
        let vc = tile.min(vocab - v0);
        tile_logits::<T>(&dev, &mut z, hidden, weight, v0, vc, d, scale)?;
        let (vc_i, v0_i) = (vc as i32, v0 as i32);
        let (first, last) = (i32::from(v0 == 0), i32::from(v0 + vc == vocab));
        let mut b = stream.launch_builder(&f);
        b.arg(state.cuda_f32_mut(OP_LIN_FWD)?)
            .arg(target_z.cuda_f32_mut(OP_LIN_FWD)?)
            .arg(out.logp.cuda_f32_mut(OP_LIN_FWD)?)
            .arg(out.lse.cuda_f32_mut(OP_LIN_FWD)?)
            .arg(out.entropy.cuda_f32_mut(OP_LIN_FWD)?)
            .arg(T::slice(&z, OP_LIN_FWD)?)
            .arg(targets.cuda_i32(OP_LIN_FWD)?)
            .arg(&n_i)
            .arg(&vc_i)
            .arg(&v0_i)
            .arg(&v_i)
            .arg(&first)
            .arg(&last);
        // SAFETY: z holds n rows of vc elements of T; state n*3, the others n; a warp per row, rows
        // past n return at once.
        unsafe { b.launch(chunk_config(n)) }?;
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn linear_bwd_cuda<T: CudaElem>(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    out: &LogprobOut,
    grad_logp: &Tensor,
    grad_entropy: &Tensor,
    dweight: &mut Tensor,
    n: usize,
    d: usize,
    vocab: usize,
    scale: f32,
) -> Result<Tensor> {
    let device = hidden.device();
    let dev = device.as_cuda(OP_LIN_BWD)?.clone();
    let mut dhidden = Tensor::zeros(&[n, d], DType::F32, device)?;
    if n == 0 {
        return Ok(dhidden);
    }
    let tile = vocab_tile(n, vocab);
    let group = dz_group_tiles(n, tile, vocab, T::DTYPE.size());
    let mut z = Tensor::empty(&[n, tile], T::DTYPE, device)?;
    let mut dz = Tensor::empty(&[n, group * tile], T::DTYPE, device)?;
    let f = dev.function(
        "logprob",
        T::pick("logprob_chunk_bwd_f32", "logprob_chunk_bwd_bf16"),
    )?;
    let stream = dev.stream().clone();
    let elem = T::DTYPE.size() as u64;
    let n_i = to_i32(OP_LIN_BWD, "rows", n)?;
    for g0 in (0..vocab).step_by(group * tile) {
        // The group's dlogits are [n, kc] with rows kc wide, so each GEMM below reads them dense.
        let kc = (group * tile).min(vocab - g0);
        let kc_i = kc as i32;
        for v0 in (g0..g0 + kc).step_by(tile) {
            let vc = tile.min(g0 + kc - v0);
            tile_logits::<T>(&dev, &mut z, hidden, weight, v0, vc, d, scale)?;
            let (dz_base, _dz) = T::slice_mut(&mut dz, OP_LIN_BWD)?.device_ptr_mut(&stream);
            let dz_tile = dz_base + (v0 - g0) as u64 * elem;
            let (vc_i, v0_i) = (vc as i32, v0 as i32);
            let mut b = stream.launch_builder(&f);
            b.arg(&dz_tile)
                .arg(T::slice(&z, OP_LIN_BWD)?)
                .arg(targets.cuda_i32(OP_LIN_BWD)?)
                .arg(out.lse.cuda_f32(OP_LIN_BWD)?)
                .arg(out.entropy.cuda_f32(OP_LIN_BWD)?)
                .arg(grad_logp.cuda_f32(OP_LIN_BWD)?)
                .arg(grad_entropy.cuda_f32(OP_LIN_BWD)?)
                .arg(&n_i)
                .arg(&vc_i)
                .arg(&v0_i)
                .arg(&kc_i);
            // SAFETY: z holds n rows of vc elements of T; dz_tile is column v0 - g0 of the [n, kc] group,
            // whose rows hold kc >= (v0 - g0) + vc elements; the per-row inputs n; a warp per row,
            // rows past n return at once.
            unsafe { b.launch(chunk_config(n)) }?;
        }
        let w_off = (g0 * d) as u64;
        let (h_ptr, _h) = T::slice(hidden, OP_LIN_BWD)?.device_ptr(&stream);
        let (w_ptr, _w) = T::slice(weight, OP_LIN_BWD)?.device_ptr(&stream);
        let (dz_ptr, _dz) = T::slice(&dz, OP_LIN_BWD)?.device_ptr(&stream);
        let (dh_ptr, _dh) = dhidden.cuda_f32_mut(OP_LIN_BWD)?.device_ptr_mut(&stream);
        // dhidden += scale · dz[n, kc] · W[g0.., :][kc, d]
        let shape = GemmShape {
            m: n,
            n: d,
            k: kc,
            ta: Trans::N,
            tb: Trans::N,
        };
        // SAFETY: dz [n, kc] dense, the weight block [kc, d], dhidden [n, d] f32.
        unsafe {
            gemm_raw(
                &dev,
                shape,
                dh_ptr,
                DType::F32,
                dz_ptr,
                w_ptr + w_off * elem,
                T::DTYPE,
                scale,
                1.0,
            )
        }?;
        let (dw_ptr, _dw) = dweight.cuda_f32_mut(OP_LIN_BWD)?.device_ptr_mut(&stream);
        // dweight[g0.., :] += scale · dz[n, kc]ᵀ · hidden[n, d]
        let shape = GemmShape {
            m: kc,
            n: d,
            k: n,
            ta: Trans::T,
            tb: Trans::N,
        };
        // SAFETY: dz [n, kc] used transposed, hidden [n, d], rows g0..g0+kc of dweight [vocab, d] f32.
        unsafe {
            gemm_raw(
                &dev,
                shape,
                dw_ptr + w_off * 4,
                DType::F32,
                dz_ptr,
                h_ptr,
                T::DTYPE,
                scale,
                1.0,
            )
        }?;
    }
    Ok(dhidden)
}
