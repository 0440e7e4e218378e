//! Causal grouped-query attention over packed variable-length sequences, the twin of
//! `kernels/attention.cu`.
//!
//! `q` is `[Nq, H·D]`, `k` and `v` `[*, KV·D]`; query head `h` reads kv head `h / (H/KV)`. An
//! [`AttnBatch`] says which query rows and key rows belong to each sequence: packed training batches
//! (keys are the query rows) or a KV cache (keys live in a per-sequence region). Causality is aligned
//! bottom-right, so a decode step's single query sees its whole cache. The forward returns the
//! per-row, per-head logsumexp for the backward, which recomputes the scores.

use std::sync::atomic::{AtomicU8, Ordering};

use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;
use num_traits::Float;

use crate::device::profile;
use crate::device::tensor::{host_f32, CudaElem};
use crate::device::{same_device, DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::to_i32;

const OP_FWD: &str = "attention_fwd";
const OP_BWD: &str = "attention_bwd";

/// Which rows belong to which sequence, on the host (CPU path, launch sizes) and on the device.
pub struct AttnBatch {
    /// `[B+1]` query row offsets.
    pub cu_q: Vec<i32>,
    /// `[B]` first key row of each sequence.
    pub k_start: Vec<i32>,
    /// `[B]` number of keys of each sequence.
    pub k_len: Vec<i32>,
    /// Whether the keys are the query rows themselves (a packed training batch).
    pub packed: bool,
    /// Which CUDA kernels run this batch.
    pub kernel: AttnKernel,
    /// The flash backward without atomics (bitwise repeatable, slower); see [`set_deterministic`].
    pub deterministic: bool,
    /// For a KV-cache batch, the most keys a sequence can reach (the cache's capacity): the decode
    /// kernels plan their split of the cache by it rather than by today's longest sequence, so
    /// that the plan, and the order each row's softmax is summed in, stays the same as the cache
    /// fills (a recorded decode step replays one launch shape; see `with_key_capacity`).
    key_capacity: Option<usize>,
    /// `[tiles, 2]` (sequence, first local query row) of every 64-row query tile, for the flash
    /// kernels: packed batches of any lengths cost no padding beyond each sequence's last tile.
    tiles: Vec<i32>,
    /// Per sequence of a packed batch, its first live query row, where some are dead (see
    /// `with_live_from`).
    live_from: Option<LiveRows>,
    dev: Option<DeviceTables>,
}

/// A packed batch's dead query rows: `dead[b]` rows at the start of sequence b whose outputs the
/// caller drops and whose output gradients are zero (a shared prompt repeated in every sequence
/// that reads it). The flash forward skips query tiles wholly inside them, and the flash dK/dV
/// kernels start each sequence's query loop at the tile holding its first live row.
struct LiveRows {
    /// Dead rows at the start of each sequence.
    dead: Vec<usize>,
    /// The forward's query-tile counts without the dead tiles, of 64 and of 128 rows (their lists
    /// are `DeviceTables::live`).
    tiles: usize,
    wide_tiles: usize,
}

/// A CUDA batch's tables on the device.
struct DeviceTables {
    cu_q: Tensor,
    k_start: Tensor,
    k_len: Tensor,
    /// The query-tile lists of 64 and of 128 rows (the blocks of the flash kernels and of the
    /// two-warpgroup Hopper ones), each copied on the first launch that needs it, so batches that
    /// never run one (decode steps, other GPUs) skip the copy.
    tiles: std::sync::OnceLock<Tensor>,
    wide_tiles: std::sync::OnceLock<Tensor>,
    /// Where some query rows are dead (`AttnBatch::with_live_from`): the first live row of each
    /// sequence, and the forward's query-tile lists of 64 and 128 rows without the dead tiles.
    live: Option<(Tensor, Tensor, Tensor)>,
}

/// Query rows (and, in the backward, key rows) per flash-kernel block.
const FLASH_TILE: usize = 64;
const FLASH_THREADS: u32 = 128;
/// Query rows (keys in the dK/dV kernels) and threads per block of the Hopper flash kernels: two
/// warpgroups of 64 rows.
const HOPPER_ROWS: usize = 128;
const HOPPER_THREADS: u32 = 256;
/// Query rows per inner tile of the flash dK/dV kernel and keys per inner tile of its dQ kernel.
const FLASH_BWD_QTILE: usize = 32;
/// Shared-memory row padding of the flash kernels, in elements.
const FLASH_PAD: usize = 8;

/// The CUDA attention kernels. `Auto` runs the decode kernels for KV-cache batches they fit
/// (`AttnBatch::decode_split`), the tensor-core flash kernels for bf16 with head_dim 64 or 128 (on
/// wgmma on Hopper GPUs, on mma.sync elsewhere), and the simple kernels otherwise (f32, other head
/// sizes). `Mma` is `Auto` with the mma.sync kernels on Hopper too; `Narrow` is `Auto` with the
/// Hopper kernels on blocks of one warpgroup (64 query rows, or keys in dK/dV) instead of two
/// (128); `Simple` always runs the simple kernels. The last three are for comparison
/// (`RLHF_ATTENTION=mma`, `narrow` or `simple` makes one the default), `Simple` also as a fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnKernel {
    Auto,
    Mma,
    Narrow,
    Simple,
}

impl AttnKernel {
    fn default_choice() -> AttnKernel {
        match std::env::var("RLHF_ATTENTION") {
            Err(_) => AttnKernel::Auto,
            Ok(v) => AttnKernel::parse(&v).unwrap_or_else(|| {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    eprintln!(
                        "note: RLHF_ATTENTION={v:?} is not one of auto, mma, narrow, simple; \
                         using auto"
                    )
                });
                AttnKernel::Auto
            }),
        }
    }

    /// The kernel set named by `RLHF_ATTENTION`'s values.
    pub fn parse(name: &str) -> Option<AttnKernel> {
        Some(match name {
            "auto" => AttnKernel::Auto,
            "mma" => AttnKernel::Mma,
            "narrow" => AttnKernel::Narrow,
            "simple" => AttnKernel::Simple,
            _ => return None,
        })
    }

    /// Whether a Hopper GPU runs the wgmma flash kernels for this choice.
    fn wgmma(self) -> bool {
        matches!(self, AttnKernel::Auto | AttnKernel::Narrow)
    }

    fn flash(self, dtype: DType, head_dim: usize) -> bool {
        self != AttnKernel::Simple && dtype == DType::BF16 && matches!(head_dim, 64 | 128)
    }
}

const DETERMINISM_UNSET: u8 = 2;
static DETERMINISTIC: AtomicU8 = AtomicU8::new(DETERMINISM_UNSET);

