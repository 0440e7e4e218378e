//! SmolLM2-135M-Instruct imported from its GGUF (scripts/get-smollm2): it answers a question, its
//! chat template and tokenizer behave as the original's, and the CLI works on it. Without the model
//! these tests say they skip, unless RLHF_REQUIRE_MODEL=1 (scripts/test), where they fail.

use std::path::PathBuf;
use std::process::Command;

use rlhf_kernels::cli::{eos_ids, prompt_tokens};
use rlhf_kernels::device::Device;
use rlhf_kernels::model::generate::GenerateOptions;
use rlhf_kernels::model::tokenizer::{Message, TextTokenizer};
use rlhf_kernels::model::Model;

fn model_dir(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("RLHF_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".models/smollm2-135m-instruct")
        });
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    if std::env::var("RLHF_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
        panic!(
            "{test}: RLHF_REQUIRE_MODEL=1 but {} has no model; run scripts/get-smollm2",
            dir.display()
        );
    }
    println!(
        "{test}: skipped: {} has no model (scripts/get-smollm2 imports it)",
        dir.display()
    );
    None
}

#[test]
fn answers_the_capital_of_france() {
    let Some(dir) = model_dir("answers_the_capital_of_france") else {
        return;
    };
    let model = Model::load(&dir, &Device::Cpu).unwrap();
    let tok = TextTokenizer::load(&dir).unwrap();
    let ids = prompt_tokens(&tok, "What is the capital of France?", true).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 24,
        temperature: 0.0,
        eos: eos_ids(&model, &tok),
        ..Default::default()
    };
    let out = model.generate(&[ids], &opts, |_, _| {}).unwrap();
    let answer = tok.decode(&out[0].tokens, true).unwrap();
    println!("answer: {answer:?}");
    assert!(answer.contains("Paris"), "greedy answer: {answer:?}");
    assert!(out[0].finished, "the answer ends with <|im_end|>");
}

#[test]
fn tokenizer_and_chat_template_match_the_original() {
    let Some(dir) = model_dir("tokenizer_and_chat_template_match_the_original") else {
        return;
    };
    let tok = TextTokenizer::load(&dir).unwrap();
    let text = tok
        .apply_chat_template(
            &[Message {
                role: "user".into(),
                content: "Hi".into(),
            }],
            true,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&text, false).unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is one special token");
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        text,
        "decoding inverts encoding"
    );
    // SmolLM2 splits digits one by one.
    let digits = tok.encode("2024", false).unwrap();
    assert_eq!(digits.len(), 4);
    assert_eq!(tok.encode(" Paris", false).unwrap().len(), 1);
}

#[test]
fn cli_logprobs_json_and_generate() {
    let Some(dir) = model_dir("cli_logprobs_json_and_generate") else {
        return;
    };
    let bin = std::env::var("RLHF_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_rlhf").to_owned());
    let out = Command::new(&bin)
        .args([
            "logprobs",
            "--model",
            dir.to_str().unwrap(),
            "--text",
            "The capital of France is Paris.",
            "--json",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (tokens, lps) = (
        v["tokens"].as_array().unwrap(),
        v["logprobs"].as_array().unwrap(),
    );
    assert_eq!(tokens.len(), lps.len());
    assert!(lps[0].is_null());
    let last = lps.last().unwrap().as_f64().unwrap();
    assert!(
        last < 0.0 && last > -3.0,
        "'.' after 'Paris' is likely: {last}"
    );
    let out = Command::new(&bin)
        .args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "What is 2+2?",
            "--chat",
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokens/s"));
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

#[test]
fn import_rejects_files_it_cannot_read() {
    let bin = std::env::var("RLHF_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_rlhf").to_owned());
    let tmp = std::env::temp_dir().join(format!("rlhf-bad-{}.gguf", std::process::id()));
    std::fs::write(&tmp, b"not a gguf at all").unwrap();
    let out = Command::new(&bin)
        .args([
            "import-gguf",
            tmp.to_str().unwrap(),
            "/tmp/rlhf-never-written",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains("not a GGUF file") && err.contains(tmp.to_str().unwrap()),
        "{err}"
    );
    // A real header cut short.
    std::fs::write(&tmp, b"GGUF\x03\x00\x00\x00\x05\x00\x00\x00").unwrap();
    let out = Command::new(&bin)
        .args([
            "import-gguf",
            tmp.to_str().unwrap(),
            "/tmp/rlhf-never-written",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated GGUF"));
    std::fs::remove_file(&tmp).ok();
    assert!(!std::path::Path::new("/tmp/rlhf-never-written").exists());
}
