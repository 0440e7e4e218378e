//! The Llama-family decoder: forward keeping what the backward needs, and the backward written by
//! hand, layer by layer, as llm.c does. One code path for both devices: every step is an op from
//! `ops`, which runs the CPU reference (f32) or the CUDA kernels (bf16 activations and weights, f32
//! accumulation and f32 gradients).
//!
//! Batches are packed: the token rows of every sequence one after another, no padding; positions
//! restart at 0 for each sequence. Sequences may share a prefix (chosen and rejected responses to
//! one prompt, a group of samples from one prompt): its rows are run once, and attention reads them
//! from every sequence that begins with them (see [`SharedPrefix`]). Parameter gradients accumulate
//! (`+=`) into a [`Params`] of f32 tensors, so gradient accumulation over micro-batches is just
//! several backward calls.

use super::config::LlamaConfig;
use super::weights::{LayerParams, Params};
use crate::device::cuda::DeviceGraph;
use crate::device::{DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::attention::{attention_bwd, attention_fwd, AttnBatch, Heads};
use crate::ops::elementwise::{bias_add, bias_grad, cast};
use crate::ops::embed::{embed_bwd, embed_fwd, rows_store, rows_store_pair, rows_sum, RowGroups};
use crate::ops::matmul::{gemm, matmul, Trans};
use crate::ops::mlp::{swiglu_bwd, swiglu_bwd_and_h, swiglu_fwd};
use crate::ops::norm::{
    add_rms_norm_fwd, rms_norm_bwd, rms_norm_bwd_add, rms_norm_fwd, RmsNormOut,
};
use crate::ops::rope::{rope_qkv_bwd, rope_qkv_fwd};
use crate::ops::sample::sample_plain_into;

pub struct Model {
    pub cfg: LlamaConfig,
    pub params: Params,
    pub device: Device,
    /// Activations and weights: f32 on the CPU, bf16 on CUDA.
    pub dtype: DType,
    inv_freq: Tensor,
    /// Recompute each layer's activations in the backward instead of keeping them (saves memory,
    /// costs one more forward).
    pub recompute: bool,
    /// Trainers build batches in which sequences with one prompt run it once (see
    /// [`SharedPrefix`]); off, each runs its own copy (the same results up to rounding).
    pub share_prompts: bool,
}

/// A packed batch of token sequences.
#[derive(Debug, Clone)]
pub struct Batch {
    pub tokens: Vec<i32>,
    /// The rows each sequence holds in `tokens` (after its shared prefix, if any).
    pub seq_lens: Vec<usize>,
    /// Per sequence (or empty: none shares): the prefix it shares with an earlier sequence.
    pub shared: Vec<Option<SharedPrefix>>,
}

/// A sequence that begins with the first `len` tokens of sequence `from`: those tokens are not
/// repeated in the batch, its own rows are the rest of it (at positions from `len`), and attention
/// reads `from`'s first `len` rows as this sequence's first keys and values. Every layer but
/// attention then runs the prefix once for all the sequences that share it; results are those of the
/// batch with the prefix repeated (the prefix rows' gradients are the sum of what each sequence
/// sends them). `from` must be earlier and share nothing itself; `len` at least 1 and at most its
/// length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedPrefix {
    pub from: usize,
    pub len: usize,
}

impl Batch {
    pub fn new(seqs: &[Vec<i32>]) -> Batch {
        Batch {
            tokens: seqs.concat(),
            seq_lens: seqs.iter().map(Vec::len).collect(),
            shared: Vec::new(),
        }
    }

    fn prefix_len(&self, i: usize) -> usize {
        self.shared.get(i).copied().flatten().map_or(0, |p| p.len)
    }

    /// Each sequence's shared prefix length (0 where it shares none).
    pub fn prefix_lens(&self) -> Vec<usize> {
        (0..self.seq_lens.len())
            .map(|i| self.prefix_len(i))
            .collect()
    }

    /// Tokens of the batch with every shared prefix repeated: what a trainer without sharing runs.
    pub fn unshared_len(&self) -> usize {
        self.full_lens().iter().sum()
    }

    /// Each sequence's whole length, its shared prefix included.
    pub fn full_lens(&self) -> Vec<usize> {
        (0..self.seq_lens.len())
            .map(|i| self.prefix_len(i) + self.seq_lens[i])
            .collect()
    }

    /// The packed attention layout the model runs the batch with: every shared prefix repeated
    /// in each sequence that reads it, the repeats dead query rows (`AttnBatch::with_live_from`).
    pub fn attention_batch(&self, device: &Device) -> Result<AttnBatch> {
        let packed = AttnBatch::packed(&self.full_lens(), device)?;
        if self.shared.iter().all(Option::is_none) {
            return Ok(packed);
        }
        packed.with_live_from(&self.prefix_lens())
    }

    /// The sharing is one the model can run: see [`SharedPrefix`].
    pub fn check_shared(&self) -> Result<()> {
        let bad = |i: usize, why: String| {
            Err(Error::shape(
                "model",
                format!("sequence {i}'s shared prefix: {why}"),
            ))
        };
        if self.shared.is_empty() {
            return Ok(());
        }
        if self.shared.len() != self.seq_lens.len() {
            return Err(Error::shape(
                "model",
                format!(
                    "{} shared-prefix entries for {} sequences",
                    self.shared.len(),
                    self.seq_lens.len()
                ),
            ));
        }
        for (i, p) in self.shared.iter().enumerate() {
            let Some(p) = p else { continue };
            if p.from >= i {
                return bad(i, format!("sequence {} is not an earlier one", p.from));
            }
            if self.shared[p.from].is_some() {
                return bad(i, format!("sequence {} shares a prefix itself", p.from));
            }
            if p.len == 0 || p.len > self.seq_lens[p.from] {
                return bad(
                    i,
                    format!(
                        "{} tokens of sequence {}, which holds {}",
                        p.len, p.from, self.seq_lens[p.from]
                    ),
                );
            }
        }
        Ok(())
    }

