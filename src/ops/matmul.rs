//! Plain GEMM: cuBLAS on the GPU (bf16 or f32 operands, f32 accumulation), `matrixmultiply` on the
//! CPU. Row-major throughout: `c[m, n] = alpha * op(a)[m, k] · op(b)[k, n] + beta * c`.

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{DevicePtr, DevicePtrMut};

use crate::device::profile;
use crate::device::tensor::{host_f32, CudaElem};
use crate::device::{same_device, CudaDevice, DType, Device, Tensor};
use crate::error::{Error, Result};

const OP: &str = "matmul";

/// Whether an operand is used as stored or transposed: a `[out, in]` weight multiplies as `T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trans {
    N,
    T,
}

/// `[rows, cols]` of op(t).
fn op_dims(t: &Tensor, trans: Trans) -> Result<(usize, usize)> {
    if t.shape().len() != 2 {
        return Err(Error::shape(
            OP,
            format!("operands must be 2-D, got {:?}", t.shape()),
        ));
    }
    let (r, c) = (t.shape()[0], t.shape()[1]);
    Ok(if trans == Trans::N { (r, c) } else { (c, r) })
}

/// CPU reference: c = alpha * op(a) · op(b) + beta * c, all row-major.
#[allow(clippy::too_many_arguments)]
pub fn gemm_ref(
    c: &mut [f32],
    a: &[f32],
    ta: Trans,
    b: &[f32],
    tb: Trans,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    beta: f32,
) {
    // Strides of op(a) [m, k] and op(b) [k, n] over the stored row-major buffers.
    let (rsa, csa) = if ta == Trans::N {
        (k as isize, 1)
    } else {
        (1, m as isize)
    };
    let (rsb, csb) = if tb == Trans::N {
        (n as isize, 1)
    } else {
        (1, k as isize)
    };
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.iter_mut().for_each(|v| *v *= beta);
        return;
    }
    if ta == Trans::N && tb == Trans::T && m <= DOT_ROWS {
        gemm_rows_dot(c, a, b, m, n, k, alpha, beta);
        return;
    }
    // With b stored [n, k] and m < n, the library is given cᵀ = op(b)ᵀ · op(a)ᵀ instead, the same
    // buffers under swapped strides: it then packs b as its left operand, along b's rows, and splits
    // its threads over n. 1536x576 weights on two cores: 2.4 ms against 1.2 at m = 30, 48 against
    // 42 at m = 2,048; never slower in those measurements.
    let swap = tb == Trans::T && m < n;
    let (rows, cols, left, (rsl, csl), right, (rsr, csr), (rsc, csc)) = if swap {
        (n, m, b, (csb, rsb), a, (csa, rsa), (1, n as isize))
    } else {
        (m, n, a, (rsa, csa), b, (rsb, csb), (n as isize, 1))
    };
    // SAFETY: the strides describe buffers of m*k, k*n and m*n elements, which the caller checked.
    unsafe {
        matrixmultiply::sgemm(
            rows,
            k,
            cols,
            alpha,
            left.as_ptr(),
            rsl,
            csl,
            right.as_ptr(),
            rsr,
            csr,
            beta,
            c.as_mut_ptr(),
            rsc,
            csc,
        );
    }
}

/// Rows of `a` up to which `a · bᵀ` (a weight `b` stored `[n, k]`, as every linear layer multiplies)
/// runs as dot products of contiguous rows instead of through `matrixmultiply`. That library packs
/// all of `b` on every call, reading it down its columns, and splits its threads over `m`: at m = 1
/// (a decode step) a 1536x576 product took 2.2 ms on two cores, the dot products 0.15 ms.
/// Past four rows its blocking reuses each packed panel enough to win.
const DOT_ROWS: usize = 4;

/// Multiply-adds per thread below which another thread costs more than it saves.
const DOT_MIN_WORK_PER_THREAD: usize = 1 << 18;

