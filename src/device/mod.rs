//! Devices and tensors: `Device::Cpu` always works; `Device::Cuda` when a GPU, its driver and the
//! embedded kernels are all present.

pub mod cuda;
pub mod kernels;
pub mod profile;
pub mod tensor;

use std::fmt;
use std::sync::Arc;

pub use cuda::CudaDevice;
pub use tensor::{DType, Tensor};

use crate::error::{Error, Result};

/// What the user asked for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeviceChoice {
    /// CUDA device 0 when one is usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone)]
pub enum Device {
    Cpu,
    Cuda(Arc<CudaDevice>),
}

impl Device {
    /// The first CUDA device, or the reason there is none.
    pub fn cuda() -> Result<Device> {
        CudaDevice::shared(0).map(Device::Cuda)
    }

    pub fn from_choice(choice: DeviceChoice) -> Result<Device> {
        match choice {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda => Device::cuda(),
            DeviceChoice::Auto => Ok(Device::cuda().unwrap_or(Device::Cpu)),
        }
    }

    /// What activations and weights are stored in: f32 on the CPU (the reference), bf16 on CUDA.
    pub fn compute_dtype(&self) -> DType {
        if self.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    pub fn same(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Cuda(a), Device::Cuda(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(d) => d.synchronize(),
        }
    }

    pub(crate) fn as_cuda(&self, op: &'static str) -> Result<&Arc<CudaDevice>> {
        match self {
            Device::Cuda(d) => Ok(d),
            Device::Cpu => Err(Error::DeviceMismatch {
                op,
                detail: "expected a CUDA tensor".into(),
            }),
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(d) => write!(f, "cuda:{}", d.ordinal()),
        }
    }
}

/// Errors unless every tensor lives on `first`'s device.
pub fn same_device<'a>(op: &'static str, tensors: &[&'a Tensor]) -> Result<&'a Device> {
    let first = tensors[0].device();
    for t in &tensors[1..] {
        if !t.device().same(first) {
            return Err(Error::DeviceMismatch {
                op,
                detail: format!("{first:?} and {:?}", t.device()),
            });
        }
    }
    Ok(first)
}