    /// Where prefixes are shared, the rows of `attention_batch`: per attention row the batch row it
    /// copies; per batch row its own attention row; per batch row every attention row that copies
    /// it (its own first).
    fn attention_rows(&self) -> (Vec<usize>, Vec<usize>, Vec<Vec<usize>>) {
        let offsets = self.offsets();
        let mut expand = Vec::with_capacity(self.unshared_len());
        let mut own = vec![0; self.len()];
        let mut copies: Vec<Vec<usize>> = vec![Vec::new(); self.len()];
        for (i, &stored) in self.seq_lens.iter().enumerate() {
            if let Some(p) = self.shared.get(i).copied().flatten() {
                let start = offsets[p.from];
                for (r, c) in copies[start..start + p.len].iter_mut().enumerate() {
                    c.push(expand.len());
                    expand.push(start + r);
                }
            }
            for (r, o) in own[offsets[i]..offsets[i] + stored].iter_mut().enumerate() {
                *o = expand.len();
                expand.push(offsets[i] + r);
            }
        }
        let groups = (0..self.len())
            .map(|r| {
                std::iter::once(own[r])
                    .chain(copies[r].iter().copied())
                    .collect()
            })
            .collect();
        (expand, own, groups)
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Row offsets of each sequence: `[0, len0, len0 + len1, ...]`.
    pub fn offsets(&self) -> Vec<usize> {
        let mut o = vec![0];
        for &l in &self.seq_lens {
            o.push(o.last().unwrap() + l);
        }
        o
    }

    fn positions(&self) -> Vec<i32> {
        (0..self.seq_lens.len())
            .flat_map(|i| {
                let p = self.prefix_len(i) as i32;
                p..p + self.seq_lens[i] as i32
            })
            .collect()
    }
}

/// What one layer's backward needs besides its input and its mid-layer residual stream `h` (kept
/// beside it in `Activations`: the next layer's first RMSNorm adds to `h`, so `h` outlives the rest).
/// The two normalised inputs and the SwiGLU output are `None` in what `forward` keeps: the backward
/// recomputes them (two RMSNorms and one SwiGLU, bit for bit the forward's values). Of the
/// 6·d + 2·d_kv + 3·I values a token and layer held (with the layer's input), that drops 2·d + I:
/// 32% for SmolLM2-135M (d 576, d_kv 192, I 1,536), for about 14 KB of extra reads and writes a token
/// and layer in the backward.
struct LayerActs {
    xn1: Option<Tensor>,
    rstd1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn: Tensor,
    lse: Tensor,
    xn2: Option<Tensor>,
    rstd2: Tensor,
    gate_up: Tensor,
    act: Option<Tensor>,
}

impl LayerActs {
    fn bytes(&self) -> usize {
        let opt = |t: &Option<Tensor>| t.as_ref().map_or(0, Tensor::bytes);
        [
            &self.rstd1,
            &self.q,
            &self.k,
            &self.v,
            &self.attn,
            &self.lse,
            &self.rstd2,
            &self.gate_up,
        ]
        .iter()
        .map(|t| t.bytes())
        .sum::<usize>()
            + opt(&self.xn1)
            + opt(&self.xn2)
            + opt(&self.act)
    }

    /// Without what the backward can recompute cheaply.
    fn lean(self) -> Self {
        LayerActs {
            xn1: None,
            xn2: None,
            act: None,
            ..self
        }
    }
}

/// The forward's saved state; `hidden` is the final normalised hidden state `[N, d]`.
pub struct Activations {
    ids: Tensor,
    positions: Tensor,
    attn: AttnBatch,
    shared: Option<SharedRows>,
    /// The input of every layer (and of the final norm, last).
    inputs: Vec<Tensor>,
    /// Each layer's residual stream after attention, `h = x + o(attention)`, and (next) its saved
    /// state: `None`, both, when the model recomputes layers in the backward.
    mids: Vec<Option<Tensor>>,
    layers: Vec<Option<LayerActs>>,
    rstd_final: Tensor,
    pub hidden: Tensor,
}

impl Activations {
    /// Bytes of every tensor kept for the backward (the layers' inputs and saved state, the final
    /// norm's statistics and the hidden state).
    pub fn saved_bytes(&self) -> usize {
        let layers: usize = self.layers.iter().flatten().map(LayerActs::bytes).sum();
        let mids: usize = self.mids.iter().flatten().map(Tensor::bytes).sum();
        let inputs: usize = self.inputs.iter().map(Tensor::bytes).sum();
        layers + mids + inputs + self.rstd_final.bytes() + self.hidden.bytes()
    }
}

/// Where sequences share prefixes (see [`SharedPrefix`]): attention runs on rows that repeat each
/// shared prefix in every sequence reading it, gathered from the batch's rows, and its results
/// come back to the batch rows (each row's own copy forward; the sum of every copy's gradient
/// backward, in a fixed order). The repeated rows are dead query rows of the packed batch
/// (`AttnBatch::with_live_from`): their outputs are dropped and their output gradients zero, so
/// the flash kernels skip their whole query tiles; their keys and values are read as usual.
struct SharedRows {
    /// `[Nv]`: the batch row each attention row copies.
    expand: Tensor,
    /// `[N]`: each batch row's attention row in its own sequence.
    own: Tensor,
    /// Per batch row, every attention row that copies it.
    groups: RowGroups,
}

/// A layer's input: the residual stream as a tensor (the embedding, for the first layer), or the
/// previous layer's mid-layer stream and its MLP output, whose sum the layer's first RMSNorm forms
/// in the same pass (so no separate residual add reads and writes the stream).
enum LayerInput<'a> {
    Ready(&'a Tensor),
    Sum(&'a Tensor, &'a Tensor),
}

/// Token ids, positions, the attention layout and, where prefixes are shared, its rows.
type BatchInputs = (Tensor, Tensor, AttnBatch, Option<SharedRows>);

/// What a layer's forward returns.
struct LayerOut {
    /// The layer's input when it was formed here (`LayerInput::Sum`).
    input: Option<Tensor>,
    /// `h = x + o(attention)`, the residual stream after attention.
    h: Tensor,
    /// The MLP's output: the layer's output is `h + mlp`, formed by the next RMSNorm.
    mlp: Tensor,
    acts: LayerActs,
}

/// A tensor the forward kept, or its value recomputed now (see `LayerActs`), living only as long as
/// the caller needs it; `gather_rows` returns its input or new rows the same way.
enum Kept<'a> {
    Saved(&'a Tensor),
    Recomputed(Tensor),
}

impl std::ops::Deref for Kept<'_> {
    type Target = Tensor;

