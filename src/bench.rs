//! `rlhf bench kernels`: times every kernel family at realistic shapes and reports achieved bandwidth
//! or FLOP rate against the device's own ceilings, measured in the same run (a large device-to-device
//! copy; a large bf16 GEMM through cuBLAS). Criterion benches (benches/) cover the same shapes for
//! statistics; this command is the quick table a user runs on their card.

use std::time::Instant;

use crate::device::{DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::adamw::{adamw_step, clip_coefficient, global_grad_norm, AdamWConfig};
use crate::ops::elementwise::add;
use crate::ops::kl::{kl_full_bwd, kl_full_fwd};
use crate::ops::logprob::{
    linear_logprob_bwd, linear_logprob_fwd, linear_logprob_scratch_bytes, logprob_bwd, logprob_fwd,
};
use crate::ops::matmul::{gemm, Trans};
use crate::ops::mlp::{swiglu_bwd, swiglu_fwd};
use crate::ops::norm::{rms_norm_bwd, rms_norm_fwd};
use crate::ops::ppo::{ppo_advantages, ppo_loss, PpoConfig};
use crate::ops::pref_loss::{pref_loss, DpoLoss, PrefExtras, PrefLoss};
use crate::ops::rope::{rope_qkv_bwd, rope_qkv_fwd};
use crate::rng::Rng;

/// What a row's rate is measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// Bytes that must cross device memory (each input read once, each output written once).
    Memory,
    /// Floating-point operations.
    Compute,
}

#[derive(Debug, Clone)]
pub struct BenchRow {
    pub kernel: String,
    pub shape: String,
    pub median_ms: f64,
    pub bound: Bound,
    /// GB/s for memory-bound rows, TFLOP/s for compute-bound ones.
    pub rate: f64,
    /// Percentage of the matching ceiling measured in the same run.
    pub percent_of_ceiling: f64,
}

#[derive(Debug, Clone)]
pub struct Ceilings {
    pub copy_gbs: f64,
    pub gemm_tflops: f64,
}

/// Problem sizes: `Full` is the realistic shapes (a GPU's work); `Small` fits a CPU run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchSize {
    Small,
    Full,
}

/// Median wall time of `reps` calls after `warmup` calls, synchronising around each call.
pub fn median_ms(
    device: &Device,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    if reps == 0 {
        return Err(Error::Unsupported {
            op: "bench",
            detail: "no repetitions to take the median of (reps must be at least 1)".into(),
        });
    }
    for _ in 0..warmup {
        f()?;
    }
    device.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Per-op device time of one run of a bench's step, taken after its timed runs (see
/// `device::profile`): `ms` is that run's wall time, which the events inflate a little.
#[derive(Debug, Clone)]
pub struct Profile {
    pub rows: Vec<crate::device::profile::ProfileRow>,
    pub ms: f64,
}

impl Profile {
    pub fn table(&self) -> String {
        crate::device::profile::format_table(&self.rows, self.ms)
    }
}

/// Runs `f` once with the op profiler on.
pub fn profile_once(device: &Device, mut f: impl FnMut() -> Result<()>) -> Result<Profile> {
    use crate::device::profile;
    device.synchronize()?;
    profile::enable(true);
    let t = Instant::now();
    let run = f().and_then(|()| device.synchronize());
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let rows = profile::report();
    profile::enable(false);
    run?;
    Ok(Profile { rows: rows?, ms })
}

/// Rejects a command's size flag below `min`: a zero leaves nothing to time (an empty batch, no
/// repetitions to take the median of) and would fail deep inside with no flag named.
fn at_least(command: &'static str, flag: &str, value: usize, min: usize) -> Result<()> {
    if value >= min {
        return Ok(());
    }
    Err(Error::Unsupported {
        op: command,
        detail: format!("{flag} {value}: must be at least {min}"),
    })
}

/// The flags of `rlhf bench attention`, checked before it measures anything: the command derives
/// the batch as `--tokens / T` and the heads as 2,048 / D from them.
pub fn check_attention_flags(
    lens: &[usize],
    tokens: usize,
    head_dims: &[usize],
    decode_lens: &[usize],
    decode_batch: usize,
    reps: usize,
) -> Result<()> {
    const CMD: &str = "bench attention";
    for &t in lens {
        at_least(CMD, "--lens", t, 1)?;
    }
    at_least(CMD, "--tokens", tokens, 1)?;
    for &d in head_dims {
        at_least(CMD, "--head-dims", d, 1)?;
        if d > 2048 {
            return Err(Error::Unsupported {
                op: CMD,
                detail: format!("--head-dims {d}: above 2,048, H = 2,048 / D leaves no head"),
            });
        }
    }
    for &t in decode_lens {
        at_least(CMD, "--decode-lens", t, 1)?;
    }
    if !decode_lens.is_empty() {
        at_least(CMD, "--decode-batch", decode_batch, 1)?;
    }
    at_least(CMD, "--reps", reps, 1)
}

/// Head counts that attention can run: at least one of each, whole groups of query heads per KV
/// head.
fn check_heads(
    command: &'static str,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<()> {
    at_least(command, "--head-dims", head_dim, 1)?;
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(Error::Unsupported {
            op: command,
            detail: format!(
                "{heads} query heads over {kv_heads} KV heads (head dim {head_dim}): need at \
                 least one of each and a whole number of query heads per KV head"
            ),
        });
    }
    Ok(())
}

/// How the trainers end a step: the global gradient norm, clipping to 1 and the AdamW update (a
/// small learning rate: the benches' weights stay random).
fn optimizer_step(
    opt: &mut crate::train::Optimizer,
    model: &mut crate::model::Model,
    grads: &crate::model::Params,
) -> Result<()> {
    let norm = global_grad_norm(&grads.named())?;
    opt.update(model, grads, 1e-6, clip_coefficient(norm, 1.0))
}

