//! GGUF (llama.cpp's format) to a Hugging Face folder: dequantized weights under HF names with
//! llama.cpp's Q/K row permutation undone, `config.json`, and a `tokenizer.json` /
//! `tokenizer_config.json` rebuilt from the GGUF vocabulary, merges and chat template.
//!
//! Supported: the `llama` architecture, GPT-2-style BPE vocabularies, and tensors in F32, F16, BF16,
//! Q8_0 and Q4_1. Anything else is rejected with the tensor or key named.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use half::{bf16, f16};
use serde_json::{json, Value};

use super::config::LlamaConfig;
use super::weights::{write_file_atomic, Params};
use crate::device::{DType, Device, Tensor};
use crate::error::{Error, Result};

/// A GGUF metadata value.
#[derive(Debug, Clone)]
pub enum MetaValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    fn as_u64(&self) -> Option<u64> {
        match self {
            MetaValue::Int(i) if *i >= 0 => Some(*i as u64),
            _ => None,
        }
    }
    fn as_f64(&self) -> Option<f64> {
        match self {
            MetaValue::Float(f) => Some(*f),
            MetaValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// As an error message shows it: the value, not the enum.
impl std::fmt::Display for MetaValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetaValue::Int(i) => write!(f, "{i}"),
            MetaValue::Float(x) => write!(f, "{x}"),
            MetaValue::Bool(b) => write!(f, "{b}"),
            MetaValue::Str(s) => write!(f, "{s:?}"),
            MetaValue::Array(a) => write!(f, "an array of {}", a.len()),
        }
    }
}

