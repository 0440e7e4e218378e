//! Sampling one token per row, the twin of `kernels/sample.cu`: plain temperature sampling by
//! inverting the CDF in vocabulary order with one uniform draw per row, or greedy (the argmax, the
//! lowest index among equal maxima). Top-k and top-p stay on the host (`model::generate`) over the
//! same [`RowWeights`]. There is no backward: nothing differentiates through the choice of a token.
//!
//! On CUDA the logits never leave the device: generation copies B tokens and log-probs instead of B
//! rows of logits, and the host does no per-token work. `RLHF_SAMPLER=host` keeps sampling on the
//! host (the CPU reference) for comparison.

use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};
use half::bf16;

use crate::device::profile;
use crate::device::tensor::{host_f32, CudaElem};
use crate::device::{DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::{per_row, to_i32};

const OP: &str = "sample";
/// Must equal SAMPLE_THREADS in kernels/sample.cu.
const THREADS: u32 = 1024;
/// The kernel passes indices through f32, exact below 2^24.
const MAX_VOCAB: usize = 1 << 24;

/// A row's sampling weights `exp((x − max) / T)` in f32 and their f64 sum; greedy (`T` = 0) weighs at
/// T = 1, so log-probs are then under the plain softmax.
pub struct RowWeights {
    pub max: f32,
    pub inv_t: f32,
    pub weights: Vec<f32>,
    pub total: f64,
}

impl RowWeights {
    pub fn new(row: &[f32], temperature: f32) -> RowWeights {
        let inv_t = if temperature > 0.0 {
            1.0 / temperature
        } else {
            1.0
        };
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = row.iter().map(|&l| ((l - max) * inv_t).exp()).collect();
        let total = weights.iter().map(|&w| w as f64).sum();
        RowWeights {
            max,
            inv_t,
            weights,
            total,
        }
    }

    /// log p of entry `i` of `row` under softmax(row / T).
    pub fn logp(&self, row: &[f32], i: usize) -> f32 {
        (((row[i] - self.max) * self.inv_t) as f64 - self.total.ln()) as f32
    }
}

/// The index of the largest entry, the lowest among equals.
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map_or(0, |(i, _)| i)
}

/// The index at which the running sum of `weights` over `order` first exceeds `target` (the last
/// index with positive weight when rounding leaves `target` past the sum).
pub fn invert_cdf(order: impl Iterator<Item = usize>, weights: &[f32], mut target: f64) -> usize {
    let mut last = 0;
    for i in order {
        let w = weights[i] as f64;
        if target < w {
            return i;
        }
        target -= w;
        if w > 0.0 {
            last = i;
        }
    }
    last
}

/// CPU reference: one row sampled at `temperature` (greedy at 0) with the draw `u` in [0, 1); returns
/// the token and its log-prob under softmax(row / T).
pub fn sample_plain_ref(row: &[f32], temperature: f32, u: f64) -> (i32, f32) {
    let w = RowWeights::new(row, temperature);
    let pick = if temperature <= 0.0 {
        argmax(row)
    } else {
        invert_cdf(0..row.len(), &w.weights, u * w.total)
    };
    (pick as i32, w.logp(row, pick))
}

/// Whether generation samples on the device when it can (`RLHF_SAMPLER=host` says no).
pub fn device_sampling() -> bool {
    std::env::var("RLHF_SAMPLER").as_deref() != Ok("host")
}

/// One token per row of `logits` `[B, V]` (f32 or bf16, on any device), sampled at `temperature`
/// (greedy at 0) with `draws[b]` in [0, 1); returns the tokens and their log-probs on the host.
pub fn sample_plain(
    logits: &Tensor,
    temperature: f32,
    draws: &[f64],
) -> Result<(Vec<i32>, Vec<f32>)> {
    let (rows, vocab) = logits.dims2(OP)?;
    let _profile = profile::scope(logits.device(), OP);
    if draws.len() != rows {
        return Err(Error::Unsupported {
            op: OP,
            detail: format!("{} draws for {rows} rows", draws.len()),
        });
    }
    if vocab == 0 || vocab >= MAX_VOCAB {
        return Err(Error::Unsupported {
            op: OP,
            detail: format!("vocabulary of {vocab}: sampling takes 1 to 2^24 - 1 entries"),
        });
    }
    match logits.device() {
        Device::Cpu => {
            let x = host_f32(logits, OP)?;
            Ok(x.chunks(vocab)
                .zip(draws)
                .map(|(row, &u)| sample_plain_ref(row, temperature, u))
                .unzip())
        }
        Device::Cuda(_) => match logits.dtype() {
            DType::F32 => sample_cuda::<f32>(logits, temperature, draws, rows, vocab),
            DType::BF16 => sample_cuda::<bf16>(logits, temperature, draws, rows, vocab),
            DType::I32 => Err(Error::DType {
                op: OP,
                dtype: "i32",
            }),
        },
    }
}

