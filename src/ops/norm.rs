//! RMSNorm, the twin of `kernels/norm.cu`.
//!
//! `y = x * rstd * w` with `rstd = 1/sqrt(mean(x²) + eps)` per row. The forward returns `rstd` for the
//! backward. The backward overwrites `dx` and accumulates into `dweight` (f32, `+=`), as every
//! parameter gradient in this crate does.

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
    let device = same_device(OP_FWD, &[x, weight])?;
    let _profile = profile::scope(device, OP_FWD);
    let (rows, cols) = x.dims2(OP_FWD)?;
    weight.expect_shape(OP_FWD, "weight", &[cols])?;
    weight.expect_dtype(OP_FWD, x.dtype())?;
    match device {
        Device::Cpu => {
            let (xs, ws) = (host_f32(x, OP_FWD)?, host_f32(weight, OP_FWD)?);
            let mut y = vec![0.0f32; rows * cols];
            let mut rstd = vec![0.0f32; rows];
            rms_norm_fwd_ref(&mut y, &mut rstd, &xs, &ws, cols, eps);
            Ok(RmsNormOut {
                y: Tensor::from_f32_as(x.shape(), &y, x.dtype(), device)?,
                rstd: Tensor::from_f32(&[rows], rstd, device)?,
            })
        }
        Device::Cuda(_) => match x.dtype() {
            DType::F32 => fwd_cuda::<f32>(x, weight, eps, rows, cols),
            DType::BF16 => fwd_cuda::<bf16>(x, weight, eps, rows, cols),
            DType::I32 => Err(Error::DType {
                op: OP_FWD,
                dtype: "i32",
            }),
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
    let device = same_device(OP_BWD, &[dy, x, weight, rstd, dweight])?.clone();
    let _profile = profile::scope(&device, OP_BWD);
    let (rows, cols) = x.dims2(OP_BWD)?;
    dy.expect_shape(OP_BWD, "dy", x.shape())?;
    weight.expect_shape(OP_BWD, "weight", &[cols])?;
    rstd.expect_shape(OP_BWD, "rstd", &[rows])?;
    dweight.expect_shape(OP_BWD, "dweight", &[cols])?;
    for t in [dy, weight] {
        t.expect_dtype(OP_BWD, x.dtype())?;
    }
    rstd.expect_dtype(OP_BWD, DType::F32)?;
    dweight.expect_dtype(OP_BWD, DType::F32)?;
    match &device {
        Device::Cpu => {
            let (dys, xs, ws, rs) = (
                host_f32(dy, OP_BWD)?,
                host_f32(x, OP_BWD)?,
                host_f32(weight, OP_BWD)?,
                host_f32(rstd, OP_BWD)?,
            );
            let mut dx = vec![0.0f32; rows * cols];
            rms_norm_bwd_ref(
                &mut dx,
                dweight.cpu_f32_mut(OP_BWD)?,
                &dys,
                &xs,
                &ws,
                &rs,
                cols,
            );
            Tensor::from_f32_as(x.shape(), &dx, x.dtype(), &device)
        }
        Device::Cuda(_) => match x.dtype() {
            DType::F32 => bwd_cuda::<f32>(dy, x, weight, rstd, dweight, rows, cols),
            DType::BF16 => bwd_cuda::<bf16>(dy, x, weight, rstd, dweight, rows, cols),
            DType::I32 => Err(Error::DType {
                op: OP_BWD,
                dtype: "i32",
            }),
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
    x: &Tensor,
    weight: &Tensor,
    eps: f32,
    rows: usize,
    cols: usize,
) -> Result<RmsNormOut> {
    let dev = x.device().as_cuda(OP_FWD)?;
    let mut y = Tensor::empty(x.shape(), T::DTYPE, x.device())?;
    let mut rstd = Tensor::empty(&[rows], DType::F32, x.device())?;
    if rows == 0 {
        return Ok(RmsNormOut { y, rstd });
    }
    let cols_i = to_i32(OP_FWD, "cols", cols)?;
    let f = dev.function("norm", T::pick("rms_norm_fwd_f32", "rms_norm_fwd_bf16"))?;
    let cfg = per_row(OP_FWD, rows, block_threads(cols, T::DTYPE.size()), 0)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(T::slice_mut(&mut y, OP_FWD)?)
        .arg(rstd.cuda_f32_mut(OP_FWD)?)
        .arg(T::slice(x, OP_FWD)?)
        .arg(T::slice(weight, OP_FWD)?)
        .arg(&cols_i)
        .arg(&eps);
    // SAFETY: y and x hold rows*cols elements, weight cols, rstd rows; one block per row.
    unsafe { b.launch(cfg) }?;
    Ok(RmsNormOut { y, rstd })
}

fn bwd_cuda<T: CudaElem>(
    dy: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
    dweight: &mut Tensor,
    rows: usize,
    cols: usize,
) -> Result<Tensor> {
    let dev = x.device().as_cuda(OP_BWD)?.clone();
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
            op: OP_BWD,
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
        to_i32(OP_BWD, "rows", rows)?,
        to_i32(OP_BWD, "cols", cols)?,
        parts as i32,
    );
    let f = dev.function_with_shared(
        "norm",
        T::pick("rms_norm_bwd_f32", "rms_norm_bwd_bf16"),
        shared,
        BWD_STATIC_SHARED,
    )?;
    let cfg = per_row(OP_BWD, parts, threads, shared as u32)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(T::slice_mut(&mut dx, OP_BWD)?)
        .arg(partial.cuda_f32_mut(OP_BWD)?)
        .arg(T::slice(dy, OP_BWD)?)
        .arg(T::slice(x, OP_BWD)?)
        .arg(T::slice(weight, OP_BWD)?)
        .arg(rstd.cuda_f32(OP_BWD)?)
        .arg(&rows_i)
        .arg(&cols_i);
    // SAFETY: dx, dy, x hold rows*cols elements; partial parts*cols; weight cols; rstd rows; dynamic
    // shared memory holds cols floats.
    unsafe { b.launch(cfg) }?;

    let reduce = dev.function("norm", "rms_norm_dweight_reduce")?;
    let cfg = LaunchConfig {
        grid_dim: (cols.div_ceil(32) as u32, 1, 1),
        block_dim: (REDUCE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream().launch_builder(&reduce);
    b.arg(dweight.cuda_f32_mut(OP_BWD)?)
        .arg(partial.cuda_f32(OP_BWD)?)
        .arg(&parts_i)
        .arg(&cols_i);
    // SAFETY: dweight holds cols floats, partial parts*cols; a block per 32 columns, each column
    // written by one thread.
    unsafe { b.launch(cfg) }?;
    Ok(dx)
}
