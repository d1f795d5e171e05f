// sim.h: the CUDA execution model on CPU threads (DESIGN §4).
//
// Included by common.cuh when __CUDACC__ is not defined; the kernels in kernels/*.cu are then
// compiled unchanged as C++20 (-x c++ -std=c++20 -O2 -pthread) and run by kernels/sim/runtime.cpp.
//
// Model:
//   - a grid runs block by block on the launching OS thread; a block's threads are fibers
//     (user-level contexts with their own stacks), each run until it reaches a meeting point or
//     returns, then the next runnable one. The order is the launch's schedule: forward (blocks
//     x fastest, threads in thread order) or reverse (both reversed), named by the launch or
//     by PRM_SIM_SCHEDULE; comparing the two finds races;
//   - threadIdx/blockIdx/blockDim/gridDim are thread_local, set for the fiber being run;
//   - __syncthreads is a block barrier; a thread that returns while others wait at a barrier,
//     or a block whose live threads all wait, is reported at once as a deadlock naming kernel,
//     block and thread; a thread that runs past the timeout while others wait fails the launch;
//   - warp intrinsics go through a per-warp exchange: lanes publish a value into a slot, meet at a
//     warp barrier whose participants are the lanes of `mask` that exist (partial last warp), and
//     read the slot they want;
//   - shared memory (PRM_SHARED_ARRAY / PRM_DYNAMIC_SHARED) lives in a per-block arena, poisoned
//     with 0xFF bytes (NaN) at every block start, with a 16-byte red zone after the dynamic part
//     and after every array that fails the launch when a block ends with it written;
//   - cp.async copies are queued per thread and land at cp.async.wait_group (forward schedule)
//     or at issue (reverse schedule) (tile_io.cuh);
//   - atomics are std::atomic_ref; __nv_bfloat16 is a round-to-nearest-even shim.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------
// Qualifiers
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
// __restrict__ is a GCC/Clang keyword already.

