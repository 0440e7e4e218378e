//! One CUDA device: its context, the one stream all work goes on, the kernel modules (loaded once,
//! functions cached), the cuBLAS handle, and graph capture (a sequence of launches recorded once
//! and replayed with one launch).
//!
//! cudarc loads libcuda and libcublas at run time and panics when they are absent, so every entry
//! point probes for the library first and turns its absence into `Error::NoCuda`.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr,
    ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::kernels;
use crate::error::{Error, Result};

pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    blas: OnceLock<std::result::Result<CudaBlas, String>>,
    /// The stream graph captures record on, and a cuBLAS handle bound to it (see `capture`).
    capture: OnceLock<std::result::Result<(Arc<CudaStream>, CudaBlas), String>>,
    /// Held while a capture records: two threads' captures on the one capture stream would merge.
    capture_lock: Mutex<()>,
    compute_capability: (i32, i32),
    /// The emulated GPU of scripts/emulated-gpu: correct results, meaningless timings.
    emulated: bool,
}

thread_local! {
    /// The device (its address) this thread is recording a graph on, or 0.
    static CAPTURING: Cell<usize> = const { Cell::new(0) };
}

/// Facts about the GPU for `rlhf doctor` and bench reports.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    pub driver_version: i32,
    pub multiprocessors: i32,
}

/// Why no CUDA device can be used here, or None when one can.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some(
            "libcuda (the NVIDIA driver library) is not installed or not on the loader path".into(),
        );
    }
    match CudaContext::device_count() {
        Ok(0) => Some("the NVIDIA driver reports no CUDA devices".into()),
        Ok(_) => None,
        Err(e) => Some(format!("the NVIDIA driver failed to initialise: {e}")),
    }
}

impl CudaDevice {
    /// Whether this is the emulated GPU of scripts/emulated-gpu, whose timings measure the CPU
    /// emulator: benches shrink what they time only to run, not to be read.
    pub fn is_emulated(&self) -> bool {
        self.emulated
    }

