//! The decoder's parameters, loaded from and saved to safetensors under Hugging Face's tensor names
//! (single file or a sharded index); in memory the QKV and the gate and up projections are stacked
//! (`StoredParam`). Saving is atomic: a temporary file, then a rename.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use super::config::LlamaConfig;
use crate::device::{DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::rng::Rng;

pub struct LayerParams {
    pub attn_norm: Tensor,
    /// q_proj, k_proj and v_proj stacked by rows, `[(heads + 2·kv_heads)·head_dim, hidden]`: one GEMM
    /// projects all three.
    pub qkv: Tensor,
    pub o: Tensor,
    /// Their biases stacked the same way, where the model has them (Qwen2).
    pub qkv_bias: Option<Tensor>,
    pub mlp_norm: Tensor,
    /// gate_proj and up_proj stacked by rows, `[2·intermediate, hidden]`.
    pub gate_up: Tensor,
    pub down: Tensor,
}

pub struct Params {
    pub embed: Tensor,
    pub layers: Vec<LayerParams>,
    pub norm: Tensor,
    /// None when tied to `embed`.
    pub lm_head: Option<Tensor>,
    /// The scalar head `[1, hidden]` of a reward or value model.
    pub score: Option<Tensor>,
}

/// A parameter as the model stores it: one tensor made of one or more Hugging Face tensors stacked
/// by rows (their first dimension). The QKV projection and the MLP's gate and up projections are
/// stored stacked so that one GEMM (forward, and each of the backward's two) serves each group: fewer,
/// wider GEMMs and one read of their input instead of three or two. Files keep Hugging Face's names
/// and tensors; only the model's memory and its optimizer state use the stacked ones.
pub struct StoredParam {
    pub name: String,
    pub shape: Vec<usize>,
    /// Each part's Hugging Face name and rows, in stacking order.
    pub parts: Vec<(String, usize)>,
}

impl StoredParam {
    fn single(name: String, shape: Vec<usize>) -> StoredParam {
        let parts = vec![(name.clone(), shape[0])];
        StoredParam { name, shape, parts }
    }

    fn stacked(name: String, rest: &[usize], parts: Vec<(String, usize)>) -> StoredParam {
        let rows = parts.iter().map(|p| p.1).sum();
        let shape = std::iter::once(rows).chain(rest.iter().copied()).collect();
        StoredParam { name, shape, parts }
    }

    /// Each part's name and shape.
    pub fn part_shapes(&self) -> impl Iterator<Item = (&str, Vec<usize>)> + '_ {
        self.parts.iter().map(|(name, rows)| {
            let shape = std::iter::once(*rows)
                .chain(self.shape[1..].iter().copied())
                .collect();
            (name.as_str(), shape)
        })
    }
}

/// Every parameter as the model stores it, in a fixed order (`Params::named`).
pub fn stored_parameters(cfg: &LlamaConfig) -> Vec<StoredParam> {
    let (d, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let one = StoredParam::single;
    let mut out = vec![one("model.embed_tokens.weight".to_owned(), vec![v, d])];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let qkv_parts = |what: &str| {
            vec![
                (format!("{p}.self_attn.q_proj.{what}"), q),
                (format!("{p}.self_attn.k_proj.{what}"), kv),
                (format!("{p}.self_attn.v_proj.{what}"), kv),
            ]
        };
        out.push(one(format!("{p}.input_layernorm.weight"), vec![d]));
        out.push(StoredParam::stacked(
            format!("{p}.self_attn.qkv_proj.weight"),
            &[d],
            qkv_parts("weight"),
        ));
        out.push(one(format!("{p}.self_attn.o_proj.weight"), vec![d, q]));
        if cfg.qkv_bias {
            out.push(StoredParam::stacked(
                format!("{p}.self_attn.qkv_proj.bias"),
                &[],
                qkv_parts("bias"),
            ));
        }
        out.push(one(format!("{p}.post_attention_layernorm.weight"), vec![d]));
        out.push(StoredParam::stacked(
            format!("{p}.mlp.gate_up_proj.weight"),
            &[d],
            vec![
                (format!("{p}.mlp.gate_proj.weight"), i),
                (format!("{p}.mlp.up_proj.weight"), i),
            ],
        ));
        out.push(one(format!("{p}.mlp.down_proj.weight"), vec![d, i]));
    }
    out.push(one("model.norm.weight".to_owned(), vec![d]));
    if !cfg.tie_word_embeddings && !cfg.scalar_head {
        out.push(one("lm_head.weight".to_owned(), vec![v, d]));
    }
    if cfg.scalar_head {
        out.push(one("score.weight".to_owned(), vec![1, d]));
    }
    out
}