// ---------------------------------------------------------------------------------------------
// Vector types
// ---------------------------------------------------------------------------------------------
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};
struct alignas(8) float2 { float x, y; };
struct float3 { float x, y, z; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float3 make_float3(float x, float y, float z) { return float3{x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---------------------------------------------------------------------------------------------
// Runtime interface (kernels/sim/runtime.cpp)
// ---------------------------------------------------------------------------------------------
namespace prm_sim {

// Coordinates of the simulated thread (fiber) being run on this OS thread.
inline thread_local unsigned tl_lane = 0;    // lane within the warp
inline thread_local unsigned tl_warp = 0;    // warp within the block
inline thread_local unsigned tl_linear = 0;  // linear thread index within the block

void syncthreads();
int syncthreads_count(int pred);
// Warp exchange: publishes `value` for this lane, waits for the lanes of `mask` that exist, and
// returns the 32 slots of this phase (valid for the lanes in *eff_mask). Lanes of the mask
// that do not exist (partial last warp) do not take part.
const uint64_t* warp_exchange(unsigned mask, uint64_t value, unsigned* eff_mask);
// Same for up to 64 bytes per lane: copies every participating lane's `bytes` into all[32*bytes]
// (lane-major). For tensor-core fallbacks (fragments of several registers).
void warp_allgather(unsigned mask, const void* mine, void* all, size_t bytes, unsigned* eff_mask);
// The same exchange without the copy: returns the phase's gather block, lane l's bytes at
// l * kGatherStride, valid until this lane's next warp collective.
constexpr size_t kGatherStride = 64;
const unsigned char* warp_gather_view(unsigned mask, const void* mine, size_t bytes, unsigned* eff_mask);
unsigned activemask();
// Fails the launch with `msg` (naming the kernel, block and thread), for wrappers that detect
// misuse the GPU would not report, e.g. a tensor-core product issued by a partial warp.
[[noreturn]] void kernel_error(const char* msg);
// Fails the launch unless [p, p + bytes) lies in the block's shared memory and p is a multiple
// of `align`; `what` names the instruction in the message.
void check_shared_access(const void* p, size_t bytes, size_t align, const char* what);
// Fails the launch unless p is a multiple of `bytes`: a vector access of that width (any memory
// space), which a GPU faults on when misaligned.
void check_vector_access(const void* p, size_t bytes, const char* what);
// cp.async of 16 bytes (zero fill when !valid), queued for this thread until
// cp_async_wait(n) lands every committed group but the n most recent (tile_io.cuh).
void cp_async_16(void* dst, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);

// Shared memory. A declaration site holds the offset of its array in the block's arena for the
// current launch (assigned on first use, the same for every thread and block of the launch);
// one a declaration and OS thread, as each OS thread launches with its own arena.
struct SharedSite {
    std::atomic<uint64_t> epoch{0};
    size_t offset = 0;
};
void* shared_static(SharedSite& site, size_t bytes, size_t align, const char* name);
void* dynamic_shared();

// Fault reporting (memory.cpp: every device buffer is followed by an inaccessible page).
// Installs the SIGSEGV/SIGBUS handler once, and an alternate signal stack for this thread.
void install_fault_handler();
// Writes "kernel K, block (x,y,z), thread (x,y,z)" for the simulated thread running on this OS
// thread; false when no launch runs here. Called from the signal handler.
bool describe_running_thread(char* buf, size_t len);

// Text built without the C library's formatting (snprintf is not async-signal-safe): the fault
// handler's message. Truncates at the buffer's end, always NUL-terminated.
struct SignalSafeText {
    char* buf;
    size_t cap;
    size_t len = 0;
    SignalSafeText(char* b, size_t c) : buf(b), cap(c) {
        if (cap) buf[0] = '\0';
    }
    SignalSafeText& put(char c) {
        if (len + 1 < cap) {
            buf[len++] = c;
            buf[len] = '\0';
        }
        return *this;
    }
    SignalSafeText& text(const char* s) {
        while (s && *s) put(*s++);
        return *this;
    }
    SignalSafeText& number(unsigned long long v) {
        char digits[24];
        int n = 0;
        do {
            digits[n++] = static_cast<char>('0' + v % 10);
            v /= 10;
        } while (v);
        while (n) put(digits[--n]);
        return *this;
    }
    SignalSafeText& hex(uintptr_t v) {
        text("0x");
        int shift = static_cast<int>(sizeof v * 8) - 4;
        while (shift > 0 && ((v >> shift) & 0xF) == 0) shift -= 4;
        for (; shift >= 0; shift -= 4) put("0123456789abcdef"[(v >> shift) & 0xF]);
        return *this;
    }
};

// Kernel registration (fallback to the table generated by build/sim.rs).
using Trampoline = void (*)(void**);
bool register_kernel(const char* name, Trampoline fn);

template <typename F>
struct Tramp;
template <typename... A>
struct Tramp<void (*)(A...)> {
    template <size_t... I>
    static void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
        f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
    }
    static void run(void (*f)(A...), void** args) { call(f, args, std::index_sequence_for<A...>{}); }
};

}  // namespace prm_sim

// ---------------------------------------------------------------------------------------------
// Built-in variables
// ---------------------------------------------------------------------------------------------
inline thread_local uint3 threadIdx = {0, 0, 0};
inline thread_local uint3 blockIdx = {0, 0, 0};
inline thread_local dim3 blockDim = {1, 1, 1};
inline thread_local dim3 gridDim = {1, 1, 1};
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// Portable macros (see common.cuh)
// ---------------------------------------------------------------------------------------------
#define PRM_REGISTER_KERNEL(fn)                                                                   \
    extern "C" void prm_sim_trampoline_##fn(void** args) {                                       \
        ::prm_sim::Tramp<decltype(&fn)>::run(&fn, args);                                         \
    }                                                                                             \
    [[maybe_unused]] static const bool prm_sim_registered_##fn =                                  \
        ::prm_sim::register_kernel(#fn, &prm_sim_trampoline_##fn)

#define PRM_SIM_CAT2(a, b) a##b
#define PRM_SIM_CAT(a, b) PRM_SIM_CAT2(a, b)

#define PRM_SHARED_ARRAY(type, name, n)                                                           \
    static thread_local ::prm_sim::SharedSite PRM_SIM_CAT(prm_sim_site_, name);                   \
    type(&name)[n] = *reinterpret_cast<type(*)[n]>(::prm_sim::shared_static(                      \
        PRM_SIM_CAT(prm_sim_site_, name), sizeof(type) * (n), alignof(type), #name))

#define PRM_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::prm_sim::dynamic_shared())
#define PRM_DYNAMIC_SHARED_IN_TEMPLATE(type, name) PRM_DYNAMIC_SHARED(type, name)

// ---------------------------------------------------------------------------------------------
// Synchronisation
// ---------------------------------------------------------------------------------------------
inline void __syncthreads() { prm_sim::syncthreads(); }
inline int __syncthreads_count(int pred) { return prm_sim::syncthreads_count(pred); }
inline int __syncthreads_or(int pred) { return prm_sim::syncthreads_count(pred) != 0; }
inline int __syncthreads_and(int pred) {
    return prm_sim::syncthreads_count(pred != 0) ==
           static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    unsigned eff;
    prm_sim::warp_exchange(mask, 0, &eff);
}
inline unsigned __activemask() { return prm_sim::activemask(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---------------------------------------------------------------------------------------------
// Warp intrinsics
// ---------------------------------------------------------------------------------------------
namespace prm_sim {
enum ShflKind { kIdx, kUp, kDown, kXor };

template <typename T>
inline T shfl(unsigned mask, T var, ShflKind kind, int arg, int width) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type over 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &var, sizeof(T));
    unsigned eff;
    const uint64_t* slots = warp_exchange(mask, bits, &eff);
    const int lane = static_cast<int>(tl_lane);
    int w = width;
    if (w <= 0 || w > 32 || (w & (w - 1)) != 0) w = 32;
    const int seg = lane & ~(w - 1);
    int src;
    switch (kind) {
        case kIdx: src = seg + static_cast<int>(static_cast<unsigned>(arg) % static_cast<unsigned>(w)); break;
        case kUp: src = lane - static_cast<int>(static_cast<unsigned>(arg)); if (src < seg) src = lane; break;
        case kDown: src = lane + static_cast<int>(static_cast<unsigned>(arg)); if (src >= seg + w) src = lane; break;
        default: src = lane ^ arg; if (src >= seg + w) src = lane; break;
    }
    if (src < 0 || src >= 32 || src == lane) return var;
    // Reading a lane outside the mask gives an undefined value on a GPU (that lane may be
    // inactive, or elsewhere in the code); the simulator used to return the caller's own.
    if (!((eff >> src) & 1u))
        kernel_error("a warp shuffle reads a lane outside its mask: its value is undefined on a GPU");
    T out;
    std::memcpy(&out, &slots[src], sizeof(T));
    return out;
}

inline unsigned ballot(unsigned mask, int pred, unsigned* eff) {
    const uint64_t* slots = warp_exchange(mask, pred ? 1u : 0u, eff);
    unsigned r = 0;
    for (unsigned l = 0; l < 32; ++l)
        if (((*eff >> l) & 1u) && slots[l]) r |= 1u << l;
    return r;
}

template <typename T, typename Op>
inline T warp_reduce(unsigned mask, T v, Op op) {
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    unsigned eff;
    const uint64_t* slots = warp_exchange(mask, bits, &eff);
    bool first = true;
    T acc{};
    for (unsigned l = 0; l < 32; ++l) {
        if (!((eff >> l) & 1u)) continue;
        T x;
        std::memcpy(&x, &slots[l], sizeof(T));
        acc = first ? x : op(acc, x);
        first = false;
    }
    return acc;
}
}  // namespace prm_sim

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32) {
    return prm_sim::shfl(mask, var, prm_sim::kIdx, srcLane, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return prm_sim::shfl(mask, var, prm_sim::kUp, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return prm_sim::shfl(mask, var, prm_sim::kDown, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32) {
    return prm_sim::shfl(mask, var, prm_sim::kXor, laneMask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    unsigned eff;
    return prm_sim::ballot(mask, pred, &eff);
}
inline int __any_sync(unsigned mask, int pred) {
    unsigned eff;
    return prm_sim::ballot(mask, pred, &eff) != 0;
}
inline int __all_sync(unsigned mask, int pred) {
    unsigned eff;
    return prm_sim::ballot(mask, pred, &eff) == eff;
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
    return prm_sim::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a + b; });
}
inline int __reduce_add_sync(unsigned mask, int v) {
    return static_cast<int>(__reduce_add_sync(mask, static_cast<unsigned>(v)));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
    return prm_sim::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a < b ? a : b; });
}
inline int __reduce_min_sync(unsigned mask, int v) {
    return prm_sim::warp_reduce(mask, v, [](int a, int b) { return a < b ? a : b; });
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
    return prm_sim::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a > b ? a : b; });
}
inline int __reduce_max_sync(unsigned mask, int v) {
    return prm_sim::warp_reduce(mask, v, [](int a, int b) { return a > b ? a : b; });
}
inline unsigned __reduce_and_sync(unsigned mask, unsigned v) {
    return prm_sim::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a & b; });
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned v) {
    return prm_sim::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a | b; });
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v) {
    return prm_sim::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a ^ b; });
}

