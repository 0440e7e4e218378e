//! The crate's one error type. Library code returns it; only the CLI turns it into a message and an
//! exit code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),

    #[error("cuBLAS: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),

    #[error("no CUDA device: {0}")]
    NoCuda(String),

    #[error("kernel `{kernel}` is not in this build: {why}")]
    MissingKernel { kernel: String, why: String },

    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },

    #[error("{op} does not support dtype {dtype}")]
    DType {
        op: &'static str,
        dtype: &'static str,
    },

    #[error("{op}: tensors live on different devices ({detail})")]
    DeviceMismatch { op: &'static str, detail: String },

    #[error("{op}: {detail}")]
    Unsupported { op: &'static str, detail: String },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: {detail}", path.display())]
    File { path: PathBuf, detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Error::Shape {
            op,
            detail: detail.into(),
        }
    }

    pub fn file(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            detail: detail.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
