//! One module per kernel family, each the twin of `kernels/<family>.cu`: a CPU reference in plain
//! loops and a CUDA launcher behind one signature that dispatches on the tensors' device.

pub mod matmul;
pub mod norm;
