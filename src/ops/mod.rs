//! One module per kernel family, each the twin of `kernels/<family>.cu`: a CPU reference in plain
//! loops and a CUDA launcher behind one signature that dispatches on the tensors' device.

pub mod adamw;
pub mod attention;
pub mod elementwise;
pub mod embed;
pub mod kl;
pub mod logprob;
pub mod matmul;
pub mod mlp;
pub mod norm;
pub mod ppo;
pub mod pref_loss;
pub mod rope;
pub mod sample;

use cudarc::driver::LaunchConfig;

use crate::error::{Error, Result};

/// Host rows cut into consecutive column blocks of the given widths (each row `Σ widths` long):
/// the CPU side of kernels whose operand packs several tensors side by side in each row (the QKV
/// projection's output, gate and up).
pub fn split_columns(x: &[f32], widths: &[usize]) -> Vec<Vec<f32>> {
    let total: usize = widths.iter().sum();
    let mut out: Vec<Vec<f32>> = widths
        .iter()
        .map(|&w| Vec::with_capacity(x.len() / total * w))
        .collect();
    for row in x.chunks_exact(total) {
        let mut at = 0;
        for (o, &w) in out.iter_mut().zip(widths) {
            o.extend_from_slice(&row[at..at + w]);
            at += w;
        }
    }
    out
}

/// The inverse of `split_columns`: `parts[i]` holds rows of `widths[i]` values.
pub fn join_columns(parts: &[&[f32]], widths: &[usize]) -> Vec<f32> {
    let rows = parts[0].len() / widths[0];
    let mut out = Vec::with_capacity(rows * widths.iter().sum::<usize>());
    for r in 0..rows {
        for (p, &w) in parts.iter().zip(widths) {
            out.extend_from_slice(&p[r * w..(r + 1) * w]);
        }
    }
    out
}

/// A size as the i32 the kernels take, or an error naming it.
pub(crate) fn to_i32(op: &'static str, name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Unsupported {
        op,
        detail: format!("{name} = {v} exceeds i32"),
    })
}

/// One block of `threads` per row.
pub(crate) fn per_row(
    op: &'static str,
    rows: usize,
    threads: u32,
    shared_mem_bytes: u32,
) -> Result<LaunchConfig> {
    let grid = u32::try_from(rows).map_err(|_| Error::Unsupported {
        op,
        detail: format!("{rows} rows exceed the grid limit"),
    })?;
    Ok(LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes,
    })
}

/// One thread per element, 256 to a block.
pub(crate) fn per_element(op: &'static str, n: usize) -> Result<LaunchConfig> {
    let blocks = u32::try_from(n.div_ceil(256)).map_err(|_| Error::Unsupported {
        op,
        detail: format!("{n} elements exceed the grid limit"),
    })?;
    Ok(LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A grid-stride launch over `n` elements: 256 threads a block, at most 8,192 blocks (enough to fill
/// any current GPU several times over).
pub(crate) fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 8192) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Numerically stable scalar helpers shared by the CPU references.
pub mod stable {
    use num_traits::Float;

    /// log(1 + e^x) without overflow.
    pub fn softplus<F: Float>(x: F) -> F {
        if x > F::zero() {
            x + (-x).exp().ln_1p()
        } else {
            x.exp().ln_1p()
        }
    }

    /// log σ(x) = −softplus(−x), exact for |x| in the hundreds.
    pub fn log_sigmoid<F: Float>(x: F) -> F {
        -softplus(-x)
    }

    pub fn sigmoid<F: Float>(x: F) -> F {
        if x >= F::zero() {
            F::one() / (F::one() + (-x).exp())
        } else {
            let e = x.exp();
            e / (F::one() + e)
        }
    }

    /// log(1 − e^x) for x < 0: log1p(−e^x) below −ln 2, log(−expm1(x)) above (Mächler 2012).
    pub fn log1mexp<F: Float>(x: F) -> F {
        if x < -F::from(std::f64::consts::LN_2).unwrap() {
            (-x.exp()).ln_1p()
        } else {
            (-x.exp_m1()).ln()
        }
    }
}