/// Makes new batches run the deterministic flash backward (no atomics: two runs give bitwise-equal
/// gradients, at the cost of a second kernel that recomputes P for dQ) or the fast one (dQ added
/// with f32 atomics, so its last bits depend on the order blocks finish). The trainers' `--deterministic`
/// flag sets it; unset, `RLHF_DETERMINISTIC=1` selects the deterministic one and anything else the
/// fast one, as PyTorch and FlashAttention-2 default to. Only the flash backward (bf16, head_dim
/// 64 or 128 on CUDA) has two modes; every other path is deterministic.
pub fn set_deterministic(on: bool) {
    DETERMINISTIC.store(on as u8, Ordering::Relaxed);
}

/// Whether new batches take the deterministic backward (see [`set_deterministic`]).
pub fn deterministic() -> bool {
    match DETERMINISTIC.load(Ordering::Relaxed) {
        DETERMINISM_UNSET => std::env::var("RLHF_DETERMINISTIC").is_ok_and(|v| v == "1"),
        on => on == 1,
    }
}

/// Blocks the decode kernel aims to launch: a few per SM of any current GPU.
const DECODE_TARGET_BLOCKS: usize = 512;
/// Must equal DECODE_THREADS, DECODE_KTILE and DECODE_MAX_ROWS in kernels/attention.cu.
const DECODE_THREADS: u32 = 128;
const DECODE_KTILE: usize = 32;
const DECODE_MAX_ROWS: usize = 16;

/// How the decode kernels split a cached batch: `splits` parts of `split_len` keys each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeSplit {
    pub splits: usize,
    pub split_len: usize,
}

impl AttnBatch {
    /// The decode kernels' plan for this batch, when they serve it: a KV-cache batch (not packed)
    /// whose new rows times the GQA group fit one block (at most 16), head_dim 64 or 128, any
    /// kernel choice but `Simple`. The cache is split so that about DECODE_TARGET_BLOCKS blocks run.
    pub fn decode_split(&self, hd: Heads) -> Option<DecodeSplit> {
        let group = hd.heads / hd.kv_heads;
        let max_q = self.cu_q.windows(2).map(|w| (w[1] - w[0]) as usize).max()?;
        let longest = self.k_len.iter().copied().max()? as usize;
        let max_keys = self.key_capacity.unwrap_or(longest);
        if self.packed
            || self.kernel == AttnKernel::Simple
            || !matches!(hd.head_dim, 64 | 128)
            || max_q == 0
            || max_q * group > DECODE_MAX_ROWS
            || max_keys == 0
        {
            return None;
        }
        let blocks = self.sequences() * hd.kv_heads;
        let tiles = max_keys.div_ceil(DECODE_KTILE);
        let wanted = DECODE_TARGET_BLOCKS.div_ceil(blocks).clamp(1, tiles);
        let split_len = tiles.div_ceil(wanted) * DECODE_KTILE;
        Some(DecodeSplit {
            splits: max_keys.div_ceil(split_len),
            split_len,
        })
    }
}

impl AttnBatch {
    /// A packed batch of sequences of these lengths: rows `0..len0` are the first, and so on.
    pub fn packed(seq_lens: &[usize], device: &Device) -> Result<AttnBatch> {
        let mut cu = vec![0i32];
        for &l in seq_lens {
            cu.push(cu.last().unwrap() + to_i32(OP_FWD, "sequence length", l)?);
        }
        let k_start = cu[..seq_lens.len()].to_vec();
        let k_len: Vec<i32> = seq_lens.iter().map(|&l| l as i32).collect();
        AttnBatch::new(cu, k_start, k_len, true, device)
    }

    /// Queries `q_lens[b]` rows per sequence (packed), keys in a cache: sequence b's keys are rows
    /// `k_start[b] .. k_start[b] + k_len[b]`, the last `q_lens[b]` of them the queries' own.
    pub fn cached(
        q_lens: &[usize],
        k_start: &[usize],
        k_len: &[usize],
        device: &Device,
    ) -> Result<AttnBatch> {
        let mut cu = vec![0i32];
        for (&q, &k) in q_lens.iter().zip(k_len) {
            if q > k {
                return Err(Error::shape(
                    OP_FWD,
                    format!("{q} queries but only {k} keys"),
                ));
            }
            cu.push(cu.last().unwrap() + to_i32(OP_FWD, "query length", q)?);
        }
        let ks = k_start
            .iter()
            .map(|&s| to_i32(OP_FWD, "key start", s))
            .collect::<Result<_>>()?;
        let kl = k_len
            .iter()
            .map(|&s| to_i32(OP_FWD, "key length", s))
            .collect::<Result<_>>()?;
        AttnBatch::new(cu, ks, kl, false, device)
    }

    fn new(
        cu_q: Vec<i32>,
        k_start: Vec<i32>,
        k_len: Vec<i32>,
        packed: bool,
        device: &Device,
    ) -> Result<AttnBatch> {
        let tiles = query_tiles(&cu_q, FLASH_TILE);
        let dev = match device {
            Device::Cpu => None,
            Device::Cuda(_) => Some(DeviceTables {
                cu_q: Tensor::from_i32(&[cu_q.len()], cu_q.clone(), device)?,
                k_start: Tensor::from_i32(&[k_start.len()], k_start.clone(), device)?,
                k_len: Tensor::from_i32(&[k_len.len()], k_len.clone(), device)?,
                tiles: std::sync::OnceLock::new(),
                wide_tiles: std::sync::OnceLock::new(),
                live: None,
            }),
        };
        Ok(AttnBatch {
            cu_q,
            k_start,
            k_len,
            packed,
            kernel: AttnKernel::default_choice(),
            deterministic: deterministic(),
            key_capacity: None,
            tiles,
            live_from: None,
            dev,
        })
    }

    /// This packed batch with the first `live[b]` rows of sequence b dead: their outputs are
    /// dropped and their output gradients must be zero, so the flash kernels may skip them (what
    /// the forward writes there is unspecified); dK and dV are what all rows would give. The
    /// backward still reads `out` and `lse` on dead rows that share a tile with live ones, so it
    /// needs there what a forward of every row gives (the model passes copies of the rows the dead
    /// ones repeat). Each sequence keeps a live row.
    pub fn with_live_from(mut self, live: &[usize]) -> Result<AttnBatch> {
        let lens: Vec<usize> = self
            .cu_q
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .collect();
        if !self.packed || live.len() != lens.len() {
            return Err(Error::shape(
                OP_FWD,
                format!(
                    "{} first live rows for a {} batch of {} sequences",
                    live.len(),
                    if self.packed { "packed" } else { "KV-cache" },
                    lens.len()
                ),
            ));
        }
        if let Some(b) = (0..lens.len()).find(|&b| live[b] >= lens[b]) {
            return Err(Error::shape(
                OP_FWD,
                format!(
                    "sequence {b}: first live row {} of {} rows",
                    live[b], lens[b]
                ),
            ));
        }
        let keep = |rows: usize| -> Vec<i32> {
            query_tiles(&self.cu_q, rows)
                .chunks(2)
                .filter(|t| (t[1] as usize + rows) > live[t[0] as usize])
                .flatten()
                .copied()
                .collect()
        };
        let (tiles, wide_tiles) = (keep(FLASH_TILE), keep(HOPPER_ROWS));
        self.live_from = Some(LiveRows {
            dead: live.to_vec(),
            tiles: tiles.len() / 2,
            wide_tiles: wide_tiles.len() / 2,
        });
        if let Some(t) = self.dev.as_mut() {
            let d = t.cu_q.device().clone();
            let from: Vec<i32> = live.iter().map(|&l| l as i32).collect();
            t.live = Some((
                Tensor::from_i32(&[from.len()], from, &d)?,
                Tensor::from_i32(&[tiles.len()], tiles, &d)?,
                Tensor::from_i32(&[wide_tiles.len()], wide_tiles, &d)?,
            ));
        }
        Ok(self)
    }

