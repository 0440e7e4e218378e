//! A row-major tensor of f32 or bf16 on the CPU or a CUDA device.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use cudarc::driver::CudaSlice;
use half::bf16;

use super::Device;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    /// Token ids and other indices.
    I32,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
            DType::I32 => 4,
        }
    }
}

pub enum HostData {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    I32(Vec<i32>),
}

pub enum CudaData {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<bf16>),
    I32(CudaSlice<i32>),
}

pub enum Storage {
    Cpu(HostData),
    Cuda(CudaData),
}

pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
    device: Device,
}

static POISON: AtomicBool = AtomicBool::new(false);

/// While on, every output buffer an op allocates starts as NaN, so an element a kernel forgets to
/// write shows up in the comparison. Tests turn it on; it costs a memset per allocation.
pub fn set_poisoning(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

pub fn poisoning() -> bool {
    POISON.load(Ordering::Relaxed)
}

static DEVICE_BYTES_LIVE: AtomicUsize = AtomicUsize::new(0);
static DEVICE_BYTES_PEAK: AtomicUsize = AtomicUsize::new(0);

/// Bytes of CUDA tensors alive now, over every device of the process: what PyTorch's
/// `memory_allocated` counts (not the pool's cached blocks, the context or cuBLAS's workspace).
pub fn device_bytes_live() -> usize {
    DEVICE_BYTES_LIVE.load(Ordering::Relaxed)
}

/// The most [`device_bytes_live`] has been since the last [`reset_device_bytes_peak`] (PyTorch's
/// `max_memory_allocated`).
pub fn device_bytes_peak() -> usize {
    DEVICE_BYTES_PEAK.load(Ordering::Relaxed)
}

pub fn reset_device_bytes_peak() {
    DEVICE_BYTES_PEAK.store(device_bytes_live(), Ordering::Relaxed);
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    pub fn from_f32(shape: &[usize], data: Vec<f32>, device: &Device) -> Result<Tensor> {
        Tensor::from_host(shape, HostData::F32(data), device)
    }

    pub fn from_i32(shape: &[usize], data: Vec<i32>, device: &Device) -> Result<Tensor> {
        Tensor::from_host(shape, HostData::I32(data), device)
    }

    /// An f32 host vector stored as `dtype` (rounded to nearest for bf16, truncated for i32).
    pub fn from_f32_as(
        shape: &[usize],
        data: &[f32],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let host = match dtype {
            DType::F32 => HostData::F32(data.to_vec()),
            DType::BF16 => HostData::BF16(data.iter().map(|&v| bf16::from_f32(v)).collect()),
            DType::I32 => HostData::I32(data.iter().map(|&v| v as i32).collect()),
        };
        Tensor::from_host(shape, host, device)
    }

    pub fn from_host(shape: &[usize], data: HostData, device: &Device) -> Result<Tensor> {
        let (len, dtype) = match &data {
            HostData::F32(v) => (v.len(), DType::F32),
            HostData::BF16(v) => (v.len(), DType::BF16),
            HostData::I32(v) => (v.len(), DType::I32),
        };
        if len != numel(shape) {
            return Err(Error::shape(
                "Tensor::from_host",
                format!("{len} values for shape {shape:?}"),
            ));
        }
        let _profile = device
            .is_cuda()
            .then(|| super::profile::scope(device, "copy to device"));
        let storage = match device {
            Device::Cpu => Storage::Cpu(data),
            Device::Cuda(d) => Storage::Cuda(match data {
                HostData::F32(v) => CudaData::F32(d.upload(&v)?),
                HostData::BF16(v) => CudaData::BF16(d.upload(&v)?),
                HostData::I32(v) => CudaData::I32(d.upload(&v)?),
            }),
        };
        Ok(Tensor::assemble(
            shape.to_vec(),
            dtype,
            storage,
            device.clone(),
        ))
    }

    /// An output buffer: unspecified contents (NaN while poisoning is on) that the op must overwrite.
    pub fn empty(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n = numel(shape);
        let storage = match device {
            Device::Cpu => {
                let fill = if poisoning() { f32::NAN } else { 0.0 };
                Storage::Cpu(match dtype {
                    DType::F32 => HostData::F32(vec![fill; n]),
                    DType::BF16 => HostData::BF16(vec![bf16::from_f32(fill); n]),
                    DType::I32 => HostData::I32(vec![-1; n]),
                })
            }
            Device::Cuda(d) => Storage::Cuda(match dtype {
                DType::F32 => CudaData::F32(d.alloc(n)?),
                DType::BF16 => CudaData::BF16(d.alloc(n)?),
                DType::I32 => CudaData::I32(d.alloc(n)?),
            }),
        };
        Ok(Tensor::assemble(
            shape.to_vec(),
            dtype,
            storage,
            device.clone(),
        ))
    }

    pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n = numel(shape);
        let storage = match device {
            Device::Cpu => Storage::Cpu(match dtype {
                DType::F32 => HostData::F32(vec![0.0; n]),
                DType::BF16 => HostData::BF16(vec![bf16::ZERO; n]),
                DType::I32 => HostData::I32(vec![0; n]),
            }),
            Device::Cuda(d) => Storage::Cuda(match dtype {
                DType::F32 => CudaData::F32(d.zeros(n)?),
                DType::BF16 => CudaData::BF16(d.zeros(n)?),
                DType::I32 => CudaData::I32(d.zeros(n)?),
            }),
        };
        Ok(Tensor::assemble(
            shape.to_vec(),
            dtype,
            storage,
            device.clone(),
        ))
    }

    /// Every tensor is built here, so that CUDA tensors are counted in [`device_bytes_live`].
    fn assemble(shape: Vec<usize>, dtype: DType, storage: Storage, device: Device) -> Tensor {
        if let Storage::Cuda(_) = storage {
            let bytes = numel(&shape) * dtype.size();
            let live = DEVICE_BYTES_LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
            DEVICE_BYTES_PEAK.fetch_max(live, Ordering::Relaxed);
        }
        Tensor {
            shape,
            dtype,
            storage,
            device,
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// Bytes of the data (elements times the dtype's size).
    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }

    /// `[rows, cols]`, treating every leading dimension as rows.
    pub fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.shape.split_last() {
            Some((&cols, lead)) if !lead.is_empty() => Ok((lead.iter().product(), cols)),
            _ => Err(Error::shape(
                op,
                format!("expected at least 2 dims, got {:?}", self.shape),
            )),
        }
    }

    pub fn expect_shape(&self, op: &'static str, name: &str, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(Error::shape(
                op,
                format!("{name} has shape {:?}, expected {shape:?}", self.shape),
            ));
        }
        Ok(())
    }

    pub fn expect_dtype(&self, op: &'static str, dtype: DType) -> Result<()> {
        if self.dtype != dtype {
            return Err(Error::DType {
                op,
                dtype: self.dtype.name(),
            });
        }
        Ok(())
    }

    /// A host copy of the data as stored.
    pub fn to_host(&self) -> Result<HostData> {
        let n = self.numel();
        Ok(match &self.storage {
            Storage::Cpu(HostData::F32(v)) => HostData::F32(v.clone()),
            Storage::Cpu(HostData::BF16(v)) => HostData::BF16(v.clone()),
            Storage::Cpu(HostData::I32(v)) => HostData::I32(v.clone()),
            Storage::Cuda(data) => {
                let d = self.device.as_cuda("to_host")?;
                let _profile = super::profile::scope(&self.device, "copy to host");
                match data {
                    CudaData::F32(s) => HostData::F32(d.download(s, n)?),
                    CudaData::BF16(s) => HostData::BF16(d.download(s, n)?),
                    CudaData::I32(s) => HostData::I32(d.download(s, n)?),
                }
            }
        })
    }

    /// The values as f32 on the host (a copy; bf16 widened exactly).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(match self.to_host()? {
            HostData::F32(v) => v,
            HostData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostData::I32(v) => v.iter().map(|&x| x as f32).collect(),
        })
    }

    /// The values of an i32 tensor on the host (a copy).
    pub fn to_i32_vec(&self) -> Result<Vec<i32>> {
        match self.to_host()? {
            HostData::I32(v) => Ok(v),
            _ => Err(Error::DType {
                op: "to_i32_vec",
                dtype: self.dtype.name(),
            }),
        }
    }

    /// A copy on the same device (device-to-device on a GPU).
    pub fn duplicate(&self) -> Result<Tensor> {
        let storage = match &self.storage {
            Storage::Cpu(HostData::F32(v)) => Storage::Cpu(HostData::F32(v.clone())),
            Storage::Cpu(HostData::BF16(v)) => Storage::Cpu(HostData::BF16(v.clone())),
            Storage::Cpu(HostData::I32(v)) => Storage::Cpu(HostData::I32(v.clone())),
            Storage::Cuda(data) => {
                let stream = self.device.as_cuda("duplicate")?.stream();
                Storage::Cuda(match data {
                    CudaData::F32(s) => CudaData::F32(stream.clone_dtod(s)?),
                    CudaData::BF16(s) => CudaData::BF16(stream.clone_dtod(s)?),
                    CudaData::I32(s) => CudaData::I32(stream.clone_dtod(s)?),
                })
            }
        };
        Ok(Tensor::assemble(
            self.shape.clone(),
            self.dtype,
            storage,
            self.device.clone(),
        ))
    }

    /// Copies `rows` rows of `src` starting at `src_row` into this tensor at `dst_row`; both are 2-D
    /// with the same width and dtype (a KV cache append).
    pub fn copy_rows(
        &mut self,
        dst_row: usize,
        src: &Tensor,
        src_row: usize,
        rows: usize,
    ) -> Result<()> {
        const OP: &str = "copy_rows";
        let (dst_rows, width) = self.dims2(OP)?;
        let (src_rows, src_width) = src.dims2(OP)?;
        if width != src_width || self.dtype != src.dtype {
            return Err(Error::shape(
                OP,
                format!(
                    "{:?} {} into {:?} {}",
                    src.shape,
                    src.dtype.name(),
                    self.shape,
                    self.dtype.name()
                ),
            ));
        }
        if dst_row + rows > dst_rows || src_row + rows > src_rows {
            return Err(Error::shape(
                OP,
                format!(
                    "rows {src_row}..+{rows} into {dst_row}..+{rows} of {src_rows} and {dst_rows}"
                ),
            ));
        }
        self.copy_elements(dst_row * width, src, src_row * width, rows * width)
    }

    /// Copies `n` elements of `src` from element `src_at` into this tensor at element `dst_at`, of
    /// any shapes and one dtype, on one device (on CUDA one device-to-device copy, which a graph
    /// can record).
    pub fn copy_elements(
        &mut self,
        dst_at: usize,
        src: &Tensor,
        src_at: usize,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "copy_elements";
        if self.dtype != src.dtype || dst_at + n > self.numel() || src_at + n > src.numel() {
            return Err(Error::shape(
                OP,
                format!(
                    "{n} elements at {src_at} of {:?} {} into {dst_at} of {:?} {}",
                    src.shape,
                    src.dtype.name(),
                    self.shape,
                    self.dtype.name()
                ),
            ));
        }
        let (a, b) = (src_at, dst_at);
        match (&mut self.storage, &src.storage) {
            (Storage::Cpu(HostData::F32(d)), Storage::Cpu(HostData::F32(s))) => {
                d[b..b + n].copy_from_slice(&s[a..a + n])
            }
            (Storage::Cpu(HostData::BF16(d)), Storage::Cpu(HostData::BF16(s))) => {
                d[b..b + n].copy_from_slice(&s[a..a + n])
            }
            (Storage::Cpu(HostData::I32(d)), Storage::Cpu(HostData::I32(s))) => {
                d[b..b + n].copy_from_slice(&s[a..a + n])
            }
            (Storage::Cuda(dst), Storage::Cuda(srcd)) => {
                let stream = self.device.as_cuda(OP)?.stream().clone();
                match (dst, srcd) {
                    (CudaData::F32(d), CudaData::F32(s)) => {
                        stream.memcpy_dtod(&s.slice(a..a + n), &mut d.slice_mut(b..b + n))?
                    }
                    (CudaData::BF16(d), CudaData::BF16(s)) => {
                        stream.memcpy_dtod(&s.slice(a..a + n), &mut d.slice_mut(b..b + n))?
                    }
                    (CudaData::I32(d), CudaData::I32(s)) => {
                        stream.memcpy_dtod(&s.slice(a..a + n), &mut d.slice_mut(b..b + n))?
                    }
                    _ => unreachable!("dtypes checked above"),
                }
            }
            _ => {
                return Err(Error::DeviceMismatch {
                    op: OP,
                    detail: "source and destination on different devices".into(),
                })
            }
        }
        Ok(())
    }

    /// Overwrites every value of this i32 tensor from the host, in place (its device buffer keeps
    /// its address, as a recorded graph that reads it needs).
    pub fn write_i32(&mut self, values: &[i32]) -> Result<()> {
        const OP: &str = "write_i32";
        if values.len() != self.numel() {
            return Err(Error::shape(
                OP,
                format!("{} values for shape {:?}", values.len(), self.shape),
            ));
        }
        match &mut self.storage {
            Storage::Cpu(HostData::I32(v)) => v.copy_from_slice(values),
            Storage::Cuda(CudaData::I32(s)) => {
                let _profile = super::profile::scope(&self.device, "copy to device");
                let stream = self.device.as_cuda(OP)?.stream().clone();
                stream.memcpy_htod(values, s)?;
            }
            _ => {
                return Err(Error::DType {
                    op: OP,
                    dtype: self.dtype.name(),
                })
            }
        }
        Ok(())
    }

    /// The same data under another shape with as many elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("{:?} to {shape:?}", self.shape),
            ));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_host(&self.shape, self.to_host()?, device)
    }

    pub fn cpu_i32(&self, op: &'static str) -> Result<&[i32]> {
        match &self.storage {
            Storage::Cpu(HostData::I32(v)) => Ok(v),
            Storage::Cpu(_) => Err(Error::DType {
                op,
                dtype: self.dtype.name(),
            }),
            Storage::Cuda(_) => Err(Error::DeviceMismatch {
                op,
                detail: "expected a CPU tensor".into(),
            }),
        }
    }

    pub fn cuda_i32(&self, op: &'static str) -> Result<&CudaSlice<i32>> {
        match &self.storage {
            Storage::Cuda(CudaData::I32(s)) => Ok(s),
            Storage::Cuda(_) => Err(Error::DType {
                op,
                dtype: self.dtype.name(),
            }),
            Storage::Cpu(_) => Err(Error::DeviceMismatch {
                op,
                detail: "expected a CUDA tensor".into(),
            }),
        }
    }

    /// A CPU f32 view of the host data, or an error naming the op when the tensor is elsewhere.
    pub fn cpu_f32(&self, op: &'static str) -> Result<&[f32]> {
        match &self.storage {
            Storage::Cpu(HostData::F32(v)) => Ok(v),
            Storage::Cpu(_) => Err(Error::DType {
                op,
                dtype: self.dtype.name(),
            }),
            Storage::Cuda(_) => Err(Error::DeviceMismatch {
                op,
                detail: "expected a CPU tensor".into(),
            }),
        }
    }

    pub fn cpu_f32_mut(&mut self, op: &'static str) -> Result<&mut [f32]> {
        match &mut self.storage {
            Storage::Cpu(HostData::F32(v)) => Ok(v),
            Storage::Cpu(_) => Err(Error::DType {
                op,
                dtype: self.dtype.name(),
            }),
            Storage::Cuda(_) => Err(Error::DeviceMismatch {
                op,
                detail: "expected a CPU tensor".into(),
            }),
        }
    }

    pub fn cuda_f32(&self, op: &'static str) -> Result<&CudaSlice<f32>> {
        match &self.storage {
            Storage::Cuda(CudaData::F32(s)) => Ok(s),
            Storage::Cuda(_) => Err(Error::DType {
                op,
                dtype: self.dtype.name(),
            }),
            Storage::Cpu(_) => Err(Error::DeviceMismatch {
                op,
                detail: "expected a CUDA tensor".into(),
            }),
        }
    }

    pub fn cuda_i32_mut(&mut self, op: &'static str) -> Result<&mut CudaSlice<i32>> {
        match &mut self.storage {
            Storage::Cuda(CudaData::I32(s)) => Ok(s),
            Storage::Cuda(_) => Err(Error::DType {
                op,
                dtype: self.dtype.name(),
            }),
            Storage::Cpu(_) => Err(Error::DeviceMismatch {
                op,
                detail: "expected a CUDA tensor".into(),
            }),
        }
    }

    pub fn cuda_f32_mut(&mut self, op: &'static str) -> Result<&mut CudaSlice<f32>> {
        match &mut self.storage {
            Storage::Cuda(CudaData::F32(s)) => Ok(s),
            Storage::Cuda(_) => Err(Error::DType {
                op,
                dtype: self.dtype.name(),
            }),
            Storage::Cpu(_) => Err(Error::DeviceMismatch {
                op,
                detail: "expected a CUDA tensor".into(),
            }),
        }
    }
}

