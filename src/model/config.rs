//! A Llama-family model's shape, read from a Hugging Face `config.json` (Llama, SmolLM2, Qwen2,
//! Mistral without sliding windows). Anything we cannot honour is an error naming the field.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Mistral,
}

impl Arch {
    fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
        }
    }

    fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Mistral => "mistral",
        }
    }
}

/// Llama 3's frequency-dependent RoPE scaling, or plain linear position interpolation.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (always for Qwen2).
    pub qkv_bias: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// A scalar head (`score.weight`, 1 × hidden) for reward and value models.
    pub scalar_head: bool,
}

fn field<'a>(obj: &'a Map<String, Value>, path: &Path, key: &str) -> Result<&'a Value> {
    obj.get(key)
        .ok_or_else(|| Error::file(path, format!("missing field `{key}`")))
}

fn usize_field(obj: &Map<String, Value>, path: &Path, key: &str) -> Result<usize> {
    field(obj, path, key)?
        .as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| {
            Error::file(
                path,
                format!("field `{key}` must be a non-negative integer"),
            )
        })
}

/// A size that must be at least 1: a zero would divide by zero or build an empty model.
fn positive_usize(obj: &Map<String, Value>, path: &Path, key: &str) -> Result<usize> {
    match usize_field(obj, path, key)? {
        0 => Err(Error::file(
            path,
            format!("field `{key}` = 0 must be at least 1"),
        )),
        v => Ok(v),
    }
}

/// A number that must be positive and finite (an epsilon, a frequency base, a scaling factor);
/// `key` is the name shown in errors.
fn check_positive(path: &Path, key: &str, v: f64) -> Result<f64> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(Error::file(
            path,
            format!("field `{key}` = {v} must be a positive, finite number"),
        ))
    }
}

/// A token id, which must name a row of the embedding.
fn token_id(path: &Path, key: &str, v: &Value, vocab_size: usize) -> Result<u32> {
    match v.as_u64() {
        Some(id) if id < vocab_size as u64 => Ok(id as u32),
        Some(id) => Err(Error::file(
            path,
            format!("field `{key}` = {id} is outside the vocabulary (vocab_size = {vocab_size})"),
        )),
        None => Err(Error::file(
            path,
            format!("field `{key}` must hold non-negative integers, got {v}"),
        )),
    }
}

fn opt_usize(obj: &Map<String, Value>, path: &Path, key: &str) -> Result<Option<usize>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(|v| Some(v as usize)).ok_or_else(|| {
            Error::file(
                path,
                format!("field `{key}` must be a non-negative integer"),
            )
        }),
    }
}

fn opt_f64(obj: &Map<String, Value>, path: &Path, key: &str) -> Result<Option<f64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| Error::file(path, format!("field `{key}` must be a number"))),
    }
}

fn opt_bool(obj: &Map<String, Value>, path: &Path, key: &str) -> Result<Option<bool>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| Error::file(path, format!("field `{key}` must be true or false"))),
    }
}