    fn deref(&self) -> &Tensor {
        match self {
            Kept::Saved(t) => t,
            Kept::Recomputed(t) => t,
        }
    }
}

fn kept_or<'a>(
    kept: &'a Option<Tensor>,
    recompute: impl FnOnce() -> Result<Tensor>,
) -> Result<Kept<'a>> {
    Ok(match kept {
        Some(t) => Kept::Saved(t),
        None => Kept::Recomputed(recompute()?),
    })
}

/// `x · wᵀ (+ b)`: a linear layer with weight `[out, in]`.
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = matmul(x, Trans::N, w, Trans::T)?;
    match b {
        Some(b) => bias_add(&y, b),
        None => Ok(y),
    }
}

/// Backward of `linear`: returns dx; `dw += dyᵀ · x` (and `db += Σ dy`).
fn linear_bwd(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    dw: &mut Tensor,
    db: Option<&mut Tensor>,
) -> Result<Tensor> {
    gemm(dw, dy, Trans::T, x, Trans::N, 1.0, 1.0)?;
    if let Some(db) = db {
        bias_grad(db, dy)?;
    }
    matmul(dy, Trans::N, w, Trans::N)
}

impl Model {
    /// The model computes in its parameters' dtype: the device's compute dtype (bf16 on CUDA), or
    /// f32 anywhere (on CUDA that is the exact twin of the CPU path, for checking and debugging).
    pub fn new(cfg: LlamaConfig, params: Params, device: Device) -> Result<Model> {
        let dtype = params.embed.dtype();
        if dtype != device.compute_dtype() && dtype != DType::F32 {
            return Err(Error::DType {
                op: "Model::new",
                dtype: params.embed.dtype().name(),
            });
        }
        let inv_freq = Tensor::from_f32(&[cfg.head_dim / 2], cfg.inv_freq(), &device)?;
        Ok(Model {
            cfg,
            params,
            device,
            dtype,
            inv_freq,
            recompute: false,
            share_prompts: true,
        })
    }

    /// A model of `cfg`'s shape with random weights (benchmarks, tests) in the device's compute dtype.
    pub fn random(cfg: &LlamaConfig, seed: u64, device: &Device) -> Result<Model> {
        Model::new(
            cfg.clone(),
            Params::random(cfg, seed, device, device.compute_dtype())?,
            device.clone(),
        )
    }

    /// Loads a Hugging Face folder (`config.json` and safetensors weights) onto `device`.
    pub fn load(dir: &std::path::Path, device: &Device) -> Result<Model> {
        let cfg = LlamaConfig::load(&dir.join("config.json"))?;
        let dtype = device.compute_dtype();
        let params = Params::load(&cfg, dir, device, dtype)?;
        Model::new(cfg, params, device.clone())
    }