fn random(
    device: &Device,
    rng: &mut Rng,
    shape: &[usize],
    std: f32,
    dtype: DType,
) -> Result<Tensor> {
    // Normal draws cost far more than the kernels they feed (a billion of them for 8,192 x 128,256
    // logits): draw 4 Mi and repeat them. The tensors are still far larger than any cache. The
    // repeats are copied on the device: built on the host, a billion-value tensor took the host
    // 10 s and 6 GB, device time a borrowed GPU spends waiting.
    let n: usize = shape.iter().product();
    let block_len = n.min(1 << 22);
    let block = rng.normal_vec(block_len, std);
    if block_len == n {
        return Tensor::from_f32_as(shape, &block, dtype, device);
    }
    let block = Tensor::from_f32_as(&[block_len], &block, dtype, device)?;
    let mut out = Tensor::empty(shape, dtype, device)?;
    for at in (0..n).step_by(block_len) {
        out.copy_elements(at, &block, 0, block_len.min(n - at))?;
    }
    Ok(out)
}

/// The two ceilings, measured now on `device`.
pub fn measure_ceilings(device: &Device, size: BenchSize) -> Result<Ceilings> {
    let mut rng = Rng::new(7);
    // Copy: 1 GiB on a GPU (well past L2), 256 MiB on a CPU; counted as bytes read plus written.
    let elems = if size == BenchSize::Full {
        1usize << 28
    } else {
        1 << 26
    };
    let src = random(device, &mut rng, &[elems], 1.0, DType::F32)?;
    let copy_ms = match device {
        Device::Cpu => {
            let s = src.cpu_f32("bench")?.to_vec();
            let mut d = vec![0.0f32; elems];
            median_ms(device, 1, 5, || {
                d.copy_from_slice(&s);
                std::hint::black_box(&d);
                Ok(())
            })?
        }
        Device::Cuda(dev) => {
            let mut dst = dev.alloc::<f32>(elems)?;
            let s = src.cuda_f32("bench")?;
            median_ms(device, 2, 10, || {
                Ok(dev.stream().memcpy_dtod(s, &mut dst)?)
            })?
        }
    };
    let copy_gbs = 2.0 * (elems * 4) as f64 / (copy_ms * 1e-3) / 1e9;
    // GEMM: bf16 operands, f32 accumulation, 8192³ on a GPU; f32 1024³ on a CPU.
    let (m, dtype) = if device.is_cuda() {
        (
            if size == BenchSize::Full { 8192 } else { 2048 },
            DType::BF16,
        )
    } else {
        (512, DType::F32)
    };
    let a = random(device, &mut rng, &[m, m], 1.0, dtype)?;
    let b = random(device, &mut rng, &[m, m], 1.0, dtype)?;
    let mut c = Tensor::empty(&[m, m], dtype, device)?;
    let gemm_ms = median_ms(device, 2, 10, || {
        gemm(&mut c, &a, Trans::N, &b, Trans::T, 1.0, 0.0)
    })?;
    let gemm_tflops = 2.0 * (m * m * m) as f64 / (gemm_ms * 1e-3) / 1e12;
    Ok(Ceilings {
        copy_gbs,
        gemm_tflops,
    })
}

fn row(
    kernel: &str,
    shape: String,
    ms: f64,
    bound: Bound,
    amount: f64,
    ceil: &Ceilings,
) -> BenchRow {
    let (rate, ceiling) = match bound {
        Bound::Memory => (amount / (ms * 1e-3) / 1e9, ceil.copy_gbs),
        Bound::Compute => (amount / (ms * 1e-3) / 1e12, ceil.gemm_tflops),
    };
    BenchRow {
        kernel: kernel.into(),
        shape,
        median_ms: ms,
        bound,
        rate,
        percent_of_ceiling: 100.0 * rate / ceiling,
    }
}

/// An AdamW step over `params` f32 master weights with a bf16 copy, ready to time (`rlhf bench
/// kernels` and the criterion bench `transformer_ops` share it).
pub struct AdamwBench {
    w: Tensor,
    m: Tensor,
    v: Tensor,
    copy: Tensor,
    grad: Tensor,
    cfg: AdamWConfig,
    steps: u64,
}

impl AdamwBench {
    pub fn new(device: &Device, params: usize, rng: &mut Rng) -> Result<Self> {
        Ok(AdamwBench {
            w: random(device, rng, &[params], 0.02, DType::F32)?,
            grad: random(device, rng, &[params], 0.02, DType::F32)?,
            m: Tensor::zeros(&[params], DType::F32, device)?,
            v: Tensor::zeros(&[params], DType::F32, device)?,
            copy: Tensor::zeros(&[params], DType::BF16, device)?,
            cfg: AdamWConfig::default(),
            steps: 0,
        })
    }

    /// Bytes one step moves: w, m, v and grad read, w, m and v written (f32), the bf16 copy written.
    pub fn bytes(&self) -> usize {
        self.w.numel() * (7 * 4 + 2)
    }

    pub fn step(&mut self) -> Result<()> {
        self.steps += 1;
        adamw_step(
            &mut self.w,
            &mut self.m,
            &mut self.v,
            Some(&mut self.copy),
            &self.grad,
            &self.cfg,
            self.steps,
            1.0,
        )
    }
}

