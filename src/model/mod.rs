//! The Llama-family model: configuration, weights, the decoder with its hand-written backward,
//! generation with a KV cache, the tokenizer with its chat template, and GGUF import.

pub mod config;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod tokenizer;
pub mod weights;

pub use config::LlamaConfig;
pub use llama::{Activations, Batch, KvCache, Model, SharedPrefix};
pub use weights::Params;