    pub(crate) fn heads(&self) -> Heads {
        Heads {
            heads: self.cfg.num_heads,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    fn scale(&self) -> f32 {
        1.0 / (self.cfg.head_dim as f32).sqrt()
    }

    fn eps(&self) -> f32 {
        self.cfg.rms_norm_eps as f32
    }

    /// The output projection: `lm_head`, or the embedding when tied.
    pub fn lm_head(&self) -> &Tensor {
        self.params.lm_head.as_ref().unwrap_or(&self.params.embed)
    }

    /// Checks ids against the vocabulary: a bad id is an error, not a NaN.
    fn check_tokens(&self, tokens: &[i32]) -> Result<()> {
        let v = self.cfg.vocab_size as i32;
        if let Some((i, t)) = tokens.iter().enumerate().find(|(_, &t)| t < 0 || t >= v) {
            return Err(Error::Unsupported {
                op: "model",
                detail: format!("token id {t} at position {i} is outside the vocabulary of {v}"),
            });
        }
        Ok(())
    }

    /// One layer forward on `input`. `kv` decides where keys and values come from: the fresh rows
    /// (training) or a cache that the fresh rows are appended to first.
    fn layer_fwd(
        &self,
        l: &LayerParams,
        input: LayerInput<'_>,
        positions: &Tensor,
        attn: &AttnBatch,
        shared: Option<&SharedRows>,
        mut kv: Option<CacheWrite>,
    ) -> Result<LayerOut> {
        let heads = self.heads();
        let (formed, n1) = match input {
            LayerInput::Ready(x) => (None, rms_norm_fwd(x, &l.attn_norm, self.eps())?),
            LayerInput::Sum(h, mlp) => {
                let o = add_rms_norm_fwd(h, mlp, &l.attn_norm, self.eps())?;
                (Some(o.h), o.norm)
            }
        };
        let x = match (&formed, &input) {
            (Some(x), _) => x,
            (None, LayerInput::Ready(x)) => *x,
            (None, LayerInput::Sum(..)) => unreachable!("a summed input is formed above"),
        };
        let RmsNormOut {
            y: xn1,
            rstd: rstd1,
        } = n1;
        let (q, k, v) = rope_qkv_fwd(
            &linear(&xn1, &l.qkv, l.qkv_bias.as_ref())?,
            positions,
            &self.inv_freq,
            heads.heads,
            heads.kv_heads,
        )?;
        let (a, lse) = match kv.as_mut() {
            None => self.attend(&q, &k, &v, attn, shared)?,
            Some(c) => {
                rows_store_pair(c.k, &k, c.v, &v, c.rows)?;
                attention_fwd(&q, c.k, c.v, attn, heads, self.scale())?
            }
        };
        let n2 = add_rms_norm_fwd(x, &linear(&a, &l.o, None)?, &l.mlp_norm, self.eps())?;
        let RmsNormOut {
            y: xn2,
            rstd: rstd2,
        } = n2.norm;
        let gate_up = linear(&xn2, &l.gate_up, None)?;
        let act = swiglu_fwd(&gate_up)?;
        let mlp = linear(&act, &l.down, None)?;
        Ok(LayerOut {
            input: formed,
            h: n2.h,
            mlp,
            acts: LayerActs {
                xn1: Some(xn1),
                rstd1,
                q,
                k,
                v,
                attn: a,
                lse,
                xn2: Some(xn2),
                rstd2,
                gate_up,
                act: Some(act),
            },
        })
    }

    /// Every layer and the final RMSNorm from the embedded tokens `x`, each layer's output add
    /// folded into the next RMSNorm. `keep_layer(x, acts)` receives each layer's input and state as
    /// soon as the layer has run, and `keep_mid(h)` its mid-layer stream once the next layer has
    /// added to it, both in layer order; what they drop is freed then (one layer's state at a time
    /// for a forward that keeps nothing). Returns the final norm's input and output. With `cache`,
    /// each layer appends its keys and values to it (`rows`: the cache row of each new row) and
    /// attends over the cache.
    #[allow(clippy::too_many_arguments)]
    fn run_layers(
        &self,
        x: Tensor,
        positions: &Tensor,
        attn: &AttnBatch,
        shared: Option<&SharedRows>,
        mut cache: Option<(&mut KvCache, &Tensor)>,
        mut keep_layer: impl FnMut(Tensor, LayerActs),
        mut keep_mid: impl FnMut(Tensor),
    ) -> Result<(Tensor, RmsNormOut)> {
        let mut first = Some(x);
        // The previous layer's mid-layer stream and MLP output.
        let mut prev: Option<(Tensor, Tensor)> = None;
        for (i, l) in self.params.layers.iter().enumerate() {
            let kv = cache.as_mut().map(|(c, rows)| CacheWrite {
                k: &mut c.k[i],
                v: &mut c.v[i],
                rows,
            });
            let input = match (&first, &prev) {
                (Some(x), _) => LayerInput::Ready(x),
                (None, Some((h, mlp))) => LayerInput::Sum(h, mlp),
                (None, None) => unreachable!("each layer after the first has a previous one"),
            };
            let out = self.layer_fwd(l, input, positions, attn, shared, kv)?;
            let x = match out.input {
                Some(x) => x,
                None => first.take().expect("the first layer's input"),
            };
            keep_layer(x, out.acts);
            if let Some((h, _)) = prev.take() {
                keep_mid(h);
            }
            prev = Some((out.h, out.mlp));
        }
        match prev {
            None => {
                let x = first.expect("no layers: the input goes to the final norm");
                let o = rms_norm_fwd(&x, &self.params.norm, self.eps())?;
                Ok((x, o))
            }
            Some((h, mlp)) => {
                let o = add_rms_norm_fwd(&h, &mlp, &self.params.norm, self.eps())?;
                keep_mid(h);
                Ok((o.h, o.norm))
            }
        }
    }

    /// Token ids, positions and the attention layout of a packed batch on the device.
    fn batch_inputs(&self, batch: &Batch) -> Result<BatchInputs> {
        self.check_tokens(&batch.tokens)?;
        batch.check_shared()?;
        self.warn_past_context(batch.full_lens().into_iter().max().unwrap_or(0));
        let n = batch.len();
        let dev = &self.device;
        let ids = Tensor::from_i32(&[n], batch.tokens.clone(), dev)?;
        let positions = Tensor::from_i32(&[n], batch.positions(), dev)?;
        let attn = batch.attention_batch(dev)?;
        if batch.shared.iter().all(Option::is_none) {
            return Ok((ids, positions, attn, None));
        }
        let (expand, own, groups) = batch.attention_rows();
        let as_i32 = |v: Vec<usize>| v.into_iter().map(|r| r as i32).collect::<Vec<i32>>();
        let shared = SharedRows {
            groups: RowGroups::new(&groups, expand.len(), dev)?,
            expand: Tensor::from_i32(&[expand.len()], as_i32(expand), dev)?,
            own: Tensor::from_i32(&[n], as_i32(own), dev)?,
        };
        Ok((ids, positions, attn, Some(shared)))
    }

    /// Attention of the batch rows `q`, `k`, `v` (see `SharedRows` for shared prefixes).
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        attn: &AttnBatch,
        shared: Option<&SharedRows>,
    ) -> Result<(Tensor, Tensor)> {
        let (heads, scale) = (self.heads(), self.scale());
        let Some(s) = shared else {
            return attention_fwd(q, k, v, attn, heads, scale);
        };
        let expand = |t: &Tensor| embed_fwd(t, &s.expand);
        let (a, lse) = attention_fwd(&expand(q)?, &expand(k)?, &expand(v)?, attn, heads, scale)?;
        Ok((embed_fwd(&a, &s.own)?, embed_fwd(&lse, &s.own)?))
    }

    /// `attend`'s backward: (dq, dk, dv) of the batch rows.
    fn attend_bwd(
        &self,
        dattn: &Tensor,
        a: &LayerActs,
        attn: &AttnBatch,
        shared: Option<&SharedRows>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (heads, scale) = (self.heads(), self.scale());
        let Some(s) = shared else {
            return attention_bwd(dattn, &a.q, &a.k, &a.v, &a.attn, &a.lse, attn, heads, scale);
        };
        let expand = |t: &Tensor| embed_fwd(t, &s.expand);
        // Only each row's own copy has an output gradient; a repeated prefix row's output was
        // dropped, so its zero gradient gives it no part in dq, dk or dv (and its dq is zero).
        let mut dout = Tensor::zeros(
            &[s.groups.src_rows(), dattn.shape()[1]],
            dattn.dtype(),
            dattn.device(),
        )?;
        rows_store(&mut dout, dattn, &s.own)?;
        let (dq, dk, dv) = attention_bwd(
            &dout,
            &expand(&a.q)?,
            &expand(&a.k)?,
            &expand(&a.v)?,
            &expand(&a.attn)?,
            &expand(&a.lse)?,
            attn,
            heads,
            scale,
        )?;
        drop(dout);
        Ok((
            embed_fwd(&dq, &s.own)?,
            rows_sum(&dk, &s.groups)?,
            rows_sum(&dv, &s.groups)?,
        ))
    }

    /// Rotary positions extrapolate past the context the model was trained on, with no error and
    /// worse outputs (as in transformers); say so once a process rather than not at all.
    pub(crate) fn warn_past_context(&self, longest: usize) {
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        let limit = self.cfg.max_position_embeddings;
        if longest > limit && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!(
                "warning: a sequence of {longest} tokens runs past this model's max_position_embeddings = {limit}; positions beyond it extrapolate (lower --max-len to stay inside)"
            );
        }
    }

