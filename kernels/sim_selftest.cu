// sim_selftest.cu: kernels that test the simulator itself (tests/sim.rs). They are valid CUDA as
// well, but only the simulator tests launch them.
//
// Layouts: plain 1-D arrays indexed by the global linear thread id unless stated otherwise.
// Launchers: tests/sim.rs builds KernelArgs directly (no src/gpu/kernels/ launcher).
#include "common.cuh"
#include "tile_io.cuh"

// Barrier: every thread writes its slot, syncs, reads its neighbours, syncs, `iters` times.
// out[g] = sum over it of (buf[(t+1)%n] + buf[(t+n-1)%n]) where buf[t] = t*it + blockIdx.x.
// count[blockIdx.x] = __syncthreads_count(t % 3 == 0).
extern "C" __global__ void prm_selftest_barrier(int* __restrict__ out, int* __restrict__ count, int iters) {
    PRM_SHARED_ARRAY(int, buf, 1024);
    const int t = threadIdx.x, n = blockDim.x;
    int acc = 0;
    for (int it = 0; it < iters; ++it) {
        buf[t] = t * it + static_cast<int>(blockIdx.x);
        __syncthreads();
        acc += buf[(t + 1) % n] + buf[(t + n - 1) % n];
        __syncthreads();
    }
    out[blockIdx.x * n + t] = acc;
    const int c = __syncthreads_count(t % 3 == 0);
    if (t == 0) count[blockIdx.x] = c;
}
PRM_REGISTER_KERNEL(prm_selftest_barrier);

// Shared memory poison: each thread reads its static and dynamic shared slots before writing
// them. out[2*g] = bits of the static slot, out[2*g+1] = bits of the dynamic slot, as read.
extern "C" __global__ void prm_selftest_shared_poison(unsigned* __restrict__ out) {
    PRM_SHARED_ARRAY(float, st, 256);
    PRM_DYNAMIC_SHARED(float, dyn);
    const int t = threadIdx.x;
    const int g = blockIdx.x * blockDim.x + t;
    out[2 * g] = __float_as_uint(st[t]);
    out[2 * g + 1] = __float_as_uint(dyn[t]);
    __syncthreads();
    st[t] = static_cast<float>(blockIdx.x + 1);
    dyn[t] = static_cast<float>(blockIdx.x + 1);
    __syncthreads();
}
PRM_REGISTER_KERNEL(prm_selftest_shared_poison);

// Dynamic shared memory: each block reverses its chunk of n = blockDim.x elements through the
// dynamic buffer; a static array after it checks that the two do not overlap.
extern "C" __global__ void prm_selftest_dynamic_shared(const float* __restrict__ in, float* __restrict__ out) {
    PRM_DYNAMIC_SHARED(float, dyn);
    PRM_SHARED_ARRAY(float, st, 1024);
    const int t = threadIdx.x, n = blockDim.x;
    dyn[t] = in[blockIdx.x * n + t];
    st[t] = -1.0f;
    __syncthreads();
    out[blockIdx.x * n + t] = dyn[n - 1 - t] + st[n - 1 - t] + 1.0f;
}
PRM_REGISTER_KERNEL(prm_selftest_dynamic_shared);

// Warp shuffles and votes on full warps. out[g*12 + k] for k:
//  0 xor 1, 1 xor 16, 2 down 3, 3 up 5, 4 idx 7, 5 idx 3 width 8, 6 down 1 width 4,
//  7 ballot(lane%3==0), 8 any(lane==31), 9 all(lane<32), 10 all(lane<31),
//  11 float xor 2 (as int bits of (float)lane * 0.5f), plus u64[g] = 64-bit xor 4.
extern "C" __global__ void prm_selftest_shuffles(int* __restrict__ out, unsigned long long* __restrict__ wide) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    const int lane = threadIdx.x % 32;
    const unsigned full = 0xffffffffu;
    int* o = out + g * 12;
    o[0] = __shfl_xor_sync(full, lane, 1);
    o[1] = __shfl_xor_sync(full, lane, 16);
    o[2] = __shfl_down_sync(full, lane, 3);
    o[3] = __shfl_up_sync(full, lane, 5);
    o[4] = __shfl_sync(full, lane, 7);
    o[5] = __shfl_sync(full, lane, 3, 8);
    o[6] = __shfl_down_sync(full, lane, 1, 4);
    o[7] = static_cast<int>(__ballot_sync(full, lane % 3 == 0));
    o[8] = __any_sync(full, lane == 31);
    o[9] = __all_sync(full, lane < 32);
    o[10] = __all_sync(full, lane < 31);
    o[11] = __float_as_int(__shfl_xor_sync(full, static_cast<float>(lane) * 0.5f, 2));
    const unsigned long long w = (static_cast<unsigned long long>(lane) << 40) | static_cast<unsigned long long>(g);
    wide[g] = __shfl_xor_sync(full, w, 4);
}
PRM_REGISTER_KERNEL(prm_selftest_shuffles);