pub struct TensorInfo {
    pub name: String,
    /// ggml order: dims[0] is the fastest-varying (a row's length).
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

pub struct Gguf {
    pub meta: HashMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    data: Vec<u8>,
    data_start: usize,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.pos + n > self.buf.len() {
            return Err(Error::file(
                self.path,
                format!("truncated GGUF: needed {n} bytes at offset {}", self.pos),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| {
            Error::file(
                self.path,
                format!("invalid UTF-8 string at offset {}", self.pos - n),
            )
        })
    }
    fn value(&mut self, ty: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::Int(self.take(1)?[0] as i64),
            1 => MetaValue::Int(self.take(1)?[0] as i8 as i64),
            2 => MetaValue::Int(u16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64),
            3 => MetaValue::Int(i16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64),
            4 => MetaValue::Int(self.u32()? as i64),
            5 => MetaValue::Int(self.u32()? as i32 as i64),
            6 => MetaValue::Float(f32::from_le_bytes(self.take(4)?.try_into().unwrap()) as f64),
            7 => MetaValue::Bool(self.take(1)?[0] != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                let inner = self.u32()?;
                let n = self.u64()? as usize;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(inner)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::Int(self.u64()? as i64),
            11 => MetaValue::Int(self.u64()? as i64),
            12 => MetaValue::Float(f64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            other => {
                return Err(Error::file(
                    self.path,
                    format!("unknown GGUF metadata type {other} at offset {}", self.pos),
                ))
            }
        })
    }
}

const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;
const GGML_Q4_1: u32 = 3;
const GGML_Q8_0: u32 = 8;
const GGML_BF16: u32 = 30;

fn type_name(t: u32) -> String {
    match t {
        0 => "F32".into(),
        1 => "F16".into(),
        2 => "Q4_0".into(),
        3 => "Q4_1".into(),
        6 => "Q5_0".into(),
        7 => "Q5_1".into(),
        8 => "Q8_0".into(),
        10..=15 => format!("Q{}_K", t - 8),
        30 => "BF16".into(),
        other => format!("type {other}"),
    }
}

/// Bytes of `n` elements stored as `t`, or None when the type is not supported.
fn stored_bytes(t: u32, n: usize) -> Option<usize> {
    match t {
        GGML_F32 => Some(4 * n),
        GGML_F16 | GGML_BF16 => Some(2 * n),
        GGML_Q8_0 => Some(n / 32 * 34),
        GGML_Q4_1 => Some(n / 32 * 20),
        _ => None,
    }
}

/// Dequantizes `n` elements of type `t` from `b`.
fn dequantize(t: u32, b: &[u8], n: usize) -> Vec<f32> {
    let h = |x: &[u8]| f16::from_le_bytes([x[0], x[1]]).to_f32();
    match t {
        GGML_F32 => b
            .chunks_exact(4)
            .take(n)
            .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]]))
            .collect(),
        GGML_F16 => b.chunks_exact(2).take(n).map(h).collect(),
        GGML_BF16 => b
            .chunks_exact(2)
            .take(n)
            .map(|x| bf16::from_le_bytes([x[0], x[1]]).to_f32())
            .collect(),
        // Blocks of 32: an f16 scale d, then 32 signed bytes; x = d·q.
        GGML_Q8_0 => b
            .chunks_exact(34)
            .take(n / 32)
            .flat_map(|blk| {
                let d = h(&blk[..2]);
                blk[2..].iter().map(move |&q| d * (q as i8) as f32)
            })
            .collect(),
        // Blocks of 32: f16 scale d and minimum m, then 16 bytes of nibbles; the low nibbles are
        // elements 0..16, the high ones 16..32; x = d·q + m.
        GGML_Q4_1 => b
            .chunks_exact(20)
            .take(n / 32)
            .flat_map(|blk| {
                let (d, m) = (h(&blk[..2]), h(&blk[2..4]));
                let qs = &blk[4..20];
                let lo = qs.iter().map(move |&q| d * (q & 0x0f) as f32 + m);
                let hi = qs.iter().map(move |&q| d * (q >> 4) as f32 + m);
                lo.chain(hi).collect::<Vec<_>>()
            })
            .collect(),
        _ => unreachable!("checked by stored_bytes"),
    }
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf> {
        let mut data = Vec::new();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(|e| Error::io(path, e))?;
        let mut r = Reader {
            buf: &data,
            pos: 0,
            path,
        };
        if r.take(4)? != b"GGUF" {
            return Err(Error::file(path, "not a GGUF file (bad magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::file(
                path,
                format!("GGUF version {version} is not supported (2 and 3 are)"),
            ));
        }
        let (n_tensors, n_kv) = (r.u64()?, r.u64()?);
        let mut meta = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            meta.insert(key, r.value(ty)?);
        }
        let mut tensors = Vec::new();
        let mut names = std::collections::HashSet::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()? as usize;
            let dims = (0..nd).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            if !names.insert(name.clone()) {
                return Err(Error::file(
                    path,
                    format!("tensor `{name}` appears twice; which one is meant?"),
                ));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let align = match meta.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .filter(|&a| a > 0)
                .and_then(|a| usize::try_from(a).ok())
                .ok_or_else(|| {
                    Error::file(
                        path,
                        format!("`general.alignment` = {v} must be a positive integer"),
                    )
                })?,
        };
        let data_start = r.pos.checked_next_multiple_of(align).ok_or_else(|| {
            Error::file(
                path,
                format!("`general.alignment` = {align} puts the tensor data past any file"),
            )
        })?;
        Ok(Gguf {
            meta,
            tensors,
            data,
            data_start,
        })
    }

    fn meta_u64(&self, path: &Path, key: &str) -> Result<u64> {
        self.opt_meta_u64(path, key)?
            .ok_or_else(|| Error::file(path, format!("missing integer `{key}`")))
    }

    /// An optional integer key: absent is None, present with another type is an error.
    fn opt_meta_u64(&self, path: &Path, key: &str) -> Result<Option<u64>> {
        match self.meta.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                Error::file(
                    path,
                    format!("`{key}` = {v} must be a non-negative integer"),
                )
            }),
        }
    }

    /// An optional number key that must be positive and finite (a frequency base, an epsilon).
    fn opt_meta_positive(&self, path: &Path, key: &str) -> Result<Option<f64>> {
        match self.meta.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
                _ => Err(Error::file(
                    path,
                    format!("`{key}` = {v} must be a positive, finite number"),
                )),
            },
        }
    }

    fn meta_str(&self, path: &Path, key: &str) -> Result<&str> {
        self.meta
            .get(key)
            .and_then(MetaValue::as_str)
            .ok_or_else(|| Error::file(path, format!("missing string `{key}`")))
    }

    fn meta_strings(&self, path: &Path, key: &str) -> Result<Vec<String>> {
        match self.meta.get(key) {
            Some(MetaValue::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| Error::file(path, format!("`{key}` must hold strings")))
                })
                .collect(),
            _ => Err(Error::file(path, format!("missing string array `{key}`"))),
        }
    }

    /// A tensor in HF shape (dims reversed), dequantized to f32.
    pub fn tensor(&self, path: &Path, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::file(path, format!("no tensor `{name}`")))?;
        let too_big = || {
            Error::file(
                path,
                format!(
                    "tensor `{name}` has dims {:?}, too large for this file",
                    t.dims
                ),
            )
        };
        let n = t
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| usize::try_from(n).ok())
            // No stored type takes under half a byte an element.
            .filter(|&n| n / 2 <= self.data.len())
            .ok_or_else(too_big)?;
        let bytes = stored_bytes(t.ggml_type, n).ok_or_else(|| {
            Error::file(
                path,
                format!(
                    "tensor `{name}` is {}; supported: F32, F16, BF16, Q8_0, Q4_1",
                    type_name(t.ggml_type)
                ),
            )
        })?;
        if matches!(t.ggml_type, GGML_Q8_0 | GGML_Q4_1) && !n.is_multiple_of(32) {
            return Err(Error::file(
                path,
                format!("tensor `{name}` has {n} elements, not whole blocks of 32"),
            ));
        }
        let start = usize::try_from(t.offset)
            .ok()
            .and_then(|o| o.checked_add(self.data_start));
        let range = start.and_then(|s| Some(s..s.checked_add(bytes)?));
        let b = range.and_then(|r| self.data.get(r)).ok_or_else(|| {
            Error::file(
                path,
                format!("tensor `{name}` runs past the end of the file"),
            )
        })?;
        Ok((
            t.dims.iter().rev().map(|&d| d as usize).collect(),
            dequantize(t.ggml_type, b, n),
        ))
    }
}

