// An emulated NVIDIA driver and cuBLAS: the subset of their C APIs the crate calls (through cudarc),
// backed by host memory and by the kernels of kernels/*.cu running on the emulator of emulation.h.
// scripts/emulated-gpu builds it as libcuda.so.1 and libcublas.so.13 (with every kernel family,
// emulated_family.cpp) and runs a command with them first on the loader path, so the crate's CUDA
// tests and commands run unchanged, through the crate's own launch code, on a machine without a GPU.
//
// A "device pointer" is a host address. Streams and events are synchronous; an event's time is the
// host clock's. The device reports compute capability RLHF_EMULATED_CC (default 9.0, so the Hopper
// kernels run; 8.0 picks the mma.sync ones) and an H100's limits. A kernel the emulator finds at
// fault (a race, a missing wait, an out-of-bounds access, a deadlock, a trap) fails its launch with
// CUDA_ERROR_LAUNCH_FAILED and the emulator's message on stderr. RLHF_EMULATED_MODE=eager runs copies
// and wgmma at their issue and threads in reverse order.
#include "emulation.h"

#include <chrono>
#include <cstdlib>
#include <mutex>

namespace {

using CUresult = int;
constexpr CUresult kSuccess = 0, kInvalidValue = 1, kOutOfMemory = 2, kNotFound = 500, kLaunchFailed = 719;
using CUdeviceptr = unsigned long long;

struct Module {
    int unused;
};
struct Function {
    std::string name;
    emu::Invoker* invoke;
};
struct Event {
    double ms = 0.0;
};

// RLHF_EMULATED_CC as (major, minor); 9.0 when unset.
std::pair<int, int> compute_capability() {
    const char* cc = std::getenv("RLHF_EMULATED_CC");
    if (!cc) return {9, 0};
    const char* dot = std::strchr(cc, '.');
    return {std::atoi(cc), dot ? std::atoi(dot + 1) : 0};
}

// One lock for the emulator's state: tests launch from several threads at once.
std::recursive_mutex& lock() {
    static std::recursive_mutex m;
    return m;
}
using Guard = std::lock_guard<std::recursive_mutex>;

size_t& in_use() {
    static size_t bytes = 0;
    return bytes;
}
std::map<void*, size_t>& allocations() {
    static std::map<void*, size_t> a;
    return a;
}
constexpr size_t kTotalMemory = 80ull << 30;

CUresult allocate(CUdeviceptr* p, size_t bytes) {
    Guard g(lock());
    void* mem = std::aligned_alloc(256, (std::max<size_t>(bytes, 1) + 255) / 256 * 256);
    if (!mem) return kOutOfMemory;
    allocations()[mem] = bytes;
    in_use() += bytes;
    emu::register_global(mem, bytes);
    *p = reinterpret_cast<CUdeviceptr>(mem);
    return kSuccess;
}

CUresult release(CUdeviceptr p) {
    Guard g(lock());
    void* mem = reinterpret_cast<void*>(p);
    auto it = allocations().find(mem);
    if (it == allocations().end()) return kInvalidValue;
    in_use() -= it->second;
    allocations().erase(it);
    emu::unregister_global(mem);
    std::free(mem);
    return kSuccess;
}

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned) { return kSuccess; }
CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return kSuccess;
}
CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return kSuccess;
}
CUresult cuDeviceGet(int* d, int ordinal) {
    if (ordinal != 0) return kInvalidValue;
    *d = 0;
    return kSuccess;
}
CUresult cuDeviceGetName(char* name, int len, int) {
    const auto [major, minor] = compute_capability();
    std::snprintf(name, len, "emulated GPU (CPU emulator, compute capability %d.%d)", major, minor);
    return kSuccess;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, int) {
    *bytes = kTotalMemory;
    return kSuccess;
}
CUresult cuDeviceGetAttribute(int* value, int attribute, int) {
    switch (attribute) {
        case 1: *value = 1024; break;            // max threads per block
        case 2: case 3: *value = 1024; break;    // block dims
        case 4: case 5: case 6: *value = 65535; break;
        case 8: *value = 48 * 1024; break;       // shared memory per block
        case 10: *value = 32; break;             // warp size
        case 16: *value = 132; break;            // multiprocessors
        case 75: *value = compute_capability().first; break;
        case 76: *value = compute_capability().second; break;
        case 97: *value = 227 * 1024; break;     // max shared memory per block (opt-in)
        case 115: *value = 1; break;             // memory pools
        default: *value = 0;
    }
    return kSuccess;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) {
    static int primary;
    *ctx = &primary;
    return kSuccess;
}
CUresult cuDevicePrimaryCtxRelease_v2(int) { return kSuccess; }
CUresult cuDevicePrimaryCtxRelease(int) { return kSuccess; }
CUresult cuCtxSetCurrent(void*) { return kSuccess; }
CUresult cuCtxGetCurrent(void** ctx) {
    static int primary;
    *ctx = &primary;
    return kSuccess;
}
CUresult cuCtxGetDevice(int* d) {
    *d = 0;
    return kSuccess;
}
CUresult cuCtxSynchronize() { return kSuccess; }
CUresult cuStreamSynchronize(void*) { return kSuccess; }
CUresult cuStreamCreate(void** s, unsigned) {
    *s = new int(0);
    return kSuccess;
}
CUresult cuStreamDestroy_v2(void*) { return kSuccess; }
CUresult cuStreamWaitEvent(void*, void*, unsigned) { return kSuccess; }

CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    Guard g(lock());
    *total = kTotalMemory;
    *free_bytes = kTotalMemory - in_use();
    return kSuccess;
}
CUresult cuDeviceGetDefaultMemPool(void** pool, int) {
    static int p;
    *pool = &p;
    return kSuccess;
}
CUresult cuMemPoolSetAttribute(void*, int, void*) { return kSuccess; }
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return allocate(p, bytes); }
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return allocate(p, bytes); }
CUresult cuMemFree_v2(CUdeviceptr p) { return release(p); }
CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return release(p); }
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    std::memcpy(reinterpret_cast<void*>(dst), src, n);
    return kSuccess;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void*) { return cuMemcpyHtoD_v2(dst, src, n); }
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    std::memcpy(dst, reinterpret_cast<const void*>(src), n);
    return kSuccess;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void*) { return cuMemcpyDtoH_v2(dst, src, n); }
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return kSuccess;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void*) { return cuMemcpyDtoD_v2(dst, src, n); }
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    std::memset(reinterpret_cast<void*>(dst), v, n);
    return kSuccess;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void*) { return cuMemsetD8_v2(dst, v, n); }
CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned v, size_t n) {
    unsigned* p = reinterpret_cast<unsigned*>(dst);
    for (size_t i = 0; i < n; ++i) p[i] = v;
    return kSuccess;
}
CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void*) { return cuMemsetD32_v2(dst, v, n); }

CUresult cuModuleLoadData(void** module, const void*) {
    *module = new Module{};
    return kSuccess;
}
CUresult cuModuleUnload(void* module) {
    delete static_cast<Module*>(module);
    return kSuccess;
}
CUresult cuModuleGetFunction(void** f, void*, const char* name) {
    auto it = emu::kernels().find(name);
    if (it == emu::kernels().end()) return kNotFound;
    *f = new Function{name, &it->second};
    return kSuccess;
}
CUresult cuFuncSetAttribute(void*, int, int) { return kSuccess; }
CUresult cuFuncGetAttribute(int* v, int, void*) {
    *v = 0;
    return kSuccess;
}

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared_bytes, void*, void** params, void**) {
    const Function* fn = static_cast<const Function*>(f);
    const char* mode = std::getenv("RLHF_EMULATED_MODE");
    const bool eager = mode && std::string(mode) == "eager";
    const emu::Mode m{!eager, eager};
    Guard g(lock());
    if (!emu::launch(dim3(gx, gy, gz), dim3(bx, by, bz), shared_bytes, m, [&] { (*fn->invoke)(params); })) {
        std::fprintf(stderr, "emulated launch of %s failed: %s\n", fn->name.c_str(), emu::last_error().c_str());
        return kLaunchFailed;
    }
    return kSuccess;
}