/// Times every family. `Full` uses the realistic shapes: N = 8,192 tokens, V = 49,152 and 128,256,
/// d = 576 and 4,096, DPO 64 pairs × 1,024 tokens, PPO 64 × 512.
pub fn bench_kernels(
    device: &Device,
    size: BenchSize,
    ceil: &Ceilings,
    mut on_row: impl FnMut(&BenchRow),
) -> Result<Vec<BenchRow>> {
    let full = size == BenchSize::Full;
    let mut rng = Rng::new(11);
    let act = device.compute_dtype();
    let (warm, reps) = if full { (2, 10) } else { (1, 3) };
    let mut rows = Vec::new();
    let mut push = |rows: &mut Vec<BenchRow>,
                    kernel: &str,
                    shape: String,
                    ms: f64,
                    bound: Bound,
                    amount: f64| {
        let r = row(kernel, shape, ms, bound, amount, ceil);
        on_row(&r);
        rows.push(r);
    };

    // RMSNorm forward + backward: read x, write y; read dy and x, write dx. At a 4,096-wide model's
    // width and at SmolLM2's (576).
    let shapes: &[(usize, usize)] = if full {
        &[(8192, 4096), (8192, 576)]
    } else {
        &[(256, 576)]
    };
    for &(n, d) in shapes {
        let x = random(device, &mut rng, &[n, d], 1.0, act)?;
        let w = random(device, &mut rng, &[d], 1.0, act)?;
        let dy = random(device, &mut rng, &[n, d], 1.0, act)?;
        let mut dw = Tensor::zeros(&[d], DType::F32, device)?;
        let ms = median_ms(device, warm, reps, || {
            let o = rms_norm_fwd(&x, &w, 1e-5)?;
            rms_norm_bwd(&dy, &x, &w, &o.rstd, &mut dw).map(drop)
        })?;
        push(
            &mut rows,
            "rms_norm fwd+bwd",
            format!("{n}x{d} {}", act.name()),
            ms,
            Bound::Memory,
            (5 * n * d * act.size()) as f64,
        );
    }

    // The transformer's other memory-bound steps at SmolLM2's shape (d 576, I 1,536) for 8,192
    // tokens: SwiGLU forward (read gate and up, write h) and backward (read dh, gate and up, write
    // dgate and dup); RoPE; the residual add (read two, write one).
    let (n, d, inner) = (if full { 8192 } else { 256 }, 576, 1536);
    let gate_up = random(device, &mut rng, &[n, 2 * inner], 1.5, act)?;
    let ms = median_ms(device, warm, reps, || {
        let h = swiglu_fwd(&gate_up)?;
        swiglu_bwd(&h, &gate_up).map(drop)
    })?;
    push(
        &mut rows,
        "swiglu fwd+bwd",
        format!("{n}x{inner} {}", act.name()),
        ms,
        Bound::Memory,
        (8 * n * inner * act.size()) as f64,
    );
    // RoPE on a layer's queries (9 heads of 64) and keys (3), split from the QKV projection's
    // output with the values (3) in one launch, and joined back backward: each reads and writes all
    // three once.
    let (heads, kv_heads, head_dim) = (9, 3, 64);
    let width = (heads + 2 * kv_heads) * head_dim;
    let qkv = random(device, &mut rng, &[n, width], 1.0, act)?;
    let positions = Tensor::from_i32(&[n], (0..n).map(|i| (i % 1024) as i32).collect(), device)?;
    let inv_freq: Vec<f32> = (0..head_dim / 2)
        .map(|i| 100_000f32.powf(-2.0 * i as f32 / head_dim as f32))
        .collect();
    let inv_freq = Tensor::from_f32(&[head_dim / 2], inv_freq, device)?;
    let ms = median_ms(device, warm, reps, || {
        let (q, k, v) = rope_qkv_fwd(&qkv, &positions, &inv_freq, heads, kv_heads)?;
        rope_qkv_bwd(&q, &k, &v, &positions, &inv_freq, heads, kv_heads).map(drop)
    })?;
    push(
        &mut rows,
        "rope qkv fwd+bwd",
        format!(
            "{n}x({heads}+{kv_heads}+{kv_heads})x{head_dim} {}",
            act.name()
        ),
        ms,
        Bound::Memory,
        (4 * n * width * act.size()) as f64,
    );
    let (a, b) = (
        random(device, &mut rng, &[n, d], 1.0, act)?,
        random(device, &mut rng, &[n, d], 1.0, act)?,
    );
    let ms = median_ms(device, warm, reps, || add(&a, &b).map(drop))?;
    push(
        &mut rows,
        "residual add",
        format!("{n}x{d} {}", act.name()),
        ms,
        Bound::Memory,
        (3 * n * d * act.size()) as f64,
    );
    // AdamW over SmolLM2-135M's parameters.
    let params = if full { 134_515_008 } else { 1 << 18 };
    let mut adamw = AdamwBench::new(device, params, &mut rng)?;
    let ms = median_ms(device, warm, reps, || adamw.step())?;
    push(
        &mut rows,
        "adamw step",
        format!("{params} params"),
        ms,
        Bound::Memory,
        adamw.bytes() as f64,
    );

    // logprob forward + backward: one read of the logits forward, one read and one write backward.
    let n = if full { 8192 } else { 64 };
    for vocab in if full {
        vec![49_152, 128_256]
    } else {
        vec![4096]
    } {
        let logits = random(device, &mut rng, &[n, vocab], 2.0, act)?;
        let tgt = Tensor::from_i32(
            &[n],
            (0..n).map(|_| rng.below(vocab) as i32).collect(),
            device,
        )?;
        let g = Tensor::from_f32(&[n], vec![1.0; n], device)?;
        let ms = median_ms(device, warm, reps, || {
            let o = logprob_fwd(&logits, &tgt, 1.0)?;
            logprob_bwd(&logits, &tgt, &o, &g, &g, 1.0).map(drop)
        })?;
        push(
            &mut rows,
            "logprob fwd+bwd",
            format!("{n}x{vocab} {}", act.name()),
            ms,
            Bound::Memory,
            (3 * n * vocab * act.size()) as f64,
        );

        // KL full forward + backward: two rows read forward, two read and one written backward.
        let reference = random(device, &mut rng, &[n, vocab], 2.0, act)?;
        let ms = median_ms(device, warm, reps, || {
            let o = kl_full_fwd(&logits, &reference)?;
            kl_full_bwd(&logits, &reference, &o, &g).map(drop)
        })?;
        push(
            &mut rows,
            "kl_full fwd+bwd",
            format!("{n}x{vocab} {}", act.name()),
            ms,
            Bound::Memory,
            (5 * n * vocab * act.size()) as f64,
        );
    }

    // Sampling one token per row for generation: the logits read once (64 sequences decoding).
    let (n, vocab) = if full { (64, 128_256) } else { (8, 4096) };
    let logits = random(device, &mut rng, &[n, vocab], 3.0, act)?;
    let draws: Vec<f64> = (0..n).map(|_| rng.unit()).collect();
    let ms = median_ms(device, warm, reps, || {
        crate::ops::sample::sample_plain(&logits, 1.0, &draws).map(drop)
    })?;
    push(
        &mut rows,
        "sample plain",
        format!("{n}x{vocab} {}", act.name()),
        ms,
        Bound::Memory,
        (n * vocab * act.size()) as f64,
    );

    // The LM-head-fused logprob: 2·N·V·d FLOPs forward, 6·N·V·d backward (recompute + two GEMMs).
    let shapes: Vec<(usize, usize, usize)> = if full {
        vec![(8192, 576, 49_152), (8192, 4096, 128_256)]
    } else {
        vec![(64, 64, 4096)]
    };
    for (n, d, vocab) in shapes {
        let h = random(device, &mut rng, &[n, d], 1.0, act)?;
        let wt = random(device, &mut rng, &[vocab, d], 1.0 / (d as f32).sqrt(), act)?;
        let tgt = Tensor::from_i32(
            &[n],
            (0..n).map(|_| rng.below(vocab) as i32).collect(),
            device,
        )?;
        let g = Tensor::from_f32(&[n], vec![1.0; n], device)?;
        let mut dwt = Tensor::zeros(&[vocab, d], DType::F32, device)?;
        let ms = median_ms(device, 1, if full { 5 } else { 3 }, || {
            let o = linear_logprob_fwd(&h, &wt, &tgt, 1.0)?;
            linear_logprob_bwd(&h, &wt, &tgt, &o, &g, &g, 1.0, &mut dwt).map(drop)
        })?;
        push(
            &mut rows,
            "linear_logprob fwd+bwd",
            if device.is_cuda() {
                // The CPU path computes in row blocks and allocates neither buffer.
                format!(
                    "n{n} d{d} V{vocab} {}, scratch {:.1}% of f32 logits",
                    act.name(),
                    100.0 * linear_logprob_scratch_bytes(n, vocab, act) as f64
                        / (n * vocab * 4) as f64
                )
            } else {
                format!("n{n} d{d} V{vocab} {}", act.name())
            },
            ms,
            Bound::Compute,
            8.0 * (n * vocab * d) as f64,
        );
    }

    // DPO: policy, reference and mask read, the token gradient written (f32).
    let (pairs, t) = if full { (64, 1024) } else { (8, 256) };
    let r = 2 * pairs;
    let lp = Tensor::from_f32(&[r, t], rng.uniform_vec(r * t, -4.0, 0.0), device)?;
    let rf = Tensor::from_f32(&[r, t], rng.uniform_vec(r * t, -4.0, 0.0), device)?;
    let mask = Tensor::from_f32(&[r, t], vec![1.0; r * t], device)?;
    let kind = PrefLoss::Dpo {
        loss: DpoLoss::Sigmoid,
        beta: 0.1,
        label_smoothing: 0.0,
    };
    let ex = PrefExtras {
        ref_logps: Some(&rf),
        ..Default::default()
    };
    let ms = median_ms(device, warm, reps, || {
        pref_loss(&kind, &lp, &mask, &ex).map(drop)
    })?;
    push(
        &mut rows,
        "pref_loss dpo sigmoid",
        format!("{pairs} pairs x {t}"),
        ms,
        Bound::Memory,
        (4 * r * t * 4) as f64,
    );

    // PPO: rollout side and loss side; 7 [B, T] inputs read, 6 written.
    let (b, t) = if full { (64, 512) } else { (8, 128) };
    let f = |rng: &mut Rng| Tensor::from_f32(&[b, t], rng.uniform_vec(b * t, -2.0, 0.0), device);
    let (old_lp, ref_lp, old_v, new_lp, new_v) = (
        f(&mut rng)?,
        f(&mut rng)?,
        f(&mut rng)?,
        f(&mut rng)?,
        f(&mut rng)?,
    );
    let scores = Tensor::from_f32(&[b], rng.normal_vec(b, 1.0), device)?;
    let mask = Tensor::from_f32(&[b, t], vec![1.0; b * t], device)?;
    let cfg = PpoConfig::default();
    let ms = median_ms(device, warm, reps, || {
        let a = ppo_advantages(&cfg, &old_lp, &ref_lp, &old_v, &scores, &mask)?;
        ppo_loss(
            &cfg,
            &new_lp,
            &new_v,
            &old_lp,
            &old_v,
            &a.whitened,
            &a.returns,
            &mask,
        )
        .map(drop)
    })?;
    push(
        &mut rows,
        "ppo advantages+loss",
        format!("{b}x{t}"),
        ms,
        Bound::Memory,
        (13 * b * t * 4) as f64,
    );
    Ok(rows)
}

