// An emulated NVIDIA driver and cuBLAS: the subset of their C APIs the crate calls (through cudarc),
// backed by host memory and by the kernels of kernels/*.cu running on the emulator of emulation.h.
// scripts/emulated-gpu builds it as libcuda.so.1 and libcublas.so.13 (with every kernel family,
// emulated_family.cpp) and runs a command with them first on the loader path, so the crate's CUDA
// tests and commands run unchanged, through the crate's own launch code, on a machine without a GPU.
//
// A "device pointer" is a host address. Streams and events are synchronous; an event's time is the
// host clock's. A stream being captured records its work into a graph instead (the kernels bound to
// copies of their arguments) and refuses, as the driver does, what a capture cannot hold: copies
// from or to host memory, synchronisations and synchronous allocations from the capturing thread,
// and frees of memory the graph did not allocate. Memory allocated while capturing belongs to the
// graph and lives as long as it does (the driver's graph allocations keep one address for the
// graph's life); freeing it outside the capture is refused, so no graph allocation escapes.
//
// The device reports compute capability RLHF_EMULATED_CC (default 9.0, so the Hopper kernels run;
// 8.0 picks the mma.sync ones) and an H100's limits. A kernel the emulator finds at
// fault (a race, a missing wait, an out-of-bounds access, a deadlock, a trap) fails its launch with
// CUDA_ERROR_LAUNCH_FAILED and the emulator's message on stderr. RLHF_EMULATED_MODE=eager runs copies
// and wgmma at their issue and threads in reverse order.
//
// RLHF_EMULATED_TALLY=FILE appends to FILE at exit one line counting what the host asked of the
// driver (launches, GEMMs, graph replays, copies each way, waits for the device, allocations): on
// a GPU each wait idles the device until the host queues more, so a step's waits are a cost the
// emulator can count where it cannot time.
//
// RLHF_EMULATED_MODE=count runs no kernel, GEMM, memset or device-to-device copy (copies to the
// host read zeros): the host's side of a run at full size in seconds, for what does not depend on
// the results, such as the CUDA tensor bytes a training step keeps alive at once and the tally
// above. Allocations are reserved, not touched, so a 30 GB peak needs no 30 GB of RAM.
#include "emulation.h"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <set>
#include <thread>