CUresult cuEventCreate(void** e, unsigned) {
    *e = new Event{};
    return kSuccess;
}
CUresult cuEventDestroy_v2(void* e) {
    delete static_cast<Event*>(e);
    return kSuccess;
}
CUresult cuEventRecord(void* e, void*) {
    static_cast<Event*>(e)->ms = now_ms();
    return kSuccess;
}
CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
CUresult cuEventSynchronize(void*) { return kSuccess; }
CUresult cuEventQuery(void*) { return kSuccess; }
CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) {
    *ms = (float)(static_cast<Event*>(end)->ms - static_cast<Event*>(start)->ms);
    return kSuccess;
}
CUresult cuEventElapsedTime(float* ms, void* start, void* end) { return cuEventElapsedTime_v2(ms, start, end); }

CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = e == kLaunchFailed ? "emulated launch failed (the emulator's message is on stderr)" : "emulated driver error";
    return kSuccess;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = e == kLaunchFailed ? "CUDA_ERROR_LAUNCH_FAILED" : "CUDA_ERROR_EMULATED";
    return kSuccess;
}

// ----- cuBLAS: GEMM in f32 on the host, column-major as cuBLAS defines it -----

int cublasCreate_v2(void** handle) {
    *handle = new int(0);
    return 0;
}
int cublasDestroy_v2(void*) { return 0; }
int cublasSetStream_v2(void*, void*) { return 0; }
int cublasSetWorkspace_v2(void*, void*, size_t) { return 0; }
int cublasSetMathMode(void*, int) { return 0; }

// cudaDataType: 0 = f32, 14 = bf16. C = alpha op(A) op(B) + beta C, compute in f32.
int cublasGemmEx(void*, int transa, int transb, int m, int n, int k, const void* alpha, const void* A, int a_type,
                 int lda, const void* B, int b_type, int ldb, const void* beta, void* C, int c_type, int ldc, int,
                 int) {
    auto load = [](const void* p, int type, size_t i) -> float {
        if (type == 0) return static_cast<const float*>(p)[i];
        if (type == 14) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
        std::fprintf(stderr, "emulated cublasGemmEx: data type %d is not emulated\n", type);
        std::abort();
    };
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    std::vector<float> a((size_t)m * k), b((size_t)k * n);  // a[i*k + l] = op(A)(i, l), b[j*k + l] = op(B)(l, j)
    for (int i = 0; i < m; ++i)
        for (int l = 0; l < k; ++l)
            a[(size_t)i * k + l] = transa ? load(A, a_type, (size_t)i * lda + l) : load(A, a_type, (size_t)l * lda + i);
    for (int j = 0; j < n; ++j)
        for (int l = 0; l < k; ++l)
            b[(size_t)j * k + l] = transb ? load(B, b_type, (size_t)l * ldb + j) : load(B, b_type, (size_t)j * ldb + l);
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            float acc = 0.0f;
            const float* ar = &a[(size_t)i * k];
            const float* br = &b[(size_t)j * k];
            for (int l = 0; l < k; ++l) acc += ar[l] * br[l];
            const size_t at = (size_t)j * ldc + i;
            const float old = be == 0.0f ? 0.0f : load(C, c_type, at);
            const float v = al * acc + be * old;
            if (c_type == 0) static_cast<float*>(C)[at] = v;
            else static_cast<__nv_bfloat16*>(C)[at] = __float2bfloat16_rn(v);
        }
    return 0;
}

}  // extern "C"