    /// The final normalised hidden state `[N, d]` of a packed batch, keeping nothing for a backward:
    /// for models that are not trained (references, reward models, old log-probs), whose saved
    /// activations would otherwise sit beside the trained model's and double a step's memory.
    pub fn forward_frozen(&self, batch: &Batch) -> Result<Tensor> {
        let (ids, positions, attn, shared) = self.batch_inputs(batch)?;
        let x = embed_fwd(&self.params.embed, &ids)?;
        let (_, o) =
            self.run_layers(x, &positions, &attn, shared.as_ref(), None, |_, _| {}, drop)?;
        Ok(o.y)
    }

    /// The forward over a packed batch, keeping what `backward` needs.
    pub fn forward(&self, batch: &Batch) -> Result<Activations> {
        let (ids, positions, attn, shared) = self.batch_inputs(batch)?;
        let x = embed_fwd(&self.params.embed, &ids)?;
        let mut inputs = Vec::with_capacity(self.cfg.num_layers + 1);
        let mut mids = Vec::with_capacity(self.cfg.num_layers);
        let mut layers = Vec::with_capacity(self.cfg.num_layers);
        let keep = !self.recompute;
        let (x, o) = self.run_layers(
            x,
            &positions,
            &attn,
            shared.as_ref(),
            None,
            |x, acts| {
                inputs.push(x);
                layers.push(keep.then(|| acts.lean()));
            },
            |h| mids.push(keep.then_some(h)),
        )?;
        inputs.push(x);
        Ok(Activations {
            ids,
            positions,
            attn,
            shared,
            inputs,
            mids,
            layers,
            rstd_final: o.rstd,
            hidden: o.y,
        })
    }