namespace {

using CUresult = int;
constexpr CUresult kSuccess = 0, kInvalidValue = 1, kOutOfMemory = 2, kIllegalState = 401, kNotFound = 500,
                   kLaunchFailed = 719, kCaptureUnsupported = 900, kCaptureInvalidated = 901;
using CUdeviceptr = unsigned long long;

struct Module {
    int unused;
};
struct Function {
    std::string name;
    emu::Binder* bind;
    // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: past 48 KiB a launch needs the opt-in.
    int max_dynamic_shared = 48 * 1024;
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

// What the host asked of the driver, counted at the call (a captured launch counts once, when it is
// recorded; a graph replay counts as one replay).
// Atomic: tests call the driver from several threads, some of the counts outside the lock.
struct Tally {
    using Count = std::atomic<size_t>;
    Count launches{0}, gemms{0}, graph_launches{0}, captures{0};
    Count waits{0};  // stream, context and event synchronisations, and copies to the host
    Count to_host{0}, to_host_bytes{0}, to_device{0}, to_device_bytes{0};
    Count allocations{0}, frees{0};
    ~Tally() {
        const char* path = std::getenv("RLHF_EMULATED_TALLY");
        if (!path || !*path) return;
        if (FILE* f = std::fopen(path, "a")) {
            std::fprintf(f,
                         "launches=%zu gemms=%zu graph_launches=%zu captures=%zu waits=%zu to_host=%zu "
                         "to_host_bytes=%zu to_device=%zu to_device_bytes=%zu allocations=%zu frees=%zu\n",
                         launches.load(), gemms.load(), graph_launches.load(), captures.load(), waits.load(),
                         to_host.load(), to_host_bytes.load(), to_device.load(), to_device_bytes.load(),
                         allocations.load(), frees.load());
            std::fclose(f);
        }
    }
};
// Each distinct (kernel, threads a block, dynamic shared bytes) launched, written at exit to
// RLHF_EMULATED_LAUNCHES.
struct LaunchShapes : std::set<std::tuple<std::string, unsigned, unsigned>> {
    ~LaunchShapes() {
        const char* path = std::getenv("RLHF_EMULATED_LAUNCHES");
        if (!path || !*path) return;
        if (FILE* f = std::fopen(path, "a")) {
            for (const auto& [name, threads, shared] : *this) std::fprintf(f, "%s %u %u\n", name.c_str(), threads, shared);
            std::fclose(f);
        }
    }
};
LaunchShapes& launch_shapes() {
    static LaunchShapes s;
    return s;
}

Tally& tally() {
    static Tally t;
    return t;
}

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
    tally().allocations++;
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
    tally().frees++;
    void* mem = reinterpret_cast<void*>(p);
    auto it = allocations().find(mem);
    if (it == allocations().end()) return kInvalidValue;
    in_use() -= it->second;
    allocations().erase(it);
    emu::unregister_global(mem);
    std::free(mem);
    return kSuccess;
}

// A graph: the operations a capture recorded, in order, and the memory allocated while capturing.
struct Graph {
    std::vector<std::function<CUresult()>> ops;
    std::set<void*> owned;
    ~Graph();
};
// What cuStreamEndCapture and cuGraphInstantiate hand out: both share the recorded graph.
struct GraphHandle {
    std::shared_ptr<Graph> graph;
};

// Graph-owned allocations, which only their graph may free.
std::set<void*>& graph_owned() {
    static std::set<void*> s;
    return s;
}

Graph::~Graph() {
    for (void* p : owned) {
        graph_owned().erase(p);
        release(reinterpret_cast<CUdeviceptr>(p));
    }
}

// The one capture in progress, if any (this driver captures one stream at a time).
struct Capture {
    void* stream = nullptr;
    std::thread::id thread;
    bool invalid = false;
    std::shared_ptr<Graph> graph;
};
Capture& capture() {
    static Capture c;
    return c;
}
bool capturing(void* stream) { return capture().graph && capture().stream == stream; }

// Refuses `what` when the calling thread is capturing (a capture in the driver's thread-local mode
// refuses potentially unsafe calls from its own thread only), and invalidates the capture.
CUresult refuse_while_capturing(const char* what) {
    Guard g(lock());
    if (!capture().graph || capture().thread != std::this_thread::get_id()) return kSuccess;
    std::fprintf(stderr, "emulated driver: %s while a stream is capturing (not allowed in a graph capture)\n", what);
    capture().invalid = true;
    return kCaptureUnsupported;
}

// RLHF_EMULATED_MODE, read once: "eager", "count" or empty.
const std::string& emulated_mode() {
    static const std::string mode = [] {
        const char* m = std::getenv("RLHF_EMULATED_MODE");
        return std::string(m ? m : "");
    }();
    return mode;
}

// RLHF_EMULATED_MODE=count: allocate and copy from the host, do nothing on the device.
bool count_only() { return emulated_mode() == "count"; }

// Work on `stream`: recorded while that stream captures, done now otherwise.
CUresult on_stream(void* stream, std::function<CUresult()> op) {
    Guard g(lock());
    if (count_only()) op = [] { return kSuccess; };
    if (capturing(stream)) {
        if (capture().invalid) return kCaptureInvalidated;
        capture().graph->ops.push_back(std::move(op));
        return kSuccess;
    }
    return op();
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
CUresult cuCtxSynchronize() {
    tally().waits++;
    return refuse_while_capturing("cuCtxSynchronize");
}
CUresult cuStreamSynchronize(void*) {
    tally().waits++;
    return refuse_while_capturing("cuStreamSynchronize");
}
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
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    if (CUresult r = refuse_while_capturing("cuMemAlloc (synchronous)")) return r;
    return allocate(p, bytes);
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void* stream) {
    Guard g(lock());
    if (CUresult r = allocate(p, bytes)) return r;
    if (capturing(stream)) {
        capture().graph->owned.insert(reinterpret_cast<void*>(*p));
        graph_owned().insert(reinterpret_cast<void*>(*p));
    }
    return kSuccess;
}
static CUresult free_async(CUdeviceptr p, void* stream) {
    Guard g(lock());
    void* mem = reinterpret_cast<void*>(p);
    if (capturing(stream)) {
        if (capture().graph->owned.count(mem)) return kSuccess;  // the graph keeps it for its next launch
        std::fprintf(stderr, "emulated driver: a capture frees memory allocated outside it\n");
        capture().invalid = true;
        return kInvalidValue;
    }
    if (graph_owned().count(mem)) {
        std::fprintf(stderr, "emulated driver: a graph's allocation is freed outside its capture (it escaped the graph)\n");
        return kInvalidValue;
    }
    return release(p);
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    if (CUresult r = refuse_while_capturing("cuMemFree (synchronous)")) return r;
    return free_async(p, nullptr);
}
CUresult cuMemFreeAsync(CUdeviceptr p, void* stream) { return free_async(p, stream); }
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    if (CUresult r = refuse_while_capturing("a copy from host memory")) return r;
    tally().to_device++;
    tally().to_device_bytes += n;
    std::memcpy(reinterpret_cast<void*>(dst), src, n);
    return kSuccess;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void*) { return cuMemcpyHtoD_v2(dst, src, n); }
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    if (CUresult r = refuse_while_capturing("a copy to host memory")) return r;
    tally().waits++;
    tally().to_host++;
    tally().to_host_bytes += n;
    if (count_only()) std::memset(dst, 0, n);
    else std::memcpy(dst, reinterpret_cast<const void*>(src), n);
    return kSuccess;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void*) { return cuMemcpyDtoH_v2(dst, src, n); }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* stream) {
    return on_stream(stream, [=] {
        std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
        return kSuccess;
    });
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) { return cuMemcpyDtoDAsync_v2(dst, src, n, nullptr); }
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void* stream) {
    return on_stream(stream, [=] {
        std::memset(reinterpret_cast<void*>(dst), v, n);
        return kSuccess;
    });
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) { return cuMemsetD8Async(dst, v, n, nullptr); }
CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, void* stream) {
    return on_stream(stream, [=] {
        unsigned* p = reinterpret_cast<unsigned*>(dst);
        for (size_t i = 0; i < n; ++i) p[i] = v;
        return kSuccess;
    });
}
CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned v, size_t n) { return cuMemsetD32Async(dst, v, n, nullptr); }

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
CUresult cuFuncSetAttribute(void* f, int attribute, int value) {
    constexpr int kMaxDynamicShared = 8, kOptInLimit = 227 * 1024;
    if (attribute == kMaxDynamicShared) {
        if (value < 0 || value > kOptInLimit) return kInvalidValue;
        static_cast<Function*>(f)->max_dynamic_shared = value;
    }
    return kSuccess;
}
CUresult cuFuncGetAttribute(int* v, int, void*) {
    *v = 0;
    return kSuccess;
}

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared_bytes, void* stream, void** params, void**) {
    const Function* fn = static_cast<const Function*>(f);
    const char* refused = nullptr;
    if ((size_t)bx * by * bz > 1024 || bx == 0 || by == 0 || bz == 0) refused = "block of more than 1,024 threads (or none)";
    else if (gx == 0 || gy == 0 || gz == 0 || gx > 0x7fffffffu || gy > 65535 || gz > 65535) refused = "grid outside 2^31-1 x 65,535 x 65,535";
    else if ((int)shared_bytes > fn->max_dynamic_shared) refused = "dynamic shared memory past the function's limit (48 KiB without the opt-in)";
    if (refused) {
        std::fprintf(stderr, "emulated driver: launch of %s refused: %s (grid %u x %u x %u, block %u x %u x %u, %u B shared)\n",
                     fn->name.c_str(), refused, gx, gy, gz, bx, by, bz, shared_bytes);
        return kInvalidValue;
    }
    {
        Guard g(lock());
        launch_shapes().insert({fn->name, bx * by * bz, shared_bytes});
    }
    const bool eager = emulated_mode() == "eager";
    const emu::Mode m{!eager, eager};
    const emu::Call call = (*fn->bind)(params);
    const std::string name = fn->name;
    tally().launches++;
    return on_stream(stream, [=] {
        Guard g(lock());
        if (!emu::launch(dim3(gx, gy, gz), dim3(bx, by, bz), shared_bytes, m, call)) {
            std::fprintf(stderr, "emulated launch of %s failed: %s\n", name.c_str(), emu::last_error().c_str());
            return kLaunchFailed;
        }
        return kSuccess;
    });
}