// Partial last warp (launch with a block size that is not a multiple of 32). For each thread:
// out[4*t+0] = sum of in[] over the lanes of its warp (through __shfl_sync from every active
// lane), +1 = __activemask(), +2 = __ballot_sync(mask, 1), +3 = an xor butterfly over the
// active mask in which a lane whose partner does not exist adds nothing at that step.
extern "C" __global__ void prm_selftest_partial_warp(const float* __restrict__ in, float* __restrict__ out) {
    const int t = threadIdx.x;
    const float v = in[t];
    const unsigned mask = __activemask();
    float sum = 0.0f;
    for (int src = 0; src < 32; ++src)
        if ((mask >> src) & 1u) sum += __shfl_sync(mask, v, src);
    out[4 * t + 0] = sum;
    out[4 * t + 1] = __uint_as_float(mask);
    out[4 * t + 2] = __uint_as_float(__ballot_sync(mask, 1));
    __syncwarp(mask);
    float b = v;
    const int lane = t % 32;
    for (int offset = 16; offset > 0; offset >>= 1) {
        // Only partners that exist are read: a shuffle from outside the mask is undefined.
        const int partner = lane ^ offset;
        const unsigned from = ((mask >> partner) & 1u) ? partner : lane;
        const float got = __shfl_sync(mask, b, from);
        b += from == (unsigned)lane ? 0.0f : got;
    }
    out[4 * t + 3] = b;
}
PRM_REGISTER_KERNEL(prm_selftest_partial_warp);

// Undefined on a GPU, refused by the simulator: mode 0, a full-mask collective (prm_warp_sum)
// in a partial last warp; mode 1, a shuffle that reads a lane outside its mask.
extern "C" __global__ void prm_selftest_bad_warp_masks(int mode, float* __restrict__ out) {
    const int t = threadIdx.x;
    if (mode == 0) {
        out[t] = prm_warp_sum(1.0f);
    } else if (t < 16) {
        out[t] = __shfl_sync(0x0000ffffu, (float)t, t + 16);
    }
}
PRM_REGISTER_KERNEL(prm_selftest_bad_warp_masks);

// Atomics from every thread: fsum += 1, isum += g, umax = max(g), u64 += g, cas_count += 1
// through an atomicCAS loop, dsum += 0.5.
extern "C" __global__ void prm_selftest_atomics(float* fsum, int* isum, unsigned* umax, unsigned long long* u64,
                                                int* cas_count, unsigned long long* dsum_bits) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(fsum, 1.0f);
    atomicAdd(isum, g);
    atomicMax(umax, static_cast<unsigned>(g));
    atomicAdd(u64, static_cast<unsigned long long>(g));
    int old = *cas_count, assumed;
    do {
        assumed = old;
        old = atomicCAS(cas_count, assumed, assumed + 1);
    } while (old != assumed);
    atomicAdd(reinterpret_cast<double*>(dsum_bits), 0.5);
}
PRM_REGISTER_KERNEL(prm_selftest_atomics);

// bf16 conversions: out[i] = __float2bfloat16(in[i]), back[i] = __bfloat162float(out[i]).
extern "C" __global__ void prm_selftest_bf16(const float* __restrict__ in, __nv_bfloat16* __restrict__ out,
                                             float* __restrict__ back, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const __nv_bfloat16 b = __float2bfloat16(in[i]);
        out[i] = b;
        back[i] = __bfloat162float(b);
    }
}
PRM_REGISTER_KERNEL(prm_selftest_bf16);

