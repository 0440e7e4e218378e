//! A model's per-token log-probabilities of a text and the gradient of their sum for every
//! parameter, on the CPU (f32) or a CUDA device (bf16), written for `bench/peers/bf16_precision.py`,
//! which compares both against PyTorch's f32 and bf16 on the same weights and tokens.
//!
//!   cargo run --release --example precision_dump -- MODEL_DIR TEXT_FILE cpu|cuda OUT
//!
//! writes OUT.json (tokens, log-probs, each gradient tensor's name and shape) and OUT.bin (the
//! gradients, f32, in that order).
use std::io::Write;

use rlhf_kernels::device::{DType, Device};
use rlhf_kernels::error::Result;
use rlhf_kernels::model::tokenizer::TextTokenizer;
use rlhf_kernels::model::{Model, Params};
use rlhf_kernels::train::{score, score_backward, ScoredBatch};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, text, device, out] = &args[..] else {
        eprintln!("usage: precision_dump MODEL_DIR TEXT_FILE cpu|cuda OUT");
        std::process::exit(2);
    };
    let dir = std::path::Path::new(dir);
    let device = match device.as_str() {
        "cuda" => Device::cuda()?,
        _ => Device::Cpu,
    };
    let model = Model::load(dir, &device)?;
    let text = std::fs::read_to_string(text).map_err(|e| rlhf_kernels::Error::io(text, e))?;
    let ids = TextTokenizer::load(dir)?.encode(text.trim_end(), true)?;
    // The first token as the prompt: every later token scored, as `rlhf logprobs` scores them.
    let seqs: Vec<(&[i32], &[i32])> = vec![(&ids[..1], &ids[1..])];
    let sb = ScoredBatch::build(&seqs, &[], false);
    let s = score(&model, &sb)?;
    let logprobs: Vec<f32> = s.per_token[..ids.len() - 1].to_vec();
    let mut grads = Params::zeros(&model.cfg, &device, DType::F32)?;
    score_backward(&model, &s, vec![1.0; sb.batch.len()], &mut grads)?;
    let mut tensors = Vec::new();
    let bin = format!("{out}.bin");
    let mut f = std::fs::File::create(&bin).map_err(|e| rlhf_kernels::Error::io(&bin, e))?;
    for (name, shape, values) in grads.hf_tensors(&model.cfg)? {
        tensors.push(serde_json::json!({"name": name, "shape": shape}));
        f.write_all(bytemuck::cast_slice(&values))
            .map_err(|e| rlhf_kernels::Error::io(&bin, e))?;
    }
    let index = serde_json::json!({"tokens": ids, "logprobs": logprobs, "tensors": tensors});
    let json = format!("{out}.json");
    std::fs::write(&json, index.to_string()).map_err(|e| rlhf_kernels::Error::io(&json, e))?;
    Ok(())
}
