//! Rotary position embedding (Hugging Face rotate-half layout), the twin of `kernels/rope.cu`.
//!
//! `x` is `[N, heads·head_dim]`; each head vector is rotated by the angle `position·inv_freq[i]`
//! pairing element `i` with `i + head_dim/2`. The backward is the inverse rotation. A layer's
//! queries and keys go through one launch together (`rope_qk_fwd`, `rope_qk_bwd`).

use cudarc::driver::PushKernelArg;
use half::bf16;
use num_traits::Float;

use crate::device::profile;
use crate::device::tensor::{host_f32, CudaElem};
use crate::device::{same_device, DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::{grid_stride, to_i32};

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

/// Checks one input `[N, heads·head_dim]` (at least one head) against the positions' N.
fn check_input(x: &Tensor, name: &str, n: usize, heads: usize, head_dim: usize) -> Result<()> {
    let (rows, width) = x.dims2(OP)?;
    if heads == 0 || rows != n || width != heads * head_dim {
        return Err(Error::shape(
            OP,
            format!("{name} is [{rows}, {width}], expected [{n}, {heads} heads x {head_dim}]"),
        ));
    }
    Ok(())
}

/// Rotates `q` (`heads` heads) and, when given, `k` (`kv_heads`) in one pass: forward, or the
/// inverse rotation for `backward`.
fn apply(
    q: &Tensor,
    k: Option<&Tensor>,
    positions: &Tensor,
    inv_freq: &Tensor,
    heads: usize,
    kv_heads: usize,
    backward: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let mut inputs = vec![q, positions, inv_freq];
    inputs.extend(k);
    let device = same_device(OP, &inputs)?;
    let _profile = profile::scope(device, if backward { "rope_bwd" } else { "rope_fwd" });
    let n = positions.numel();
    positions.expect_shape(OP, "positions", &[n])?;
    positions.expect_dtype(OP, DType::I32)?;
    inv_freq.expect_dtype(OP, DType::F32)?;
    let head_dim = 2 * inv_freq.numel();
    check_input(q, if k.is_some() { "q" } else { "x" }, n, heads, head_dim)?;
    if let Some(k) = k {
        check_input(k, "k", n, kv_heads, head_dim)?;
        k.expect_dtype(OP, q.dtype())?;
    }
    match device {
        Device::Cpu => {
            let dir = if backward { -1.0 } else { 1.0 };
            let (pos, freq) = (positions.cpu_i32(OP)?, inv_freq.cpu_f32(OP)?);
            let rotate = |x: &Tensor, heads: usize| -> Result<Tensor> {
                let xs = host_f32(x, OP)?;
                let mut y = vec![0.0f32; xs.len()];
                rope_ref(&mut y, &xs, pos, freq, heads, head_dim, dir);
                Tensor::from_f32_as(x.shape(), &y, x.dtype(), device)
            };
            Ok((
                rotate(q, heads)?,
                k.map(|k| rotate(k, kv_heads)).transpose()?,
            ))
        }
        Device::Cuda(_) => match q.dtype() {
            DType::F32 => cuda::<f32>(q, k, positions, inv_freq, heads, kv_heads, backward),
            DType::BF16 => cuda::<bf16>(q, k, positions, inv_freq, heads, kv_heads, backward),
            DType::I32 => Err(Error::DType {
                op: OP,
                dtype: "i32",
            }),
        },
    }
}

/// Rotates `x` ([N, heads·head_dim]) by `positions` ([N] i32) and `inv_freq` ([head_dim/2] f32).
pub fn rope_fwd(x: &Tensor, positions: &Tensor, inv_freq: &Tensor, heads: usize) -> Result<Tensor> {
    Ok(apply(x, None, positions, inv_freq, heads, 0, false)?.0)
}

/// The gradient with respect to the input of `rope_fwd`.
pub fn rope_bwd(
    dy: &Tensor,
    positions: &Tensor,
    inv_freq: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    Ok(apply(dy, None, positions, inv_freq, heads, 0, true)?.0)
}

/// `rope_fwd` of a layer's queries (`heads` heads) and keys (`kv_heads`) in one launch, each sine
/// and cosine computed once for both.
pub fn rope_qk_fwd(
    q: &Tensor,
    k: &Tensor,
    positions: &Tensor,
    inv_freq: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<(Tensor, Tensor)> {
    let (q, k) = apply(q, Some(k), positions, inv_freq, heads, kv_heads, false)?;
    Ok((q, k.expect("keys were given")))
}

/// The gradients of `rope_qk_fwd`'s inputs from those of its outputs.
pub fn rope_qk_bwd(
    dq: &Tensor,
    dk: &Tensor,
    positions: &Tensor,
    inv_freq: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<(Tensor, Tensor)> {
    let (dq, dk) = apply(dq, Some(dk), positions, inv_freq, heads, kv_heads, true)?;
    Ok((dq, dk.expect("keys were given")))
}

fn cuda<T: CudaElem>(
    q: &Tensor,
    k: Option<&Tensor>,
    positions: &Tensor,
    inv_freq: &Tensor,
    heads: usize,
    kv_heads: usize,
    backward: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let dev = q.device().as_cuda(OP)?;
    let mut yq = Tensor::empty(q.shape(), T::DTYPE, q.device())?;
    let mut yk = k
        .map(|k| Tensor::empty(k.shape(), T::DTYPE, k.device()))
        .transpose()?;
    let n = positions.numel();
    if n == 0 {
        return Ok((yq, yk));
    }
    let name = if backward {
        T::pick("rope_bwd_f32", "rope_bwd_bf16")
    } else {
        T::pick("rope_fwd_f32", "rope_fwd_bf16")
    };
    let f = dev.function("rope", name)?;
    let head_dim = 2 * inv_freq.numel();
    let kv_heads = if k.is_some() { kv_heads } else { 0 };
    let (hq, hk, d) = (
        to_i32(OP, "heads", heads)?,
        to_i32(OP, "kv_heads", kv_heads)?,
        to_i32(OP, "head_dim", head_dim)?,
    );
    // Without keys the kernel reads and writes no key pointer (kv_heads 0): null ones.
    let null = 0u64;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(T::slice_mut(&mut yq, OP)?);
    match yk.as_mut() {
        Some(yk) => b.arg(T::slice_mut(yk, OP)?),
        None => b.arg(&null),
    };
    b.arg(T::slice(q, OP)?);
    match k {
        Some(k) => b.arg(T::slice(k, OP)?),
        None => b.arg(&null),
    };
    b.arg(positions.cuda_i32(OP)?)
        .arg(inv_freq.cuda_f32(OP)?)
        .arg(&n)
        .arg(&hq)
        .arg(&hk)
        .arg(&d);
    // A thread per row and run of frequencies: 16 bytes of each half of a head where the runs fit
    // (the kernel's own rule; the grid-stride loop covers any other count too).
    let vector = 16 / T::DTYPE.size();
    let run = if (head_dim / 2).is_multiple_of(vector) {
        vector
    } else {
        1
    };
    let cfg = grid_stride(n * head_dim / 2 / run);
    // SAFETY: q and yq hold n·heads·head_dim elements, k and yk n·kv_heads·head_dim (or are null
    // with kv_heads 0), positions n, inv_freq head_dim/2; the kernel walks its items grid-stride.
    unsafe { b.launch(cfg) }?;
    Ok((yq, yk))
}