// ---------------------------------------------------------------------------------------------
// Atomics (std::atomic_ref; return the old value as CUDA does)
// ---------------------------------------------------------------------------------------------
namespace prm_sim {
template <typename T>
inline std::atomic_ref<T> aref(T* p) { return std::atomic_ref<T>(*p); }
template <typename T>
inline T atomic_max(T* p, T v) {
    auto a = aref(p);
    T old = a.load(std::memory_order_relaxed);
    while (old < v && !a.compare_exchange_weak(old, v, std::memory_order_seq_cst)) {}
    return old;
}
template <typename T>
inline T atomic_min(T* p, T v) {
    auto a = aref(p);
    T old = a.load(std::memory_order_relaxed);
    while (v < old && !a.compare_exchange_weak(old, v, std::memory_order_seq_cst)) {}
    return old;
}
template <typename T>
inline T atomic_cas(T* p, T compare, T val) {
    T expected = compare;
    aref(p).compare_exchange_strong(expected, val, std::memory_order_seq_cst);
    return expected;
}
}  // namespace prm_sim

inline float atomicAdd(float* p, float v) { return prm_sim::aref(p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return prm_sim::aref(p).fetch_add(v); }
inline int atomicAdd(int* p, int v) { return prm_sim::aref(p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return prm_sim::aref(p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return prm_sim::aref(p).fetch_add(v); }
inline int atomicSub(int* p, int v) { return prm_sim::aref(p).fetch_sub(v); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return prm_sim::aref(p).fetch_sub(v); }
inline int atomicMax(int* p, int v) { return prm_sim::atomic_max(p, v); }
inline unsigned atomicMax(unsigned* p, unsigned v) { return prm_sim::atomic_max(p, v); }
inline long long atomicMax(long long* p, long long v) { return prm_sim::atomic_max(p, v); }
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) { return prm_sim::atomic_max(p, v); }
inline int atomicMin(int* p, int v) { return prm_sim::atomic_min(p, v); }
inline unsigned atomicMin(unsigned* p, unsigned v) { return prm_sim::atomic_min(p, v); }
inline long long atomicMin(long long* p, long long v) { return prm_sim::atomic_min(p, v); }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) { return prm_sim::atomic_min(p, v); }
inline int atomicCAS(int* p, int c, int v) { return prm_sim::atomic_cas(p, c, v); }
inline unsigned atomicCAS(unsigned* p, unsigned c, unsigned v) { return prm_sim::atomic_cas(p, c, v); }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long c, unsigned long long v) { return prm_sim::atomic_cas(p, c, v); }
inline unsigned short atomicCAS(unsigned short* p, unsigned short c, unsigned short v) { return prm_sim::atomic_cas(p, c, v); }
inline int atomicExch(int* p, int v) { return prm_sim::aref(p).exchange(v); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return prm_sim::aref(p).exchange(v); }
inline unsigned long long atomicExch(unsigned long long* p, unsigned long long v) { return prm_sim::aref(p).exchange(v); }
inline float atomicExch(float* p, float v) { return prm_sim::aref(p).exchange(v); }
inline int atomicAnd(int* p, int v) { return prm_sim::aref(p).fetch_and(v); }
inline unsigned atomicAnd(unsigned* p, unsigned v) { return prm_sim::aref(p).fetch_and(v); }
inline int atomicOr(int* p, int v) { return prm_sim::aref(p).fetch_or(v); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return prm_sim::aref(p).fetch_or(v); }
inline int atomicXor(int* p, int v) { return prm_sim::aref(p).fetch_xor(v); }
inline unsigned atomicXor(unsigned* p, unsigned v) { return prm_sim::aref(p).fetch_xor(v); }
inline unsigned atomicInc(unsigned* p, unsigned limit) {
    auto a = prm_sim::aref(p);
    unsigned old = a.load(std::memory_order_relaxed);
    while (!a.compare_exchange_weak(old, old >= limit ? 0u : old + 1u)) {}
    return old;
}