/// Every parameter's Hugging Face name and shape, in the order of the files this crate writes.
pub fn parameter_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    stored_parameters(cfg)
        .iter()
        .flat_map(|p| {
            p.part_shapes()
                .map(|(n, s)| (n.to_owned(), s))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A Hugging Face tensor on the host: name, shape, values.
pub type HfTensor = (String, Vec<usize>, Vec<f32>);

/// Tensors stacked by rows into one of `shape` (same dtype and device).
fn stack_rows(parts: &[Tensor], shape: &[usize]) -> Result<Tensor> {
    let mut out = Tensor::empty(shape, parts[0].dtype(), parts[0].device())?;
    let mut at = 0;
    for part in parts {
        out.copy_elements(at, part, 0, part.numel())?;
        at += part.numel();
    }
    Ok(out)
}

impl Params {
    /// Builds every parameter from its Hugging Face parts, each made by `make(name, shape)` in
    /// `parameter_shapes` order and stacked where the model stores them stacked.
    pub fn build(
        cfg: &LlamaConfig,
        mut make: impl FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<Params> {
        Params::build_stored(cfg, |p| {
            let mut parts = p
                .part_shapes()
                .map(|(name, shape)| make(name, &shape))
                .collect::<Result<Vec<_>>>()?;
            if parts.len() == 1 {
                return Ok(parts.pop().expect("one part"));
            }
            stack_rows(&parts, &p.shape)
        })
    }

    /// Builds every parameter as stored with `make`, in `stored_parameters` order.
    pub fn build_stored(
        cfg: &LlamaConfig,
        mut make: impl FnMut(&StoredParam) -> Result<Tensor>,
    ) -> Result<Params> {
        let stored = stored_parameters(cfg);
        let mut it = stored.iter();
        let mut next = || -> Result<Tensor> {
            make(it.next().expect("stored_parameters lists every parameter"))
        };
        let embed = next()?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            let (attn_norm, qkv, o) = (next()?, next()?, next()?);
            let qkv_bias = if cfg.qkv_bias { Some(next()?) } else { None };
            let (mlp_norm, gate_up, down) = (next()?, next()?, next()?);
            layers.push(LayerParams {
                attn_norm,
                qkv,
                o,
                qkv_bias,
                mlp_norm,
                gate_up,
                down,
            });
        }
        let norm = next()?;
        let lm_head = if !cfg.tie_word_embeddings && !cfg.scalar_head {
            Some(next()?)
        } else {
            None
        };
        let score = if cfg.scalar_head { Some(next()?) } else { None };
        Ok(Params {
            embed,
            layers,
            norm,
            lm_head,
            score,
        })
    }

    /// Every parameter as stored, in `stored_parameters` order.
    pub fn named(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.embed];
        for l in &self.layers {
            v.extend([&l.attn_norm, &l.qkv, &l.o]);
            v.extend(&l.qkv_bias);
            v.extend([&l.mlp_norm, &l.gate_up, &l.down]);
        }
        v.push(&self.norm);
        v.extend(self.lm_head.iter());
        v.extend(self.score.iter());
        v
    }

    pub fn named_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = vec![&mut self.embed];
        for l in &mut self.layers {
            v.extend([&mut l.attn_norm, &mut l.qkv, &mut l.o]);
            v.extend(&mut l.qkv_bias);
            v.extend([&mut l.mlp_norm, &mut l.gate_up, &mut l.down]);
        }
        v.push(&mut self.norm);
        v.extend(self.lm_head.iter_mut());
        v.extend(self.score.iter_mut());
        v
    }

    /// Every Hugging Face tensor's name, shape and values on the host, in `parameter_shapes` order:
    /// the stacked parameters cut back into their parts.
    pub fn hf_tensors(&self, cfg: &LlamaConfig) -> Result<Vec<HfTensor>> {
        let mut out = Vec::new();
        for (p, t) in stored_parameters(cfg).iter().zip(self.named()) {
            let values = t.to_f32_vec()?;
            let mut at = 0;
            for (name, shape) in p.part_shapes() {
                let n: usize = shape.iter().product();
                out.push((name.to_owned(), shape, values[at..at + n].to_vec()));
                at += n;
            }
        }
        Ok(out)
    }

    /// The output projection: `lm_head`, or the embedding when tied.
    pub fn lm_head_mut(&mut self) -> &mut Tensor {
        match &mut self.lm_head {
            Some(h) => h,
            None => &mut self.embed,
        }
    }

    /// All zeros: the gradient accumulators (f32) of a model.
    pub fn zeros(cfg: &LlamaConfig, device: &Device, dtype: DType) -> Result<Params> {
        Params::build_stored(cfg, |p| Tensor::zeros(&p.shape, dtype, device))
    }

    /// A random model for tests and demos: norms at 1, matrices N(0, 0.02²)·(scale), like HF's init.
    pub fn random(cfg: &LlamaConfig, seed: u64, device: &Device, dtype: DType) -> Result<Params> {
        // Normal draws (some 20 ns each) took 3 s a SmolLM2-135M, on a borrowed GPU's clock in the
        // benches that build two or three of them: the first 4 Mi values are drawn, the rest reuse
        // them in turn. A model of at most 4 Mi weights gets exactly its own draws.
        const DRAWN: usize = 1 << 22;
        let mut rng = Rng::new(seed);
        let mut drawn: Vec<f32> = Vec::new();
        let mut reused = 0usize;
        Params::build(cfg, |name, shape| {
            let n: usize = shape.iter().product();
            let data = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                let fresh = n.min(DRAWN - drawn.len());
                let mut data = rng.normal_vec(fresh, 0.02);
                drawn.extend_from_slice(&data);
                data.extend((0..n - fresh).map(|i| drawn[(reused + i) % DRAWN]));
                reused += n - fresh;
                data
            };
            Tensor::from_f32_as(shape, &data, dtype, device)
        })
    }

    /// A copy in another dtype or on another device.
    pub fn convert(&self, cfg: &LlamaConfig, device: &Device, dtype: DType) -> Result<Params> {
        let mut src = self.named().into_iter();
        Params::build_stored(cfg, |p| {
            let t = src.next().expect("same config");
            // On one GPU a cast kernel each, with no trip through the host.
            if t.device().same(device) && t.shape() == p.shape.as_slice() {
                return crate::ops::elementwise::cast(t, dtype);
            }
            Tensor::from_f32_as(&p.shape, &t.to_f32_vec()?, dtype, device)
        })
    }

    /// Loads `model.safetensors` or the shards named by `model.safetensors.index.json` in `dir`.
    pub fn load(cfg: &LlamaConfig, dir: &Path, device: &Device, dtype: DType) -> Result<Params> {
        let files = safetensors_files(dir)?;
        let mut host: HashMap<String, (Vec<usize>, Vec<f32>, PathBuf)> = HashMap::new();
        for file in &files {
            let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
            let st = SafeTensors::deserialize(&bytes)
                .map_err(|e| Error::file(file, format!("not a safetensors file: {e}")))?;
            for (name, view) in st.tensors() {
                let data = to_f32(view.dtype(), view.data()).ok_or_else(|| {
                    Error::file(
                        file,
                        format!(
                            "tensor `{name}` has dtype {:?}; F32, BF16 and F16 are supported",
                            view.dtype()
                        ),
                    )
                })?;
                let entry = (view.shape().to_vec(), data, file.clone());
                if let Some((_, _, first)) = host.insert(name.clone(), entry) {
                    return Err(Error::file(
                        file,
                        format!(
                            "tensor `{name}` is also in {}; which copy is meant?",
                            first.display()
                        ),
                    ));
                }
            }
        }
        drop_tied_lm_head(cfg, &mut host)?;
        let shown = files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let params = Params::build(cfg, |name, shape| {
            let (got, data, file) = host
                .remove(name)
                .ok_or_else(|| Error::file(dir, format!("no tensor `{name}` in {shown}")))?;
            if got != shape {
                return Err(Error::file(
                    &file,
                    format!("tensor `{name}` has shape {got:?}, the config implies {shape:?}"),
                ));
            }
            Tensor::from_f32_as(shape, &data, dtype, device)
        })?;
        reject_unused(cfg, &host)?;
        Ok(params)
    }

    /// Writes `model.safetensors` into `dir` (f32, or bf16 when `dtype` says so), atomically.
    pub fn save(&self, cfg: &LlamaConfig, dir: &Path, dtype: DType) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tensors = self.hf_tensors(cfg)?;
        let mut buffers = Vec::with_capacity(tensors.len());
        for (name, shape, v) in tensors {
            let bytes: Vec<u8> = match dtype {
                DType::BF16 => v
                    .iter()
                    .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                    .collect(),
                _ => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
            };
            buffers.push((name, shape, bytes));
        }
        let st_dtype = if dtype == DType::BF16 {
            Dtype::BF16
        } else {
            Dtype::F32
        };
        let views = buffers
            .iter()
            .map(|(n, s, b)| {
                safetensors::tensor::TensorView::new(st_dtype, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::file(dir, format!("tensor `{n}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        let path = dir.join("model.safetensors");
        write_atomic(&path, |tmp| {
            safetensors::serialize_to_file(views, Some(meta), tmp)
                .map_err(|e| Error::file(tmp, e.to_string()))
        })?;
        // A stale index from an earlier sharded save would point loaders at files that are gone.
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            std::fs::remove_file(&index).map_err(|e| Error::io(&index, e))?;
        }
        Ok(())
    }
}

type HostTensors = HashMap<String, (Vec<usize>, Vec<f32>, PathBuf)>;

/// Some checkpoints of tied models also store the output projection; it must be the embedding, or
/// the config's tie would silently drop a trained head.
fn drop_tied_lm_head(cfg: &LlamaConfig, host: &mut HostTensors) -> Result<()> {
    if !cfg.tie_word_embeddings {
        return Ok(());
    }
    let (Some(head), Some(embed)) = (
        host.get("lm_head.weight"),
        host.get("model.embed_tokens.weight"),
    ) else {
        return Ok(());
    };
    if head.0 != embed.0 || head.1 != embed.1 {
        return Err(Error::file(
            &head.2,
            "tensor `lm_head.weight` differs from `model.embed_tokens.weight`, but the config has \
             tie_word_embeddings = true",
        ));
    }
    host.remove("lm_head.weight");
    Ok(())
}

/// What is left after loading must be nothing the model should have used: a layer past the
/// config's count or a stray head means the config and the weights disagree. Only the rotary
/// inverse frequencies that older checkpoints store (a buffer we recompute) are ignored.
fn reject_unused(cfg: &LlamaConfig, host: &HostTensors) -> Result<()> {
    let mut left: Vec<(&String, &PathBuf)> = host
        .iter()
        .filter(|(name, _)| !name.ends_with("rotary_emb.inv_freq"))
        .map(|(name, (_, _, file))| (name, file))
        .collect();
    left.sort();
    let Some(&(name, file)) = left.first() else {
        return Ok(());
    };
    let layer = name
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|l| l.parse::<usize>().ok());
    let why = match layer {
        Some(l) if l >= cfg.num_layers => format!(
            "it is for layer {l}, but the config has num_hidden_layers = {}",
            cfg.num_layers
        ),
        _ if name.contains("self_attn.") && name.ends_with("_proj.bias") => {
            "the config has no attention biases (attention_bias = false)".to_owned()
        }
        _ if name == "lm_head.weight" => {
            "the config's model has a scalar head (ForSequenceClassification), not an LM head"
                .to_owned()
        }
        _ if name == "score.weight" => {
            "the config's architectures name no ForSequenceClassification model".to_owned()
        }
        _ => "the model has no such parameter".to_owned(),
    };
    let more = match left.len() - 1 {
        0 => String::new(),
        n => format!(" ({n} more unused tensors)"),
    };
    Err(Error::file(
        file,
        format!("tensor `{name}` is not used: {why}{more}"),
    ))
}

/// Writes through `write(tmp)` then renames over `path`, so a reader never sees half a file and an
/// interrupted save leaves the previous file intact.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Writes f32 training state (optimizer moments, master weights) under `tensors`' names into one
/// safetensors file with string metadata such as the step count, atomically.
pub fn save_state(
    path: &Path,
    tensors: &[(String, &Tensor)],
    meta: &[(&str, String)],
) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, t)| {
            Ok(t.to_f32_vec()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect())
        })
        .collect::<Result<_>>()?;
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, t), b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, t.shape().to_vec(), b)
                .map(|v| (name.as_str(), v))
                .map_err(|e| Error::file(path, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    write_atomic(path, |tmp| {
        safetensors::serialize_to_file(views, Some(meta), tmp)
            .map_err(|e| Error::file(tmp, e.to_string()))
    })
}

/// A file written by `save_state`, read back with every problem named against its path.
pub struct StateFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl StateFile {
    pub fn open(path: &Path) -> Result<StateFile> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        SafeTensors::deserialize(&bytes).map_err(|e| Error::file(path, e.to_string()))?;
        Ok(StateFile {
            path: path.to_path_buf(),
            bytes,
        })
    }

    /// The metadata entry `key`, parsed.
    pub fn meta<T: std::str::FromStr>(&self, key: &str) -> Result<T> {
        let (_, header) = SafeTensors::read_metadata(&self.bytes)
            .map_err(|e| Error::file(&self.path, e.to_string()))?;
        header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(key))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::file(&self.path, format!("no `{key}` in the metadata")))
    }

    /// The f32 tensor `name`, which must have `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let st = SafeTensors::deserialize(&self.bytes)
            .map_err(|e| Error::file(&self.path, e.to_string()))?;
        let view = st
            .tensor(name)
            .map_err(|_| Error::file(&self.path, format!("missing `{name}`")))?;
        if view.dtype() != Dtype::F32 || view.shape() != shape {
            return Err(Error::file(
                &self.path,
                format!(
                    "`{name}` is {:?} {:?}, expected F32 {shape:?}",
                    view.dtype(),
                    view.shape()
                ),
            ));
        }
        let data = to_f32(Dtype::F32, view.data()).expect("F32 converts");
        Tensor::from_f32(shape, data, device)
    }
}

/// `write_atomic` for bytes.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, e))
    })
}

fn to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&index, format!("invalid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::file(&index, "no `weight_map` object"))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    Err(Error::file(
        dir,
        "no model.safetensors or model.safetensors.index.json",
    ))
}