    /// The process-wide device for `ordinal`, created on first use.
    pub fn shared(ordinal: usize) -> Result<Arc<CudaDevice>> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
        let mut devices = DEVICES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(d) = devices.get(&ordinal) {
            return Ok(d.clone());
        }
        if let Some(why) = unavailable_reason() {
            return Err(Error::NoCuda(why));
        }
        if !kernels::compiled() {
            return Err(Error::NoCuda(format!(
                "this binary was built without CUDA kernels ({})",
                kernels::TOOLCHAIN
            )));
        }
        let ctx = CudaContext::new(ordinal)?;
        // cudarc tracks every buffer with two CUDA events (created at each allocation, recorded at
        // each kernel launch that takes it) so that several streams can share buffers. Everything
        // here runs on the one default stream (kernels, copies and cuBLAS), whose order already
        // serialises every use, so the tracking would only add driver calls to every launch.
        // SAFETY: the one other stream, the capture stream (see `capture`), only records graphs,
        // which run on the main stream, so no buffer is ever used by two streams' running work.
        unsafe { ctx.disable_event_tracking() };
        if let Err(e) = keep_freed_memory(&ctx) {
            eprintln!(
                "warning: cuda:{ordinal}: freed device memory will go back to the driver at every \
                 synchronisation (could not raise the memory pool's release threshold: {e})"
            );
        }
        let emulated = ctx.name().is_ok_and(|n| n.starts_with("emulated GPU"));
        if emulated {
            eprintln!(
                "note: cuda:{ordinal} is an emulated GPU (scripts/emulated-gpu): its kernels run on a CPU \
                 emulator, for checking them; its timings measure the emulator, not a GPU"
            );
        }
        let stream = ctx.default_stream();
        let compute_capability = ctx.compute_capability()?;
        let dev = Arc::new(CudaDevice {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
            capture: OnceLock::new(),
            capture_lock: Mutex::new(()),
            compute_capability,
            emulated,
        });
        devices.insert(ordinal, dev.clone());
        Ok(dev)
    }

    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// (major, minor), read once when the device is opened: kernels pick their path by it.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// A Hopper GPU (compute capability 9.0), whose sm_90a kernels use wgmma.
    pub fn is_hopper(&self) -> bool {
        self.compute_capability.0 == 9
    }

    /// The stream work goes on: the main stream, or the capture stream while this thread records
    /// a graph on this device.
    pub fn stream(&self) -> &Arc<CudaStream> {
        match self.capturing() {
            Some((stream, _)) => stream,
            None => &self.stream,
        }
    }

    fn capturing(&self) -> Option<&(Arc<CudaStream>, CudaBlas)> {
        if CAPTURING.get() != self as *const CudaDevice as usize {
            return None;
        }
        self.capture.get().and_then(|c| c.as_ref().ok())
    }

    /// Records the work `record` puts on this device (kernels, cuBLAS GEMMs, device copies and the
    /// allocations and frees of its temporaries) into a graph, running none of it. The capture is
    /// the driver's thread-local kind on a stream of its own, so other threads' work on the device
    /// goes on unrecorded. `record` must not copy from or to the host or wait for the device (the
    /// driver refuses both while capturing), and every tensor it allocates must be dropped before
    /// it returns: the graph owns those allocations, at one address for its life. Captures from
    /// several threads take turns; `record` must not capture in turn.
    pub fn capture(&self, record: impl FnOnce() -> Result<()>) -> Result<DeviceGraph> {
        use cudarc::driver::sys;
        // The main handle first: it probes for libcublas, which cudarc would otherwise panic on.
        self.blas()?;
        let (stream, _) = self
            .capture
            .get_or_init(|| {
                let stream = self.ctx.new_stream().map_err(|e| e.to_string())?;
                let blas = CudaBlas::new(stream.clone()).map_err(|e| e.to_string())?;
                Ok((stream, blas))
            })
            .as_ref()
            .map_err(|e| Error::NoCuda(format!("no stream to capture a graph on: {e}")))?;
        let _one_at_a_time = self.capture_lock.lock().unwrap_or_else(|p| p.into_inner());
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        struct Recording;
        impl Drop for Recording {
            fn drop(&mut self) {
                CAPTURING.set(0);
            }
        }
        let recorded = {
            CAPTURING.set(self as *const CudaDevice as usize);
            let _recording = Recording;
            record()
        };
        // The capture ends whatever `record` returned, so that the stream records no more.
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        if recorded.is_err() || ended.is_err() {
            // Frees of the failed capture's temporaries, refused by the driver as the capture
            // broke, left their errors for cudarc to report at the next call; they are this
            // failure's, already reported below.
            let _ = self.ctx.check_err();
        }
        recorded?;
        let graph = ended?.ok_or_else(|| Error::Unsupported {
            op: "capture",
            detail: "the graph capture recorded no work".into(),
        })?;
        Ok(DeviceGraph {
            graph,
            stream: self.stream.clone(),
        })
    }

    pub fn info(&self) -> Result<DeviceInfo> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        let mut driver_version = 0;
        // SAFETY: writes one int.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) }.result()?;
        Ok(DeviceInfo {
            name: self.ctx.name()?,
            compute_capability: self.ctx.compute_capability()?,
            total_memory: self.ctx.total_mem()?,
            driver_version,
            multiprocessors: self
                .ctx
                .attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        })
    }

    /// Device memory in use (total − free, as the driver reports it: all processes' allocations, and
    /// this process's freed memory that its pool keeps for reuse, like PyTorch's reserved memory).
    pub fn memory_in_use(&self) -> Result<usize> {
        let (free, total) = self.ctx.mem_get_info()?;
        Ok(total - free)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream().synchronize()?;
        Ok(())
    }

    /// A kernel by name from family `family` (the `.cu` file stem); modules load once.
    /// A kernel launched with `dynamic_bytes` of dynamic shared memory beside its `static_bytes`:
    /// past 48 KiB together a function must opt in to more.
    pub fn function_with_shared(
        &self,
        family: &'static str,
        name: &'static str,
        dynamic_bytes: usize,
        static_bytes: usize,
    ) -> Result<CudaFunction> {
        let f = self.function(family, name)?;
        if dynamic_bytes + static_bytes > 48 * 1024 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dynamic_bytes as i32,
            )?;
        }
        Ok(f)
    }

    pub fn function(&self, family: &'static str, name: &'static str) -> Result<CudaFunction> {
        let mut functions = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = functions.get(name) {
            return Ok(f.clone());
        }
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            match modules.get(family) {
                Some(m) => m.clone(),
                None => {
                    let image = kernels::image(family).ok_or_else(|| Error::MissingKernel {
                        kernel: format!("{family}/{name}"),
                        why: format!("kernels/{family}.cu was not compiled into this build"),
                    })?;
                    let m = self.ctx.load_module(Ptx::from_binary(image.to_vec()))?;
                    modules.insert(family, m.clone());
                    m
                }
            }
        };
        let f = module
            .load_function(name)
            .map_err(|e| Error::MissingKernel {
                kernel: format!("{family}/{name}"),
                why: e.to_string(),
            })?;
        functions.insert(name, f.clone());
        Ok(f)
    }

    /// A timing event recorded on this device's stream now (for the op profiler).
    pub fn timing_event(&self) -> Result<cudarc::driver::CudaEvent> {
        let e = self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        e.record(self.stream())?;
        Ok(e)
    }

    /// The cuBLAS handle, bound to this device's stream.
    pub fn blas(&self) -> Result<&CudaBlas> {
        if let Some((_, blas)) = self.capturing() {
            return Ok(blas);
        }
        self.blas
            .get_or_init(|| {
                // SAFETY: only tries to dlopen the library.
                if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                    return Err("libcublas is not on the loader path (set LD_LIBRARY_PATH to the CUDA toolkit's lib64 or PyTorch's nvidia/cublas/lib)".into());
                }
                CudaBlas::new(self.stream.clone()).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| Error::NoCuda(e.clone()))
    }

    /// Device memory whose contents are unspecified, or all-ones bytes (NaN for f32 and bf16) while
    /// output poisoning is on: kernels must write every element they promise.
    pub fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: callers only hand this buffer to kernels that write it before it is read.
        let mut slice = unsafe { self.stream().alloc::<T>(len.max(1)) }?;
        if super::tensor::poisoning() {
            let bytes = len.max(1) * std::mem::size_of::<T>();
            let (ptr, _sync) = slice.device_ptr_mut(self.stream());
            // SAFETY: `ptr` covers exactly `bytes` bytes of this allocation.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, 0xff, bytes, self.stream().cu_stream())
            }?;
        }
        Ok(slice)
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        Ok(self.stream().alloc_zeros::<T>(len.max(1))?)
    }

    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            // cuMemAlloc rejects zero bytes; keep a one-element buffer that nothing reads.
            // SAFETY: never read.
            return Ok(unsafe { self.stream().alloc::<T>(1) }?);
        }
        Ok(self.stream().clone_htod(data)?)
    }

    pub fn download<T: DeviceRepr + Clone + Default>(
        &self,
        data: &CudaSlice<T>,
        len: usize,
    ) -> Result<Vec<T>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut v = vec![T::default(); len];
        self.stream().memcpy_dtoh(&data.slice(0..len), &mut v)?;
        Ok(v)
    }
}