/// One model-step measurement.
#[derive(Debug, Clone)]
pub struct ModelBench {
    pub tokens: usize,
    pub forward_ms: f64,
    pub forward_backward_ms: f64,
    /// Forward + backward FLOPs (3 × forward) per second.
    pub tflops: f64,
    /// Where one forward + backward spends its time, when asked for.
    pub profile: Option<Profile>,
}

/// Times the forward and the forward + backward (next-token log-likelihood through the fused LM
/// head) of a model with `cfg`'s shape and random weights, on `seqs` sequences of `len` tokens;
/// with `profile`, one more forward + backward under the op profiler.
pub fn bench_model(
    device: &Device,
    cfg: &crate::model::LlamaConfig,
    seqs: usize,
    len: usize,
    reps: usize,
    profile: bool,
) -> Result<ModelBench> {
    use crate::model::{Batch, Model, Params};
    at_least("bench model", "--batch", seqs, 1)?;
    at_least("bench model", "--seq-len", len, 1)?;
    at_least("bench model", "--reps", reps, 1)?;
    let model = Model::random(cfg, 1, device)?;
    let mut rng = Rng::new(3);
    let seq_tokens: Vec<Vec<i32>> = (0..seqs)
        .map(|_| (0..len).map(|_| rng.below(cfg.vocab_size) as i32).collect())
        .collect();
    let batch = Batch::new(&seq_tokens);
    let n = batch.len();
    let mut targets: Vec<i32> = batch.tokens[1..].to_vec();
    targets.push(-100);
    let tgt = Tensor::from_i32(&[n], targets, device)?;
    let ones = Tensor::from_f32(&[n], vec![1.0 / n as f32; n], device)?;
    let zeros = Tensor::zeros(&[n], DType::F32, device)?;
    let mut grads = Params::zeros(cfg, device, DType::F32)?;
    let forward_ms = median_ms(device, 1, reps, || model.forward(&batch).map(drop))?;
    let mut step = || {
        let acts = model.forward(&batch)?;
        let out = linear_logprob_fwd(&acts.hidden, model.lm_head(), &tgt, 1.0)?;
        let dh = linear_logprob_bwd(
            &acts.hidden,
            model.lm_head(),
            &tgt,
            &out,
            &ones,
            &zeros,
            1.0,
            grads.lm_head_mut(),
        )?;
        model.backward(&acts, &dh, &mut grads)
    };
    let forward_backward_ms = median_ms(device, 1, reps, &mut step)?;
    let profile = profile
        .then(|| profile_once(device, &mut step))
        .transpose()?;
    let flops = 3.0 * cfg.forward_flops(seqs, len);
    Ok(ModelBench {
        tokens: n,
        forward_ms,
        forward_backward_ms,
        tflops: flops / (forward_backward_ms * 1e-3) / 1e12,
        profile,
    })
}