    /// The forward's query tiles (128-row ones if `wide`) on the device and their count: without
    /// the dead tiles where the batch has some.
    fn forward_tiles(&self, op: &'static str, wide: bool) -> Result<(&Tensor, usize)> {
        let tables = self.device_tables(op)?;
        Ok(match (&self.live_from, &tables.live) {
            (Some(live), Some((_, tiles, _))) if !wide => (tiles, live.tiles),
            (Some(live), Some((_, _, wide_tiles))) => (wide_tiles, live.wide_tiles),
            _ if wide => (self.device_tiles(op, wide)?, self.wide_tile_count()),
            _ => (self.device_tiles(op, wide)?, self.tile_count()),
        })
    }

    /// The device table of first live rows, for the dK/dV kernels (None where all rows live).
    fn device_live_from(&self, op: &'static str) -> Result<Option<&Tensor>> {
        Ok(self
            .device_tables(op)?
            .live
            .as_ref()
            .map(|(from, _, _)| from))
    }

    /// The device copies of the tables, for `op`'s launch; an error if the batch is a CPU one.
    fn device_tables(&self, op: &'static str) -> Result<&DeviceTables> {
        self.dev.as_ref().ok_or_else(|| Error::DeviceMismatch {
            op,
            detail: "the batch was built for the CPU".into(),
        })
    }

    /// The device copy of the query-tile list (of 128-row tiles if `wide`), for `op`'s flash
    /// launch.
    fn device_tiles(&self, op: &'static str, wide: bool) -> Result<&Tensor> {
        let tables = self.device_tables(op)?;
        if self.tiles.is_empty() {
            return Err(Error::Unsupported {
                op,
                detail: "a batch with no query rows has no tiles to launch".into(),
            });
        }
        let cell = if wide {
            &tables.wide_tiles
        } else {
            &tables.tiles
        };
        if let Some(t) = cell.get() {
            return Ok(t);
        }
        let list = if wide {
            query_tiles(&self.cu_q, HOPPER_ROWS)
        } else {
            self.tiles.clone()
        };
        let t = Tensor::from_i32(&[list.len()], list, tables.cu_q.device())?;
        Ok(cell.get_or_init(|| t))
    }

    /// This KV-cache batch with every sequence's keys able to grow to `capacity` (see
    /// `key_capacity`).
    pub fn with_key_capacity(mut self, capacity: usize) -> Result<AttnBatch> {
        self.check_key_lens(&self.k_len, Some(capacity))?;
        self.key_capacity = Some(capacity);
        Ok(self)
    }

    /// New key counts for a KV-cache batch's sequences (the cache grew), on the host and in the
    /// device table in place, so a recorded step that reads the table sees them. Each must still
    /// cover its sequence's query rows and stay within the key capacity, if one was given.
    pub fn set_key_lens(&mut self, k_len: &[usize]) -> Result<()> {
        self.set_host_key_lens(k_len)?;
        if let Some(tables) = self.dev.as_mut() {
            tables.k_len.write_i32(&self.k_len)?;
        }
        Ok(())
    }

    /// `set_key_lens` on the host only, for a caller that fills the device table itself (see
    /// `copy_key_lens`).
    pub(crate) fn set_host_key_lens(&mut self, k_len: &[usize]) -> Result<()> {
        let lens = k_len
            .iter()
            .map(|&l| to_i32(OP_FWD, "key length", l))
            .collect::<Result<Vec<i32>>>()?;
        self.check_key_lens(&lens, self.key_capacity)?;
        self.k_len = lens;
        Ok(())
    }

    /// Fills the device table of key counts from `words[at..at + sequences]` (i32, on the device)
    /// with one device-to-device copy, which a graph can record; the host's counts are the
    /// caller's to keep in step (`set_host_key_lens`).
    pub(crate) fn copy_key_lens(&mut self, words: &Tensor, at: usize) -> Result<()> {
        let b = self.sequences();
        match self.dev.as_mut() {
            Some(tables) => tables.k_len.copy_elements(0, words, at, b),
            None => Err(Error::Unsupported {
                op: OP_FWD,
                detail: "a batch on the host has no device table of key counts".into(),
            }),
        }
    }