/// A graph recorded by `CudaDevice::capture`; each launch replays its work on the main stream, in
/// order with everything else there.
pub struct DeviceGraph {
    graph: cudarc::driver::CudaGraph,
    stream: Arc<CudaStream>,
}

impl DeviceGraph {
    pub fn launch(&self) -> Result<()> {
        self.stream.context().bind_to_thread()?;
        // SAFETY: the executable graph is alive (owned by `self.graph`) and the stream belongs to
        // the context it was captured in.
        unsafe {
            cudarc::driver::result::graph::launch(
                self.graph.cu_graph_exec(),
                self.stream.cu_stream(),
            )
        }?;
        Ok(())
    }
}

/// Keeps freed device memory in the stream-ordered pool instead of returning it to the driver at
/// every synchronisation, which is what the pool's default release threshold of 0 does: a training
/// step or benchmark that frees and reallocates gigabytes of logits each iteration would otherwise
/// pay to map them again every time. The memory stays reusable by this process's allocations, as with
/// PyTorch's caching allocator; `memory_in_use` then counts it, like PyTorch's reserved memory.
fn keep_freed_memory(ctx: &Arc<CudaContext>) -> Result<()> {
    use cudarc::driver::sys;
    let supported =
        ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)?;
    if supported == 0 {
        return Ok(());
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: writes one pool handle for a valid device.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result()?;
    let mut threshold = u64::MAX;
    // SAFETY: the release threshold attribute takes a pointer to one u64.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()?;
    Ok(())
}
