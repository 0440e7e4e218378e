//! SwiGLU, the twin of `kernels/mlp.cu`: `h = silu(gate) · up` and its backward, optionally with
//! `h` again from the same pass. The MLP's three projections are plain GEMMs (`ops::matmul`).

use cudarc::driver::PushKernelArg;
use half::bf16;
use num_traits::Float;

use crate::device::profile;
use crate::device::tensor::{host_f32, CudaElem};
use crate::device::{same_device, DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::grid_stride;

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

fn check(op: &'static str, first: &Tensor, others: &[(&str, &Tensor)]) -> Result<()> {
    for (name, t) in others {
        t.expect_shape(op, name, first.shape())?;
        t.expect_dtype(op, first.dtype())?;
    }
    Ok(())
}

pub fn swiglu_fwd(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let device = same_device(OP_FWD, &[gate, up])?;
    let _profile = profile::scope(device, OP_FWD);
    check(OP_FWD, gate, &[("up", up)])?;
    match device {
        Device::Cpu => {
            let mut h = vec![0.0f32; gate.numel()];
            swiglu_fwd_ref(&mut h, &host_f32(gate, OP_FWD)?, &host_f32(up, OP_FWD)?);
            Tensor::from_f32_as(gate.shape(), &h, gate.dtype(), device)
        }
        Device::Cuda(_) => match gate.dtype() {
            DType::F32 => fwd_cuda::<f32>(gate, up),
            DType::BF16 => fwd_cuda::<bf16>(gate, up),
            DType::I32 => Err(Error::DType {
                op: OP_FWD,
                dtype: "i32",
            }),
        },
    }
}

/// Returns (dgate, dup).
pub fn swiglu_bwd(dh: &Tensor, gate: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor)> {
    let (dg, du, _) = bwd(dh, gate, up, false)?;
    Ok((dg, du))
}

/// `swiglu_bwd` and the forward's `h` again, from one pass over gate and up: for a backward that
/// did not keep `h` but needs it (the down projection's weight gradient). Returns (dgate, dup, h).
pub fn swiglu_bwd_and_h(
    dh: &Tensor,
    gate: &Tensor,
    up: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (dg, du, h) = bwd(dh, gate, up, true)?;
    Ok((dg, du, h.expect("h was asked for")))
}

fn bwd(
    dh: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    with_h: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let device = same_device(OP_BWD, &[dh, gate, up])?;
    let _profile = profile::scope(device, OP_BWD);
    check(OP_BWD, gate, &[("up", up), ("dh", dh)])?;
    match device {
        Device::Cpu => {
            let n = gate.numel();
            let (g, u) = (host_f32(gate, OP_BWD)?, host_f32(up, OP_BWD)?);
            let (mut dg, mut du) = (vec![0.0f32; n], vec![0.0f32; n]);
            swiglu_bwd_ref(&mut dg, &mut du, &host_f32(dh, OP_BWD)?, &g, &u);
            let h = with_h
                .then(|| {
                    let mut h = vec![0.0f32; n];
                    swiglu_fwd_ref(&mut h, &g, &u);
                    Tensor::from_f32_as(gate.shape(), &h, gate.dtype(), device)
                })
                .transpose()?;
            Ok((
                Tensor::from_f32_as(gate.shape(), &dg, gate.dtype(), device)?,
                Tensor::from_f32_as(gate.shape(), &du, gate.dtype(), device)?,
                h,
            ))
        }
        Device::Cuda(_) => match gate.dtype() {
            DType::F32 => bwd_cuda::<f32>(dh, gate, up, with_h),
            DType::BF16 => bwd_cuda::<bf16>(dh, gate, up, with_h),
            DType::I32 => Err(Error::DType {
                op: OP_BWD,
                dtype: "i32",
            }),
        },
    }
}

fn fwd_cuda<T: CudaElem>(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let dev = gate.device().as_cuda(OP_FWD)?;
    let n = gate.numel();
    let mut h = Tensor::empty(gate.shape(), T::DTYPE, gate.device())?;
    if n == 0 {
        return Ok(h);
    }
    let f = dev.function("mlp", T::pick("swiglu_fwd_f32", "swiglu_fwd_bf16"))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(T::slice_mut(&mut h, OP_FWD)?)
        .arg(T::slice(gate, OP_FWD)?)
        .arg(T::slice(up, OP_FWD)?)
        .arg(&n);
    // SAFETY: the three buffers hold n elements; grid-stride loop bounded by n.
    unsafe { b.launch(grid_stride(n)) }?;
    Ok(h)
}

fn bwd_cuda<T: CudaElem>(
    dh: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    with_h: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let dev = gate.device().as_cuda(OP_BWD)?;
    let n = gate.numel();
    let mut dg = Tensor::empty(gate.shape(), T::DTYPE, gate.device())?;
    let mut du = Tensor::empty(gate.shape(), T::DTYPE, gate.device())?;
    let mut h = with_h
        .then(|| Tensor::empty(gate.shape(), T::DTYPE, gate.device()))
        .transpose()?;
    if n == 0 {
        return Ok((dg, du, h));
    }
    let f = dev.function("mlp", T::pick("swiglu_bwd_f32", "swiglu_bwd_bf16"))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(T::slice_mut(&mut dg, OP_BWD)?)
        .arg(T::slice_mut(&mut du, OP_BWD)?);
    // A null h: the kernel writes only the gradients.
    let null = 0u64;
    match h.as_mut() {
        Some(h) => b.arg(T::slice_mut(h, OP_BWD)?),
        None => b.arg(&null),
    };
    b.arg(T::slice(dh, OP_BWD)?)
        .arg(T::slice(gate, OP_BWD)?)
        .arg(T::slice(up, OP_BWD)?)
        .arg(&n);
    // SAFETY: the buffers (h when given) hold n elements; grid-stride loop bounded by n.
    unsafe { b.launch(grid_stride(n)) }?;
    Ok((dg, du, h))
}