    fn check_key_lens(&self, k_len: &[i32], capacity: Option<usize>) -> Result<()> {
        if self.packed || k_len.len() != self.sequences() {
            return Err(Error::shape(
                OP_FWD,
                format!(
                    "{} key lengths for a {} batch of {} sequences",
                    k_len.len(),
                    if self.packed { "packed" } else { "KV-cache" },
                    self.sequences()
                ),
            ));
        }
        for (b, (w, &k)) in self.cu_q.windows(2).zip(k_len).enumerate() {
            let q = w[1] - w[0];
            if k < q || capacity.is_some_and(|c| k as usize > c) {
                return Err(Error::shape(
                    OP_FWD,
                    format!(
                        "sequence {b}: {k} keys for {q} queries, capacity {}",
                        capacity.map_or("unbounded".into(), |c| c.to_string())
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The same batch run by `kernel` on CUDA.
    pub fn with_kernel(mut self, kernel: AttnKernel) -> AttnBatch {
        self.kernel = kernel;
        self
    }

    /// The same batch with the deterministic (or the fast) flash backward.
    pub fn with_deterministic(mut self, on: bool) -> AttnBatch {
        self.deterministic = on;
        self
    }

    /// Matrix-product FLOPs of the forward: 4·D per (query, visible key) pair and head (Q·Kᵀ and
    /// P·V), causal bottom-right as the kernels run it; dead query rows (`with_live_from`) count
    /// nothing.
    pub fn forward_flops(&self, hd: Heads) -> f64 {
        let dead = |b: usize| self.live_from.as_ref().map_or(0.0, |l| l.dead[b] as f64);
        let pairs: f64 = self
            .cu_q
            .windows(2)
            .zip(&self.k_len)
            .enumerate()
            .map(|(b, (w, &k))| {
                let (q, k, d) = ((w[1] - w[0]) as f64, k as f64, dead(b));
                q * (k - q) + q * (q + 1.0) / 2.0 - d * (d + 1.0) / 2.0
            })
            .sum();
        4.0 * (hd.heads * hd.head_dim) as f64 * pairs
    }

    fn tile_count(&self) -> usize {
        self.tiles.len() / 2
    }

    fn wide_tile_count(&self) -> usize {
        self.cu_q
            .windows(2)
            .map(|w| ((w[1] - w[0]) as usize).div_ceil(HOPPER_ROWS))
            .sum()
    }

    pub fn sequences(&self) -> usize {
        self.k_len.len()
    }

    pub fn query_rows(&self) -> usize {
        *self.cu_q.last().unwrap() as usize
    }

    /// Rows of `k` and `v` the batch reads: they must exist.
    fn key_rows_needed(&self) -> usize {
        self.k_start
            .iter()
            .zip(&self.k_len)
            .map(|(&s, &l)| (s + l) as usize)
            .max()
            .unwrap_or(0)
    }
}

/// `[tiles, 2]` (sequence, first local query row) of every `rows`-row query tile of a batch with
/// query row offsets `cu_q`, in sequence order.
fn query_tiles(cu_q: &[i32], rows: usize) -> Vec<i32> {
    let mut tiles = Vec::new();
    for (b, w) in cu_q.windows(2).enumerate() {
        for start in (0..w[1] - w[0]).step_by(rows) {
            tiles.extend([b as i32, start]);
        }
    }
    tiles
}

/// Head geometry: `heads` query heads, `kv_heads` key/value heads, `head_dim` each.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// CPU reference forward. out: [Nq, H·D]; lse: [Nq, H].
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd_ref<F: Float>(
    out: &mut [F],
    lse: &mut [F],
    q: &[F],
    k: &[F],
    v: &[F],
    batch: &AttnBatch,
    hd: Heads,
    scale: F,
) {
    let (h_n, kv, d) = (hd.heads, hd.kv_heads, hd.head_dim);
    for b in 0..batch.sequences() {
        let (q0, q1) = (batch.cu_q[b] as usize, batch.cu_q[b + 1] as usize);
        let (k0, kl) = (batch.k_start[b] as usize, batch.k_len[b] as usize);
        for (iq, row) in (q0..q1).enumerate() {
            let n_keys = kl - (q1 - q0) + iq + 1;
            for h in 0..h_n {
                let g = h / (h_n / kv);
                let qv = &q[(row * h_n + h) * d..][..d];
                let scores: Vec<F> = (0..n_keys)
                    .map(|j| {
                        let kv_row = &k[((k0 + j) * kv + g) * d..][..d];
                        qv.iter()
                            .zip(kv_row)
                            .fold(F::zero(), |s, (&a, &b)| s + a * b)
                            * scale
                    })
                    .collect();
                let m = scores.iter().copied().fold(F::neg_infinity(), F::max);
                let sum = scores.iter().fold(F::zero(), |s, &x| s + (x - m).exp());
                lse[row * h_n + h] = m + sum.ln();
                let o = &mut out[(row * h_n + h) * d..][..d];
                o.iter_mut().for_each(|x| *x = F::zero());
                for (j, &s) in scores.iter().enumerate() {
                    let p = (s - m).exp() / sum;
                    let vr = &v[((k0 + j) * kv + g) * d..][..d];
                    for (x, &vv) in o.iter_mut().zip(vr) {
                        *x = *x + p * vv;
                    }
                }
            }
        }
    }
}

/// CPU reference backward for a packed batch: dq, dk, dv overwritten.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd_ref<F: Float>(
    dq: &mut [F],
    dk: &mut [F],
    dv: &mut [F],
    dout: &[F],
    q: &[F],
    k: &[F],
    v: &[F],
    out: &[F],
    lse: &[F],
    batch: &AttnBatch,
    hd: Heads,
    scale: F,
) {
    let (h_n, kv, d) = (hd.heads, hd.kv_heads, hd.head_dim);
    dq.iter_mut()
        .chain(dk.iter_mut())
        .chain(dv.iter_mut())
        .for_each(|x| *x = F::zero());
    let dot = |a: &[F], b: &[F]| a.iter().zip(b).fold(F::zero(), |s, (&x, &y)| s + x * y);
    for b in 0..batch.sequences() {
        let (q0, q1) = (batch.cu_q[b] as usize, batch.cu_q[b + 1] as usize);
        for i in q0..q1 {
            for h in 0..h_n {
                let g = h / (h_n / kv);
                let qi = (i * h_n + h) * d;
                let delta = dot(&dout[qi..qi + d], &out[qi..qi + d]);
                for j in q0..=i {
                    let kj = (j * kv + g) * d;
                    let p = (dot(&q[qi..qi + d], &k[kj..kj + d]) * scale - lse[i * h_n + h]).exp();
                    let ds = p * (dot(&dout[qi..qi + d], &v[kj..kj + d]) - delta);
                    for x in 0..d {
                        dq[qi + x] = dq[qi + x] + scale * ds * k[kj + x];
                        dk[kj + x] = dk[kj + x] + scale * ds * q[qi + x];
                        dv[kj + x] = dv[kj + x] + p * dout[qi + x];
                    }
                }
            }
        }
    }
}

fn check(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    batch: &AttnBatch,
    hd: Heads,
    scale: f32,
) -> Result<usize> {
    // The kernels take the row max of the raw scores and scale afterwards, which needs scale > 0.
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::Unsupported {
            op,
            detail: format!("the softmax scale must be positive and finite, got {scale}"),
        });
    }
    let (nq, wq) = q.dims2(op)?;
    let (nk, wk) = k.dims2(op)?;
    if hd.kv_heads == 0 || !hd.heads.is_multiple_of(hd.kv_heads) {
        return Err(Error::shape(
            op,
            format!(
                "{} query heads are not a multiple of {} kv heads",
                hd.heads, hd.kv_heads
            ),
        ));
    }
    if wq != hd.heads * hd.head_dim || wk != hd.kv_heads * hd.head_dim {
        return Err(Error::shape(
            op,
            format!(
                "q is [{nq}, {wq}] and k [{nk}, {wk}]; expected widths {} and {}",
                hd.heads * hd.head_dim,
                hd.kv_heads * hd.head_dim
            ),
        ));
    }
    v.expect_shape(op, "v", k.shape())?;
    for t in [k, v] {
        t.expect_dtype(op, q.dtype())?;
    }
    if batch.query_rows() != nq || batch.key_rows_needed() > nk {
        return Err(Error::shape(
            op,
            format!(
                "the batch covers {} query rows and {} key rows; q has {nq}, k {nk}",
                batch.query_rows(),
                batch.key_rows_needed()
            ),
        ));
    }
    if hd.head_dim > 1024 {
        return Err(Error::Unsupported {
            op,
            detail: format!("head_dim {} over 1024", hd.head_dim),
        });
    }
    Ok(nq)
}

/// Returns (out `[Nq, H·D]` in q's dtype, lse `[Nq, H]` f32).
pub fn attention_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    batch: &AttnBatch,
    hd: Heads,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let device = same_device(OP_FWD, &[q, k, v])?;
    let nq = check(OP_FWD, q, k, v, batch, hd, scale)?;
    let _profile = profile::scope_counting(device, || OP_FWD.into(), batch.forward_flops(hd));
    match device {
        Device::Cpu => {
            let (mut out, mut lse) = (vec![0.0f32; q.numel()], vec![0.0f32; nq * hd.heads]);
            attention_fwd_ref(
                &mut out,
                &mut lse,
                &host_f32(q, OP_FWD)?,
                &host_f32(k, OP_FWD)?,
                &host_f32(v, OP_FWD)?,
                batch,
                hd,
                scale,
            );
            Ok((
                Tensor::from_f32_as(q.shape(), &out, q.dtype(), device)?,
                Tensor::from_f32(&[nq, hd.heads], lse, device)?,
            ))
        }
        Device::Cuda(_) => match q.dtype() {
            DType::F32 => fwd_cuda::<f32>(q, k, v, batch, hd, scale),
            DType::BF16 => fwd_cuda::<bf16>(q, k, v, batch, hd, scale),
            DType::I32 => Err(Error::DType {
                op: OP_FWD,
                dtype: "i32",
            }),
        },
    }
}

/// Returns (dq, dk, dv) for a packed batch.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    batch: &AttnBatch,
    hd: Heads,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let device = same_device(OP_BWD, &[dout, q, k, v, out, lse])?;
    let nq = check(OP_BWD, q, k, v, batch, hd, scale)?;
    // The usual convention: the backward counts 2.5 forwards.
    let flops = 2.5 * batch.forward_flops(hd);
    let _profile = profile::scope_counting(device, || OP_BWD.into(), flops);
    if !batch.packed {
        return Err(Error::Unsupported {
            op: OP_BWD,
            detail: "the backward needs a packed batch (keys are the query rows)".into(),
        });
    }
    dout.expect_shape(OP_BWD, "dout", q.shape())?;
    out.expect_shape(OP_BWD, "out", q.shape())?;
    lse.expect_shape(OP_BWD, "lse", &[nq, hd.heads])?;
    match device {
        Device::Cpu => {
            let (mut dq, mut dk, mut dv) = (
                vec![0.0f32; q.numel()],
                vec![0.0f32; k.numel()],
                vec![0.0f32; v.numel()],
            );
            attention_bwd_ref(
                &mut dq,
                &mut dk,
                &mut dv,
                &host_f32(dout, OP_BWD)?,
                &host_f32(q, OP_BWD)?,
                &host_f32(k, OP_BWD)?,
                &host_f32(v, OP_BWD)?,
                &host_f32(out, OP_BWD)?,
                lse.cpu_f32(OP_BWD)?,
                batch,
                hd,
                scale,
            );
            Ok((
                Tensor::from_f32_as(q.shape(), &dq, q.dtype(), device)?,
                Tensor::from_f32_as(k.shape(), &dk, k.dtype(), device)?,
                Tensor::from_f32_as(v.shape(), &dv, v.dtype(), device)?,
            ))
        }
        Device::Cuda(_) => match q.dtype() {
            DType::F32 => bwd_cuda::<f32>(dout, q, k, v, out, lse, batch, hd, scale),
            DType::BF16 => bwd_cuda::<bf16>(dout, q, k, v, out, lse, batch, hd, scale),
            DType::I32 => Err(Error::DType {
                op: OP_BWD,
                dtype: "i32",
            }),
        },
    }
}

/// Says once per (dtype, head_dim) that CUDA attention runs on the simple kernel, which is far
/// slower than the flash kernels, and why.
fn warn_simple_fallback(dtype: DType, head_dim: usize) {
    static WARNED: std::sync::Mutex<Vec<(DType, usize)>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    if warned.contains(&(dtype, head_dim)) {
        return;
    }
    warned.push((dtype, head_dim));
    eprintln!(
        "note: attention in {} with head_dim {head_dim} runs the simple CUDA kernel (no tensor \
         cores, tens of times slower): the flash kernels take bf16 with head_dim 64 or 128",
        dtype.name()
    );
}

fn threads(head_dim: usize) -> u32 {
    (head_dim.max(128).div_ceil(32) * 32) as u32
}

fn grid(
    op: &'static str,
    rows: usize,
    heads: usize,
    head_dim: usize,
    shared_floats: usize,
) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (to_i32(op, "rows", rows)? as u32, heads as u32, 1),
        block_dim: (threads(head_dim), 1, 1),
        shared_mem_bytes: (shared_floats * 4) as u32,
    })
}