fn sample_cuda<T: CudaElem>(
    logits: &Tensor,
    temperature: f32,
    draws: &[f64],
    rows: usize,
    vocab: usize,
) -> Result<(Vec<i32>, Vec<f32>)> {
    if rows == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let dev = logits.device().as_cuda(OP)?;
    let mut tokens = Tensor::empty(&[rows], DType::I32, logits.device())?;
    let mut logp = Tensor::empty(&[rows], DType::F32, logits.device())?;
    let u = dev.upload(draws)?;
    let stream = dev.stream().clone();
    {
        let (u_ptr, _u) = u.device_ptr(&stream);
        let (t_ptr, _t) = tokens.cuda_i32_mut(OP)?.device_ptr_mut(&stream);
        let (l_ptr, _l) = logp.cuda_f32_mut(OP)?.device_ptr_mut(&stream);
        launch::<T>(logits, temperature, vocab, rows, [u_ptr, t_ptr, l_ptr])?;
    }
    Ok((tokens.to_i32_vec()?, logp.to_f32_vec()?))
}

/// The kernel over `rows` rows of `logits`, with `pointers` = [draws (f64), tokens (i32), log-probs
/// (f32)], each `rows` long, on the device.
fn launch<T: CudaElem>(
    logits: &Tensor,
    temperature: f32,
    vocab: usize,
    rows: usize,
    pointers: [u64; 3],
) -> Result<()> {
    let dev = logits.device().as_cuda(OP)?;
    let v = to_i32(OP, "vocab", vocab)?;
    let greedy = i32::from(temperature <= 0.0);
    let inv_t = if temperature > 0.0 {
        1.0 / temperature
    } else {
        1.0f32
    };
    let [u, tokens, logp] = pointers;
    let f = dev.function("sample", T::pick("sample_plain_f32", "sample_plain_bf16"))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&tokens)
        .arg(&logp)
        .arg(T::slice(logits, OP)?)
        .arg(&u)
        .arg(&v)
        .arg(&inv_t)
        .arg(&greedy);
    // SAFETY: logits hold rows*vocab elements, the three pointers `rows` each (the callers'
    // contract); one block of THREADS per row.
    unsafe { b.launch(per_row(OP, rows, THREADS, 0)?) }?;
    Ok(())
}

/// `sample_plain` on CUDA with every buffer on the device and no copy to or from the host, so that
/// a graph can record it: the draws are `words[at..at + 2·rows]` (each f64 as two little-endian i32
/// words; `at` even), and `out` (`[2·rows]` i32) receives the tokens, then the log-probs' f32 bits.
pub(crate) fn sample_plain_into(
    logits: &Tensor,
    temperature: f32,
    words: &Tensor,
    at: usize,
    out: &mut Tensor,
) -> Result<()> {
    let (rows, vocab) = logits.dims2(OP)?;
    words.expect_dtype(OP, DType::I32)?;
    out.expect_shape(OP, "out", &[2 * rows])?;
    out.expect_dtype(OP, DType::I32)?;
    if !at.is_multiple_of(2) || at + 2 * rows > words.numel() || !(1..MAX_VOCAB).contains(&vocab) {
        return Err(Error::shape(
            OP,
            format!(
                "draws at word {at} of {} for {rows} rows of {vocab} logits",
                words.numel()
            ),
        ));
    }
    if rows == 0 {
        return Ok(());
    }
    let stream = logits.device().as_cuda(OP)?.stream().clone();
    let (words_ptr, _w) = words.cuda_i32(OP)?.device_ptr(&stream);
    let (out_ptr, _o) = out.cuda_i32_mut(OP)?.device_ptr_mut(&stream);
    let pointers = [
        words_ptr + 4 * at as u64,
        out_ptr,
        out_ptr + 4 * rows as u64,
    ];
    match logits.dtype() {
        DType::F32 => launch::<f32>(logits, temperature, vocab, rows, pointers),
        DType::BF16 => launch::<bf16>(logits, temperature, vocab, rows, pointers),
        DType::I32 => Err(Error::DType {
            op: OP,
            dtype: "i32",
        }),
    }
}