    /// Backward from `dhidden` (`[N, d]`, the gradient of the loss with respect to `hidden`, any
    /// float dtype), accumulating into `grads` (f32, same layout as the parameters).
    pub fn backward(&self, acts: &Activations, dhidden: &Tensor, grads: &mut Params) -> Result<()> {
        let mut dx = {
            let dh = cast(dhidden, self.dtype)?;
            rms_norm_bwd(
                &dh,
                acts.inputs.last().unwrap(),
                &self.params.norm,
                &acts.rstd_final,
                &mut grads.norm,
            )?
        };
        for (i, l) in self.params.layers.iter().enumerate().rev() {
            let x = &acts.inputs[i];
            let recomputed;
            let (h, a) = match (&acts.mids[i], &acts.layers[i]) {
                (Some(h), Some(a)) => (h, a),
                _ => {
                    let input = LayerInput::Ready(x);
                    let shared = acts.shared.as_ref();
                    let out =
                        self.layer_fwd(l, input, &acts.positions, &acts.attn, shared, None)?;
                    recomputed = (out.h, out.acts);
                    (&recomputed.0, &recomputed.1)
                }
            };
            dx = self.layer_bwd(
                l,
                &mut grads.layers[i],
                x,
                h,
                a,
                &acts.positions,
                &acts.attn,
                acts.shared.as_ref(),
                &dx,
            )?;
        }
        embed_bwd(&mut grads.embed, &dx, &acts.ids)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_bwd(
        &self,
        l: &LayerParams,
        g: &mut LayerParams,
        x: &Tensor,
        h: &Tensor,
        a: &LayerActs,
        positions: &Tensor,
        attn: &AttnBatch,
        shared: Option<&SharedRows>,
        dout: &Tensor,
    ) -> Result<Tensor> {
        let heads = self.heads();
        // Kept tensors, or the forward's values recomputed (see LayerActs); a recomputed one lives
        // only while its products need it.
        // MLP: out = h + down(swiglu(gate_up(xn2))), gate and up from one GEMM.
        let dgate_up = match &a.act {
            Some(act) => {
                let dact = linear_bwd(dout, act, &l.down, &mut g.down, None)?;
                swiglu_bwd(&dact, &a.gate_up)?
            }
            // The activation comes back from the same pass as the gradients (one read of gate
            // and up, not two), in time for the down projection's weight gradient.
            None => {
                let dact = matmul(dout, Trans::N, &l.down, Trans::N)?;
                let (dgate_up, act) = swiglu_bwd_and_h(&dact, &a.gate_up)?;
                gemm(&mut g.down, dout, Trans::T, &act, Trans::N, 1.0, 1.0)?;
                dgate_up
            }
        };
        let dxn2 = {
            let xn2 = kept_or(&a.xn2, || Ok(rms_norm_fwd(h, &l.mlp_norm, self.eps())?.y))?;
            linear_bwd(&dgate_up, &xn2, &l.gate_up, &mut g.gate_up, None)?
        };
        drop(dgate_up);
        let dh = rms_norm_bwd_add(&dxn2, h, &l.mlp_norm, &a.rstd2, &mut g.mlp_norm, dout)?;
        // Attention: h = x + o(attention(rope(q, k), v)), (q, k, v) = qkv(xn1) from one GEMM.
        let dattn = linear_bwd(&dh, &a.attn, &l.o, &mut g.o, None)?;
        let (dq, dk, dv) = self.attend_bwd(&dattn, a, attn, shared)?;
        let dqkv = rope_qkv_bwd(
            &dq,
            &dk,
            &dv,
            positions,
            &self.inv_freq,
            heads.heads,
            heads.kv_heads,
        )?;
        drop((dq, dk, dv));
        let xn1 = kept_or(&a.xn1, || Ok(rms_norm_fwd(x, &l.attn_norm, self.eps())?.y))?;
        let dxn1 = linear_bwd(&dqkv, &xn1, &l.qkv, &mut g.qkv, g.qkv_bias.as_mut())?;
        rms_norm_bwd_add(&dxn1, x, &l.attn_norm, &a.rstd1, &mut g.attn_norm, &dh)
    }

    /// Rows `rows` of `hidden` times the LM head: logits `[rows.len(), V]` as f32 on the host.
    pub fn logits_rows(&self, hidden: &Tensor, rows: &[usize]) -> Result<Vec<f32>> {
        self.logits_rows_tensor(hidden, rows)?.to_f32_vec()
    }

    /// `logits_rows` left on the model's device, in its dtype.
    pub fn logits_rows_tensor(&self, hidden: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let h = gather_rows(hidden, rows, &self.device)?;
        matmul(&h, Trans::N, self.lm_head(), Trans::T)
    }

    fn score_weight(&self) -> Result<&Tensor> {
        self.params
            .score
            .as_ref()
            .ok_or_else(|| Error::Unsupported {
                op: "scalar_head",
                detail: "this model has no score head".into(),
            })
    }

    /// The scalar head on every row: `[N]` values (reward and value models).
    pub fn scalar_head(&self, hidden: &Tensor) -> Result<Tensor> {
        head_values(hidden, self.score_weight()?)
    }

    /// Backward of `scalar_head` for upstream `dvalues` `[N]` f32: returns dhidden (f32); `dscore +=`.
    pub fn scalar_head_bwd(
        &self,
        hidden: &Tensor,
        dvalues: &Tensor,
        dscore: &mut Tensor,
    ) -> Result<Tensor> {
        head_values_bwd(hidden, self.score_weight()?, dvalues, dscore)
    }
}

/// Whether `rows` lists each of `n` rows once, in order (a decode step's last rows).
fn is_every_row(rows: &[usize], n: usize) -> bool {
    rows.len() == n && rows.iter().enumerate().all(|(i, &r)| i == r)
}

/// Rows `rows` of `x` `[N, d]` as a `[rows.len(), d]` tensor: `x` itself when `rows` is every row in
/// order, with no upload or launch.
fn gather_rows<'a>(x: &'a Tensor, rows: &[usize], device: &Device) -> Result<Kept<'a>> {
    if is_every_row(rows, x.shape()[0]) {
        return Ok(Kept::Saved(x));
    }
    Ok(Kept::Recomputed(embed_fwd(x, &row_ids(rows, device)?)?))
}

/// Row indices as the `[rows.len()]` i32 ids `embed_fwd` gathers with.
fn row_ids(rows: &[usize], device: &Device) -> Result<Tensor> {
    Tensor::from_i32(
        &[rows.len()],
        rows.iter().map(|&r| r as i32).collect(),
        device,
    )
}

/// `hidden · wᵀ` for a `[1, d]` head: one f32 value per row.
pub fn head_values(hidden: &Tensor, w: &Tensor) -> Result<Tensor> {
    let n = hidden.shape()[0];
    cast(&matmul(hidden, Trans::N, w, Trans::T)?, DType::F32)?.reshape(&[n])
}

/// Backward of `head_values` for upstream `dvalues` `[N]` f32: returns dhidden `[N, d]` f32 and adds
/// the head's gradient into `dw` (`[1, d]` f32).
pub fn head_values_bwd(
    hidden: &Tensor,
    w: &Tensor,
    dvalues: &Tensor,
    dw: &mut Tensor,
) -> Result<Tensor> {
    let n = hidden.shape()[0];
    let dv = cast(&dvalues.duplicate()?.reshape(&[n, 1])?, hidden.dtype())?;
    gemm(dw, &dv, Trans::T, hidden, Trans::N, 1.0, 1.0)?;
    let mut dh = Tensor::zeros(hidden.shape(), DType::F32, hidden.device())?;
    gemm(&mut dh, &dv, Trans::N, w, Trans::N, 1.0, 0.0)?;
    Ok(dh)
}

/// Where a layer writes its new keys and values: `(cache row, fresh row, rows)` copies.
pub(crate) struct CacheWrite<'a> {
    pub k: &'a mut Tensor,
    pub v: &'a mut Tensor,
    /// `[N]` i32: the cache row each new row's key and value go to.
    pub rows: &'a Tensor,
}

/// Keys and values of every layer for a batch of sequences, `capacity` positions each.
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    pub lens: Vec<usize>,
    pub capacity: usize,
}

impl KvCache {
    pub fn new(model: &Model, sequences: usize, capacity: usize) -> Result<KvCache> {
        let width = model.cfg.num_kv_heads * model.cfg.head_dim;
        let make = || Tensor::zeros(&[sequences * capacity, width], model.dtype, &model.device);
        let k = (0..model.cfg.num_layers)
            .map(|_| make())
            .collect::<Result<_>>()?;
        let v = (0..model.cfg.num_layers)
            .map(|_| make())
            .collect::<Result<_>>()?;
        Ok(KvCache {
            k,
            v,
            lens: vec![0; sequences],
            capacity,
        })
    }