/// llama.cpp stores q and k with each head's rows interleaved (its rotary layout); this puts them
/// back in Hugging Face's rotate-half order: hf[h, j·half + i] = gguf[h, 2i + j].
fn unpermute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * hd + 2 * i + j) * cols;
                let dst = (h * hd + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// Converts a GGUF file into a Hugging Face folder at `out_dir`; returns the model's config.
pub fn import_gguf(path: &Path, out_dir: &Path) -> Result<LlamaConfig> {
    let g = Gguf::open(path)?;
    let arch = g.meta_str(path, "general.architecture")?;
    if arch != "llama" {
        return Err(Error::file(
            path,
            format!("architecture `{arch}` is not supported (llama is)"),
        ));
    }
    let tok_model = g.meta_str(path, "tokenizer.ggml.model")?;
    if tok_model != "gpt2" {
        return Err(Error::file(
            path,
            format!("tokenizer model `{tok_model}` is not supported (gpt2-style BPE is)"),
        ));
    }
    // The config checks these too, but under its own field names; a GGUF user needs the key.
    let positive = |k: &str| -> Result<usize> {
        let key = format!("llama.{k}");
        match g.meta_u64(path, &key)? {
            0 => Err(Error::file(path, format!("`{key}` = 0 must be at least 1"))),
            v => Ok(v as usize),
        }
    };
    let opt_positive = |k: &str| -> Result<Option<usize>> {
        let key = format!("llama.{k}");
        match g.opt_meta_u64(path, &key)? {
            Some(0) => Err(Error::file(path, format!("`{key}` = 0 must be at least 1"))),
            v => Ok(v.map(|v| v as usize)),
        }
    };
    let tokens = g.meta_strings(path, "tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err(Error::file(path, "`tokenizer.ggml.tokens` is empty"));
    }
    // tokenizer.json maps each string to one id: a string listed twice would leave one of its ids
    // impossible to encode or decode, so such a vocabulary is refused rather than half imported.
    let mut first_id = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if let Some(first) = first_id.insert(t.as_str(), i) {
            return Err(Error::file(
                path,
                format!(
                    "`tokenizer.ggml.tokens` lists {t:?} twice (ids {first} and {i}); a byte-level BPE vocabulary needs each token once"
                ),
            ));
        }
    }
    let (hidden, heads) = (
        positive("embedding_length")?,
        positive("attention.head_count")?,
    );
    let kv_heads = opt_positive("attention.head_count_kv")?.unwrap_or(heads);
    let head_dim = opt_positive("rope.dimension_count")?.unwrap_or_else(|| hidden / heads);
    let has_output = g.tensors.iter().any(|t| t.name == "output.weight");
    let token_id = |key: &str| -> Result<Option<u64>> {
        match g.opt_meta_u64(path, key)? {
            Some(id) if id >= tokens.len() as u64 => Err(Error::file(
                path,
                format!(
                    "`{key}` = {id} is outside the vocabulary of {} tokens",
                    tokens.len()
                ),
            )),
            id => Ok(id),
        }
    };
    let eos = token_id("tokenizer.ggml.eos_token_id")?;
    let bos = token_id("tokenizer.ggml.bos_token_id")?;
    // Rope scaling: linear maps onto config.json's; any other kind (yarn, or Llama 3.1's
    // per-frequency factors in `rope_freqs.weight`) would be dropped, leaving a model wrong past
    // its original context, so it is refused.
    let rope_scaling = match g.meta.get("llama.rope.scaling.type") {
        None => serde_json::Value::Null,
        Some(_) => match g.meta_str(path, "llama.rope.scaling.type")? {
            "none" => serde_json::Value::Null,
            "linear" => {
                let factor = g
                    .opt_meta_positive(path, "llama.rope.scaling.factor")?
                    .ok_or_else(|| {
                        Error::file(
                            path,
                            "linear rope scaling without `llama.rope.scaling.factor`",
                        )
                    })?;
                json!({"rope_type": "linear", "factor": factor})
            }
            other => {
                return Err(Error::file(
                    path,
                    format!(
                    "`llama.rope.scaling.type` = {other:?} is not imported (none and linear are)"
                ),
                ))
            }
        },
    };
    if g.tensors.iter().any(|t| t.name == "rope_freqs.weight") {
        return Err(Error::file(
            path,
            "tensor `rope_freqs.weight` (per-frequency rope factors, as Llama 3.1's) is not imported",
        ));
    }
    let cfg_json = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tokens.len(),
        "hidden_size": hidden,
        "intermediate_size": positive("feed_forward_length")?,
        "num_hidden_layers": positive("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rope_theta": g.opt_meta_positive(path, "llama.rope.freq_base")?.unwrap_or(10_000.0),
        "rms_norm_eps": g.opt_meta_positive(path, "llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        "max_position_embeddings": opt_positive("context_length")?.unwrap_or(2048),
        "tie_word_embeddings": !has_output,
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
        "bos_token_id": bos,
        "eos_token_id": eos,
    });
    let cfg = LlamaConfig::from_json(&cfg_json, path)?;
    let hd = cfg.head_dim;
    let mut used = std::collections::HashSet::new();
    let params = Params::build(&cfg, |name, shape| {
        let gguf_name = hf_to_gguf(name)
            .ok_or_else(|| Error::file(path, format!("no GGUF name for `{name}`")))?;
        used.insert(gguf_name.clone());
        let (got, mut data) = g.tensor(path, &gguf_name)?;
        if got != shape {
            return Err(Error::file(
                path,
                format!("tensor `{gguf_name}` has shape {got:?}; the metadata implies {shape:?}"),
            ));
        }
        if name.ends_with("q_proj.weight") {
            data = unpermute(&data, heads * hd, hidden, heads);
        } else if name.ends_with("k_proj.weight") {
            data = unpermute(&data, kv_heads * hd, hidden, kv_heads);
        }
        Tensor::from_f32(shape, data, &Device::Cpu)
    })?;
    // A tensor the model does not take (a layer past block_count, an unknown part) would be
    // dropped without a word.
    if let Some(t) = g.tensors.iter().find(|t| !used.contains(&t.name)) {
        return Err(Error::file(
            path,
            format!(
                "tensor `{}` is not part of the imported model (llama.block_count = {})",
                t.name, cfg.num_layers
            ),
        ));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    params.save(&cfg, out_dir, DType::F32)?;
    write_file_atomic(
        &out_dir.join("config.json"),
        serde_json::to_string_pretty(&cfg.to_json())
            .unwrap()
            .as_bytes(),
    )?;
    write_tokenizer(&g, path, &tokens, out_dir, cfg.max_position_embeddings)?;
    Ok(cfg)
}

fn hf_to_gguf(name: &str) -> Option<String> {
    Some(match name {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let rest = name.strip_prefix("model.layers.")?;
            let (layer, part) = rest.split_once('.')?;
            let g = match part {
                "input_layernorm.weight" => "attn_norm.weight",
                "self_attn.q_proj.weight" => "attn_q.weight",
                "self_attn.k_proj.weight" => "attn_k.weight",
                "self_attn.v_proj.weight" => "attn_v.weight",
                "self_attn.o_proj.weight" => "attn_output.weight",
                "self_attn.q_proj.bias" => "attn_q.bias",
                "self_attn.k_proj.bias" => "attn_k.bias",
                "self_attn.v_proj.bias" => "attn_v.bias",
                "post_attention_layernorm.weight" => "ffn_norm.weight",
                "mlp.gate_proj.weight" => "ffn_gate.weight",
                "mlp.up_proj.weight" => "ffn_up.weight",
                "mlp.down_proj.weight" => "ffn_down.weight",
                _ => return None,
            };
            format!("blk.{layer}.{g}")
        }
    })
}

