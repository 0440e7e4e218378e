//! Fused AdamW on f32 master weights with global-norm gradient clipping, the twin of
//! `kernels/adamw.cu`. Decoupled weight decay, bias-corrected moments, as `torch.optim.AdamW`.

use cudarc::driver::{DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::device::profile;
use crate::device::tensor::CudaElem;
use crate::device::{same_device, DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::grid_stride;

const OP: &str = "adamw";
/// Blocks of the sum-of-squares pass; fixed, so the norm is the same on every card and run.
const NORM_BLOCKS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch.optim.AdamW's defaults except the learning rate, a common fine-tuning value.
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The L2 norm over every gradient buffer (f32), in f64 on the host from per-block partial sums.
/// On CUDA every buffer's partial sums go into one buffer read back with one copy: one wait for the
/// GPU a step, not one a parameter tensor (about 200 for SmolLM2-135M), each of which left the GPU
/// idle for a host round trip.
pub fn global_grad_norm(grads: &[&Tensor]) -> Result<f64> {
    let _profile = grads
        .first()
        .map(|g| profile::scope(g.device(), "global_grad_norm"));
    let mut total = 0.0f64;
    // CUDA buffers with their partial-sum counts, summed after one copy.
    let mut on_device: Vec<(&Tensor, usize)> = Vec::new();
    for g in grads {
        g.expect_dtype(OP, DType::F32)?;
        match g.device() {
            Device::Cpu => {
                total += g
                    .cpu_f32(OP)?
                    .iter()
                    .map(|&x| (x as f64) * (x as f64))
                    .sum::<f64>()
            }
            Device::Cuda(_) => {
                let n = g.numel();
                if n > 0 {
                    on_device.push((g, NORM_BLOCKS.min(n.div_ceil(256))));
                }
            }
        }
    }
    if on_device.is_empty() {
        return Ok(total.sqrt());
    }
    let tensors: Vec<&Tensor> = on_device.iter().map(|(g, _)| *g).collect();
    let device = same_device(OP, &tensors)?;
    let dev = device.as_cuda(OP)?;
    let all_blocks = on_device.iter().map(|(_, b)| b).sum::<usize>();
    let mut partial = Tensor::empty(&[all_blocks], DType::F32, device)?;
    let stream = dev.stream().clone();
    {
        let (base, _partial) = partial.cuda_f32_mut(OP)?.device_ptr_mut(&stream);
        let f = dev.function("adamw", "grad_sumsq")?;
        let mut at = 0u64;
        for &(g, blocks) in &on_device {
            let n = g.numel();
            let out = base + 4 * at;
            let mut l = stream.launch_builder(&f);
            l.arg(&out).arg(g.cuda_f32(OP)?).arg(&n);
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: grad holds n floats; `out` is this buffer's `blocks` floats of `partial`
            // (one per block); grid-stride loop bounded by n.
            unsafe { l.launch(cfg) }?;
            at += blocks as u64;
        }
    }
    let partial = partial.to_f32_vec()?;
    let mut at = 0;
    for &(_, blocks) in &on_device {
        total += partial[at..at + blocks]
            .iter()
            .map(|&x| x as f64)
            .sum::<f64>();
        at += blocks;
    }
    Ok(total.sqrt())
}

/// The factor that scales gradients to a global norm of at most `max_norm` (1 when under it).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// CPU reference of one step (1-based `step`), updating `w`, `m`, `v` in place.
#[allow(clippy::too_many_arguments)]
pub fn adamw_ref(
    w: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grad: &[f32],
    cfg: &AdamWConfig,
    step: u64,
    clip: f32,
) {
    let (b1, b2) = (cfg.beta1 as f32, cfg.beta2 as f32);
    let bc1 = 1.0 - cfg.beta1.powi(step as i32) as f32;
    let bc2 = 1.0 - cfg.beta2.powi(step as i32) as f32;
    let (lr, eps, wd) = (cfg.lr as f32, cfg.eps as f32, cfg.weight_decay as f32);
    for i in 0..w.len() {
        let g = grad[i] * clip;
        m[i] = b1 * m[i] + (1.0 - b1) * g;
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        w[i] = w[i] * (1.0 - lr * wd) - lr * (m[i] / bc1) / ((v[i] / bc2).sqrt() + eps);
    }
}

/// One AdamW step on master weights `w` (f32) with moments `m`, `v` (f32), the gradient scaled by
/// `clip` first; when `copy` is given (bf16, same shape) it receives the updated weights for the
/// forward pass. `step` counts from 1.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    w: &mut Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    copy: Option<&mut Tensor>,
    grad: &Tensor,
    cfg: &AdamWConfig,
    step: u64,
    clip: f64,
) -> Result<()> {
    let device = same_device(OP, &[w, m, v, grad])?.clone();
    let _profile = profile::scope(&device, OP);
    if step == 0 {
        return Err(Error::Unsupported {
            op: OP,
            detail: "steps count from 1".into(),
        });
    }
    for (name, t) in [("m", &*m), ("v", &*v), ("grad", grad)] {
        t.expect_shape(OP, name, w.shape())?;
        t.expect_dtype(OP, DType::F32)?;
    }
    w.expect_dtype(OP, DType::F32)?;
    if let Some(c) = copy.as_deref() {
        c.expect_shape(OP, "copy", w.shape())?;
    }
    match &device {
        Device::Cpu => {
            let g = grad.cpu_f32(OP)?.to_vec();
            let mut mv = m.cpu_f32(OP)?.to_vec();
            let mut vv = v.cpu_f32(OP)?.to_vec();
            adamw_ref(
                w.cpu_f32_mut(OP)?,
                &mut mv,
                &mut vv,
                &g,
                cfg,
                step,
                clip as f32,
            );
            m.cpu_f32_mut(OP)?.copy_from_slice(&mv);
            v.cpu_f32_mut(OP)?.copy_from_slice(&vv);
            if let Some(c) = copy {
                *c = Tensor::from_f32_as(w.shape(), w.cpu_f32(OP)?, c.dtype(), &device)?;
            }
            Ok(())
        }
        Device::Cuda(dev) => {
            let n = w.numel();
            if n == 0 {
                return Ok(());
            }
            let f = dev.function("adamw", "adamw_step")?;
            let bc1 = (1.0 - cfg.beta1.powi(step as i32)) as f32;
            let bc2 = (1.0 - cfg.beta2.powi(step as i32)) as f32;
            let (lr, b1, b2, eps, wd, clip) = (
                cfg.lr as f32,
                cfg.beta1 as f32,
                cfg.beta2 as f32,
                cfg.eps as f32,
                cfg.weight_decay as f32,
                clip as f32,
            );
            let null_copy = 0u64;
            let mut l = dev.stream().launch_builder(&f);
            l.arg(w.cuda_f32_mut(OP)?)
                .arg(m.cuda_f32_mut(OP)?)
                .arg(v.cuda_f32_mut(OP)?);
            match copy {
                Some(c) => {
                    c.expect_dtype(OP, DType::BF16)?;
                    l.arg(<bf16 as CudaElem>::slice_mut(c, OP)?)
                }
                // A null pointer: the kernel skips the copy.
                None => l.arg(&null_copy),
            };
            l.arg(grad.cuda_f32(OP)?)
                .arg(&n)
                .arg(&lr)
                .arg(&b1)
                .arg(&b2)
                .arg(&eps)
                .arg(&wd)
                .arg(&bc1)
                .arg(&bc2)
                .arg(&clip);
            // SAFETY: w, m, v, grad (and copy when given) hold n elements; grid-stride loop bounded by n.
            unsafe { l.launch(grid_stride(n)) }?;
            Ok(())
        }
    }
}