/// `c[m, n] = alpha · a[m, k] · b[n, k]ᵀ + beta · c`, one dot product per output, split over
/// threads by columns of c (rows of b), so each thread streams its own part of b once.
#[allow(clippy::too_many_arguments)]
fn gemm_rows_dot(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    beta: f32,
) {
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(m * n * k / DOT_MIN_WORK_PER_THREAD)
        .clamp(1, n);
    // Column j of c: b's row j against every row of a, so a thread streams its rows of b once.
    let column = |j: usize| {
        let row_b = &b[j * k..(j + 1) * k];
        (0..m).map(move |i| dot(&a[i * k..(i + 1) * k], row_b))
    };
    // cᵀ: the threads take runs of columns, contiguous there, where c's rows interleave them.
    let ct: Vec<f32> = if threads == 1 {
        (0..n).flat_map(column).collect()
    } else {
        let per = n.div_ceil(threads);
        std::thread::scope(|s| {
            let jobs: Vec<_> = (0..n)
                .step_by(per)
                .map(|j0| {
                    s.spawn(move || (j0..(j0 + per).min(n)).flat_map(column).collect::<Vec<_>>())
                })
                .collect();
            jobs.into_iter()
                .flat_map(|j| j.join().expect("a GEMM thread panicked"))
                .collect()
        })
    };
    for (j, col) in ct.chunks(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            let cij = &mut c[i * n + j];
            // BLAS convention: beta = 0 ignores c, NaN included.
            *cij = if beta == 0.0 {
                alpha * v
            } else {
                alpha * v + beta * *cij
            };
        }
    }
}

/// Dot product over eight partial sums, which an optimising build turns into vector lanes.
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (u, v) in xc.zip(yc) {
        for l in 0..8 {
            acc[l] += u[l] * v[l];
        }
    }
    let tail: f32 = xr.iter().zip(yr).map(|(u, v)| u * v).sum();
    acc.iter().sum::<f32>() + tail
}

/// `op(a) · op(b)` as a new tensor of a's dtype.
pub fn matmul(a: &Tensor, ta: Trans, b: &Tensor, tb: Trans) -> Result<Tensor> {
    let (m, _) = op_dims(a, ta)?;
    let (_, n) = op_dims(b, tb)?;
    let mut c = Tensor::empty(&[m, n], a.dtype(), a.device())?;
    gemm(&mut c, a, ta, b, tb, 1.0, 0.0)?;
    Ok(c)
}

/// `c = alpha * op(a) · op(b) + beta * c`. beta = 1 accumulates (gradients of weights).
pub fn gemm(
    c: &mut Tensor,
    a: &Tensor,
    ta: Trans,
    b: &Tensor,
    tb: Trans,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let device = same_device(OP, &[a, b, c])?.clone();
    let (m, k) = op_dims(a, ta)?;
    let (kb, n) = op_dims(b, tb)?;
    if k != kb {
        return Err(Error::shape(
            OP,
            format!(
                "inner dims differ: {:?}{ta:?} · {:?}{tb:?}",
                a.shape(),
                b.shape()
            ),
        ));
    }
    c.expect_shape(OP, "c", &[m, n])?;
    b.expect_dtype(OP, a.dtype())?;
    // Named by shape: the shapes tell the model's GEMMs apart.
    let _profile = profile::scope_counting(
        &device,
        || {
            format!(
                "gemm {m}x{n}x{k} {ta:?}{tb:?}{}",
                if beta == 0.0 { "" } else { " +=" }
            )
            .into()
        },
        2.0 * (m * n * k) as f64,
    );
    match &device {
        Device::Cpu => {
            let (av, bv) = (host_f32(a, OP)?, host_f32(b, OP)?);
            let mut cv = if beta == 0.0 {
                vec![0.0; m * n]
            } else {
                c.to_f32_vec()?
            };
            gemm_ref(&mut cv, &av, ta, &bv, tb, m, n, k, alpha, beta);
            *c = Tensor::from_f32_as(&[m, n], &cv, c.dtype(), &device)?;
            Ok(())
        }
        Device::Cuda(_) => {
            if m == 0 || n == 0 {
                return Ok(());
            }
            match (a.dtype(), c.dtype()) {
                (DType::F32, DType::F32) => {
                    gemm_cuda::<f32, f32>(c, a, ta, b, tb, m, n, k, alpha, beta)
                }
                (DType::BF16, DType::BF16) => {
                    gemm_cuda::<half::bf16, half::bf16>(c, a, ta, b, tb, m, n, k, alpha, beta)
                }
                (DType::BF16, DType::F32) => {
                    gemm_cuda::<half::bf16, f32>(c, a, ta, b, tb, m, n, k, alpha, beta)
                }
                (_, dt) => Err(Error::DType {
                    op: OP,
                    dtype: dt.name(),
                }),
            }
        }
    }
}