impl LlamaConfig {
    pub fn load(path: &Path) -> Result<LlamaConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
        LlamaConfig::from_json(&value, path)
    }

    /// `path` only names the source in errors.
    pub fn from_json(value: &Value, path: &Path) -> Result<LlamaConfig> {
        let obj = value
            .as_object()
            .ok_or_else(|| Error::file(path, "expected a JSON object"))?;
        let model_type = field(obj, path, "model_type")?
            .as_str()
            .ok_or_else(|| Error::file(path, "field `model_type` must be a string"))?;
        let arch = match model_type {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "mistral" => Arch::Mistral,
            other => {
                return Err(Error::file(
                    path,
                    format!("model_type `{other}` is not supported (llama, qwen2 and mistral are)"),
                ))
            }
        };
        let mut scalar_head = false;
        let archs = match obj.get("architectures") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
                a.iter().filter_map(Value::as_str).collect()
            }
            // Read past, a lone string would hide a reward model's head.
            Some(_) => {
                return Err(Error::file(
                    path,
                    "field `architectures` must be a list of strings",
                ))
            }
        };
        for a in archs {
            if a.ends_with("ForSequenceClassification") || a.ends_with("ForTokenClassification") {
                scalar_head = true;
            } else if !a.ends_with("ForCausalLM") && !a.ends_with("Model") {
                return Err(Error::file(
                    path,
                    format!("architecture `{a}` is not supported"),
                ));
            }
        }
        if scalar_head {
            if let Some(n) = opt_usize(obj, path, "num_labels")? {
                if n != 1 {
                    return Err(Error::file(
                        path,
                        format!("num_labels = {n}: only a scalar head (1 label) is supported"),
                    ));
                }
            }
        }
        let act = obj
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" {
            return Err(Error::file(
                path,
                format!("hidden_act `{act}` is not supported (only silu)"),
            ));
        }
        if opt_bool(obj, path, "mlp_bias")? == Some(true) {
            return Err(Error::file(path, "mlp_bias = true is not supported"));
        }
        if let Some(w) = opt_usize(obj, path, "sliding_window")? {
            let used = opt_bool(obj, path, "use_sliding_window")?.unwrap_or(arch == Arch::Mistral);
            if used {
                return Err(Error::file(
                    path,
                    format!("sliding_window = {w} is not supported (full attention only)"),
                ));
            }
        }
        let hidden_size = positive_usize(obj, path, "hidden_size")?;
        let num_heads = positive_usize(obj, path, "num_attention_heads")?;
        let num_kv_heads = opt_usize(obj, path, "num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(Error::file(path, format!("num_attention_heads = {num_heads} must be a positive multiple of num_key_value_heads = {num_kv_heads}")));
        }
        let head_dim = opt_usize(obj, path, "head_dim")?.unwrap_or(hidden_size / num_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::file(
                path,
                format!("head_dim = {head_dim} must be even and at least 2 for rotary embeddings (hidden_size / num_attention_heads when absent)"),
            ));
        }
        let vocab_size = positive_usize(obj, path, "vocab_size")?;
        let rope_scaling = match obj.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(Value::Object(rs)) => {
                let kind = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                // Each is a divisor of a frequency or a wavelength.
                let num = |k: &str| {
                    let v = rs.get(k).and_then(Value::as_f64).ok_or_else(|| {
                        Error::file(path, format!("rope_scaling needs a number `{k}`"))
                    })?;
                    check_positive(path, &format!("rope_scaling.{k}"), v)
                };
                match kind {
                    "default" => None,
                    "linear" => Some(RopeScaling::Linear {
                        factor: num("factor")?,
                    }),
                    "llama3" => {
                        let (low_freq_factor, high_freq_factor) =
                            (num("low_freq_factor")?, num("high_freq_factor")?);
                        // The band between them is interpolated over their difference.
                        if high_freq_factor <= low_freq_factor {
                            return Err(Error::file(
                                path,
                                format!("rope_scaling.high_freq_factor = {high_freq_factor} must exceed rope_scaling.low_freq_factor = {low_freq_factor}"),
                            ));
                        }
                        Some(RopeScaling::Llama3 {
                            factor: num("factor")?,
                            low_freq_factor,
                            high_freq_factor,
                            original_max_position_embeddings: num(
                                "original_max_position_embeddings",
                            )?,
                        })
                    }
                    other => {
                        return Err(Error::file(
                            path,
                            format!(
                            "rope_scaling type `{other}` is not supported (linear and llama3 are)"
                        ),
                        ))
                    }
                }
            }
            Some(_) => return Err(Error::file(path, "rope_scaling must be an object or null")),
        };
        let eos_token_ids = match obj.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| token_id(path, "eos_token_id", v, vocab_size))
                .collect::<Result<_>>()?,
            Some(v @ Value::Number(_)) => vec![token_id(path, "eos_token_id", v, vocab_size)?],
            Some(_) => {
                return Err(Error::file(
                    path,
                    "field `eos_token_id` must be an integer or a list of integers",
                ))
            }
        };
        let bos_token_id = match obj.get("bos_token_id") {
            None | Some(Value::Null) => None,
            Some(v) => Some(token_id(path, "bos_token_id", v, vocab_size)?),
        };
        let positive_f64 = |key: &str, default: f64| -> Result<f64> {
            check_positive(path, key, opt_f64(obj, path, key)?.unwrap_or(default))
        };
        Ok(LlamaConfig {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: positive_usize(obj, path, "intermediate_size")?,
            num_layers: positive_usize(obj, path, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: positive_f64("rope_theta", 10_000.0)?,
            rope_scaling,
            rms_norm_eps: positive_f64("rms_norm_eps", 1e-6)?,
            tie_word_embeddings: opt_bool(obj, path, "tie_word_embeddings")?.unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2
                || opt_bool(obj, path, "attention_bias")?.unwrap_or(false),
            max_position_embeddings: opt_usize(obj, path, "max_position_embeddings")?
                .unwrap_or(2048),
            bos_token_id,
            eos_token_ids,
            scalar_head,
        })
    }

    /// The `config.json` transformers reads back as this model.
    pub fn to_json(&self) -> Value {
        let class = if self.scalar_head {
            self.arch
                .hf_class()
                .replace("ForCausalLM", "ForSequenceClassification")
        } else {
            self.arch.hf_class().to_owned()
        };
        let mut v = json!({
            "architectures": [class],
            "model_type": self.arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": "float32",
        });
        let o = v.as_object_mut().unwrap();
        if self.arch != Arch::Qwen2 {
            o.insert("attention_bias".into(), json!(self.qkv_bias));
        }
        o.insert(
            "rope_scaling".into(),
            match &self.rope_scaling {
                None => Value::Null,
                Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
                Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings
                }),
            },
        );
        if let Some(b) = self.bos_token_id {
            o.insert("bos_token_id".into(), json!(b));
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [e] => {
                o.insert("eos_token_id".into(), json!(e));
            }
            many => {
                o.insert("eos_token_id".into(), json!(many));
            }
        }
        if self.scalar_head {
            o.insert("num_labels".into(), json!(1));
        }
        v
    }

    /// RoPE inverse frequencies `[head_dim / 2]`, computed as transformers does (f32), with scaling.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        let scaled: Vec<f64> = match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_position_embeddings / wavelen
                                - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        scaled.into_iter().map(|f| f as f32).collect()
    }

    /// SmolLM2-135M's shape (the weights come from `scripts/get-smollm2`); benchmarks use it with
    /// random weights.
    pub fn smollm2_135m() -> LlamaConfig {
        let v = json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
            "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "head_dim": 64, "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
            "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2
        });
        LlamaConfig::from_json(&v, Path::new("built-in SmolLM2-135M config"))
            .expect("valid built-in config")
    }

    /// Forward FLOPs for `seqs` sequences of `len` tokens: every GEMM (2 per multiply-add, the LM
    /// head included) and causal attention (QKᵀ and PV over the lower triangle).
    pub fn forward_flops(&self, seqs: usize, len: usize) -> f64 {
        let (layers, head) = self.token_flops();
        (layers + head) * (seqs * len) as f64 + self.attention_flops(seqs, len)
    }

    /// Forward FLOPs a token costs in the layers' GEMMs and in the LM head.
    pub fn token_flops(&self) -> (f64, f64) {
        let (d, i, v) = (
            self.hidden_size as f64,
            self.intermediate_size as f64,
            self.vocab_size as f64,
        );
        let (q, kv) = (
            (self.num_heads * self.head_dim) as f64,
            (self.num_kv_heads * self.head_dim) as f64,
        );
        let layers = self.num_layers as f64 * (d * q + 2.0 * d * kv + q * d + 3.0 * d * i);
        (2.0 * layers, 2.0 * d * v)
    }

    /// Forward FLOPs of causal attention (QKᵀ and PV over the lower triangle) over `seqs`
    /// sequences of `len` tokens.
    fn attention_flops(&self, seqs: usize, len: usize) -> f64 {
        let q = (self.num_heads * self.head_dim) as f64;
        self.num_layers as f64 * seqs as f64 * 2.0 * 2.0 * q * (len * (len + 1) / 2) as f64
    }

    /// Parameters of the decoder (and head), for reports.
    pub fn parameter_count(&self) -> usize {
        let (d, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        let bias = if self.qkv_bias { q + 2 * kv } else { 0 };
        let layer = 2 * d + d * q + 2 * d * kv + q * d + bias + 3 * d * i;
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        v * d + self.num_layers * layer + d + head + if self.scalar_head { d } else { 0 }
    }
}