// Multi-dimensional grids and blocks: out[g] packs (threadIdx, blockIdx) where g is the linear
// global id (x fastest); order[block] = the order in which blocks ran (thread (0,0,0) of each).
extern "C" __global__ void prm_selftest_dims(int* __restrict__ out, int* __restrict__ order, int* counter) {
    const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int tib = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int threads = blockDim.x * blockDim.y * blockDim.z;
    out[block * threads + tib] = static_cast<int>(threadIdx.x | (threadIdx.y << 4) | (threadIdx.z << 8) |
                                                  (blockIdx.x << 12) | (blockIdx.y << 16) | (blockIdx.z << 20));
    if (tib == 0) order[block] = atomicAdd(counter, 1);
}
PRM_REGISTER_KERNEL(prm_selftest_dims);

// Deadlock: thread 0 returns before a __syncthreads the others reach (undefined on a GPU).
extern "C" __global__ void prm_selftest_early_return(float* __restrict__ out) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}
PRM_REGISTER_KERNEL(prm_selftest_early_return);

// Deadlock that only the timeout can see: lane 0 waits in a warp collective with lane 1, which
// waits in __syncthreads with everybody else.
extern "C" __global__ void prm_selftest_stuck(float* __restrict__ out) {
    if (threadIdx.x == 0) {
        __syncwarp(0x3u);
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}
PRM_REGISTER_KERNEL(prm_selftest_stuck);

// A typical block reduction: out[b] = sum of in[b*chunk .. (b+1)*chunk) through shared memory
// and warp shuffles (blockDim.x a multiple of 32).
extern "C" __global__ void prm_selftest_block_sum(const float* __restrict__ in, float* __restrict__ out, int chunk) {
    PRM_SHARED_ARRAY(float, partial, 32);
    const int t = threadIdx.x;
    float v = 0.0f;
    for (int i = t; i < chunk; i += blockDim.x) v += in[blockIdx.x * chunk + i];
    v = prm_warp_sum(v);
    if (t % 32 == 0) partial[t / 32] = v;
    __syncthreads();
    if (t < 32) {
        const int nw = blockDim.x / 32;
        float w = t < nw ? partial[t] : 0.0f;
        w = prm_warp_sum(w);
        if (t == 0) out[blockIdx.x] = w;
    }
}
PRM_REGISTER_KERNEL(prm_selftest_block_sum);

// Timeout: the last thread keeps running for spin_ns (clock64 counts nanoseconds in the
// simulator) while the others wait at __syncthreads (the simulator runs threads in order, so
// they are already there); with a shorter barrier timeout the launch fails.
extern "C" __global__ void prm_selftest_slow_thread(float* __restrict__ out, unsigned long long spin_ns) {
    if (threadIdx.x == blockDim.x - 1) {
        const long long start = clock64();
        while (clock64() - start < static_cast<long long>(spin_ns)) {}
    }
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}
PRM_REGISTER_KERNEL(prm_selftest_slow_thread);

// cp.async and ldmatrix (kernels/tile_io.cuh), one warp. src holds 32 rows of 8 bf16 (16 bytes
// each); row `skip` is copied with valid = false (zero fill). Lane l then gives the address of
// shared row (7·l + 3) % 32 to ldmatrix .x4 and .x4.trans: out[l·8 + j] = r[j] of the plain
// form, out[l·8 + 4 + j] = r[j] of the transposed form.
extern "C" __global__ void prm_selftest_tile_io(const __nv_bfloat16* __restrict__ src, unsigned* __restrict__ out,
                                                int skip) {
    PRM_SHARED_ARRAY(__nv_bfloat16, rows, 32 * 8);
    const int lane = threadIdx.x;
    prm_cp_async_16(rows + lane * 8, src + lane * 8, lane != skip);
    prm_cp_async_commit();
    prm_cp_async_wait<0>();
    __syncthreads();
    uint32_t r[4], rt[4];
    const __nv_bfloat16* mine = rows + ((7 * lane + 3) % 32) * 8;
    prm_ldmatrix_x4(r, mine);
    prm_ldmatrix_x4_trans(rt, mine);
    for (int j = 0; j < 4; ++j) {
        out[lane * 8 + j] = r[j];
        out[lane * 8 + 4 + j] = rt[j];
    }
}
PRM_REGISTER_KERNEL(prm_selftest_tile_io);

// cp.async groups, one warp. Each lane copies 16 bytes of src (row lane) into shared rows of
// three tiles: A in group 1, B in group 2, C issued but never committed. It reads the first word
// of its own rows (its own copies: no barrier needed): out[l·4 + 0..3] = A and B after
// wait_group 1, B and C after wait_group 0. A copy lands only once a wait covers its group.
extern "C" __global__ void prm_selftest_cp_async_groups(const unsigned* __restrict__ src, unsigned* __restrict__ out) {
    PRM_SHARED_ARRAY(unsigned, tiles, 3 * 32 * 4);
    const int lane = threadIdx.x;
    unsigned* a = tiles + lane * 4;
    unsigned* b = tiles + (32 + lane) * 4;
    unsigned* c = tiles + (64 + lane) * 4;
    prm_cp_async_16(a, src + lane * 4, true);
    prm_cp_async_commit();
    prm_cp_async_16(b, src + lane * 4, true);
    prm_cp_async_commit();
    prm_cp_async_wait<1>();
    out[lane * 4 + 0] = a[0];
    out[lane * 4 + 1] = b[0];
    prm_cp_async_16(c, src + lane * 4, true);
    prm_cp_async_wait<0>();
    out[lane * 4 + 2] = b[0];
    out[lane * 4 + 3] = c[0];
}
PRM_REGISTER_KERNEL(prm_selftest_cp_async_groups);

// Misuse the GPU would fault on, one warp: mode 0 a cp.async destination 8 bytes off alignment,
// mode 1 a cp.async destination in global memory, mode 2 a misaligned global source, mode 3 an
// ldmatrix row address 8 bytes off alignment.
extern "C" __global__ void prm_selftest_tile_io_misuse(const unsigned* __restrict__ src, unsigned* __restrict__ out,
                                                       int mode) {
    PRM_SHARED_ARRAY(unsigned, tile, 32 * 4 + 4);
    const int lane = threadIdx.x;
    if (mode == 0) prm_cp_async_16(tile + lane * 4 + 2, src + lane * 4, true);
    if (mode == 1) prm_cp_async_16(out + lane * 4, src + lane * 4, true);
    if (mode == 2) prm_cp_async_16(tile + lane * 4, src + lane * 4 + 1, true);
    prm_cp_async_commit();
    prm_cp_async_wait<0>();
    __syncthreads();
    if (mode == 3) {
        uint32_t r[4];
        prm_ldmatrix_x4(r, tile + lane * 4 + (lane == 9 ? 2 : 0));
        out[lane] = r[0];
    }
}
PRM_REGISTER_KERNEL(prm_selftest_tile_io_misuse);

// Wide accesses through prm_load_vec / prm_store_vec, one warp: mode 0 every lane aligned
// (out[lane] = the bits of src[4·lane + 3], then the bf16 pair {1, 2} stored at out[32 + lane]),
// mode 1 lane 5's float4 load 8 bytes off alignment, mode 2 lane 7's 4-byte store 2 bytes off.
extern "C" __global__ void prm_selftest_vector_misuse(const float* __restrict__ src, unsigned* __restrict__ out,
                                                      int mode) {
    const int lane = threadIdx.x;
    const float4 v = prm_load_vec<float4>(src + 4 * lane + (mode == 1 && lane == 5 ? 2 : 0));
    out[lane] = __float_as_uint(v.w);
    __nv_bfloat16* pairs = reinterpret_cast<__nv_bfloat16*>(out + 32);
    prm_store_vec(pairs + 2 * lane + (mode == 2 && lane == 7 ? 1 : 0), 0x40003f80u);
}
PRM_REGISTER_KERNEL(prm_selftest_vector_misuse);

#ifndef __CUDACC__
// Simulator only: prm_sim::warp_allgather (the exchange behind tensor-core fallbacks). Each lane
// contributes 4 ints {lane, 2*lane, g, -g}; out[g] = sum over the lanes of its warp of all four.
extern "C" __global__ void prm_selftest_allgather(int* __restrict__ out) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    const int lane = threadIdx.x % 32;
    const int mine[4] = {lane, 2 * lane, g, -g};
    int all[32 * 4];
    unsigned eff;
    prm_sim::warp_allgather(__activemask(), mine, all, sizeof mine, &eff);
    int sum = 0;
    for (int l = 0; l < 32; ++l)
        if ((eff >> l) & 1u)
            for (int k = 0; k < 4; ++k) sum += all[l * 4 + k];
    out[g] = sum;
}
PRM_REGISTER_KERNEL(prm_selftest_allgather);
#endif