/// One DPO step's measurement.
#[derive(Debug, Clone)]
pub struct TrainBench {
    /// Tokens of the step's sequences, each pair's prompt counted on both sides (as TRL counts).
    pub tokens: usize,
    /// Rows the layers ran: `tokens` less each shared prompt's second copy.
    pub rows: usize,
    pub step_ms: f64,
    pub tflops: f64,
    /// The most device memory in use seen in the timed steps, read after the policy's forward
    /// (activations held) and after the backward, CUDA only: the driver's used memory, which counts
    /// every allocation of this process and the blocks its pool keeps (as PyTorch's reserved does).
    pub device_memory_peak: Option<usize>,
    /// Bytes the policy's forward keeps for its backward (`Activations::saved_bytes`), any device.
    pub saved_activation_bytes: usize,
    /// The most bytes of CUDA tensors alive at once during the timed steps (weights, gradients,
    /// activations, scratch, the optimizer's state): PyTorch's max_memory_allocated.
    pub tensor_bytes_peak: Option<usize>,
    /// Where one step spends its time, when asked for.
    pub profile: Option<Profile>,
}

/// Times a DPO step (policy forward + backward on chosen and rejected, reference forward, the AdamW
/// step over f32 master weights) with `cfg`'s shape and random weights: `pairs` pairs of `len`
/// tokens each side, half prompt, each pair's prompt run once for both sides where `share_prompts`
/// (as the trainer does by default); with `profile`, one more step under the op profiler.
pub fn bench_dpo_step(
    device: &Device,
    cfg: &crate::model::LlamaConfig,
    pairs: usize,
    len: usize,
    reps: usize,
    share_prompts: bool,
    profile: bool,
) -> Result<TrainBench> {
    use crate::model::{Model, Params};
    use crate::ops::pref_loss::{pref_loss, DpoLoss, PrefExtras, PrefLoss};
    use crate::train::{frozen_logps, score, score_backward, ScoredBatch};
    at_least("bench train", "--pairs", pairs, 1)?;
    // Half prompt, half completion: each needs a token.
    at_least("bench train", "--seq-len", len, 2)?;
    at_least("bench train", "--reps", reps, 1)?;
    let mut policy = Model::random(cfg, 1, device)?;
    let reference = Model::random(cfg, 1, device)?;
    // The trainer's optimizer (f32 master weights on CUDA, AdamW's two moments) and its step: the
    // peer's step and peak memory hold its optimizer too.
    let mut opt = crate::train::Optimizer::new(&policy, AdamWConfig::default())?;
    let mut rng = Rng::new(5);
    let mut tok = |n: usize| {
        (0..n)
            .map(|_| rng.below(cfg.vocab_size) as i32)
            .collect::<Vec<i32>>()
    };
    let prompt_len = len / 2;
    let prompts: Vec<Vec<i32>> = (0..pairs).map(|_| tok(prompt_len)).collect();
    let comps: Vec<Vec<i32>> = (0..2 * pairs).map(|_| tok(len - prompt_len)).collect();
    let seqs: Vec<(&[i32], &[i32])> = (0..2 * pairs)
        .map(|i| (prompts[i % pairs].as_slice(), comps[i].as_slice()))
        .collect();
    let sb = ScoredBatch::build(&seqs, &[], share_prompts);
    let kind = PrefLoss::Dpo {
        loss: DpoLoss::Sigmoid,
        beta: 0.1,
        label_smoothing: 0.0,
    };
    let mut memory = None;
    let mut saved = 0;
    let mut step = || {
        // As the trainer begins each optimizer step: fresh zero gradients.
        let mut grads = Params::zeros(cfg, device, DType::F32)?;
        let reference_logps = frozen_logps(&reference, &sb)?;
        let s = score(&policy, &sb)?;
        saved = s.acts.saved_bytes();
        let seen = |m: &mut Option<usize>| {
            if let Device::Cuda(d) = device {
                *m = (*m).max(d.memory_in_use().ok());
            }
        };
        seen(&mut memory);
        let (lp, mask, t) = sb.padded(&s.per_token);
        let (rp, _, _) = sb.padded(&reference_logps);
        let shape = [2 * pairs, t];
        let (lp, mask, rp) = (
            Tensor::from_f32(&shape, lp, device)?,
            Tensor::from_f32(&shape, mask, device)?,
            Tensor::from_f32(&shape, rp, device)?,
        );
        let out = pref_loss(
            &kind,
            &lp,
            &mask,
            &PrefExtras {
                ref_logps: Some(&rp),
                ..Default::default()
            },
        )?;
        score_backward(
            &policy,
            &s,
            sb.unpad(&out.grad_policy_logps.to_f32_vec()?, t),
            &mut grads,
        )?;
        optimizer_step(&mut opt, &mut policy, &grads)?;
        device.synchronize()?;
        seen(&mut memory);
        Ok(())
    };
    crate::device::tensor::reset_device_bytes_peak();
    let step_ms = median_ms(device, 1, reps, &mut step)?;
    let tensor_bytes_peak = device
        .is_cuda()
        .then(crate::device::tensor::device_bytes_peak);
    let profile = profile
        .then(|| profile_once(device, &mut step))
        .transpose()?;
    // Policy forward, its backward (twice the forward) and the reference forward, as run: the
    // layers' GEMMs on the batch's rows (a shared prompt once), the LM head on the scored rows only
    // (the completions' predictions), attention as the model lays it out (a shared prompt's
    // repeated query rows skipped).
    let (layers, head) = cfg.token_flops();
    let scored = sb.targets.iter().filter(|&&t| t >= 0).count();
    let attention = cfg.num_layers as f64
        * sb.batch
            .attention_batch(&Device::Cpu)?
            .forward_flops(policy.heads());
    let flops = 4.0 * (layers * sb.batch.len() as f64 + head * scored as f64 + attention);
    Ok(TrainBench {
        tokens: sb.batch.unshared_len(),
        rows: sb.batch.len(),
        step_ms,
        tflops: flops / (step_ms * 1e-3) / 1e12,
        device_memory_peak: memory,
        saved_activation_bytes: saved,
        tensor_bytes_peak,
        profile,
    })
}

