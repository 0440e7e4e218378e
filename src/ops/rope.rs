//! Rotary position embedding (Hugging Face rotate-half layout), the twin of `kernels/rope.cu`.
//!
//! `x` is `[N, heads·head_dim]`; each head vector is rotated by the angle `position·inv_freq[i]`
//! pairing element `i` with `i + head_dim/2`. The backward is the inverse rotation. A layer's
//! queries and keys go through one launch together, which also splits the QKV projection's output
//! into queries, keys and values (`rope_qkv_fwd`) and joins their gradients back (`rope_qkv_bwd`).

use cudarc::driver::PushKernelArg;
use half::bf16;
use num_traits::Float;

use crate::device::profile;
use crate::device::tensor::{host_f32, CudaElem};
use crate::device::{same_device, DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::{grid_stride, join_columns, split_columns, to_i32};

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

/// The row of queries, keys and values split from the QKV projection's output, or to be joined back.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// One tensor in and one out (`rope_fwd`, `rope_bwd`).
    Single,
    /// In: q, k and v side by side in one tensor's rows; out: three tensors (`rope_qkv_fwd`).
    Split,
    /// In: three tensors; out: one, q, k and v side by side (`rope_qkv_bwd`).
    Join,
}

/// Rotates queries (`heads` heads) and keys (`kv_heads`) forward, or by the inverse rotation for
/// `backward`, carrying values over, in the layout `layout` says. `inputs` holds one tensor (Single,
/// Split) or three (Join); so does the result (Single, Join: one; Split: three).
fn apply(
    inputs: &[&Tensor],
    layout: Layout,
    positions: &Tensor,
    inv_freq: &Tensor,
    heads: usize,
    kv_heads: usize,
    backward: bool,
) -> Result<Vec<Tensor>> {
    let mut all = inputs.to_vec();
    all.extend([positions, inv_freq]);
    let device = same_device(OP, &all)?;
    let _profile = profile::scope(device, if backward { "rope_bwd" } else { "rope_fwd" });
    let n = positions.numel();
    positions.expect_shape(OP, "positions", &[n])?;
    positions.expect_dtype(OP, DType::I32)?;
    inv_freq.expect_dtype(OP, DType::F32)?;
    let head_dim = 2 * inv_freq.numel();
    // Heads of q, k and v; the single layout has only the first.
    let kv = if layout == Layout::Single {
        0
    } else {
        kv_heads
    };
    let widths = [heads * head_dim, kv * head_dim, kv * head_dim];
    match layout {
        Layout::Single => check_input(inputs[0], "x", n, heads, head_dim)?,
        Layout::Split => check_input(inputs[0], "qkv", n, heads + 2 * kv_heads, head_dim)?,
        Layout::Join => {
            for (t, (name, h)) in
                inputs
                    .iter()
                    .zip([("dq", heads), ("dk", kv_heads), ("dv", kv_heads)])
            {
                check_input(t, name, n, h, head_dim)?;
            }
        }
    }
    if (layout != Layout::Single && kv_heads == 0) || heads == 0 {
        return Err(Error::shape(
            OP,
            "queries and keys need at least one head each",
        ));
    }
    let dtype = inputs[0].dtype();
    for t in inputs {
        t.expect_dtype(OP, dtype)?;
    }
    match device {
        Device::Cpu => {
            let dir = if backward { -1.0 } else { 1.0 };
            let (pos, freq) = (positions.cpu_i32(OP)?, inv_freq.cpu_f32(OP)?);
            let host = inputs
                .iter()
                .map(|t| host_f32(t, OP))
                .collect::<Result<Vec<_>>>()?;
            let mut parts = match layout {
                Layout::Split => split_columns(&host[0], &widths),
                _ => host.into_iter().map(|h| h.into_owned()).collect(),
            };
            for (p, h) in parts.iter_mut().zip([heads, kv]).take(2) {
                let mut y = vec![0.0f32; p.len()];
                rope_ref(&mut y, p, pos, freq, h, head_dim, dir);
                *p = y;
            }
            let tensor =
                |data: &[f32], width: usize| Tensor::from_f32_as(&[n, width], data, dtype, device);
            match layout {
                Layout::Single => Ok(vec![tensor(&parts[0], widths[0])?]),
                Layout::Split => parts
                    .iter()
                    .zip(widths)
                    .map(|(p, w)| tensor(p, w))
                    .collect(),
                Layout::Join => {
                    let refs: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
                    Ok(vec![tensor(
                        &join_columns(&refs, &widths),
                        widths.iter().sum(),
                    )?])
                }
            }
        }
        Device::Cuda(_) => match dtype {
            DType::F32 => cuda::<f32>(inputs, layout, positions, inv_freq, heads, kv, backward),
            DType::BF16 => cuda::<bf16>(inputs, layout, positions, inv_freq, heads, kv, backward),
            DType::I32 => Err(Error::DType {
                op: OP,
                dtype: "i32",
            }),
        },
    }
}

