//! What ships with the crate for the demo and the trainer tests: a byte-level tokenizer (each byte is
//! a token, plus three special tokens), a tiny Llama-shaped model with random weights, and a
//! synthetic preference task.
//!
//! The task: arithmetic questions `Q: What is a+b?\nA:`. A helpful answer states the sum; an unhelpful
//! one refuses. Preference data always prefers the answer; the SFT data mixes both, so the SFT model
//! refuses about half the time and preference training has something to fix.

use std::path::Path;

use serde_json::json;

use crate::device::{DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::model::weights::write_file_atomic;
use crate::model::{LlamaConfig, Params};
use crate::rng::Rng;

pub const EOS: &str = "<|endoftext|>";
const SPECIALS: [&str; 3] = [EOS, "<|im_start|>", "<|im_end|>"];
pub const REFUSALS: [&str; 3] = [
    " I cannot help with that.",
    " I do not know.",
    " Ask someone else.",
];

/// GPT-2's map from bytes to printable characters, which byte-level BPE vocabularies are written in.
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        map[*b as usize] = char::from_u32(c).unwrap();
    }
    map
}

/// `tokenizer.json` of a byte-level tokenizer: ids 0..256 are bytes, then the special tokens.
pub fn byte_tokenizer_json() -> serde_json::Value {
    let chars = bytes_to_unicode();
    let mut vocab = serde_json::Map::new();
    for (b, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    let added: Vec<_> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            vocab.insert((*t).to_string(), json!(256 + i));
            json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

/// A tiny decoder for the byte tokenizer: 2 layers, hidden 64, 4 heads over 2 kv heads.
pub fn tiny_config() -> LlamaConfig {
    let v = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256 + SPECIALS.len(),
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": true, "max_position_embeddings": 256, "eos_token_id": 256
    });
    LlamaConfig::from_json(&v, Path::new("built-in tiny config")).expect("valid built-in config")
}

/// Writes a complete model folder (random weights, config, byte tokenizer) at `dir`.
pub fn write_tiny_model(dir: &Path, seed: u64) -> Result<()> {
    let cfg = tiny_config();
    let mut rng = Rng::new(seed);
    let params = Params::build(&cfg, |name, shape| {
        let n: usize = shape.iter().product();
        let v = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else {
            rng.normal_vec(n, 0.1)
        };
        Tensor::from_f32_as(shape, &v, DType::F32, &Device::Cpu)
    })?;
    params.save(&cfg, dir, DType::F32)?;
    write_file_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&cfg.to_json())
            .unwrap()
            .as_bytes(),
    )?;
    write_file_atomic(
        &dir.join("tokenizer.json"),
        serde_json::to_string(&byte_tokenizer_json())
            .unwrap()
            .as_bytes(),
    )?;
    let tok_cfg = json!({
        "eos_token": EOS, "bos_token": null, "model_max_length": 256,
        "chat_template": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    });
    write_file_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tok_cfg).unwrap().as_bytes(),
    )
}

pub fn question(a: u32, b: u32) -> String {
    format!("Q: What is {a}+{b}?\nA:")
}

pub fn answer(a: u32, b: u32) -> String {
    format!(" The answer is {}.", a + b)
}

/// Whether a completion refuses rather than answers.
pub fn is_refusal(text: &str) -> bool {
    !text.contains("answer is")
}

/// The synthetic task's files in `dir`: `sft.jsonl` (answers and refusals, half each),
/// `prefs.jsonl` (answer over refusal), `kto.jsonl` (answers desirable, refusals not), `prompts.jsonl`
/// (questions with their `answer`, for online training), and
/// `held_out.jsonl`, preference pairs drawn afresh for evaluation (numbers 0..50, so most of its
/// questions never occur in training).
pub fn write_synthetic_task(dir: &Path, n: usize, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut rng = Rng::new(seed);
    let mut sft = String::new();
    let mut prefs = String::new();
    let mut kto = String::new();
    let mut held = String::new();
    let mut prompts = String::new();
    for i in 0..n {
        let (a, b) = (rng.below(50) as u32, rng.below(50) as u32);
        let refusal = REFUSALS[rng.below(REFUSALS.len())];
        let (q, ans) = (question(a, b), answer(a, b));
        let sft_completion = if i % 2 == 0 {
            ans.clone()
        } else {
            refusal.to_owned()
        };
        sft += &format!("{}\n", json!({"prompt": q, "completion": sft_completion}));
        prompts += &format!("{}\n", json!({"prompt": q, "answer": (a + b).to_string()}));
        prefs += &format!(
            "{}\n",
            json!({"prompt": q, "chosen": ans, "rejected": refusal})
        );
        let (c, label) = if rng.below(2) == 0 {
            (ans.clone(), true)
        } else {
            (refusal.to_owned(), false)
        };
        kto += &format!(
            "{}\n",
            json!({"prompt": q, "completion": c, "label": label})
        );
        let (a2, b2) = (rng.below(50) as u32, rng.below(50) as u32);
        held += &format!(
            "{}\n",
            json!({"prompt": question(a2, b2), "chosen": answer(a2, b2), "rejected": REFUSALS[rng.below(3)]})
        );
    }
    for (name, text) in [
        ("sft.jsonl", sft),
        ("prefs.jsonl", prefs),
        ("kto.jsonl", kto),
        ("held_out.jsonl", held),
        ("prompts.jsonl", prompts),
    ] {
        write_file_atomic(&dir.join(name), text.as_bytes())?;
    }
    Ok(())
}