    /// The attention layout of a step in which sequence b takes `q_lens[b]` new rows: its keys are
    /// its region of the cache, grown by them. The decode kernels split the cache by its capacity,
    /// so every step, eager or replayed from a graph, sums in the same order.
    fn attn_batch(&self, q_lens: &[usize], device: &Device) -> Result<AttnBatch> {
        let k_start: Vec<usize> = (0..q_lens.len()).map(|b| b * self.capacity).collect();
        let k_len: Vec<usize> = q_lens.iter().zip(&self.lens).map(|(q, l)| q + l).collect();
        AttnBatch::cached(q_lens, &k_start, &k_len, device)?.with_key_capacity(self.capacity)
    }

    /// Sequence `owners[b]`'s cached rows copied to sequence b wherever they differ (b empty so
    /// far): a prompt shared by several sequences, run once.
    pub(crate) fn copy_sequences(&mut self, owners: &[usize]) -> Result<()> {
        let (mut from, mut to) = (Vec::new(), Vec::new());
        for (b, &o) in owners.iter().enumerate() {
            if o == b {
                continue;
            }
            let rows = 0..self.lens[o];
            from.extend(rows.clone().map(|j| (o * self.capacity + j) as i32));
            to.extend(rows.map(|j| (b * self.capacity + j) as i32));
            self.lens[b] = self.lens[o];
        }
        let Some(device) = self.k.first().map(|t| t.device().clone()) else {
            return Ok(());
        };
        if from.is_empty() {
            return Ok(());
        }
        let from = Tensor::from_i32(&[from.len()], from, &device)?;
        let to = Tensor::from_i32(&[to.len()], to, &device)?;
        for (k, v) in self.k.iter_mut().zip(&mut self.v) {
            let (ks, vs) = (embed_fwd(k, &from)?, embed_fwd(v, &from)?);
            rows_store_pair(k, &ks, v, &vs, &to)?;
        }
        Ok(())
    }

    /// Where a step's new rows go when sequence b takes `q_lens[b]` of them after what it holds:
    /// their positions and their cache rows, in row order. An error if a sequence has no room.
    fn place(&self, q_lens: &[usize]) -> Result<(Vec<i32>, Vec<i32>)> {
        let (mut positions, mut slots) = (Vec::new(), Vec::new());
        for (b, (&q, &l)) in q_lens.iter().zip(&self.lens).enumerate() {
            if l + q > self.capacity {
                return Err(Error::Unsupported {
                    op: "generate",
                    detail: format!(
                        "sequence {b} needs {} positions; the cache holds {}",
                        l + q,
                        self.capacity
                    ),
                });
            }
            positions.extend((l..l + q).map(|p| p as i32));
            let first = b * self.capacity + l;
            slots.extend((first..first + q).map(|r| r as i32));
        }
        Ok((positions, slots))
    }
}

impl Model {
    /// Runs `new_tokens[b]` (possibly empty) after what the cache holds for each sequence, appends
    /// their keys and values, and returns the final hidden state of the last new token of each
    /// sequence that had any, as rows of the returned `[rows, d]` tensor, with their sequence ids.
    pub fn forward_cached(
        &self,
        new_tokens: &[Vec<i32>],
        cache: &mut KvCache,
    ) -> Result<(Tensor, Vec<usize>)> {
        let batch = Batch::new(new_tokens);
        self.check_tokens(&batch.tokens)?;
        let q_lens: Vec<usize> = new_tokens.iter().map(Vec::len).collect();
        // Every new row's position and cache slot, so each layer appends its keys and values in
        // one launch.
        let (positions, slots) = cache.place(&q_lens)?;
        let n = batch.len();
        let ids = Tensor::from_i32(&[n], batch.tokens.clone(), &self.device)?;
        let pos = Tensor::from_i32(&[n], positions, &self.device)?;
        let attn = cache.attn_batch(&q_lens, &self.device)?;
        let offsets = batch.offsets();
        let rows = Tensor::from_i32(&[n], slots, &self.device)?;
        let hidden = self.run_cached(&ids, &pos, &rows, &attn, cache)?;
        for (l, q) in cache.lens.iter_mut().zip(&q_lens) {
            *l += q;
        }
        let seqs: Vec<usize> = (0..q_lens.len()).filter(|&b| q_lens[b] > 0).collect();
        let last: Vec<usize> = seqs.iter().map(|&b| offsets[b + 1] - 1).collect();
        let last_rows = if is_every_row(&last, n) {
            hidden
        } else {
            embed_fwd(&hidden, &row_ids(&last, &self.device)?)?
        };
        Ok((last_rows, seqs))
    }

    /// The cached forward on inputs already on the device: embedding, every layer (appending keys
    /// and values to the cache at `rows`), final norm. It copies nothing from or to the host, so a
    /// graph can record it.
    fn run_cached(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        rows: &Tensor,
        attn: &AttnBatch,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let x = embed_fwd(&self.params.embed, ids)?;
        let cache_rows = Some((cache, rows));
        Ok(self
            .run_layers(x, positions, attn, None, cache_rows, |_, _| {}, drop)?
            .1
            .y)
    }