fn data_type(d: DType) -> cudaDataType {
    match d {
        DType::F32 => cudaDataType::CUDA_R_32F,
        DType::BF16 => cudaDataType::CUDA_R_16BF,
        DType::I32 => cudaDataType::CUDA_R_32I,
    }
}

#[allow(clippy::too_many_arguments)]
fn gemm_cuda<T: CudaElem, C: CudaElem>(
    c: &mut Tensor,
    a: &Tensor,
    ta: Trans,
    b: &Tensor,
    tb: Trans,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let dev = a.device().as_cuda(OP)?.clone();
    let stream = dev.stream();
    let (a_ptr, _ra) = T::slice(a, OP)?.device_ptr(stream);
    let (b_ptr, _rb) = T::slice(b, OP)?.device_ptr(stream);
    let (c_ptr, _rc) = C::slice_mut(c, OP)?.device_ptr_mut(stream);
    let shape = GemmShape { m, n, k, ta, tb };
    // SAFETY: `gemm` checked that a, b and c hold m*k, k*n and m*n elements of these types.
    unsafe {
        gemm_raw(
            &dev,
            shape,
            c_ptr,
            C::DTYPE,
            a_ptr,
            b_ptr,
            T::DTYPE,
            alpha,
            beta,
        )
    }
}

/// Dimensions of `c[m, n] = op(a)[m, k] · op(b)[k, n]` over dense row-major buffers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ta: Trans,
    pub tb: Trans,
}

/// cuBLAS GEMM on raw device pointers, for ops that multiply sub-ranges of tensors (a vocabulary
/// tile of the LM head).
///
/// # Safety
/// `a`, `b`, `c` must point to dense row-major buffers of `m*k`, `k*n`, `m*n` elements of `ab_type`,
/// `ab_type` and `c_type`, live on `dev`'s stream for the duration of the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw(
    dev: &CudaDevice,
    s: GemmShape,
    c: u64,
    c_type: DType,
    a: u64,
    b: u64,
    ab_type: DType,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    if s.m == 0 || s.n == 0 {
        return Ok(());
    }
    let blas = dev.blas()?;
    let op = |t: Trans| {
        if t == Trans::N {
            cublasOperation_t::CUBLAS_OP_N
        } else {
            cublasOperation_t::CUBLAS_OP_T
        }
    };
    let dim = |v: usize| {
        i32::try_from(v).map_err(|_| Error::Unsupported {
            op: OP,
            detail: format!("dimension {v} exceeds i32"),
        })
    };
    // cuBLAS is column-major: the row-major product c = a·b is the column-major c^T = b^T·a^T, so b
    // goes first. A row-major [r, c] buffer is a column-major [c, r] matrix with leading dimension c.
    let ld_b = if s.tb == Trans::N { s.n } else { s.k };
    let ld_a = if s.ta == Trans::N { s.k } else { s.m };
    // SAFETY: the caller guarantees the buffers; alpha and beta are f32 as CUBLAS_COMPUTE_32F requires.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            op(s.tb),
            op(s.ta),
            dim(s.n)?,
            dim(s.m)?,
            dim(s.k)?,
            (&alpha) as *const f32 as *const _,
            b as *const _,
            data_type(ab_type),
            dim(ld_b)?,
            a as *const _,
            data_type(ab_type),
            dim(ld_a)?,
            (&beta) as *const f32 as *const _,
            c as *mut _,
            data_type(c_type),
            dim(s.n)?,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )?;
    }
    Ok(())
}