fn fwd_cuda<T: CudaElem>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    batch: &AttnBatch,
    hd: Heads,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let dev = q.device().as_cuda(OP_FWD)?;
    let nq = batch.query_rows();
    let mut out = Tensor::empty(q.shape(), T::DTYPE, q.device())?;
    let mut lse = Tensor::empty(&[nq, hd.heads], DType::F32, q.device())?;
    if nq == 0 {
        return Ok((out, lse));
    }
    let tables = batch.device_tables(OP_FWD)?;
    let (cu, ks, kl) = (&tables.cu_q, &tables.k_start, &tables.k_len);
    let (b_n, h, kv, d) = (
        batch.sequences() as i32,
        hd.heads as i32,
        hd.kv_heads as i32,
        hd.head_dim as i32,
    );
    if let Some(split) = batch.decode_split(hd) {
        decode_fwd_cuda::<T>(&mut out, &mut lse, q, k, v, batch, hd, scale, split)?;
        return Ok((out, lse));
    }
    if batch.kernel.flash(T::DTYPE, hd.head_dim) {
        flash_fwd_cuda(&mut out, &mut lse, q, k, v, batch, hd, scale)?;
        return Ok((out, lse));
    }
    if batch.kernel != AttnKernel::Simple {
        warn_simple_fallback(T::DTYPE, hd.head_dim);
    }
    let f = dev.function(
        "attention",
        T::pick("attention_fwd_f32", "attention_fwd_bf16"),
    )?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(T::slice_mut(&mut out, OP_FWD)?)
        .arg(lse.cuda_f32_mut(OP_FWD)?)
        .arg(T::slice(q, OP_FWD)?)
        .arg(T::slice(k, OP_FWD)?)
        .arg(T::slice(v, OP_FWD)?)
        .arg(cu.cuda_i32(OP_FWD)?)
        .arg(ks.cuda_i32(OP_FWD)?)
        .arg(kl.cuda_i32(OP_FWD)?)
        .arg(&b_n)
        .arg(&h)
        .arg(&kv)
        .arg(&d)
        .arg(&scale);
    // SAFETY: `check` matched q, k, v to the batch's rows and the head geometry; one block per
    // (query row, head) with head_dim floats of dynamic shared memory.
    unsafe { l.launch(grid(OP_FWD, nq, hd.heads, hd.head_dim, hd.head_dim)?) }?;
    Ok((out, lse))
}

