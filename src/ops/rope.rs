//! Rotary position embedding (Hugging Face rotate-half layout), the twin of `kernels/rope.cu`.
//!
//! `x` is `[N, heads·head_dim]`; each head vector is rotated by the angle `position·inv_freq[i]`
//! pairing element `i` with `i + head_dim/2`. The backward is the inverse rotation.

use cudarc::driver::PushKernelArg;
use half::bf16;
use num_traits::Float;

use crate::device::profile;
use crate::device::tensor::{host_f32, CudaElem};
use crate::device::{same_device, DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::{per_row, to_i32};

const OP: &str = "rope";

/// CPU reference. `direction` is +1 forward, −1 backward (the inverse rotation).
pub fn rope_ref<F: Float>(
    y: &mut [F],
    x: &[F],
    positions: &[i32],
    inv_freq: &[f32],
    heads: usize,
    head_dim: usize,
    direction: F,
) {
    let half = head_dim / 2;
    for (row, (xr, yr)) in x
        .chunks_exact(heads * head_dim)
        .zip(y.chunks_exact_mut(heads * head_dim))
        .enumerate()
    {
        for i in 0..half {
            // The angle in f32 as transformers computes it; only then widened.
            let angle = F::from(positions[row] as f32 * inv_freq[i]).unwrap();
            let (s, c) = (angle.sin() * direction, angle.cos());
            for h in 0..heads {
                let (a, b) = (xr[h * head_dim + i], xr[h * head_dim + i + half]);
                yr[h * head_dim + i] = a * c - b * s;
                yr[h * head_dim + i + half] = b * c + a * s;
            }
        }
    }
}

fn apply(
    x: &Tensor,
    positions: &Tensor,
    inv_freq: &Tensor,
    heads: usize,
    backward: bool,
) -> Result<Tensor> {
    let device = same_device(OP, &[x, positions, inv_freq])?;
    let _profile = profile::scope(device, if backward { "rope_bwd" } else { "rope_fwd" });
    let (n, width) = x.dims2(OP)?;
    let half = inv_freq.numel();
    let head_dim = 2 * half;
    if heads == 0 || width != heads * head_dim {
        return Err(Error::shape(
            OP,
            format!("x is [{n}, {width}], expected [{n}, {heads} heads x {head_dim}]"),
        ));
    }
    positions.expect_shape(OP, "positions", &[n])?;
    positions.expect_dtype(OP, DType::I32)?;
    inv_freq.expect_dtype(OP, DType::F32)?;
    match device {
        Device::Cpu => {
            let xs = host_f32(x, OP)?;
            let mut y = vec![0.0f32; n * width];
            let dir = if backward { -1.0 } else { 1.0 };
            rope_ref(
                &mut y,
                &xs,
                positions.cpu_i32(OP)?,
                inv_freq.cpu_f32(OP)?,
                heads,
                head_dim,
                dir,
            );
            Tensor::from_f32_as(x.shape(), &y, x.dtype(), device)
        }
        Device::Cuda(_) => match x.dtype() {
            DType::F32 => cuda::<f32>(x, positions, inv_freq, n, heads, head_dim, backward),
            DType::BF16 => cuda::<bf16>(x, positions, inv_freq, n, heads, head_dim, backward),
            DType::I32 => Err(Error::DType {
                op: OP,
                dtype: "i32",
            }),
        },
    }
}

/// Rotates `x` ([N, heads·head_dim]) by `positions` ([N] i32) and `inv_freq` ([head_dim/2] f32).
pub fn rope_fwd(x: &Tensor, positions: &Tensor, inv_freq: &Tensor, heads: usize) -> Result<Tensor> {
    apply(x, positions, inv_freq, heads, false)
}

/// The gradient with respect to the input of `rope_fwd`.
pub fn rope_bwd(
    dy: &Tensor,
    positions: &Tensor,
    inv_freq: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    apply(dy, positions, inv_freq, heads, true)
}

fn cuda<T: CudaElem>(
    x: &Tensor,
    positions: &Tensor,
    inv_freq: &Tensor,
    n: usize,
    heads: usize,
    head_dim: usize,
    backward: bool,
) -> Result<Tensor> {
    let dev = x.device().as_cuda(OP)?;
    let mut y = Tensor::empty(x.shape(), T::DTYPE, x.device())?;
    if n == 0 {
        return Ok(y);
    }
    let name = if backward {
        T::pick("rope_bwd_f32", "rope_bwd_bf16")
    } else {
        T::pick("rope_fwd_f32", "rope_fwd_bf16")
    };
    let f = dev.function("rope", name)?;
    let (h, d) = (
        to_i32(OP, "heads", heads)?,
        to_i32(OP, "head_dim", head_dim)?,
    );
    let mut b = dev.stream().launch_builder(&f);
    b.arg(T::slice_mut(&mut y, OP)?)
        .arg(T::slice(x, OP)?)
        .arg(positions.cuda_i32(OP)?)
        .arg(inv_freq.cuda_f32(OP)?)
        .arg(&h)
        .arg(&d);
    // SAFETY: x and y hold n*heads*head_dim elements, positions n, inv_freq head_dim/2; one block per row.
    unsafe { b.launch(per_row(OP, n, 128, 0)?) }?;
    Ok(y)
}
