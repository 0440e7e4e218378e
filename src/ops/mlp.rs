//! SwiGLU, the twin of `kernels/mlp.cu`: `h = silu(gate) · up` and its backward, optionally with
//! `h` again from the same pass. Gate and up arrive side by side in the rows of one tensor, the
//! output of one GEMM against the two projections' stacked weights; the projections are plain
//! GEMMs (`ops::matmul`).

use cudarc::driver::PushKernelArg;
use half::bf16;
use num_traits::Float;

use crate::device::profile;
use crate::device::tensor::{host_f32, CudaElem};
use crate::device::{same_device, DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::{grid_stride, join_columns, split_columns};

const OP_FWD: &str = "swiglu_fwd";
const OP_BWD: &str = "swiglu_bwd";

fn sigmoid<F: Float>(x: F) -> F {
    F::one() / (F::one() + (-x).exp())
}

/// CPU reference forward: h = g·σ(g)·u.
pub fn swiglu_fwd_ref<F: Float>(h: &mut [F], gate: &[F], up: &[F]) {
    for ((h, &g), &u) in h.iter_mut().zip(gate).zip(up) {
        *h = g * sigmoid(g) * u;
    }
}

/// CPU reference backward: dgate, dup (overwritten).
pub fn swiglu_bwd_ref<F: Float>(dgate: &mut [F], dup: &mut [F], dh: &[F], gate: &[F], up: &[F]) {
    for i in 0..dh.len() {
        let (g, u, d) = (gate[i], up[i], dh[i]);
        let s = sigmoid(g);
        dup[i] = d * g * s;
        dgate[i] = d * u * s * (F::one() + g * (F::one() - s));
    }
}

/// The rows of `gate_up` `[N, 2I]` split into gate and up, each `[N, I]`.
fn gate_and_up(gate_up: &[f32], inter: usize) -> [Vec<f32>; 2] {
    split_columns(gate_up, &[inter, inter])
        .try_into()
        .expect("two column blocks")
}

/// `gate_up` must be `[N, 2I]` with I at least 1, and `dh` (when given) `[N, I]` of its dtype.
/// Returns (N, I).
fn check(op: &'static str, gate_up: &Tensor, dh: Option<&Tensor>) -> Result<(usize, usize)> {
    let (rows, width) = gate_up.dims2(op)?;
    if width == 0 || width % 2 != 0 {
        return Err(Error::shape(
            op,
            format!("gate_up is [{rows}, {width}]: gate and up side by side need an even, non-zero width"),
        ));
    }
    let inter = width / 2;
    if let Some(dh) = dh {
        dh.expect_shape(op, "dh", &[rows, inter])?;
        dh.expect_dtype(op, gate_up.dtype())?;
    }
    Ok((rows, inter))
}

/// `h = silu(gate) · up` from `gate_up` `[N, 2I]` (gate in the first I columns of each row, up in
/// the last I, as one GEMM against the stacked gate and up weights writes them); `h` is `[N, I]`.
pub fn swiglu_fwd(gate_up: &Tensor) -> Result<Tensor> {
    let device = gate_up.device();
    let _profile = profile::scope(device, OP_FWD);
    let (rows, inter) = check(OP_FWD, gate_up, None)?;
    match device {
        Device::Cpu => {
            let [g, u] = gate_and_up(&host_f32(gate_up, OP_FWD)?, inter);
            let mut h = vec![0.0f32; rows * inter];
            swiglu_fwd_ref(&mut h, &g, &u);
            Tensor::from_f32_as(&[rows, inter], &h, gate_up.dtype(), device)
        }
        Device::Cuda(_) => match gate_up.dtype() {
            DType::F32 => fwd_cuda::<f32>(gate_up, rows, inter),
            DType::BF16 => fwd_cuda::<bf16>(gate_up, rows, inter),
            DType::I32 => Err(Error::DType {
                op: OP_FWD,
                dtype: "i32",
            }),
        },
    }
}

/// The gradient `dgate_up` `[N, 2I]` (gate_up's layout) from `dh` `[N, I]`.
pub fn swiglu_bwd(dh: &Tensor, gate_up: &Tensor) -> Result<Tensor> {
    Ok(bwd(dh, gate_up, false)?.0)
}

/// `swiglu_bwd` and the forward's `h` again, from one pass over gate_up: for a backward that did
/// not keep `h` but needs it (the down projection's weight gradient). Returns (dgate_up, h).
pub fn swiglu_bwd_and_h(dh: &Tensor, gate_up: &Tensor) -> Result<(Tensor, Tensor)> {
    let (dgu, h) = bwd(dh, gate_up, true)?;
    Ok((dgu, h.expect("h was asked for")))
}

fn bwd(dh: &Tensor, gate_up: &Tensor, with_h: bool) -> Result<(Tensor, Option<Tensor>)> {
    let device = same_device(OP_BWD, &[dh, gate_up])?;
    let _profile = profile::scope(device, OP_BWD);
    let (rows, inter) = check(OP_BWD, gate_up, Some(dh))?;
    match device {
        Device::Cpu => {
            let n = rows * inter;
            let [g, u] = gate_and_up(&host_f32(gate_up, OP_BWD)?, inter);
            let (mut dg, mut du) = (vec![0.0f32; n], vec![0.0f32; n]);
            swiglu_bwd_ref(&mut dg, &mut du, &host_f32(dh, OP_BWD)?, &g, &u);
            let h = with_h
                .then(|| {
                    let mut h = vec![0.0f32; n];
                    swiglu_fwd_ref(&mut h, &g, &u);
                    Tensor::from_f32_as(&[rows, inter], &h, gate_up.dtype(), device)
                })
                .transpose()?;
            let dgu = join_columns(&[&dg, &du], &[inter, inter]);
            Ok((
                Tensor::from_f32_as(gate_up.shape(), &dgu, gate_up.dtype(), device)?,
                h,
            ))
        }
        Device::Cuda(_) => match gate_up.dtype() {
            DType::F32 => bwd_cuda::<f32>(dh, gate_up, rows, inter, with_h),
            DType::BF16 => bwd_cuda::<bf16>(dh, gate_up, rows, inter, with_h),
            DType::I32 => Err(Error::DType {
                op: OP_BWD,
                dtype: "i32",
            }),
        },
    }
}

fn fwd_cuda<T: CudaElem>(gate_up: &Tensor, rows: usize, inter: usize) -> Result<Tensor> {
    let dev = gate_up.device().as_cuda(OP_FWD)?;
    let n = rows * inter;
    let mut h = Tensor::empty(&[rows, inter], T::DTYPE, gate_up.device())?;
    if n == 0 {
        return Ok(h);
    }
    let f = dev.function("mlp", T::pick("swiglu_fwd_f32", "swiglu_fwd_bf16"))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(T::slice_mut(&mut h, OP_FWD)?)
        .arg(T::slice(gate_up, OP_FWD)?)
        .arg(&n)
        .arg(&inter);
    // SAFETY: h holds n = rows·inter elements and gate_up 2n; grid-stride loop bounded by n.
    unsafe { b.launch(grid_stride(n)) }?;
    Ok(h)
}

fn bwd_cuda<T: CudaElem>(
    dh: &Tensor,
    gate_up: &Tensor,
    rows: usize,
    inter: usize,
    with_h: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let dev = gate_up.device().as_cuda(OP_BWD)?;
    let n = rows * inter;
    let mut dgu = Tensor::empty(gate_up.shape(), T::DTYPE, gate_up.device())?;
    let mut h = with_h
        .then(|| Tensor::empty(&[rows, inter], T::DTYPE, gate_up.device()))
        .transpose()?;
    if n == 0 {
        return Ok((dgu, h));
    }
    let f = dev.function("mlp", T::pick("swiglu_bwd_f32", "swiglu_bwd_bf16"))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(T::slice_mut(&mut dgu, OP_BWD)?);
    // A null h: the kernel writes only the gradients.
    let null = 0u64;
    match h.as_mut() {
        Some(h) => b.arg(T::slice_mut(h, OP_BWD)?),
        None => b.arg(&null),
    };
    b.arg(T::slice(dh, OP_BWD)?)
        .arg(T::slice(gate_up, OP_BWD)?)
        .arg(&n)
        .arg(&inter);
    // SAFETY: dh and h (when given) hold n = rows·inter elements, gate_up and dgate_up 2n;
    // grid-stride loop bounded by n.
    unsafe { b.launch(grid_stride(n)) }?;
    Ok((dgu, h))
}