/// tokenizer.json for a GPT-2-style byte-level BPE from the GGUF vocabulary and merges, and
/// tokenizer_config.json with the special tokens and chat template.
fn write_tokenizer(
    g: &Gguf,
    path: &Path,
    tokens: &[String],
    out_dir: &Path,
    max_len: usize,
) -> Result<()> {
    let merges = g.meta_strings(path, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match g.meta.get("tokenizer.ggml.token_type") {
        Some(MetaValue::Array(a)) => a
            .iter()
            .map(|v| if let MetaValue::Int(i) = v { *i } else { 1 })
            .collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    // Control (3) and user-defined (4) tokens are matched whole, before the BPE.
    let added: Vec<Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": types[i] == 3})
        })
        .collect();
    let pre = g
        .meta
        .get("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    // llama.cpp's "smollm" pre-tokenizer splits digits one by one before GPT-2's regex.
    let pre_tokenizer = if pre == "smollm" {
        json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]})
    } else {
        byte_level.clone()
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    });
    write_file_atomic(
        &out_dir.join("tokenizer.json"),
        serde_json::to_string(&tokenizer).unwrap().as_bytes(),
    )?;
    let tok = |key: &str| {
        g.meta_u64(path, key)
            .ok()
            .and_then(|i| tokens.get(i as usize))
            .cloned()
    };
    let mut cfg = json!({
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": max_len,
        "add_bos_token": g.meta.get("tokenizer.ggml.add_bos_token").map(|v| matches!(v, MetaValue::Bool(true))).unwrap_or(false),
        "clean_up_tokenization_spaces": false,
    });
    let o = cfg.as_object_mut().unwrap();
    for (field, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(t) = tok(key) {
            o.insert(field.into(), json!(t));
        }
    }
    if let Some(t) = g
        .meta
        .get("tokenizer.chat_template")
        .and_then(MetaValue::as_str)
    {
        o.insert("chat_template".into(), json!(t));
    }
    write_file_atomic(
        &out_dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&cfg).unwrap().as_bytes(),
    )
}