// ---------------------------------------------------------------------------------------------
// Bit casts and integer intrinsics
// ---------------------------------------------------------------------------------------------
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline unsigned __umulhi(unsigned a, unsigned b) {
    return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __mul24(int a, int b) {
    const int a24 = static_cast<int>(static_cast<unsigned>(a) << 8) >> 8;
    const int b24 = static_cast<int>(static_cast<unsigned>(b) << 8) >> 8;
    return a24 * b24;
}
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(unsigned x) { return std::countl_zero(x); }
inline int __clzll(unsigned long long x) { return std::countl_zero(x); }
inline int __ffs(unsigned x) { return x == 0 ? 0 : std::countr_zero(x) + 1; }
inline int __ffsll(unsigned long long x) { return x == 0 ? 0 : std::countr_zero(x) + 1; }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}
template <typename T>
inline T __ldg(const T* p) { return *p; }

// ---------------------------------------------------------------------------------------------
// Math (<cmath> plus the CUDA intrinsics)
// ---------------------------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __tanhf(float x) { return std::tanh(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }  // NaN -> 0
inline float exp10f(float x) { return std::pow(10.0f, x); }
inline float rcbrtf(float x) { return 1.0f / std::cbrt(x); }
inline float normcdff(float x) { return 0.5f * std::erfc(-x * 0.70710678118654752f); }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(std::ceil(x)); }
inline unsigned __float2uint_rn(float x) { return static_cast<unsigned>(std::nearbyint(x)); }
inline unsigned __float2uint_rz(float x) { return static_cast<unsigned>(x); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }

// min/max as CUDA overloads them (integer pairs promote to unsigned when one side is unsigned).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
// Mixed arithmetic types: the usual arithmetic conversions (int with unsigned gives unsigned,
// float with double gives double), as CUDA's overloads do.
template <typename A, typename B>
    requires(std::is_arithmetic_v<A> && std::is_arithmetic_v<B> && !std::is_same_v<A, B>)
inline std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    return min(static_cast<C>(a), static_cast<C>(b));
}
template <typename A, typename B>
    requires(std::is_arithmetic_v<A> && std::is_arithmetic_v<B> && !std::is_same_v<A, B>)
inline std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    return max(static_cast<C>(a), static_cast<C>(b));
}

// Time: nanoseconds of the host's steady clock (cycles on a GPU).
inline long long clock64() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}
inline void __nanosleep(unsigned ns) { std::this_thread::sleep_for(std::chrono::nanoseconds(ns)); }

// ---------------------------------------------------------------------------------------------
// bfloat16
// ---------------------------------------------------------------------------------------------
namespace prm_sim {
inline unsigned short f32_to_bf16_bits(float f) {
    const unsigned u = std::bit_cast<unsigned>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((u >> 16) | 0x40u);  // quiet NaN, sign kept
    const unsigned rounding = 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return static_cast<unsigned short>((u + rounding) >> 16);
}
inline float bf16_bits_to_f32(unsigned short b) { return std::bit_cast<float>(static_cast<unsigned>(b) << 16); }
}  // namespace prm_sim

struct alignas(2) __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(prm_sim::f32_to_bf16_bits(f)) {}
    operator float() const { return prm_sim::bf16_bits_to_f32(__x); }
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
using nv_bfloat16 = __nv_bfloat16;
using nv_bfloat162 = __nv_bfloat162;

inline __nv_bfloat16 __float2bfloat16(float f) {
    __nv_bfloat16 r;
    r.__x = prm_sim::f32_to_bf16_bits(f);
    return r;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rz(float f) {
    __nv_bfloat16 r;
    const unsigned u = std::bit_cast<unsigned>(f);
    r.__x = static_cast<unsigned short>(((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : (u >> 16));
    return r;
}
inline float __bfloat162float(__nv_bfloat16 b) { return prm_sim::bf16_bits_to_f32(b.__x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162{__float2bfloat16(a), __float2bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return float2{__bfloat162float(b.x), __bfloat162float(b.y)}; }
inline float __low2float(__nv_bfloat162 b) { return __bfloat162float(b.x); }
inline float __high2float(__nv_bfloat162 b) { return __bfloat162float(b.y); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
    __nv_bfloat16 r;
    r.__x = u;
    return r;
}