// Races, for the schedule tests: every thread but the first of the grid reads what its left
// neighbour wrote in the same launch.
//   mode 0: through shared memory after a __syncthreads (race-free; the first thread of each
//           block reads its own input);
//   mode 1: through shared memory with no barrier (a race, inside warps and across them);
//   mode 2: through global memory, across blocks too (a race: blocks are not ordered);
//   mode 3: each thread reads its own cp.async destination before waiting for the copy (a race
//           with the copy). in holds 4 floats per thread here; blockDim.x <= 256.
extern "C" __global__ void prm_selftest_race(const float* __restrict__ in, float* __restrict__ out,
                                             float* __restrict__ scratch, int mode) {
    PRM_SHARED_ARRAY(float, s, 1024);
    const int t = threadIdx.x;
    const int g = blockIdx.x * blockDim.x + t;
    float got;
    if (mode <= 1) {
        s[t] = in[g];
        if (mode == 0) __syncthreads();
        got = t > 0 ? s[t - 1] : in[g];
    } else if (mode == 2) {
        scratch[g] = in[g];
        got = g > 0 ? scratch[g - 1] : in[g];
    } else {
        prm_cp_async_16(s + 4 * t, in + 4 * g, true);
        prm_cp_async_commit();
        got = s[4 * t];
        prm_cp_async_wait<0>();
    }
    out[g] = got;
}
PRM_REGISTER_KERNEL(prm_selftest_race);

