//! Elementwise plumbing, the twin of `kernels/elementwise.cu`: residual adds, dtype casts, bias add
//! and its gradient.

use cudarc::driver::PushKernelArg;
use half::bf16;

use crate::device::profile;
use crate::device::tensor::{host_f32, CudaElem};
use crate::device::{same_device, DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::{grid_stride, per_element, to_i32};

const OP_ADD: &str = "add";
const OP_CAST: &str = "cast";
const OP_BIAS: &str = "bias_add";
const OP_BIAS_GRAD: &str = "bias_grad";

/// `a + b`, same shape and dtype.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let device = same_device(OP_ADD, &[a, b])?;
    let _profile = profile::scope(device, OP_ADD);
    b.expect_shape(OP_ADD, "b", a.shape())?;
    b.expect_dtype(OP_ADD, a.dtype())?;
    match device {
        Device::Cpu => {
            let (x, y) = (host_f32(a, OP_ADD)?, host_f32(b, OP_ADD)?);
            let s: Vec<f32> = x.iter().zip(y.iter()).map(|(p, q)| p + q).collect();
            Tensor::from_f32_as(a.shape(), &s, a.dtype(), device)
        }
        Device::Cuda(_) => match a.dtype() {
            DType::F32 => add_cuda::<f32>(a, b),
            DType::BF16 => add_cuda::<bf16>(a, b),
            DType::I32 => Err(Error::DType {
                op: OP_ADD,
                dtype: "i32",
            }),
        },
    }
}

fn add_cuda<T: CudaElem>(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dev = a.device().as_cuda(OP_ADD)?;
    let n = a.numel();
    let mut out = Tensor::empty(a.shape(), T::DTYPE, a.device())?;
    if n == 0 {
        return Ok(out);
    }
    let f = dev.function("elementwise", T::pick("add_f32", "add_bf16"))?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(T::slice_mut(&mut out, OP_ADD)?)
        .arg(T::slice(a, OP_ADD)?)
        .arg(T::slice(b, OP_ADD)?)
        .arg(&n);
    // SAFETY: three buffers of n elements; grid-stride loop bounded by n.
    unsafe { l.launch(grid_stride(n)) }?;
    Ok(out)
}

/// The tensor stored as `dtype` (f32 ↔ bf16, round to nearest even); a copy when already `dtype`.
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        return x.duplicate();
    }
    if dtype == DType::I32 || x.dtype() == DType::I32 {
        return Err(Error::DType {
            op: OP_CAST,
            dtype: "i32",
        });
    }
    let _profile = profile::scope(x.device(), OP_CAST);
    if let Device::Cpu = x.device() {
        return Tensor::from_f32_as(x.shape(), &x.to_f32_vec()?, dtype, x.device());
    }
    let dev = x.device().as_cuda(OP_CAST)?;
    let n = x.numel();
    let mut out = Tensor::empty(x.shape(), dtype, x.device())?;
    if n == 0 {
        return Ok(out);
    }
    match (x.dtype(), dtype) {
        (DType::F32, DType::BF16) => {
            let f = dev.function("elementwise", "cast_f32_to_bf16")?;
            let mut l = dev.stream().launch_builder(&f);
            l.arg(<bf16 as CudaElem>::slice_mut(&mut out, OP_CAST)?)
                .arg(x.cuda_f32(OP_CAST)?)
                .arg(&n);
            // SAFETY: both buffers hold n elements; grid-stride loop bounded by n.
            unsafe { l.launch(grid_stride(n)) }?;
        }
        (DType::BF16, DType::F32) => {
            let f = dev.function("elementwise", "cast_bf16_to_f32")?;
            let mut l = dev.stream().launch_builder(&f);
            l.arg(out.cuda_f32_mut(OP_CAST)?)
                .arg(<bf16 as CudaElem>::slice(x, OP_CAST)?)
                .arg(&n);
            // SAFETY: both buffers hold n elements; grid-stride loop bounded by n.
            unsafe { l.launch(grid_stride(n)) }?;
        }
        (_, other) => {
            return Err(Error::DType {
                op: OP_CAST,
                dtype: other.name(),
            })
        }
    }
    Ok(out)
}