// ----- Stream capture and graphs -----

CUresult cuStreamBeginCapture_v2(void* stream, int) {
    Guard g(lock());
    if (!stream) {
        std::fprintf(stderr, "emulated driver: the legacy default stream cannot be captured\n");
        return kCaptureUnsupported;
    }
    if (capture().graph) return kIllegalState;
    capture() = Capture{stream, std::this_thread::get_id(), false, std::make_shared<Graph>()};
    tally().captures++;
    return kSuccess;
}
CUresult cuStreamEndCapture(void* stream, void** graph) {
    Guard g(lock());
    if (!capturing(stream)) return kIllegalState;
    Capture done = std::move(capture());
    capture() = Capture{};
    if (done.invalid) {
        *graph = nullptr;
        return kCaptureInvalidated;
    }
    *graph = new GraphHandle{done.graph};
    return kSuccess;
}
CUresult cuStreamIsCapturing(void* stream, int* status) {
    Guard g(lock());
    *status = capturing(stream) ? (capture().invalid ? 2 : 1) : 0;
    return kSuccess;
}
CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    *exec = new GraphHandle{static_cast<GraphHandle*>(graph)->graph};
    return kSuccess;
}
CUresult cuGraphUpload(void*, void*) { return kSuccess; }
CUresult cuGraphLaunch(void* exec, void* stream) {
    tally().graph_launches++;
    std::shared_ptr<Graph> graph = static_cast<GraphHandle*>(exec)->graph;
    return on_stream(stream, [graph] {
        for (const auto& op : graph->ops)
            if (CUresult r = op()) return r;
        return kSuccess;
    });
}
CUresult cuGraphExecDestroy(void* exec) {
    Guard g(lock());
    delete static_cast<GraphHandle*>(exec);
    return kSuccess;
}
CUresult cuGraphDestroy(void* graph) {
    Guard g(lock());
    delete static_cast<GraphHandle*>(graph);
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
CUresult cuEventRecord(void* e, void* stream) {
    Guard g(lock());
    if (!capturing(stream)) static_cast<Event*>(e)->ms = now_ms();
    return kSuccess;
}
CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
CUresult cuEventSynchronize(void*) {
    tally().waits++;
    return refuse_while_capturing("cuEventSynchronize");
}
CUresult cuEventQuery(void*) { return kSuccess; }
CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) {
    *ms = (float)(static_cast<Event*>(end)->ms - static_cast<Event*>(start)->ms);
    return kSuccess;
}
CUresult cuEventElapsedTime(float* ms, void* start, void* end) { return cuEventElapsedTime_v2(ms, start, end); }