// out[t] = in[t + past], one block of n threads over n floats: reads past the end of `in` when
// past > 0, before its start when past < 0. Under the simulator such a read faults at the guard
// page after the buffer (forward-schedule devices) or before it (reverse-schedule devices).
extern "C" __global__ void prm_selftest_overrun(const float* __restrict__ in, float* __restrict__ out, int past) {
    const int t = threadIdx.x;
    out[t] = in[t + past];
}
PRM_REGISTER_KERNEL(prm_selftest_overrun);

// One block of 32 threads writes one element past a shared array: mode 0 the static array
// `tile`, mode 1 the dynamic shared memory (launched with 32 floats of it); mode 2 stays inside
// both. The simulator's red zones fail modes 0 and 1 when the block ends.
extern "C" __global__ void prm_selftest_shared_overrun(float* __restrict__ out, int mode) {
    PRM_SHARED_ARRAY(float, tile, 32);
    PRM_DYNAMIC_SHARED(float, dyn);
    const int t = threadIdx.x;
    const int at = t + (mode == 2 ? 0 : 1);
    if (mode == 1) {
        dyn[at] = 1.0f;
    } else {
        tile[at] = 1.0f;
    }
    __syncthreads();
    out[t] = t == 0 ? 0.0f : (mode == 1 ? dyn[t] : tile[t]);
}
PRM_REGISTER_KERNEL(prm_selftest_shared_overrun);

// The floating-point modes: out[g] = 1 + tiny (with tiny = 2^-24, 1 under round-to-nearest and
// the next float up under round-upward). Under the simulator thread 0 of block `change_block`
// switches the rounding mode to upward, which the simulator must refuse (the fibers share the
// launching thread's modes); on a GPU there is no such switch and nothing changes.
#ifndef __CUDACC__
#include <cfenv>
#endif
extern "C" __global__ void prm_selftest_fp_modes(float* __restrict__ out, float tiny, int change_block) {
#ifndef __CUDACC__
    if ((int)blockIdx.x == change_block && threadIdx.x == 0) std::fesetround(FE_UPWARD);
#endif
    out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f + tiny;
}
PRM_REGISTER_KERNEL(prm_selftest_fp_modes);