/// One attention measurement: median forward and backward times and their TFLOP/s (forward
/// 4·B·H·T²·D / 2 for causal attention, backward 2.5× that), the backward in its fast mode (dQ by
/// atomics) and its deterministic one, the forward also on the mma.sync kernel (`AttnKernel::Mma`:
/// the same as the default except on Hopper GPUs, where the default runs on wgmma), and the forward
/// and fast backward on one-warpgroup blocks (`AttnKernel::Narrow`: kernels of their own on Hopper
/// GPUs only).
#[derive(Debug, Clone)]
pub struct AttentionBench {
    pub seqs: usize,
    pub len: usize,
    pub head_dim: usize,
    pub forward_ms: f64,
    pub forward_mma_ms: f64,
    pub backward_ms: f64,
    pub backward_deterministic_ms: f64,
    pub forward_narrow_ms: f64,
    pub backward_narrow_ms: f64,
    pub forward_tflops: f64,
    pub forward_mma_tflops: f64,
    pub backward_tflops: f64,
    pub backward_deterministic_tflops: f64,
    pub forward_narrow_tflops: f64,
    pub backward_narrow_tflops: f64,
}

pub fn bench_attention(
    device: &Device,
    seqs: usize,
    len: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    reps: usize,
) -> Result<AttentionBench> {
    use crate::ops::attention::{attention_bwd, attention_fwd, AttnBatch, AttnKernel, Heads};
    const CMD: &str = "bench attention";
    at_least(CMD, "--lens", len, 1)?;
    at_least(CMD, "batch (--tokens / T)", seqs, 1)?;
    at_least(CMD, "--reps", reps, 1)?;
    check_heads(CMD, heads, kv_heads, head_dim)?;
    let dtype = device.compute_dtype();
    let n = seqs * len;
    let hd = Heads {
        heads,
        kv_heads,
        head_dim,
    };
    let mut rng = Rng::new(2);
    let q = random(device, &mut rng, &[n, heads * head_dim], 1.0, dtype)?;
    let k = random(device, &mut rng, &[n, kv_heads * head_dim], 1.0, dtype)?;
    let v = random(device, &mut rng, &[n, kv_heads * head_dim], 1.0, dtype)?;
    let dout = random(device, &mut rng, &[n, heads * head_dim], 1.0, dtype)?;
    let batch_of = |kernel| -> Result<AttnBatch> {
        Ok(AttnBatch::packed(&vec![len; seqs], device)?
            .with_kernel(kernel)
            .with_deterministic(false))
    };
    // The default kernels, as RLHF_ATTENTION chooses them.
    let batch = AttnBatch::packed(&vec![len; seqs], device)?.with_deterministic(false);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let forward_ms = median_ms(device, 1, reps, || {
        attention_fwd(&q, &k, &v, &batch, hd, scale).map(drop)
    })?;
    let mma = batch_of(AttnKernel::Mma)?;
    let forward_mma_ms = median_ms(device, 1, reps, || {
        attention_fwd(&q, &k, &v, &mma, hd, scale).map(drop)
    })?;
    let (o, lse) = attention_fwd(&q, &k, &v, &batch, hd, scale)?;
    let backward_ms = median_ms(device, 1, reps, || {
        attention_bwd(&dout, &q, &k, &v, &o, &lse, &batch, hd, scale).map(drop)
    })?;
    let narrow = batch_of(AttnKernel::Narrow)?;
    let forward_narrow_ms = median_ms(device, 1, reps, || {
        attention_fwd(&q, &k, &v, &narrow, hd, scale).map(drop)
    })?;
    let backward_narrow_ms = median_ms(device, 1, reps, || {
        attention_bwd(&dout, &q, &k, &v, &o, &lse, &narrow, hd, scale).map(drop)
    })?;
    let batch = batch.with_deterministic(true);
    let backward_deterministic_ms = median_ms(device, 1, reps, || {
        attention_bwd(&dout, &q, &k, &v, &o, &lse, &batch, hd, scale).map(drop)
    })?;
    let flops = 4.0 * (seqs * heads * len * len * head_dim) as f64 / 2.0;
    Ok(AttentionBench {
        seqs,
        len,
        head_dim,
        forward_ms,
        backward_ms,
        backward_deterministic_ms,
        forward_narrow_ms,
        backward_narrow_ms,
        forward_mma_ms,
        forward_tflops: flops / (forward_ms * 1e-3) / 1e12,
        forward_mma_tflops: flops / (forward_mma_ms * 1e-3) / 1e12,
        backward_tflops: 2.5 * flops / (backward_ms * 1e-3) / 1e12,
        backward_deterministic_tflops: 2.5 * flops / (backward_deterministic_ms * 1e-3) / 1e12,
        forward_narrow_tflops: flops / (forward_narrow_ms * 1e-3) / 1e12,
        backward_narrow_tflops: 2.5 * flops / (backward_narrow_ms * 1e-3) / 1e12,
    })
}