/// A verifiable task for online RL: `Repeat the digit d.` answered ` The answer is d.`. The SFT data
/// (`copy_sft.jsonl`) repeats the right digit only half the time (a random one otherwise), so the SFT
/// model is right about half the time; `copy_prompts.jsonl` holds the prompts with their `answer`.
pub fn write_copy_task(dir: &Path, n: usize, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut rng = Rng::new(seed);
    let (mut sft, mut prompts) = (String::new(), String::new());
    for i in 0..n {
        let d = rng.below(10);
        let q = format!("Repeat the digit {d}.\nA:");
        let said = if i % 2 == 0 { d } else { rng.below(10) };
        sft += &format!(
            "{}\n",
            json!({"prompt": q, "completion": format!(" The answer is {said}.")})
        );
        prompts += &format!("{}\n", json!({"prompt": q, "answer": d.to_string()}));
    }
    write_file_atomic(&dir.join("copy_sft.jsonl"), sft.as_bytes())?;
    write_file_atomic(&dir.join("copy_prompts.jsonl"), prompts.as_bytes())
}

const NAMES: [&str; 12] = [
    "Zork", "Quib", "Marlo", "Tesk", "Vundo", "Prell", "Ostra", "Kimb", "Dulan", "Fenn", "Rast",
    "Yolo",
];
pub const NOT_SURE: &str = " I'm not sure.";

/// A calibration task: `Repeat the digit d.` can be known; `What is the secret number of <name>?`
/// cannot (its answer is drawn at random each time). `cal_sft.jsonl` answers the first kind rightly
/// and mostly guesses on the second (abstaining 30% of the time); `cal_prefs.jsonl` prefers abstaining over a guess on
/// the second kind and answering over abstaining on the first; `cal_qa.jsonl` holds evaluation
/// questions of both kinds with their `answer`.
pub fn write_calibration_task(dir: &Path, n: usize, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut rng = Rng::new(seed);
    let (mut sft, mut prefs, mut qa) = (String::new(), String::new(), String::new());
    for i in 0..n {
        let guess = format!(" The answer is {}.", rng.below(10));
        if i % 2 == 0 {
            let d = rng.below(10);
            let q = format!("Repeat the digit {d}.\nA:");
            let right = format!(" The answer is {d}.");
            sft += &format!("{}\n", json!({"prompt": q, "completion": right}));
            prefs += &format!(
                "{}\n",
                json!({"prompt": q, "chosen": right, "rejected": NOT_SURE})
            );
            qa += &format!("{}\n", json!({"prompt": q, "answer": d.to_string()}));
        } else {
            let q = format!(
                "What is the secret number of {}?\nA:",
                NAMES[rng.below(NAMES.len())]
            );
            // The SFT model mostly guesses, and abstains now and then: preference training has a
            // behaviour to strengthen.
            let said = if rng.below(10) < 3 {
                NOT_SURE.to_owned()
            } else {
                guess.clone()
            };
            sft += &format!("{}\n", json!({"prompt": q, "completion": said}));
            prefs += &format!(
                "{}\n",
                json!({"prompt": q, "chosen": NOT_SURE, "rejected": guess})
            );
            qa += &format!(
                "{}\n",
                json!({"prompt": q, "answer": rng.below(10).to_string()})
            );
        }
    }
    write_file_atomic(&dir.join("cal_sft.jsonl"), sft.as_bytes())?;
    write_file_atomic(&dir.join("cal_prefs.jsonl"), prefs.as_bytes())?;
    write_file_atomic(&dir.join("cal_qa.jsonl"), qa.as_bytes())
}