/// `x[n, c] + bias[c]` as a new tensor.
pub fn bias_add(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let device = same_device(OP_BIAS, &[x, bias])?;
    let _profile = profile::scope(device, OP_BIAS);
    let (rows, cols) = x.dims2(OP_BIAS)?;
    bias.expect_shape(OP_BIAS, "bias", &[cols])?;
    bias.expect_dtype(OP_BIAS, x.dtype())?;
    match device {
        Device::Cpu => {
            let (xs, bs) = (host_f32(x, OP_BIAS)?, host_f32(bias, OP_BIAS)?);
            let y: Vec<f32> = xs
                .iter()
                .enumerate()
                .map(|(i, v)| v + bs[i % cols])
                .collect();
            Tensor::from_f32_as(x.shape(), &y, x.dtype(), device)
        }
        Device::Cuda(_) => {
            let y = x.duplicate()?;
            match x.dtype() {
                DType::F32 => bias_add_cuda::<f32>(y, bias, rows, cols),
                DType::BF16 => bias_add_cuda::<bf16>(y, bias, rows, cols),
                DType::I32 => Err(Error::DType {
                    op: OP_BIAS,
                    dtype: "i32",
                }),
            }
        }
    }
}

fn bias_add_cuda<T: CudaElem>(
    mut y: Tensor,
    bias: &Tensor,
    rows: usize,
    cols: usize,
) -> Result<Tensor> {
    let dev = bias.device().as_cuda(OP_BIAS)?;
    if rows * cols == 0 {
        return Ok(y);
    }
    let c = to_i32(OP_BIAS, "cols", cols)?;
    let f = dev.function("elementwise", T::pick("bias_add_f32", "bias_add_bf16"))?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(T::slice_mut(&mut y, OP_BIAS)?)
        .arg(T::slice(bias, OP_BIAS)?)
        .arg(&rows)
        .arg(&c);
    // SAFETY: y holds rows*cols elements, bias cols; grid-stride loop bounded by rows*cols.
    unsafe { l.launch(grid_stride(rows * cols)) }?;
    Ok(y)
}

/// `dbias[c] += Σ_n dy[n, c]`; dbias is [cols] f32.
pub fn bias_grad(dbias: &mut Tensor, dy: &Tensor) -> Result<()> {
    let device = same_device(OP_BIAS_GRAD, &[dbias, dy])?.clone();
    let _profile = profile::scope(&device, OP_BIAS_GRAD);
    let (rows, cols) = dy.dims2(OP_BIAS_GRAD)?;
    dbias.expect_shape(OP_BIAS_GRAD, "dbias", &[cols])?;
    dbias.expect_dtype(OP_BIAS_GRAD, DType::F32)?;
    match &device {
        Device::Cpu => {
            let g = host_f32(dy, OP_BIAS_GRAD)?.into_owned();
            let db = dbias.cpu_f32_mut(OP_BIAS_GRAD)?;
            for row in g.chunks_exact(cols) {
                for (d, v) in db.iter_mut().zip(row) {
                    *d += v;
                }
            }
            Ok(())
        }
        Device::Cuda(dev) => {
            if cols == 0 {
                return Ok(());
            }
            let (r, c) = (
                to_i32(OP_BIAS_GRAD, "rows", rows)?,
                to_i32(OP_BIAS_GRAD, "cols", cols)?,
            );
            let name = match dy.dtype() {
                DType::F32 => "bias_grad_f32",
                DType::BF16 => "bias_grad_bf16",
                DType::I32 => {
                    return Err(Error::DType {
                        op: OP_BIAS_GRAD,
                        dtype: "i32",
                    })
                }
            };
            let f = dev.function("elementwise", name)?;
            let mut l = dev.stream().launch_builder(&f);
            l.arg(dbias.cuda_f32_mut(OP_BIAS_GRAD)?);
            match dy.dtype() {
                DType::F32 => l.arg(dy.cuda_f32(OP_BIAS_GRAD)?),
                _ => l.arg(<bf16 as CudaElem>::slice(dy, OP_BIAS_GRAD)?),
            };
            l.arg(&r).arg(&c);
            // SAFETY: dbias holds cols floats, dy rows*cols; one thread per column.
            unsafe { l.launch(per_element(OP_BIAS_GRAD, cols)?) }?;
            Ok(())
        }
    }
}