#[allow(clippy::too_many_arguments)]
fn bwd_cuda<T: CudaElem>(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    batch: &AttnBatch,
    hd: Heads,
    scale: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let device = q.device();
    let dev = device.as_cuda(OP_BWD)?;
    let nq = batch.query_rows();
    let mut dk = Tensor::empty(k.shape(), T::DTYPE, device)?;
    let mut dv = Tensor::empty(v.shape(), T::DTYPE, device)?;
    if nq == 0 {
        return Ok((Tensor::empty(q.shape(), T::DTYPE, device)?, dk, dv));
    }
    let tables = batch.device_tables(OP_BWD)?;
    let (cu, ks, kl) = (&tables.cu_q, &tables.k_start, &tables.k_len);
    let (b_n, h, kv, d) = (
        batch.sequences() as i32,
        hd.heads as i32,
        hd.kv_heads as i32,
        hd.head_dim as i32,
    );
    let mut delta = Tensor::empty(&[nq, hd.heads], DType::F32, device)?;
    let f = dev.function(
        "attention",
        T::pick("attention_bwd_dot_f32", "attention_bwd_dot_bf16"),
    )?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(delta.cuda_f32_mut(OP_BWD)?)
        .arg(T::slice(dout, OP_BWD)?)
        .arg(T::slice(out, OP_BWD)?)
        .arg(&h)
        .arg(&d);
    // SAFETY: dout and out hold nq*H*D elements, delta nq*H; one block per (row, head).
    unsafe { l.launch(grid(OP_BWD, nq, hd.heads, hd.head_dim, 0)?) }?;
    if batch.kernel.flash(T::DTYPE, hd.head_dim) {
        let dq = flash_bwd_cuda(
            &mut dk, &mut dv, dout, q, k, v, lse, &delta, batch, hd, scale,
        )?;
        return Ok((dq, dk, dv));
    }

    let mut dq = Tensor::empty(q.shape(), T::DTYPE, device)?;
    let f = dev.function(
        "attention",
        T::pick("attention_bwd_dq_f32", "attention_bwd_dq_bf16"),
    )?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(T::slice_mut(&mut dq, OP_BWD)?)
        .arg(T::slice(q, OP_BWD)?)
        .arg(T::slice(k, OP_BWD)?)
        .arg(T::slice(v, OP_BWD)?)
        .arg(T::slice(dout, OP_BWD)?)
        .arg(lse.cuda_f32(OP_BWD)?)
        .arg(delta.cuda_f32(OP_BWD)?)
        .arg(cu.cuda_i32(OP_BWD)?)
        .arg(ks.cuda_i32(OP_BWD)?)
        .arg(kl.cuda_i32(OP_BWD)?)
        .arg(&b_n)
        .arg(&h)
        .arg(&kv)
        .arg(&d)
        .arg(&scale);
    // SAFETY: as the forward; 2*head_dim floats of dynamic shared memory.
    unsafe { l.launch(grid(OP_BWD, nq, hd.heads, hd.head_dim, 2 * hd.head_dim)?) }?;

    let f = dev.function(
        "attention",
        T::pick("attention_bwd_dkv_f32", "attention_bwd_dkv_bf16"),
    )?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(T::slice_mut(&mut dk, OP_BWD)?)
        .arg(T::slice_mut(&mut dv, OP_BWD)?)
        .arg(T::slice(q, OP_BWD)?)
        .arg(T::slice(k, OP_BWD)?)
        .arg(T::slice(v, OP_BWD)?)
        .arg(T::slice(dout, OP_BWD)?)
        .arg(lse.cuda_f32(OP_BWD)?)
        .arg(delta.cuda_f32(OP_BWD)?)
        .arg(cu.cuda_i32(OP_BWD)?)
        .arg(&b_n)
        .arg(&h)
        .arg(&kv)
        .arg(&d)
        .arg(&scale);
    // SAFETY: packed batch, so key rows are the nq query rows; one block per (key row, kv head).
    unsafe { l.launch(grid(OP_BWD, nq, hd.kv_heads, hd.head_dim, 2 * hd.head_dim)?) }?;
    Ok((dq, dk, dv))
}

/// The decode kernels: per (sequence, KV head, split) partial softmax states over the split's keys,
/// then one merge per (query row, head) into `out` and `lse`.
#[allow(clippy::too_many_arguments)]
fn decode_fwd_cuda<T: CudaElem>(
    out: &mut Tensor,
    lse: &mut Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    batch: &AttnBatch,
    hd: Heads,
    scale: f32,
    split: DecodeSplit,
) -> Result<()> {
    let dev = q.device().as_cuda(OP_FWD)?;
    let tables = batch.device_tables(OP_FWD)?;
    let nq = batch.query_rows();
    let states = nq * hd.heads * split.splits;
    let mut po = Tensor::empty(&[states, hd.head_dim], DType::F32, q.device())?;
    let mut pm = Tensor::empty(&[states], DType::F32, q.device())?;
    let mut pl = Tensor::empty(&[states], DType::F32, q.device())?;
    let (h, kv, d) = (hd.heads as i32, hd.kv_heads as i32, hd.head_dim as i32);
    let (s_n, s_len) = (
        to_i32(OP_FWD, "splits", split.splits)?,
        to_i32(OP_FWD, "split length", split.split_len)?,
    );
    let name = match (T::DTYPE, hd.head_dim) {
        (DType::F32, 64) => "decode_partial_f32_d64",
        (DType::F32, _) => "decode_partial_f32_d128",
        (_, 64) => "decode_partial_bf16_d64",
        _ => "decode_partial_bf16_d128",
    };
    let f = dev.function("attention", name)?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(po.cuda_f32_mut(OP_FWD)?)
        .arg(pm.cuda_f32_mut(OP_FWD)?)
        .arg(pl.cuda_f32_mut(OP_FWD)?)
        .arg(T::slice(q, OP_FWD)?)
        .arg(T::slice(k, OP_FWD)?)
        .arg(T::slice(v, OP_FWD)?)
        .arg(tables.cu_q.cuda_i32(OP_FWD)?)
        .arg(tables.k_start.cuda_i32(OP_FWD)?)
        .arg(tables.k_len.cuda_i32(OP_FWD)?)
        .arg(&h)
        .arg(&kv)
        .arg(&scale)
        .arg(&s_n)
        .arg(&s_len);
    let grid = (
        to_i32(OP_FWD, "sequences", batch.sequences())? as u32,
        kv as u32,
        s_n as u32,
    );
    // SAFETY: `check` matched q, k, v to the batch (rows, head geometry); `decode_split` admitted
    // head_dim 64 or 128 and at most DECODE_MAX_ROWS rows per (sequence, KV head); whole-tensor
    // allocations are 16-byte aligned and every K/V row starts on a multiple of head_dim elements;
    // po, pm, pl hold nq * H * splits states, each written by exactly one block.
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: grid,
            block_dim: (DECODE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        })
    }?;
    let f = dev.function(
        "attention",
        T::pick("decode_combine_f32", "decode_combine_bf16"),
    )?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(T::slice_mut(out, OP_FWD)?)
        .arg(lse.cuda_f32_mut(OP_FWD)?)
        .arg(po.cuda_f32(OP_FWD)?)
        .arg(pm.cuda_f32(OP_FWD)?)
        .arg(pl.cuda_f32(OP_FWD)?)
        .arg(&h)
        .arg(&d)
        .arg(&s_n);
    // SAFETY: one block of head_dim threads per (query row, head) reads that row's `splits` states
    // and writes its head_dim outputs and one lse.
    unsafe {
        l.launch(LaunchConfig {
            grid_dim: (to_i32(OP_FWD, "rows", nq)? as u32, hd.heads as u32, 1),
            block_dim: (hd.head_dim as u32, 1, 1),
            shared_mem_bytes: 0,
        })
    }?;
    Ok(())
}