/// Host-side values of a CPU tensor in f32, widening bf16; used by the CPU paths of the ops, which
/// compute in f32 whatever the storage.
pub(crate) fn host_f32<'a>(t: &'a Tensor, op: &'static str) -> Result<std::borrow::Cow<'a, [f32]>> {
    match &t.storage {
        Storage::Cpu(HostData::F32(v)) => Ok(std::borrow::Cow::Borrowed(v)),
        Storage::Cpu(HostData::BF16(v)) => Ok(std::borrow::Cow::Owned(
            v.iter().map(|x| x.to_f32()).collect(),
        )),
        Storage::Cpu(HostData::I32(_)) => Err(Error::DType { op, dtype: "i32" }),
        Storage::Cuda(_) => Err(Error::DeviceMismatch {
            op,
            detail: "expected a CPU tensor".into(),
        }),
    }
}

/// An element type a kernel can be instantiated for: picks the `_f32` / `_bf16` kernel and the
/// matching device buffer of a tensor.
pub trait CudaElem:
    cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy + Default
{
    const DTYPE: DType;
    fn slice<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a CudaSlice<Self>>;
    fn slice_mut<'a>(t: &'a mut Tensor, op: &'static str) -> Result<&'a mut CudaSlice<Self>>;
    /// The kernel name for this type out of its two instantiations.
    fn pick(f32_name: &'static str, bf16_name: &'static str) -> &'static str {
        if Self::DTYPE == DType::F32 {
            f32_name
        } else {
            bf16_name
        }
    }
}

