//! The kernel images that build.rs compiled and embedded, and ptxas's resource report for each kernel.

/// ptxas's report for one kernel on one architecture.
#[derive(Debug, Clone, Copy)]
pub struct KernelResources {
    pub family: &'static str,
    pub kernel: &'static str,
    pub arch: &'static str,
    pub registers: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    /// ptxas made every wgmma of the kernel wait for the previous one (its warning C7514).
    pub wgmma_serialized: bool,
}

mod generated {
    use super::KernelResources;
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// `NVCC`: the compiler build.rs used, for tests that compile host-side checks of the kernel sources.
pub use generated::{KERNEL_IMAGES, KERNEL_RESOURCES, NVCC, TOOLCHAIN};

/// The fatbin of one kernel family (`kernels/<family>.cu`), if this build has it.
pub fn image(family: &str) -> Option<&'static [u8]> {
    KERNEL_IMAGES
        .iter()
        .find(|(f, _)| *f == family)
        .map(|(_, img)| *img)
}

/// True when build.rs found nvcc and compiled the kernels.
pub fn compiled() -> bool {
    !KERNEL_IMAGES.is_empty()
}