/// The flash kernels of kernels/attention.cu, each built for head_dim 64 and 128.
#[derive(Clone, Copy)]
enum Flash {
    Fwd,
    FwdHopper,
    /// dK/dV without atomics (the deterministic backward) and its dQ kernel.
    Dkv,
    Dq,
    /// dK/dV adding dQ with atomics (the fast backward).
    DkvDq,
    BwdHopper,
    DkvHopper,
    FwdHopperNarrow,
    BwdHopperNarrow,
    DkvHopperNarrow,
    DqHopperNarrow,
    DqHopper,
}

impl Flash {
    /// The kernel's name at `head_dim` (64, else 128).
    fn name(self, head_dim: usize) -> &'static str {
        let (d64, d128) = match self {
            Flash::Fwd => ("flash_fwd_d64", "flash_fwd_d128"),
            Flash::FwdHopper => ("flash_fwd_hopper_d64", "flash_fwd_hopper_d128"),
            Flash::Dkv => ("flash_bwd_dkv_d64", "flash_bwd_dkv_d128"),
            Flash::Dq => ("flash_bwd_dq_d64", "flash_bwd_dq_d128"),
            Flash::DkvDq => ("flash_bwd_dkv_dq_d64", "flash_bwd_dkv_dq_d128"),
            Flash::BwdHopper => ("flash_bwd_hopper_d64", "flash_bwd_hopper_d128"),
            Flash::DkvHopper => ("flash_bwd_dkv_hopper_d64", "flash_bwd_dkv_hopper_d128"),
            Flash::FwdHopperNarrow => (
                "flash_fwd_hopper_narrow_d64",
                "flash_fwd_hopper_narrow_d128",
            ),
            Flash::BwdHopperNarrow => (
                "flash_bwd_hopper_narrow_d64",
                "flash_bwd_hopper_narrow_d128",
            ),
            Flash::DkvHopperNarrow => (
                "flash_bwd_dkv_hopper_narrow_d64",
                "flash_bwd_dkv_hopper_narrow_d128",
            ),
            Flash::DqHopperNarrow => (
                "flash_bwd_dq_hopper_narrow_d64",
                "flash_bwd_dq_hopper_narrow_d128",
            ),
            Flash::DqHopper => ("flash_bwd_dq_hopper_d64", "flash_bwd_dq_hopper_d128"),
        };
        if head_dim == 64 {
            d64
        } else {
            d128
        }
    }
}

fn flash_config(
    op: &'static str,
    tiles: usize,
    heads: usize,
    smem_bytes: usize,
    threads: u32,
) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (to_i32(op, "query tiles", tiles)? as u32, heads as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem_bytes as u32,
    })
}

#[allow(clippy::too_many_arguments)]
fn flash_fwd_cuda(
    out: &mut Tensor,
    lse: &mut Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    batch: &AttnBatch,
    hd: Heads,
    scale: f32,
) -> Result<()> {
    let dev = q.device().as_cuda(OP_FWD)?;
    let tables = batch.device_tables(OP_FWD)?;
    let (cu, ks, kl) = (&tables.cu_q, &tables.k_start, &tables.k_len);
    let hopper = dev.is_hopper() && batch.kernel.wgmma();
    let wide = hopper && batch.kernel != AttnKernel::Narrow;
    let (tiles, blocks) = batch.forward_tiles(OP_FWD, wide)?;
    let (h, kv) = (hd.heads as i32, hd.kv_heads as i32);
    // The Hopper kernels: a Q tile per warpgroup and two stages of K and V, unpadded (swizzled),
    // and 1 KiB to align them to 1,024 bytes.
    let hopper_smem = |wgs: usize| (wgs + 4) * FLASH_TILE * hd.head_dim * 2 + 1024;
    let (name, smem, threads) = if wide {
        (
            Flash::FwdHopper.name(hd.head_dim),
            hopper_smem(HOPPER_ROWS / FLASH_TILE),
            HOPPER_THREADS,
        )
    } else if hopper {
        (
            Flash::FwdHopperNarrow.name(hd.head_dim),
            hopper_smem(1),
            FLASH_THREADS,
        )
    } else {
        (
            Flash::Fwd.name(hd.head_dim),
            2 * FLASH_TILE * (hd.head_dim + FLASH_PAD) * 2,
            FLASH_THREADS,
        )
    };
    let f = dev.function_with_shared("attention", name, smem, 0)?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(bf16::slice_mut(out, OP_FWD)?)
        .arg(lse.cuda_f32_mut(OP_FWD)?)
        .arg(bf16::slice(q, OP_FWD)?)
        .arg(bf16::slice(k, OP_FWD)?)
        .arg(bf16::slice(v, OP_FWD)?)
        .arg(cu.cuda_i32(OP_FWD)?)
        .arg(ks.cuda_i32(OP_FWD)?)
        .arg(kl.cuda_i32(OP_FWD)?)
        .arg(tiles.cuda_i32(OP_FWD)?)
        .arg(&h)
        .arg(&kv)
        .arg(&scale);
    // SAFETY: `check` matched q, k, v to the batch's rows and the head geometry (head_dim 64 or
    // 128, bf16); whole-tensor allocations are 16-byte aligned for cp.async; the Hopper kernel
    // aligns its tiles to 1,024 bytes inside the extra KiB it is given; one block per (query
    // tile, head) with K and V tiles in dynamic shared memory, `threads` as the kernel's launch
    // bounds say.
    unsafe { l.launch(flash_config(OP_FWD, blocks, hd.heads, smem, threads)?) }?;
    Ok(())
}

