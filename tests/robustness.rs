//! Malformed input meets a clear error naming the file and the tensor, key, field or flag: reference
//! files with inconsistent shapes, GGUF metadata that would divide by zero, config.json values
//! that make no model, weights the config does not use, and bench sizes of zero.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rlhf_kernels::bench;
use rlhf_kernels::device::Device;
use rlhf_kernels::golden::Golden;
use rlhf_kernels::model::gguf::import_gguf;
use rlhf_kernels::model::{LlamaConfig, Model};
use rlhf_kernels::ops::attention::Heads;
use rlhf_kernels::testing::golden_dir;
use rlhf_kernels::train::builtin;
use rlhf_kernels::verify::{verify_file, Outcome};
use safetensors::Dtype;
use serde_json::json;

/// A fresh temporary folder for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlhf-robust-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

type F32Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn write_f32_safetensors(path: &Path, tensors: &F32Tensors, meta: Option<HashMap<String, String>>) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, (s, d))| {
            (
                n.clone(),
                s.clone(),
                d.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

fn read_f32_safetensors(path: &Path) -> F32Tensors {
    let g = Golden::open(path).unwrap();
    g.tensors
        .into_iter()
        .map(|(n, t)| (n, (t.shape, t.data)))
        .collect()
}

/// A copy of a golden file with `edit` applied to its metadata and tensors.
fn edited_golden(
    src: &str,
    dst: &Path,
    edit: impl FnOnce(&mut HashMap<String, String>, &mut F32Tensors),
) -> PathBuf {
    let g = Golden::open(golden_dir().join(src)).unwrap();
    let mut meta = g.metadata.clone();
    let mut tensors = read_f32_safetensors(&g.path);
    edit(&mut meta, &mut tensors);
    write_f32_safetensors(dst, &tensors, Some(meta));
    dst.to_path_buf()
}

fn verify_error(path: &Path) -> String {
    match verify_file(path, &Device::Cpu) {
        Err(e) => e.to_string(),
        Ok(r) => panic!("{}: expected an error, got {:?}", path.display(), r.outcome),
    }
}

#[test]
fn verify_rejects_every_tensor_with_a_dimension_shrunk() {
    // Each dimension of each tensor of each golden file, one shorter: before the shape checks these
    // panicked in the references or compared a prefix and passed.
    let dir = scratch("verify-shrunk");
    let mut golden: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    golden.sort();
    let mut cases = 0;
    for file in &golden {
        let name = file.file_name().unwrap().to_str().unwrap().to_owned();
        let tensors = read_f32_safetensors(file);
        for (tensor, (shape, _)) in &tensors {
            for dim in 0..shape.len() {
                if shape[dim] < 2 {
                    continue;
                }
                let out = dir.join(format!("{name}-{tensor}-{dim}.safetensors"));
                let path = edited_golden(&name, &out, |_, t| {
                    let (s, d) = t.get_mut(tensor).unwrap();
                    s[dim] -= 1;
                    d.truncate(s.iter().product());
                });
                let e = verify_error(&path);
                assert!(
                    e.contains(path.to_str().unwrap()) && e.contains("tensor `"),
                    "{tensor} dim {dim}: {e}"
                );
                cases += 1;
            }
        }
    }
    assert!(cases > 200, "only {cases} cases");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn verify_names_the_mismatched_tensor_and_what_sets_its_shape() {
    let dir = scratch("verify-named");
    let path = edited_golden(
        "dpo_sigmoid.safetensors",
        &dir.join("mask.safetensors"),
        |_, t| {
            let (s, d) = t.get_mut("mask").unwrap();
            *s = vec![10, 16];
            d.truncate(160);
        },
    );
    let e = verify_error(&path);
    assert!(
        e.contains("tensor `mask` has shape [10, 16], expected [10, 17] (as `policy_logps`)"),
        "{e}"
    );
    // The DPO family reads the reference's log-probs; without them it must not assume zeros.
    let path = edited_golden(
        "dpo_sigmoid.safetensors",
        &dir.join("noref.safetensors"),
        |_, t| {
            t.remove("ref_logps");
        },
    );
    assert!(verify_error(&path).contains("missing tensor `ref_logps`"));
    // A target id past the vocabulary indexed out of the row.
    let path = edited_golden(
        "logprob.safetensors",
        &dir.join("target.safetensors"),
        |_, t| {
            t.get_mut("target").unwrap().1[3] = 1000.0;
        },
    );
    let e = verify_error(&path);
    assert!(e.contains("`target`[3] = 1000"), "{e}");
    // Query heads that are no whole multiple of the KV heads.
    let path = edited_golden(
        "attention.safetensors",
        &dir.join("heads.safetensors"),
        |_, t| {
            for name in ["q", "grad_q", "grad_out", "out"] {
                let (s, d) = t.get_mut(name).unwrap();
                s[1] = 3;
                d.truncate(s.iter().product());
            }
            let (s, d) = t.get_mut("lse").unwrap();
            s[1] = 3;
            d.truncate(s.iter().product());
        },
    );
    let e = verify_error(&path);
    assert!(e.contains("not a multiple of the 2 KV heads"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn verify_errors_on_an_unknown_family_and_skips_a_known_one() {
    let dir = scratch("verify-family");
    let path = edited_golden("kl.safetensors", &dir.join("typo.safetensors"), |m, _| {
        m.insert("family".into(), "kll".into());
    });
    let e = verify_error(&path);
    assert!(
        e.contains(path.to_str().unwrap()) && e.contains("`kll` is not a kernel family"),
        "{e}"
    );
    let path = edited_golden("kl.safetensors", &dir.join("norm.safetensors"), |m, _| {
        m.insert("family".into(), "norm".into());
    });
    let r = verify_file(&path, &Device::Cpu).unwrap();
    assert!(matches!(r.outcome, Outcome::Skipped(_)), "{:?}", r.outcome);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn verify_command_reports_a_shape_error_without_panicking() {
    let dir = scratch("verify-cli");
    let path = edited_golden("ppo.safetensors", &dir.join("ppo.safetensors"), |_, t| {
        let (s, d) = t.get_mut("scores").unwrap();
        s[0] = 3;
        d.truncate(3);
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rlhf"))
        .args(["verify", "--device", "cpu", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("tensor `scores` has shape [3], expected [4]"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- GGUF ----

enum Meta {
    U32(u32),
    F32(f32),
    Str(&'static str),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

/// A GGUF v3 file of a tiny llama (hidden 16, 2 heads over 1 KV head, 1 block, 40 tokens), its
/// metadata after `edit`.
fn tiny_gguf(path: &Path, edit: impl FnOnce(&mut BTreeMap<&'static str, Meta>)) {
    tiny_gguf_with(path, edit, |_| {});
}

/// `tiny_gguf` with its tensor list (names and ggml dims) edited too.
fn tiny_gguf_with(
    path: &Path,
    edit: impl FnOnce(&mut BTreeMap<&'static str, Meta>),
    edit_tensors: impl FnOnce(&mut Vec<(String, Vec<u64>)>),
) {
    let (h, i, heads, kv, vocab) = (16u64, 32u64, 2u64, 1u64, 40usize);
    let hd = h / heads;
    let tokens: Vec<String> = (0..vocab).map(|t| format!("t{t}")).collect();
    let mut meta: BTreeMap<&'static str, Meta> = BTreeMap::new();
    meta.insert("general.architecture", Meta::Str("llama"));
    meta.insert("general.alignment", Meta::U32(32));
    meta.insert("llama.embedding_length", Meta::U32(h as u32));
    meta.insert("llama.feed_forward_length", Meta::U32(i as u32));
    meta.insert("llama.block_count", Meta::U32(1));
    meta.insert("llama.attention.head_count", Meta::U32(heads as u32));
    meta.insert("llama.attention.head_count_kv", Meta::U32(kv as u32));
    meta.insert("llama.context_length", Meta::U32(64));
    meta.insert("llama.rope.freq_base", Meta::F32(10000.0));
    meta.insert("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5));
    meta.insert("tokenizer.ggml.model", Meta::Str("gpt2"));
    meta.insert("tokenizer.ggml.tokens", Meta::Strs(tokens));
    meta.insert("tokenizer.ggml.merges", Meta::Strs(Vec::new()));
    meta.insert("tokenizer.ggml.token_type", Meta::I32s(vec![1; vocab]));
    meta.insert("tokenizer.ggml.bos_token_id", Meta::U32(0));
    meta.insert("tokenizer.ggml.eos_token_id", Meta::U32(1));
    edit(&mut meta);
    // ggml dims: the row length first.
    let mut tensors: Vec<(String, Vec<u64>)> = vec![
        ("token_embd.weight".into(), vec![h, vocab as u64]),
        ("output_norm.weight".into(), vec![h]),
    ];
    for (name, dims) in [
        ("attn_norm.weight", vec![h]),
        ("ffn_norm.weight", vec![h]),
        ("attn_q.weight", vec![h, heads * hd]),
        ("attn_k.weight", vec![h, kv * hd]),
        ("attn_v.weight", vec![h, kv * hd]),
        ("attn_output.weight", vec![heads * hd, h]),
        ("ffn_gate.weight", vec![h, i]),
        ("ffn_up.weight", vec![h, i]),
        ("ffn_down.weight", vec![i, h]),
    ] {
        tensors.push((format!("blk.0.{name}"), dims));
    }
    edit_tensors(&mut tensors);
    let s = |out: &mut Vec<u8>, x: &str| {
        out.extend((x.len() as u64).to_le_bytes());
        out.extend(x.as_bytes());
    };
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        s(&mut out, k);
        match v {
            Meta::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::Str(x) => {
                out.extend(8u32.to_le_bytes());
                s(&mut out, x);
            }
            Meta::Strs(xs) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((xs.len() as u64).to_le_bytes());
                for x in xs {
                    s(&mut out, x);
                }
            }
            Meta::I32s(xs) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((xs.len() as u64).to_le_bytes());
                for x in xs {
                    out.extend(x.to_le_bytes());
                }
            }
        }
    }
    let mut data = Vec::new();
    for (t, (name, dims)) in tensors.iter().enumerate() {
        s(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(0u32.to_le_bytes()); // F32
        out.extend((data.len() as u64).to_le_bytes());
        let n: u64 = dims.iter().product();
        let norm = name.ends_with("norm.weight");
        for j in 0..n {
            let x = if norm {
                1.0f32
            } else {
                ((t as u64 * 31 + j * 7) % 13) as f32 / 100.0 - 0.06
            };
            data.extend(x.to_le_bytes());
        }
        data.resize(data.len().next_multiple_of(32), 0);
    }
    out.resize(out.len().next_multiple_of(32), 0);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

type MetaEdit = Box<dyn FnOnce(&mut BTreeMap<&'static str, Meta>)>;

fn import_error(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut BTreeMap<&'static str, Meta>),
) -> String {
    let path = dir.join(format!("{name}.gguf"));
    tiny_gguf(&path, edit);
    match import_gguf(&path, &dir.join(name)) {
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains(path.to_str().unwrap()), "{e}");
            e
        }
        Ok(cfg) => panic!("{name}: imported {cfg:?}"),
    }
}

#[test]
fn gguf_import_of_the_tiny_file_works() {
    let dir = scratch("gguf-ok");
    let path = dir.join("ok.gguf");
    tiny_gguf(&path, |_| {});
    let cfg = import_gguf(&path, &dir.join("out")).unwrap();
    assert_eq!((cfg.num_layers, cfg.num_heads, cfg.vocab_size), (1, 2, 40));
    Model::load(&dir.join("out"), &Device::Cpu).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gguf_import_names_the_bad_key() {
    let dir = scratch("gguf-bad");
    let cases: Vec<(&str, &str, MetaEdit)> = vec![
        (
            "align0",
            "general.alignment",
            Box::new(|m| {
                m.insert("general.alignment", Meta::U32(0));
            }),
        ),
        (
            "heads0",
            "llama.attention.head_count",
            Box::new(|m| {
                m.insert("llama.attention.head_count", Meta::U32(0));
            }),
        ),
        (
            "kvheads0",
            "llama.attention.head_count_kv",
            Box::new(|m| {
                m.insert("llama.attention.head_count_kv", Meta::U32(0));
            }),
        ),
        (
            "blocks0",
            "llama.block_count",
            Box::new(|m| {
                m.insert("llama.block_count", Meta::U32(0));
            }),
        ),
        (
            "noarch",
            "missing string `general.architecture`",
            Box::new(|m| {
                m.remove("general.architecture");
            }),
        ),
        (
            "notok",
            "missing string `tokenizer.ggml.model`",
            Box::new(|m| {
                m.remove("tokenizer.ggml.model");
            }),
        ),
        (
            "eos",
            "tokenizer.ggml.eos_token_id",
            Box::new(|m| {
                m.insert("tokenizer.ggml.eos_token_id", Meta::U32(40));
            }),
        ),
        (
            "bos",
            "tokenizer.ggml.bos_token_id",
            Box::new(|m| {
                m.insert("tokenizer.ggml.bos_token_id", Meta::U32(99_999));
            }),
        ),
        (
            "eps",
            "llama.attention.layer_norm_rms_epsilon",
            Box::new(|m| {
                m.insert("llama.attention.layer_norm_rms_epsilon", Meta::F32(-1.0));
            }),
        ),
        (
            "theta",
            "llama.rope.freq_base",
            Box::new(|m| {
                m.insert("llama.rope.freq_base", Meta::F32(f32::NAN));
            }),
        ),
        (
            "duptoken",
            "lists \"t3\" twice (ids 3 and 7)",
            Box::new(|m| {
                let mut tokens: Vec<String> = (0..40).map(|t| format!("t{t}")).collect();
                tokens[7] = "t3".into();
                m.insert("tokenizer.ggml.tokens", Meta::Strs(tokens));
            }),
        ),
    ];
    let path = dir.join("dup.gguf");
    tiny_gguf_with(&path, |_| {}, |t| t.push(t[0].clone()));
    let e = import_gguf(&path, &dir.join("dup"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`token_embd.weight` appears twice"), "{e}");
    for (name, key, edit) in cases {
        let e = import_error(&dir, name, edit);
        assert!(e.contains(key), "{name}: {e}");
        assert!(
            !dir.join(name).join("model.safetensors").exists(),
            "{name} wrote a model"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a GGUF carries beyond the model it imports is refused, not dropped: a block past
/// block_count, Llama 3.1's per-frequency rope factors, a rope scaling kind config.json cannot hold;
/// linear rope scaling carries over.
#[test]
fn gguf_import_refuses_what_it_would_drop_and_keeps_linear_rope_scaling() {
    let dir = scratch("gguf-extra");
    let path = dir.join("extra.gguf");
    tiny_gguf_with(
        &path,
        |_| {},
        |t| t.push(("blk.1.attn_norm.weight".into(), vec![16])),
    );
    let e = import_gguf(&path, &dir.join("extra"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tensor `blk.1.attn_norm.weight` is not part of the imported model"),
        "{e}"
    );
    let path = dir.join("freqs.gguf");
    tiny_gguf_with(
        &path,
        |_| {},
        |t| t.push(("rope_freqs.weight".into(), vec![4])),
    );
    let e = import_gguf(&path, &dir.join("freqs"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`rope_freqs.weight`"), "{e}");
    let e = import_error(&dir, "yarn", |m| {
        m.insert("llama.rope.scaling.type", Meta::Str("yarn"));
    });
    assert!(e.contains("`llama.rope.scaling.type` = \"yarn\""), "{e}");
    let path = dir.join("linear.gguf");
    tiny_gguf(&path, |m| {
        m.insert("llama.rope.scaling.type", Meta::Str("linear"));
        m.insert("llama.rope.scaling.factor", Meta::F32(4.0));
    });
    let cfg = import_gguf(&path, &dir.join("linear")).unwrap();
    assert_eq!(cfg.to_json()["rope_scaling"]["factor"], 4.0);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- config.json ----

fn config_error(cfg: &serde_json::Value) -> String {
    match LlamaConfig::from_json(cfg, Path::new("m/config.json")) {
        Err(e) => e.to_string(),
        Ok(c) => panic!("accepted {cfg}: {c:?}"),
    }
}

fn small_config() -> serde_json::Value {
    json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 10,
        "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "eos_token_id": 2, "bos_token_id": 1})
}

fn with(key: &str, v: serde_json::Value) -> serde_json::Value {
    let mut c = small_config();
    c.as_object_mut().unwrap().insert(key.into(), v);
    c
}

#[test]
fn config_rejects_values_that_make_no_model() {
    assert!(LlamaConfig::from_json(&small_config(), Path::new("m/config.json")).is_ok());
    for (key, value, named) in [
        ("rms_norm_eps", json!(0.0), "rms_norm_eps"),
        ("rms_norm_eps", json!(-1e-5), "rms_norm_eps"),
        ("rope_theta", json!(0), "rope_theta"),
        ("rope_theta", json!(-10000.0), "rope_theta"),
        ("num_hidden_layers", json!(0), "num_hidden_layers"),
        ("num_attention_heads", json!(0), "num_attention_heads"),
        ("hidden_size", json!(0), "hidden_size"),
        ("vocab_size", json!(0), "vocab_size"),
        ("intermediate_size", json!(0), "intermediate_size"),
        ("head_dim", json!(0), "head_dim"),
        ("eos_token_id", json!(10), "eos_token_id"),
        ("eos_token_id", json!([2, 11]), "eos_token_id"),
        ("eos_token_id", json!([2, "</s>"]), "eos_token_id"),
        ("eos_token_id", json!([2, 1.5]), "eos_token_id"),
        ("eos_token_id", json!("2"), "eos_token_id"),
        ("bos_token_id", json!(10), "bos_token_id"),
        ("architectures", json!("LlamaForCausalLM"), "architectures"),
        (
            "architectures",
            json!(["LlamaForCausalLM", 3]),
            "architectures",
        ),
        ("model_type", json!(7), "model_type"),
        ("model_type", json!(null), "model_type"),
        (
            "rope_scaling",
            json!({"rope_type": "linear", "factor": 0.0}),
            "rope_scaling.factor",
        ),
        (
            "rope_scaling",
            json!({"rope_type": "linear", "factor": -2.0}),
            "rope_scaling.factor",
        ),
        (
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
            "rope_scaling.low_freq_factor",
        ),
        (
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 0}),
            "rope_scaling.original_max_position_embeddings",
        ),
        (
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
            "rope_scaling.high_freq_factor",
        ),
    ] {
        let e = config_error(&with(key, value.clone()));
        assert!(
            e.contains("m/config.json") && e.contains(named),
            "{key} = {value}: {e}"
        );
    }
}

#[test]
fn config_accepts_the_supported_families() {
    let p = Path::new("m/config.json");
    let llama3 = json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": true, "max_position_embeddings": 131072,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
        "attention_bias": false, "mlp_bias": false,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}});
    let c = LlamaConfig::from_json(&llama3, p).unwrap();
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    let qwen2 = json!({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": true, "max_position_embeddings": 32768,
        "bos_token_id": 151643, "eos_token_id": 151645, "sliding_window": 32768,
        "use_sliding_window": false, "rope_scaling": null, "hidden_act": "silu"});
    assert!(LlamaConfig::from_json(&qwen2, p).unwrap().qkv_bias);
    let mistral = json!({"architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-5, "sliding_window": null, "bos_token_id": 1, "eos_token_id": 2,
        "max_position_embeddings": 32768, "tie_word_embeddings": false});
    LlamaConfig::from_json(&mistral, p).unwrap();
    let reward = json!({"architectures": ["LlamaForSequenceClassification"], "model_type": "llama",
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "num_labels": 1, "eos_token_id": 2});
    assert!(LlamaConfig::from_json(&reward, p).unwrap().scalar_head);
    let smol = LlamaConfig::smollm2_135m();
    // What the crate writes, it reads back.
    assert_eq!(LlamaConfig::from_json(&smol.to_json(), p).unwrap(), smol);
    let l3 = LlamaConfig::from_json(&llama3, p).unwrap();
    assert_eq!(LlamaConfig::from_json(&l3.to_json(), p).unwrap(), l3);
}

// ---- weights ----

fn tiny_model_dir(name: &str) -> PathBuf {
    let dir = scratch(name);
    builtin::write_tiny_model(&dir, 1).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    match Model::load(dir, &Device::Cpu) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("{} loaded", dir.display()),
    }
}

#[test]
fn weights_reject_tensors_the_model_does_not_use() {
    let dir = tiny_model_dir("weights-extra");
    let file = dir.join("model.safetensors");
    let original = read_f32_safetensors(&file);
    // A third layer where the config has two.
    let mut t = original.clone();
    let extra = t["model.layers.1.mlp.up_proj.weight"].clone();
    t.insert("model.layers.2.mlp.up_proj.weight".into(), extra);
    write_f32_safetensors(&file, &t, None);
    let e = load_error(&dir);
    assert!(
        e.contains(file.to_str().unwrap())
            && e.contains("`model.layers.2.mlp.up_proj.weight`")
            && e.contains("num_hidden_layers = 2"),
        "{e}"
    );
    // A name the model has no parameter for.
    let mut t = original.clone();
    t.insert("model.mystery.weight".into(), (vec![2], vec![0.0, 1.0]));
    write_f32_safetensors(&file, &t, None);
    let e = load_error(&dir);
    assert!(e.contains("`model.mystery.weight` is not used"), "{e}");
    // Attention biases the config does not enable.
    let mut t = original.clone();
    t.insert(
        "model.layers.0.self_attn.q_proj.bias".into(),
        (vec![64], vec![0.0; 64]),
    );
    write_f32_safetensors(&file, &t, None);
    assert!(load_error(&dir).contains("attention_bias"));
    // A scalar head on a causal LM.
    let mut t = original.clone();
    t.insert("score.weight".into(), (vec![1, 64], vec![0.0; 64]));
    write_f32_safetensors(&file, &t, None);
    assert!(load_error(&dir).contains("`score.weight`"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn weights_ignore_what_hugging_face_checkpoints_legitimately_carry() {
    let dir = tiny_model_dir("weights-hf");
    let file = dir.join("model.safetensors");
    let original = read_f32_safetensors(&file);
    let mut t = original.clone();
    t.insert(
        "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        (vec![8], vec![1.0; 8]),
    );
    // The tiny model ties its head: a stored copy equal to the embedding is the same parameter.
    let embed = t["model.embed_tokens.weight"].clone();
    t.insert("lm_head.weight".into(), embed.clone());
    write_f32_safetensors(&file, &t, None);
    Model::load(&dir, &Device::Cpu).unwrap();
    // One that differs would be silently dropped by the tie.
    let mut head = embed;
    head.1[0] += 1.0;
    t.insert("lm_head.weight".into(), head);
    write_f32_safetensors(&file, &t, None);
    let e = load_error(&dir);
    assert!(
        e.contains("`lm_head.weight` differs") && e.contains("tie_word_embeddings"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn weights_reject_a_tensor_in_two_shards() {
    let dir = tiny_model_dir("weights-shards");
    let file = dir.join("model.safetensors");
    let all = read_f32_safetensors(&file);
    std::fs::remove_file(&file).unwrap();
    let names: Vec<String> = all.keys().cloned().collect();
    let (a, b) = names.split_at(names.len() / 2);
    let shard = |part: &[String], extra: Option<&String>| -> F32Tensors {
        part.iter()
            .chain(extra)
            .map(|n| (n.clone(), all[n].clone()))
            .collect()
    };
    let mut map = serde_json::Map::new();
    for n in a {
        map.insert(n.clone(), json!("model-00001-of-00002.safetensors"));
    }
    for n in b {
        map.insert(n.clone(), json!("model-00002-of-00002.safetensors"));
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let (first, second) = (
        dir.join("model-00001-of-00002.safetensors"),
        dir.join("model-00002-of-00002.safetensors"),
    );
    write_f32_safetensors(&first, &shard(a, None), None);
    write_f32_safetensors(&second, &shard(b, None), None);
    Model::load(&dir, &Device::Cpu).unwrap();
    // The first shard's first tensor again in the second.
    write_f32_safetensors(&second, &shard(b, Some(&a[0])), None);
    let e = load_error(&dir);
    assert!(
        e.contains(&format!("`{}` is also in", a[0]))
            && e.contains("model-00001-of-00002")
            && e.contains("model-00002-of-00002"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- bench ----

fn bench_error<T: std::fmt::Debug>(r: rlhf_kernels::Result<T>) -> String {
    match r {
        Err(e) => e.to_string(),
        Ok(v) => panic!("ran: {v:?}"),
    }
}

#[test]
fn bench_sizes_of_zero_name_the_flag() {
    let cpu = Device::Cpu;
    let cfg = builtin::tiny_config();
    let e = bench_error(bench::bench_model(&cpu, &cfg, 0, 8, 1, false));
    assert!(e.contains("--batch"), "{e}");
    let e = bench_error(bench::bench_model(&cpu, &cfg, 1, 0, 1, false));
    assert!(e.contains("--seq-len"), "{e}");
    let e = bench_error(bench::bench_model(&cpu, &cfg, 1, 8, 0, false));
    assert!(e.contains("--reps"), "{e}");
    let e = bench_error(bench::bench_dpo_step(&cpu, &cfg, 1, 8, 0, true, false));
    assert!(e.contains("--reps"), "{e}");
    let e = bench_error(bench::bench_dpo_step(&cpu, &cfg, 0, 8, 1, true, false));
    assert!(e.contains("--pairs"), "{e}");
    let e = bench_error(bench::bench_dpo_step(&cpu, &cfg, 1, 1, 1, true, false));
    assert!(e.contains("--seq-len"), "{e}");
    let e = bench_error(bench::bench_online(&cpu, &cfg, true, 4, 0, 0, true, false));
    assert!(e.contains("--seq-len"), "{e}");
    let e = bench_error(bench::bench_attention(&cpu, 1, 8, 2, 2, 16, 0));
    assert!(e.contains("--reps"), "{e}");
    let e = bench_error(bench::bench_attention(&cpu, 1, 0, 2, 2, 16, 1));
    assert!(e.contains("--lens"), "{e}");
    let e = bench_error(bench::bench_attention(&cpu, 1, 8, 2, 2, 0, 1));
    assert!(e.contains("--head-dims"), "{e}");
    let e = bench_error(bench::bench_attention(&cpu, 1, 8, 0, 0, 4096, 1));
    assert!(e.contains("0 query heads"), "{e}");
    let hd = Heads {
        heads: 2,
        kv_heads: 1,
        head_dim: 16,
    };
    let e = bench_error(bench::bench_decode(&cpu, 1, 8, hd, 0));
    assert!(e.contains("--reps"), "{e}");
    let e = bench_error(bench::bench_decode(&cpu, 0, 8, hd, 1));
    assert!(e.contains("--decode-batch"), "{e}");
    let e = bench_error(bench::median_ms(&cpu, 0, 0, || Ok(())));
    assert!(e.contains("reps"), "{e}");
    // What `rlhf bench attention` must check before it divides by a length or a head dim.
    let ok = bench::check_attention_flags(&[512], 16_384, &[64, 128], &[1024], 64, 3);
    assert!(ok.is_ok());
    for (r, flag) in [
        (
            bench::check_attention_flags(&[0], 16_384, &[64], &[], 64, 3),
            "--lens",
        ),
        (
            bench::check_attention_flags(&[512], 0, &[64], &[], 64, 3),
            "--tokens",
        ),
        (
            bench::check_attention_flags(&[512], 16_384, &[0], &[], 64, 3),
            "--head-dims",
        ),
        (
            bench::check_attention_flags(&[512], 16_384, &[4096], &[], 64, 3),
            "--head-dims",
        ),
        (
            bench::check_attention_flags(&[512], 16_384, &[64], &[0], 64, 3),
            "--decode-lens",
        ),
        (
            bench::check_attention_flags(&[512], 16_384, &[64], &[16], 0, 3),
            "--decode-batch",
        ),
        (
            bench::check_attention_flags(&[512], 16_384, &[64], &[], 64, 0),
            "--reps",
        ),
    ] {
        let e = bench_error(r);
        assert!(e.contains(flag), "{flag}: {e}");
    }
    // Small but valid sizes still run.
    bench::bench_model(&cpu, &cfg, 1, 4, 1, false).unwrap();
}

#[test]
fn verify_rejects_a_tensor_its_family_never_reads() {
    // An optional output under a misspelt name was silently left unchecked and the file passed.
    let dir = scratch("verify-stray");
    let path = edited_golden(
        "dpo_sigmoid.safetensors",
        &dir.join("stray.safetensors"),
        |_, t| {
            let v = t.remove("chosen_rewards").unwrap();
            t.insert("chosen_reward".into(), v);
        },
    );
    let e = verify_error(&path);
    assert!(
        e.contains("tensor `chosen_reward` is not one the dpo family"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
