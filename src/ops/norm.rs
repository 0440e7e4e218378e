//! RMSNorm, the twin of `kernels/norm.cu`.
//!
//! `y = x * rstd * w` with `rstd = 1/sqrt(mean(x²) + eps)` per row. The forward returns `rstd` for the
//! backward. The backward overwrites `dx` and accumulates into `dweight` (f32, `+=`), as every
//! parameter gradient in this crate does.
//!
//! The residual variants take the transformer's residual add along, saving it a pass over the
//! rows: [`add_rms_norm_fwd`] normalises `h = x + delta` and returns `h` too (rounded to the dtype
//! first, as [`crate::ops::elementwise::add`] would), and [`rms_norm_bwd_add`] returns
//! `dx + dres`, the gradient of a tensor that also reaches the loss through the residual path.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;
use num_traits::Float;

use crate::device::profile;
use crate::device::tensor::{host_f32, CudaElem};
use crate::device::{same_device, DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::{per_row, to_i32};

const OP_FWD: &str = "rms_norm_fwd";
const OP_BWD: &str = "rms_norm_bwd";
const OP_ADD_FWD: &str = "add_rms_norm_fwd";
const OP_BWD_ADD: &str = "rms_norm_bwd_add";
/// Threads of the vector-path backward over all its blocks, a quarter of what an H100 keeps resident
/// (more blocks means more partial rows to reduce). Each block writes one partial dweight row, so the
/// count depends only on the shape and results are the same on every card.
const BWD_THREADS_TOTAL: usize = 1 << 16;
/// Blocks of the scalar-path backward, whose partial rows can be wide (past MAX_VECS * 512 vectors).
const SCALAR_BWD_PARTS: usize = 256;
/// Vectors (16 bytes) per thread on the kernels' vector path (`kNormMaxVecs` in kernels/norm.cu).
const MAX_VECS: usize = 2;
/// Threads of one reduce block (`kReduceWarps` warps), each block taking 32 columns.
const REDUCE_THREADS: u32 = 256;
/// The backward kernel's static shared memory (its block-reduction scratch), on top of the dynamic
/// dweight accumulator.
const BWD_STATIC_SHARED: usize = 32 * 4;

/// CPU reference forward. x, y: [rows, cols]; weight: [cols]; rstd: [rows].
pub fn rms_norm_fwd_ref<F: Float>(
    y: &mut [F],
    rstd: &mut [F],
    x: &[F],
    weight: &[F],
    cols: usize,
    eps: F,
) {
    let n = F::from(cols).unwrap();
    for (row, (xr, yr)) in x
        .chunks_exact(cols)
        .zip(y.chunks_exact_mut(cols))
        .enumerate()
    {
        let mut sumsq = F::zero();
        for &v in xr {
            sumsq = sumsq + v * v;
        }
        let r = F::one() / (sumsq / n + eps).sqrt();
        rstd[row] = r;
        for c in 0..cols {
            yr[c] = xr[c] * r * weight[c];
        }
    }
}

/// CPU reference backward: dx = (overwritten), dweight += (accumulated).
pub fn rms_norm_bwd_ref<F: Float>(
    dx: &mut [F],
    dweight: &mut [F],
    dy: &[F],
    x: &[F],
    weight: &[F],
    rstd: &[F],
    cols: usize,
) {
    let n = F::from(cols).unwrap();
    for (row, ((xr, dyr), dxr)) in x
        .chunks_exact(cols)
        .zip(dy.chunks_exact(cols))
        .zip(dx.chunks_exact_mut(cols))
        .enumerate()
    {
        let r = rstd[row];
        let mut dot = F::zero();
        for c in 0..cols {
            dot = dot + dyr[c] * weight[c] * xr[c];
        }
        let coef = r * r * r * dot / n;
        for c in 0..cols {
            dxr[c] = r * dyr[c] * weight[c] - xr[c] * coef;
            dweight[c] = dweight[c] + dyr[c] * xr[c] * r;
        }
    }
}

pub struct RmsNormOut {
    /// [rows, cols], x's dtype.
    pub y: Tensor,
    /// [rows] f32, saved for the backward.
    pub rstd: Tensor,
}

pub fn rms_norm_fwd(x: &Tensor, weight: &Tensor, eps: f32) -> Result<RmsNormOut> {
    fwd(OP_FWD, x, None, weight, eps).map(|(out, _)| out)
}

/// `add_rms_norm_fwd`'s outputs: the normalised rows and the sum they normalise.
pub struct AddRmsNormOut {
    /// `x + delta`, [rows, cols] in x's dtype: the next residual stream.
    pub h: Tensor,
    pub norm: RmsNormOut,
}

/// RMSNorm of `h = x + delta` (one pass: h is rounded to x's dtype, written, and normalised).
pub fn add_rms_norm_fwd(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<AddRmsNormOut> {
    let (norm, h) = fwd(OP_ADD_FWD, x, Some(delta), weight, eps)?;
    Ok(AddRmsNormOut {
        h: h.expect("the residual forward returns h"),
        norm,
    })
}

fn fwd(
    op: &'static str,
    x: &Tensor,
    delta: Option<&Tensor>,
    weight: &Tensor,
    eps: f32,
) -> Result<(RmsNormOut, Option<Tensor>)> {
    let device = same_device(op, &[x, weight])?;
    let _profile = profile::scope(device, op);
    let (rows, cols) = x.dims2(op)?;
    weight.expect_shape(op, "weight", &[cols])?;
    weight.expect_dtype(op, x.dtype())?;
    if let Some(d) = delta {
        same_device(op, &[x, d])?;
        d.expect_shape(op, "delta", x.shape())?;
        d.expect_dtype(op, x.dtype())?;
    }
    match device {
        Device::Cpu => {
            // h as the dtype stores it, then the norm of that.
            let h = delta
                .map(|d| {
                    let sum: Vec<f32> = host_f32(x, op)?
                        .iter()
                        .zip(host_f32(d, op)?.iter())
                        .map(|(a, b)| a + b)
                        .collect();
                    Tensor::from_f32_as(x.shape(), &sum, x.dtype(), device)
                })
                .transpose()?;
            let (xs, ws) = (
                host_f32(h.as_ref().unwrap_or(x), op)?,
                host_f32(weight, op)?,
            );
            let mut y = vec![0.0f32; rows * cols];
            let mut rstd = vec![0.0f32; rows];
            rms_norm_fwd_ref(&mut y, &mut rstd, &xs, &ws, cols, eps);
            let out = RmsNormOut {
                y: Tensor::from_f32_as(x.shape(), &y, x.dtype(), device)?,
                rstd: Tensor::from_f32(&[rows], rstd, device)?,
            };
            Ok((out, h))
        }
        Device::Cuda(_) => match x.dtype() {
            DType::F32 => fwd_cuda::<f32>(op, x, delta, weight, eps, rows, cols),
            DType::BF16 => fwd_cuda::<bf16>(op, x, delta, weight, eps, rows, cols),
            DType::I32 => Err(Error::DType { op, dtype: "i32" }),
        },
    }
}

/// Returns dx; adds this batch's weight gradient into `dweight` ([cols] f32).
pub fn rms_norm_bwd(
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
    dweight: &mut Tensor,
) -> Result<Tensor> {
    bwd(OP_BWD, dy, x, weight, rstd, dweight, None)
}

/// `rms_norm_bwd`'s dx plus `dres` (x's shape and dtype), rounded once.
pub fn rms_norm_bwd_add(
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
    dweight: &mut Tensor,
    dres: &Tensor,
) -> Result<Tensor> {
    bwd(OP_BWD_ADD, dy, x, weight, rstd, dweight, Some(dres))
}

fn bwd(
    op: &'static str,
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
    dweight: &mut Tensor,
    dres: Option<&Tensor>,
) -> Result<Tensor> {
    let device = same_device(op, &[dy, x, weight, rstd, dweight])?.clone();
    let _profile = profile::scope(&device, op);
    let (rows, cols) = x.dims2(op)?;
    dy.expect_shape(op, "dy", x.shape())?;
    weight.expect_shape(op, "weight", &[cols])?;
    rstd.expect_shape(op, "rstd", &[rows])?;
    dweight.expect_shape(op, "dweight", &[cols])?;
    for t in [dy, weight] {
        t.expect_dtype(op, x.dtype())?;
    }
    if let Some(d) = dres {
        same_device(op, &[x, d])?;
        d.expect_shape(op, "dres", x.shape())?;
        d.expect_dtype(op, x.dtype())?;
    }
    rstd.expect_dtype(op, DType::F32)?;
    dweight.expect_dtype(op, DType::F32)?;
    match &device {
        Device::Cpu => {
            let (dys, xs, ws, rs) = (
                host_f32(dy, op)?,
                host_f32(x, op)?,
                host_f32(weight, op)?,
                host_f32(rstd, op)?,
            );
            let mut dx = vec![0.0f32; rows * cols];
            rms_norm_bwd_ref(&mut dx, dweight.cpu_f32_mut(op)?, &dys, &xs, &ws, &rs, cols);
            if let Some(d) = dres {
                for (a, b) in dx.iter_mut().zip(host_f32(d, op)?.iter()) {
                    *a += b;
                }
            }
            Tensor::from_f32_as(x.shape(), &dx, x.dtype(), &device)
        }
        Device::Cuda(_) => match x.dtype() {
            DType::F32 => bwd_cuda::<f32>(op, dy, x, weight, rstd, dweight, dres, rows, cols),
            DType::BF16 => bwd_cuda::<bf16>(op, dy, x, weight, rstd, dweight, dres, rows, cols),
            DType::I32 => Err(Error::DType { op, dtype: "i32" }),
        },
    }
}

/// True when a row takes the kernels' vector path: 16-byte aligned rows of at most MAX_VECS vectors a
/// thread at 512 threads.
fn vector_path(cols: usize, elem_bytes: usize) -> bool {
    let n = 16 / elem_bytes;
    cols.is_multiple_of(n) && cols / n <= MAX_VECS * 512
}

/// One row per block. On the vector path, enough whole warps for MAX_VECS vectors a thread (a
/// 4,096-wide bf16 row: 512 vectors, 256 threads; the backward's 85 registers then still fit three
/// blocks an SM, where 512 threads would fit one); otherwise by width.
fn block_threads(cols: usize, elem_bytes: usize) -> u32 {
    if vector_path(cols, elem_bytes) {
        let vecs = cols / (16 / elem_bytes);
        return vecs.div_ceil(MAX_VECS).next_multiple_of(32).clamp(32, 512) as u32;
    }
    if cols >= 2048 {
        512
    } else if cols >= 512 {
        256
    } else {
        128
    }
}

fn fwd_cuda<T: CudaElem>(
    op: &'static str,
    x: &Tensor,
    delta: Option<&Tensor>,
    weight: &Tensor,
    eps: f32,
    rows: usize,
    cols: usize,
) -> Result<(RmsNormOut, Option<Tensor>)> {
    let dev = x.device().as_cuda(op)?;
    let mut y = Tensor::empty(x.shape(), T::DTYPE, x.device())?;
    let mut rstd = Tensor::empty(&[rows], DType::F32, x.device())?;
    let mut h = delta
        .map(|_| Tensor::empty(x.shape(), T::DTYPE, x.device()))
        .transpose()?;
    if rows == 0 {
        return Ok((RmsNormOut { y, rstd }, h));
    }
    let cols_i = to_i32(op, "cols", cols)?;
    let name = match delta {
        None => T::pick("rms_norm_fwd_f32", "rms_norm_fwd_bf16"),
        Some(_) => T::pick("add_rms_norm_fwd_f32", "add_rms_norm_fwd_bf16"),
    };
    let f = dev.function("norm", name)?;
    let cfg = per_row(op, rows, block_threads(cols, T::DTYPE.size()), 0)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(T::slice_mut(&mut y, op)?).arg(rstd.cuda_f32_mut(op)?);
    if let (Some(h), Some(d)) = (h.as_mut(), delta) {
        b.arg(T::slice_mut(h, op)?)
            .arg(T::slice(x, op)?)
            .arg(T::slice(d, op)?);
    } else {
        b.arg(T::slice(x, op)?);
    }
    b.arg(T::slice(weight, op)?).arg(&cols_i).arg(&eps);
    // SAFETY: y, x (and h, delta) hold rows*cols elements, weight cols, rstd rows; one block per
    // row.
    unsafe { b.launch(cfg) }?;
    Ok((RmsNormOut { y, rstd }, h))
}

#[allow(clippy::too_many_arguments)]
fn bwd_cuda<T: CudaElem>(
    op: &'static str,
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
    dweight: &mut Tensor,
    dres: Option<&Tensor>,
    rows: usize,
    cols: usize,
) -> Result<Tensor> {
    let dev = x.device().as_cuda(op)?.clone();
    let mut dx = Tensor::empty(x.shape(), T::DTYPE, x.device())?;
    if rows == 0 {
        return Ok(dx);
    }
    let vector = vector_path(cols, T::DTYPE.size());
    let threads = block_threads(cols, T::DTYPE.size());
    // The scalar path accumulates dweight in shared memory; the vector path in registers.
    let shared = if vector { 0 } else { cols * 4 };
    // Past 48 KiB (static scratch included) a block must opt in to more shared memory; 160 KiB is
    // under every sm_80+ card's opt-in limit (A100: 163 KiB), so cols up to 40,960.
    if shared > 160 * 1024 {
        return Err(Error::Unsupported {
            op,
            detail: format!("cols = {cols}: the dweight accumulator needs {shared} B of shared memory, over 160 KiB"),
        });
    }
    let parts = rows.min(if vector {
        BWD_THREADS_TOTAL / threads as usize
    } else {
        SCALAR_BWD_PARTS
    });
    let mut partial = Tensor::empty(&[parts, cols], DType::F32, x.device())?;
    let (rows_i, cols_i, parts_i) = (
        to_i32(op, "rows", rows)?,
        to_i32(op, "cols", cols)?,
        parts as i32,
    );
    let name = match dres {
        None => T::pick("rms_norm_bwd_f32", "rms_norm_bwd_bf16"),
        Some(_) => T::pick("rms_norm_bwd_add_f32", "rms_norm_bwd_add_bf16"),
    };
    let f = dev.function_with_shared("norm", name, shared, BWD_STATIC_SHARED)?;
    let cfg = per_row(op, parts, threads, shared as u32)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(T::slice_mut(&mut dx, op)?)
        .arg(partial.cuda_f32_mut(op)?)
        .arg(T::slice(dy, op)?)
        .arg(T::slice(x, op)?)
        .arg(T::slice(weight, op)?)
        .arg(rstd.cuda_f32(op)?);
    if let Some(d) = dres {
        b.arg(T::slice(d, op)?);
    }
    b.arg(&rows_i).arg(&cols_i);
    // SAFETY: dx, dy, x (and dres) hold rows*cols elements; partial parts*cols; weight cols; rstd
    // rows; dynamic shared memory holds cols floats.
    unsafe { b.launch(cfg) }?;

    let reduce = dev.function("norm", "rms_norm_dweight_reduce")?;
    let cfg = LaunchConfig {
        grid_dim: (cols.div_ceil(32) as u32, 1, 1),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream().launch_builder(&reduce);
    b.arg(dweight.cuda_f32_mut(op)?)
        .arg(partial.cuda_f32(op)?)
        .arg(&parts_i)
        .arg(&cols_i);
    // SAFETY: dweight holds cols floats, partial parts*cols; a block per 32 columns, each column
    // written by one thread.
    unsafe { b.launch(cfg) }?;
    Ok(dx)
}