fn one(mut out: Vec<Tensor>) -> Tensor {
    out.pop().expect("one output")
}

/// Rotates `x` ([N, heads·head_dim]) by `positions` ([N] i32) and `inv_freq` ([head_dim/2] f32).
pub fn rope_fwd(x: &Tensor, positions: &Tensor, inv_freq: &Tensor, heads: usize) -> Result<Tensor> {
    apply(&[x], Layout::Single, positions, inv_freq, heads, 0, false).map(one)
}

/// The gradient with respect to the input of `rope_fwd`.
pub fn rope_bwd(
    dy: &Tensor,
    positions: &Tensor,
    inv_freq: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    apply(&[dy], Layout::Single, positions, inv_freq, heads, 0, true).map(one)
}

/// The QKV projection's output `qkv` (`[N, (heads + 2·kv_heads)·head_dim]`: queries, keys, values
/// side by side in each row) split into rotated queries `[N, heads·head_dim]`, rotated keys and the
/// values (`[N, kv_heads·head_dim]` each), in one launch that computes each sine and cosine once.
pub fn rope_qkv_fwd(
    qkv: &Tensor,
    positions: &Tensor,
    inv_freq: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let mut out = apply(
        &[qkv],
        Layout::Split,
        positions,
        inv_freq,
        heads,
        kv_heads,
        false,
    )?;
    let v = out.pop().expect("values");
    let k = out.pop().expect("keys");
    Ok((one(out), k, v))
}

/// The gradient of `rope_qkv_fwd`'s input, in its layout, from those of its three outputs.
pub fn rope_qkv_bwd(
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    positions: &Tensor,
    inv_freq: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    apply(
        &[dq, dk, dv],
        Layout::Join,
        positions,
        inv_freq,
        heads,
        kv_heads,
        true,
    )
    .map(one)
}

fn cuda<T: CudaElem>(
    inputs: &[&Tensor],
    layout: Layout,
    positions: &Tensor,
    inv_freq: &Tensor,
    heads: usize,
    kv_heads: usize,
    backward: bool,
) -> Result<Vec<Tensor>> {
    let device = inputs[0].device();
    let dev = device.as_cuda(OP)?;
    let n = positions.numel();
    let head_dim = 2 * inv_freq.numel();
    let widths = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim];
    let mut outputs = match layout {
        Layout::Split => widths
            .iter()
            .map(|&w| Tensor::empty(&[n, w], T::DTYPE, device))
            .collect::<Result<Vec<_>>>()?,
        Layout::Single | Layout::Join => {
            vec![Tensor::empty(&[n, widths.iter().sum()], T::DTYPE, device)?]
        }
    };
    if n == 0 {
        return Ok(outputs);
    }
    let name = if backward {
        T::pick("rope_bwd_f32", "rope_bwd_bf16")
    } else {
        T::pick("rope_fwd_f32", "rope_fwd_bf16")
    };
    let f = dev.function("rope", name)?;
    let (hq, hk, d) = (
        to_i32(OP, "heads", heads)?,
        to_i32(OP, "kv_heads", kv_heads)?,
        to_i32(OP, "head_dim", head_dim)?,
    );
    let (packed_x, packed_y) = (
        (layout == Layout::Split) as i32,
        (layout == Layout::Join) as i32,
    );
    // Pointers a packed side or a missing head group leaves unused are null.
    let null = 0u64;
    let mut b = dev.stream().launch_builder(&f);
    let mut outs = outputs.iter_mut();
    for _ in 0..3 {
        match outs.next() {
            Some(t) => b.arg(T::slice_mut(t, OP)?),
            None => b.arg(&null),
        };
    }
    for i in 0..3 {
        match inputs.get(i) {
            Some(t) => b.arg(T::slice(t, OP)?),
            None => b.arg(&null),
        };
    }
    b.arg(positions.cuda_i32(OP)?)
        .arg(inv_freq.cuda_f32(OP)?)
        .arg(&n)
        .arg(&hq)
        .arg(&hk)
        .arg(&hk)
        .arg(&d)
        .arg(&packed_x)
        .arg(&packed_y);
    // A thread per row and run of frequencies: 16 bytes of each half of a head where the runs fit
    // (the kernel's own rule; the grid-stride loop covers any other count too).
    let vector = 16 / T::DTYPE.size();
    let run = if (head_dim / 2).is_multiple_of(vector) {
        vector
    } else {
        1
    };
    let cfg = grid_stride(n * head_dim / 2 / run);
    // SAFETY: each tensor holds n rows of its heads·head_dim (a packed one n rows of all three
    // groups'), positions n, inv_freq head_dim/2; heads_k = heads_v = 0 without keys and values, and
    // then no pointer but q's is read; the kernel walks its items grid-stride.
    unsafe { b.launch(cfg) }?;
    Ok(outputs)
}