/// One KV-cache decode measurement: a new query row per sequence against `cache_len` cached keys.
#[derive(Debug, Clone)]
pub struct DecodeBench {
    pub ms: f64,
    /// Bytes of K and V cache read, once each, per second.
    pub cache_gbs: f64,
}

/// Times the attention of one new token per sequence against a KV cache of `cache_len` keys (the
/// generation step's attention), counting the cache's K and V bytes as what must be read.
pub fn bench_decode(
    device: &Device,
    seqs: usize,
    cache_len: usize,
    hd: crate::ops::attention::Heads,
    reps: usize,
) -> Result<DecodeBench> {
    use crate::ops::attention::{attention_fwd, AttnBatch};
    const CMD: &str = "bench attention";
    at_least(CMD, "--decode-batch", seqs, 1)?;
    at_least(CMD, "--decode-lens", cache_len, 1)?;
    at_least(CMD, "--reps", reps, 1)?;
    check_heads(CMD, hd.heads, hd.kv_heads, hd.head_dim)?;
    let dtype = device.compute_dtype();
    let mut rng = Rng::new(3);
    let rows = seqs * cache_len;
    let kv_shape = [rows, hd.kv_heads * hd.head_dim];
    let q = random(
        device,
        &mut rng,
        &[seqs, hd.heads * hd.head_dim],
        1.0,
        dtype,
    )?;
    let k = random(device, &mut rng, &kv_shape, 1.0, dtype)?;
    let v = random(device, &mut rng, &kv_shape, 1.0, dtype)?;
    let starts: Vec<usize> = (0..seqs).map(|b| b * cache_len).collect();
    let batch = AttnBatch::cached(&vec![1; seqs], &starts, &vec![cache_len; seqs], device)?;
    let scale = 1.0 / (hd.head_dim as f32).sqrt();
    let ms = median_ms(device, 1, reps, || {
        attention_fwd(&q, &k, &v, &batch, hd, scale).map(drop)
    })?;
    let bytes = 2 * rows * hd.kv_heads * hd.head_dim * dtype.size();
    Ok(DecodeBench {
        ms,
        cache_gbs: bytes as f64 / (ms * 1e-3) / 1e9,
    })
}

/// Responses per prompt in the GRPO bench's rollout.
pub const GRPO_BENCH_GROUP: usize = 8;

/// Generation and training throughput of an online trainer's iteration.
#[derive(Debug, Clone)]
pub struct OnlineBench {
    pub generated_tokens: usize,
    pub generation_tokens_per_s: f64,
    /// The same generation with decode steps launched op by op instead of replayed as graphs (on
    /// a GPU, unless graphs are off).
    pub generation_eager_tokens_per_s: Option<f64>,
    /// Tokens of the rollout's sequences, each with its whole prompt (as TRL counts them).
    pub training_tokens: usize,
    /// Rows the layers ran: a GRPO group's prompt once.
    pub training_rows: usize,
    pub training_tokens_per_s: f64,
    /// The same update with every sequence's prompt run on its own, where groups share one.
    pub training_whole_tokens_per_s: Option<f64>,
    /// The most bytes of CUDA tensors alive at once (PyTorch's max_memory_allocated), CUDA only:
    /// during the generations, and during the timed updates as run (a shared prompt once).
    pub tensor_bytes_peak: Option<(usize, usize)>,
    /// Where a 32-token generation from the same prompts, and one more update, spend their time,
    /// when asked for.
    pub profile: Option<(Profile, Profile)>,
}