// Each error this driver returns: its name and message, as the driver's.
struct ErrorText {
    CUresult code;
    const char* name;
    const char* message;
};
constexpr ErrorText kErrors[] = {
    {kLaunchFailed, "CUDA_ERROR_LAUNCH_FAILED", "emulated launch failed (the emulator's message is on stderr)"},
    {kCaptureUnsupported, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", "operation not permitted when stream is capturing"},
    {kCaptureInvalidated, "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
     "operation failed due to a previous error during capture"},
    {kIllegalState, "CUDA_ERROR_ILLEGAL_STATE", "the operation is not valid in the stream's capture state"},
};
constexpr ErrorText kUnknownError = {0, "CUDA_ERROR_EMULATED", "emulated driver error"};

const ErrorText& error_text(CUresult e) {
    for (const ErrorText& t : kErrors)
        if (t.code == e) return t;
    return kUnknownError;
}
CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = error_text(e).message;
    return kSuccess;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = error_text(e).name;
    return kSuccess;
}

// ----- cuBLAS: GEMM in f32 on the host, column-major as cuBLAS defines it -----

struct BlasHandle {
    void* stream = nullptr;
};
int cublasCreate_v2(void** handle) {
    *handle = new BlasHandle{};
    return 0;
}
int cublasDestroy_v2(void* handle) {
    delete static_cast<BlasHandle*>(handle);
    return 0;
}
int cublasSetStream_v2(void* handle, void* stream) {
    static_cast<BlasHandle*>(handle)->stream = stream;
    return 0;
}
int cublasSetWorkspace_v2(void*, void*, size_t) { return 0; }
int cublasSetMathMode(void*, int) { return 0; }

// cudaDataType: 0 = f32, 14 = bf16. C = alpha op(A) op(B) + beta C, compute in f32.
static void gemm_now(int transa, int transb, int m, int n, int k, float al, const void* A, int a_type, int lda,
              const void* B, int b_type, int ldb, float be, void* C, int c_type, int ldc) {
    auto load = [](const void* p, int type, size_t i) -> float {
        if (type == 0) return static_cast<const float*>(p)[i];
        if (type == 14) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
        std::fprintf(stderr, "emulated cublasGemmEx: data type %d is not emulated\n", type);
        std::abort();
    };
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
}

// The scalars are read at the call, as with CUBLAS_POINTER_MODE_HOST; the GEMM runs on the
// handle's stream (recorded while it captures).
int cublasGemmEx(void* handle, int transa, int transb, int m, int n, int k, const void* alpha, const void* A,
                 int a_type, int lda, const void* B, int b_type, int ldb, const void* beta, void* C, int c_type,
                 int ldc, int, int) {
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    tally().gemms++;
    const CUresult r = on_stream(static_cast<BlasHandle*>(handle)->stream, [=] {
        gemm_now(transa, transb, m, n, k, al, A, a_type, lda, B, b_type, ldb, be, C, c_type, ldc);
        return kSuccess;
    });
    return r == kSuccess ? 0 : 13;  // CUBLAS_STATUS_EXECUTION_FAILED
}

}  // extern "C"
