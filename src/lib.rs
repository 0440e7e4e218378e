//! rlhf-kernels: preference post-training on one GPU, on hand-written CUDA kernels.
//!
//! Layers, each calling only the one below: `cli` → `train` → `model` → `ops` → `device`.

pub mod bench;
pub mod cli;
pub mod device;
pub mod error;
pub mod golden;
pub mod model;
pub mod ops;
pub mod rng;
pub mod testing;
pub mod train;
pub mod verify;

pub use device::{DType, Device, DeviceChoice, Tensor};
pub use error::{Error, Result};