    /// A decode step in which each of `cache`'s sequences takes one token, recorded as a CUDA
    /// graph; `None` where a step cannot be recorded: on the CPU, or when attention would not run
    /// on the decode kernels (the cache's capacity fixes their launch shape; the flash kernels'
    /// follows the lengths). With `sample_at`, the graph also samples each row of its logits at that
    /// temperature (plain or greedy, the `sample` op), so a step copies its tokens and log-probs back
    /// instead of running the sampler after it. Changes nothing in the cache; `decode_step` runs it.
    pub fn decode_graph(
        &self,
        cache: &mut KvCache,
        sample_at: Option<f32>,
    ) -> Result<Option<DecodeGraph>> {
        let Device::Cuda(dev) = &self.device else {
            return Ok(None);
        };
        let b = cache.lens.len();
        let mut attn = cache.attn_batch(&vec![1; b], &self.device)?;
        if attn.decode_split(self.heads()).is_none() {
            return Ok(None);
        }
        // One buffer holds all a step uploads (see `DecodeGraph::inputs`); the graph first copies
        // the parts into the tensors the step reads. Placeholders while recording.
        let words = STEP_INPUTS * b + if sample_at.is_some() { 2 * b } else { 0 };
        let inputs = Tensor::zeros(&[words], DType::I32, &self.device)?;
        let zeros = || Tensor::zeros(&[b], DType::I32, &self.device);
        let (mut ids, mut positions, mut rows) = (zeros()?, zeros()?, zeros()?);
        let mut logits = Tensor::empty(&[b, self.cfg.vocab_size], self.dtype, &self.device)?;
        let mut sampled = sample_at
            .map(|t| Tensor::empty(&[2 * b], DType::I32, &self.device).map(|out| (t, out)))
            .transpose()?;
        let graph = dev.capture(|| {
            ids.copy_elements(0, &inputs, 0, b)?;
            positions.copy_elements(0, &inputs, b, b)?;
            rows.copy_elements(0, &inputs, 2 * b, b)?;
            attn.copy_key_lens(&inputs, 3 * b)?;
            let hidden = self.run_cached(&ids, &positions, &rows, &attn, cache)?;
            // The LM head writes straight into the graph's logits: the eager step's GEMM, in place.
            gemm(
                &mut logits,
                &hidden,
                Trans::N,
                self.lm_head(),
                Trans::T,
                1.0,
                0.0,
            )?;
            match sampled.as_mut() {
                Some((t, out)) => sample_plain_into(&logits, *t, &inputs, STEP_INPUTS * b, out),
                None => Ok(()),
            }
        })?;
        Ok(Some(DecodeGraph {
            inputs,
            ids,
            _positions: positions,
            _rows: rows,
            attn,
            logits,
            sampled,
            graph,
        }))
    }

    /// Replays `graph`: `tokens[b]` goes after what the cache holds for sequence b (every sequence
    /// takes one). Where the graph samples, `draws` holds each row's uniform draw (any value for a
    /// row whose token is unused); otherwise it is empty. Returns the step's logits, `[sequences,
    /// vocab]`, row b for sequence b, valid until the next step, and the sampled tokens and
    /// log-probs.
    pub fn decode_step<'g>(
        &self,
        graph: &'g mut DecodeGraph,
        tokens: &[i32],
        draws: &[f64],
        cache: &mut KvCache,
    ) -> Result<DecodeOut<'g>> {
        let b = cache.lens.len();
        let want_draws = if graph.sampled.is_some() { b } else { 0 };
        if tokens.len() != b || graph.ids.numel() != b || draws.len() != want_draws {
            return Err(Error::Unsupported {
                op: "decode_step",
                detail: format!(
                    "{} tokens and {} draws for a step recorded for {} sequences ({}sampling), \
                     with a cache of {b}",
                    tokens.len(),
                    draws.len(),
                    graph.ids.numel(),
                    if want_draws > 0 { "" } else { "not " },
                ),
            });
        }
        self.check_tokens(tokens)?;
        let (positions, slots) = cache.place(&vec![1; b])?;
        let grown: Vec<usize> = cache.lens.iter().map(|l| l + 1).collect();
        graph.attn.set_host_key_lens(&grown)?;
        let mut words = Vec::with_capacity(graph.inputs.numel());
        words.extend_from_slice(tokens);
        words.extend(positions);
        words.extend(slots);
        words.extend(grown.iter().map(|&l| l as i32));
        for u in draws {
            let bits = u.to_bits();
            words.extend([bits as u32 as i32, (bits >> 32) as u32 as i32]);
        }
        graph.inputs.write_i32(&words)?;
        graph.graph.launch()?;
        cache.lens = grown;
        let sampled = match &graph.sampled {
            Some((_, out)) => {
                let out = out.to_i32_vec()?;
                let logps = out[b..].iter().map(|&w| f32::from_bits(w as u32)).collect();
                Some((out[..b].to_vec(), logps))
            }
            None => None,
        };
        Ok(DecodeOut {
            logits: &graph.logits,
            sampled,
        })
    }
}

/// Values a decode step uploads per sequence besides its draw: token, position, cache row, key count.
const STEP_INPUTS: usize = 4;

/// What a replayed decode step gives.
pub struct DecodeOut<'g> {
    /// `[sequences, vocab]`, valid until the next step.
    pub logits: &'g Tensor,
    /// Each sequence's token and its log-prob, where the graph samples.
    pub sampled: Option<(Vec<i32>, Vec<f32>)>,
}

/// A recorded decode step (see `Model::decode_graph`): its inputs and its logits live in buffers
/// the graph reads and writes at fixed addresses. A step of a small model is some 400 launches of
/// little work each, so issuing them one by one from the host, not the GPU's work, sets its time;
/// replayed, they cost one launch, one upload and (sampling in the graph) one copy back.
pub struct DecodeGraph {
    /// `[4·B (+ 2·B)]` i32: each sequence's token, then positions, cache rows and key counts, then
    /// (sampling in the graph) the draws as f64 in two words each; one upload a step.
    inputs: Tensor,
    /// What the graph copies the inputs into and its kernels read, owned here for the graph's life
    /// (the host reads none but the ids' count).
    ids: Tensor,
    _positions: Tensor,
    _rows: Tensor,
    attn: AttnBatch,
    logits: Tensor,
    /// Sampling in the graph: the temperature and `[2·B]` i32 of tokens, then log-probs' f32 bits.
    sampled: Option<(f32, Tensor)>,
    graph: DeviceGraph,
}