impl CudaElem for f32 {
    const DTYPE: DType = DType::F32;
    fn slice<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a CudaSlice<f32>> {
        t.cuda_f32(op)
    }
    fn slice_mut<'a>(t: &'a mut Tensor, op: &'static str) -> Result<&'a mut CudaSlice<f32>> {
        t.cuda_f32_mut(op)
    }
}

impl CudaElem for bf16 {
    const DTYPE: DType = DType::BF16;
    fn slice<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a CudaSlice<bf16>> {
        match &t.storage {
            Storage::Cuda(CudaData::BF16(s)) => Ok(s),
            Storage::Cuda(_) => Err(Error::DType {
                op,
                dtype: t.dtype.name(),
            }),
            Storage::Cpu(_) => Err(Error::DeviceMismatch {
                op,
                detail: "expected a CUDA tensor".into(),
            }),
        }
    }
    fn slice_mut<'a>(t: &'a mut Tensor, op: &'static str) -> Result<&'a mut CudaSlice<bf16>> {
        match &mut t.storage {
            Storage::Cuda(CudaData::BF16(s)) => Ok(s),
            Storage::Cuda(_) => Err(Error::DType {
                op,
                dtype: t.dtype.name(),
            }),
            Storage::Cpu(_) => Err(Error::DeviceMismatch {
                op,
                detail: "expected a CUDA tensor".into(),
            }),
        }
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        if let Storage::Cuda(_) = self.storage {
            DEVICE_BYTES_LIVE.fetch_sub(numel(&self.shape) * self.dtype.size(), Ordering::Relaxed);
        }
    }
}