/// dK and dV into `dk`, `dv`; returns dQ.
#[allow(clippy::too_many_arguments)]
fn flash_bwd_cuda(
    dk: &mut Tensor,
    dv: &mut Tensor,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
    batch: &AttnBatch,
    hd: Heads,
    scale: f32,
) -> Result<Tensor> {
    let device = q.device();
    let dev = device.as_cuda(OP_BWD)?;
    let cu = &batch.device_tables(OP_BWD)?.cu_q;
    let hopper = dev.is_hopper() && batch.kernel.wgmma();
    let (h, kv) = (hd.heads as i32, hd.kv_heads as i32);
    let row_bytes = (hd.head_dim + FLASH_PAD) * 2;

    // K and V tiles, then two stages of (Q tile, dO tile, scaled lse, delta); the fast kernel adds
    // the tile's dSᵀ, [64][FLASH_BWD_QTILE + FLASH_PAD] bf16.
    let dkv_smem = (2 * FLASH_TILE + 4 * FLASH_BWD_QTILE) * row_bytes + 4 * FLASH_BWD_QTILE * 4;
    // The wgmma tiles are unpadded (swizzled) and 1 KiB more lets the kernels align them to 1,024
    // bytes. dK/dV (`wgs` warpgroups a block): K and V tiles for each, two stages of (Q, dO), a
    // dSᵀ block for each (unused by the deterministic kernel), where dQ's 64-column blocks do not
    // split over the warpgroups (head_dim 64, two) a K-major copy of Kᵀ, two stages of 64 scaled
    // lse and delta values. dQ: below.
    let hopper_tile = FLASH_TILE * hd.head_dim * 2;
    let narrow = batch.kernel == AttnKernel::Narrow;
    let wgs = if narrow { 1 } else { HOPPER_ROWS / FLASH_TILE };
    let kt_copy = if !(hd.head_dim / 64).is_multiple_of(wgs) {
        wgs * hopper_tile
    } else {
        0
    };
    let hopper_dkv_smem = (2 * wgs + 4) * hopper_tile
        + wgs * FLASH_TILE * 64 * 2
        + kt_copy
        + 4 * FLASH_TILE * 4
        + 1024;
    let (name, smem) = match (batch.deterministic, hopper) {
        (false, true) if narrow => (Flash::BwdHopperNarrow.name(hd.head_dim), hopper_dkv_smem),
        (false, true) => (Flash::BwdHopper.name(hd.head_dim), hopper_dkv_smem),
        (false, false) => (
            Flash::DkvDq.name(hd.head_dim),
            dkv_smem + FLASH_TILE * (FLASH_BWD_QTILE + FLASH_PAD) * 2,
        ),
        (true, true) if narrow => (Flash::DkvHopperNarrow.name(hd.head_dim), hopper_dkv_smem),
        (true, true) => (Flash::DkvHopper.name(hd.head_dim), hopper_dkv_smem),
        (true, false) => (Flash::Dkv.name(hd.head_dim), dkv_smem),
    };
    // The fast kernels add dQ into f32 with atomics; the deterministic one leaves it to a kernel
    // of its own below.
    let mut dq_acc = (!batch.deterministic)
        .then(|| Tensor::zeros(q.shape(), DType::F32, device))
        .transpose()?;
    let wide = hopper && !narrow;
    let tiles = batch.device_tiles(OP_BWD, wide)?;
    let live_from = batch.device_live_from(OP_BWD)?;
    let null = 0u64;
    let f = dev.function_with_shared("attention", name, smem, 0)?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(bf16::slice_mut(dk, OP_BWD)?)
        .arg(bf16::slice_mut(dv, OP_BWD)?);
    if let Some(acc) = dq_acc.as_mut() {
        l.arg(acc.cuda_f32_mut(OP_BWD)?);
    }
    l.arg(bf16::slice(q, OP_BWD)?)
        .arg(bf16::slice(k, OP_BWD)?)
        .arg(bf16::slice(v, OP_BWD)?)
        .arg(bf16::slice(dout, OP_BWD)?)
        .arg(lse.cuda_f32(OP_BWD)?)
        .arg(delta.cuda_f32(OP_BWD)?)
        .arg(cu.cuda_i32(OP_BWD)?)
        .arg(tiles.cuda_i32(OP_BWD)?);
    // Null where every row is live: the kernels then start at each key tile's own query tile.
    match live_from {
        Some(t) => l.arg(t.cuda_i32(OP_BWD)?),
        None => l.arg(&null),
    };
    l.arg(&h).arg(&kv).arg(&scale);
    let (blocks, threads) = if wide {
        (batch.wide_tile_count(), HOPPER_THREADS)
    } else {
        (batch.tile_count(), FLASH_THREADS)
    };
    // SAFETY: a packed batch, so key tiles are the query tiles (128-row ones for the Hopper
    // kernels); live_from, where given, holds a row below its length for each sequence
    // (`with_live_from`); one block per (key tile, kv head), each writing only its own key rows of dk and dv
    // and, in the fast kernels (whose extra argument dq_acc is), adding atomically into rows of
    // dq_acc, [Nq, H·D] f32 like q's shape. The Hopper kernel aligns its tiles inside the extra KiB
    // it is given.
    unsafe { l.launch(flash_config(OP_BWD, blocks, hd.kv_heads, smem, threads)?) }?;
    if let Some(acc) = dq_acc {
        return crate::ops::elementwise::cast(&acc, DType::BF16);
    }

    let mut dq = Tensor::empty(q.shape(), DType::BF16, device)?;
    // mma.sync: two stages of (K tile, V tile), FLASH_BWD_QTILE rows each; Q and dO are staged
    // through the first. Hopper: Q and dO tiles for each warpgroup, two stages of (K, V).
    let (name, smem) = if hopper {
        let kernel = if narrow {
            Flash::DqHopperNarrow
        } else {
            Flash::DqHopper
        };
        (kernel.name(hd.head_dim), (2 * wgs + 4) * hopper_tile + 1024)
    } else {
        (Flash::Dq.name(hd.head_dim), 4 * FLASH_BWD_QTILE * row_bytes)
    };
    let f = dev.function_with_shared("attention", name, smem, 0)?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(bf16::slice_mut(&mut dq, OP_BWD)?)
        .arg(bf16::slice(q, OP_BWD)?)
        .arg(bf16::slice(k, OP_BWD)?)
        .arg(bf16::slice(v, OP_BWD)?)
        .arg(bf16::slice(dout, OP_BWD)?)
        .arg(lse.cuda_f32(OP_BWD)?)
        .arg(delta.cuda_f32(OP_BWD)?)
        .arg(cu.cuda_i32(OP_BWD)?)
        .arg(tiles.cuda_i32(OP_BWD)?)
        .arg(&h)
        .arg(&kv)
        .arg(&scale);
    // SAFETY: as above (the Hopper kernel aligns its tiles inside the extra KiB); one block per
    // (query tile, head), each writing only its own rows of dq; the same tiles and block size as
    // the dK/dV kernel.
    unsafe { l.launch(flash_config(OP_BWD, blocks, hd.heads, smem, threads)?) }?;
    Ok(dq)
}