/// Times one rollout (`prompts` prompts of `prompt_len` tokens, `new_tokens` sampled each, no EOS;
/// for GRPO in groups of `GRPO_BENCH_GROUP` on one prompt, which the prefill and the update run once
/// a group unless `share_prompts` is off) and its update: for PPO the policy and value
/// forward+backward plus the reference and reward forwards; for GRPO the policy forward+backward
/// plus the reference forward; each trained model's AdamW step. Random weights with
/// `cfg`'s shape. On a GPU the rollout runs again with its decode steps launched op by op instead
/// of replayed as graphs, and must sample the same tokens. With `profile`, a short generation and
/// one more update under the op profiler.
#[allow(clippy::too_many_arguments)]
pub fn bench_online(
    device: &Device,
    cfg: &crate::model::LlamaConfig,
    ppo: bool,
    prompts: usize,
    prompt_len: usize,
    new_tokens: usize,
    share_prompts: bool,
    profile: bool,
) -> Result<OnlineBench> {
    use crate::model::generate::{decode_graphs, set_decode_graphs, GenerateOptions};
    use crate::model::{Model, Params};
    use crate::train::{frozen_logps, score, score_backward, ScoredBatch};
    // The command asks for --pairs × 4 prompts of --seq-len / 2 tokens, and as many new ones.
    at_least("bench train", "--pairs", prompts, 1)?;
    if prompt_len == 0 || new_tokens == 0 {
        return Err(Error::Unsupported {
            op: "bench train",
            detail: format!(
                "--seq-len must be at least 2: half prompt ({prompt_len} tokens here), half \
                 generated ({new_tokens})"
            ),
        });
    }
    let mut policy = Model::random(cfg, 1, device)?;
    policy.share_prompts = share_prompts;
    let reference = Model::random(cfg, 2, device)?;
    let mut vcfg = cfg.clone();
    vcfg.scalar_head = true;
    let mut value = Model::random(&vcfg, 3, device)?;
    let mut rng = Rng::new(4);
    // GRPO samples a group of responses for each prompt (TRL's num_generations, 8 in
    // bench/peers/trl_grpo.py), PPO one.
    let group = if ppo {
        1
    } else {
        GRPO_BENCH_GROUP.min(prompts)
    };
    let distinct: Vec<Vec<i32>> = (0..prompts.div_ceil(group))
        .map(|_| {
            (0..prompt_len)
                .map(|_| rng.below(cfg.vocab_size) as i32)
                .collect()
        })
        .collect();
    let batch: Vec<Vec<i32>> = (0..prompts).map(|i| distinct[i / group].clone()).collect();
    let opts = GenerateOptions {
        max_new_tokens: new_tokens,
        temperature: 1.0,
        seed: 5,
        ..Default::default()
    };
    device.synchronize()?;
    crate::device::tensor::reset_device_bytes_peak();
    let t = Instant::now();
    let gens = policy.generate(&batch, &opts, |_, _| {})?;
    device.synchronize()?;
    let gen_secs = t.elapsed().as_secs_f64();
    let generated: usize = gens.iter().map(|g| g.tokens.len()).sum();
    // The same generation with each step's kernels launched one by one: the graphs' gain, and a
    // check that replaying a recorded step samples the very tokens the eager steps do.
    let eager_tokens_per_s = if device.is_cuda() && decode_graphs() {
        set_decode_graphs(false);
        let t = Instant::now();
        let eager = policy.generate(&batch, &opts, |_, _| {});
        let synced = device.synchronize();
        let secs = t.elapsed().as_secs_f64();
        set_decode_graphs(true);
        let eager = eager?;
        synced?;
        if let Some(b) = (0..gens.len()).find(|&b| eager[b].tokens != gens[b].tokens) {
            return Err(Error::Unsupported {
                op: "bench train",
                detail: format!(
                    "sequence {b}: decode steps replayed from a CUDA graph sampled other tokens \
                     than the same steps launched one by one (RLHF_CUDA_GRAPHS=0 turns graphs off)"
                ),
            });
        }
        Some(generated as f64 / secs)
    } else {
        None
    };
    let generation_peak = crate::device::tensor::device_bytes_peak();
    let seqs: Vec<(&[i32], &[i32])> = batch
        .iter()
        .zip(&gens)
        .map(|(p, g)| (p.as_slice(), g.tokens.as_slice()))
        .collect();
    // A group's responses share its prompt, as in the GRPO trainer.
    let sb = ScoredBatch::build(&seqs, &[], policy.share_prompts);
    // Before the updates change the policy's weights (random either way).
    let generation_profile = if profile {
        let short = GenerateOptions {
            max_new_tokens: new_tokens.min(32),
            ..opts.clone()
        };
        Some(profile_once(device, || {
            policy.generate(&batch, &short, |_, _| {}).map(drop)
        })?)
    } else {
        None
    };
    // The trainers' optimizers and steps, as the peer's update has its own.
    let mut opt = crate::train::Optimizer::new(&policy, AdamWConfig::default())?;
    let mut vopt = if ppo {
        Some(crate::train::Optimizer::new(
            &value,
            AdamWConfig::default(),
        )?)
    } else {
        None
    };
    let mut update_on = |sb: &ScoredBatch| {
        frozen_logps(&reference, sb)?;
        let s = score(&policy, sb)?;
        let up = vec![1.0 / sb.batch.len() as f32; sb.batch.len()];
        let mut grads = Params::zeros(cfg, device, DType::F32)?;
        score_backward(&policy, &s, up.clone(), &mut grads)?;
        drop(s);
        optimizer_step(&mut opt, &mut policy, &grads)?;
        if let Some(vopt) = vopt.as_mut() {
            let mut vgrads = Params::zeros(&vcfg, device, DType::F32)?;
            let acts = value.forward(&sb.batch)?;
            value.scalar_head(&acts.hidden)?;
            let dv = Tensor::from_f32(&[sb.batch.len()], up, device)?;
            let dh = value.scalar_head_bwd(
                &acts.hidden,
                &dv,
                vgrads.score.as_mut().expect("value head"),
            )?;
            value.backward(&acts, &dh, &mut vgrads)?;
            drop(acts);
            optimizer_step(vopt, &mut value, &vgrads)?;
            // The reward model's forward (the same shape as the value model's).
            value.forward_frozen(&sb.batch)?;
        }
        Ok(())
    };
    // Where groups share their prompt, the same update on the sequences written out whole first:
    // the sharing's gain in the same run.
    let whole_ms = if sb.batch.len() != sb.batch.unshared_len() {
        let whole = ScoredBatch::build(&seqs, &[], false);
        Some(median_ms(device, 1, 3, || update_on(&whole))?)
    } else {
        None
    };
    let mut update = || update_on(&sb);
    crate::device::tensor::reset_device_bytes_peak();
    let train_ms = median_ms(device, 1, 3, &mut update)?;
    let tensor_bytes_peak = device
        .is_cuda()
        .then(|| (generation_peak, crate::device::tensor::device_bytes_peak()));
    let profile = match generation_profile {
        Some(generation) => Some((generation, profile_once(device, &mut update)?)),
        None => None,
    };
    Ok(OnlineBench {
        generated_tokens: generated,
        generation_tokens_per_s: generated as f64 / gen_secs,
        generation_eager_tokens_per_s: eager_tokens_per_s,
        training_tokens: sb.batch.unshared_len(),
        training_rows: sb.batch.len(),
        training_tokens_per_s: sb.batch.unshared_len() as f64 / (train_ms * 1e-3),
        training_whole_tokens_per_s: whole_ms
            .map(|ms| sb.batch.unshared_len() as f64 / (ms * 1e-3)),
        tensor_bytes_peak,
        profile,
    })
}
