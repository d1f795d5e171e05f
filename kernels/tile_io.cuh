// tile_io.cuh: wrappers for the shared-memory tile instructions of the tensor-core kernels
// (sm_80+), each with a simulator implementation that follows the PTX ISA.
//
//   prm_cp_async_16(dst, src, valid)   cp.async.cg.shared.global, 16 bytes; `valid` false copies
//                                      nothing and writes 16 zero bytes (src-size 0), so tiles
//                                      past a sequence's end read as zeros. dst and src 16-byte
//                                      aligned; src must be a valid address even when !valid.
//   prm_cp_async_commit()              cp.async.commit_group
//   prm_cp_async_wait<N>()             cp.async.wait_group N: all but the N most recent groups of
//                                      this thread have landed. A __syncthreads() must follow
//                                      before other threads read the data (as on the GPU).
//   prm_ldmatrix_x4(r, row)            ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8j..8j+7
//                                      give the 16-byte row addresses of 8×8 matrix j; lane i
//                                      gets in r[j] the pair (row i/4, cols 2(i%4), 2(i%4)+1) of
//                                      matrix j, the lower column in the low half.
//   prm_ldmatrix_x4_trans(r, row)      the same with .trans: lane i gets (rows 2(i%4), 2(i%4)+1,
//                                      col i/4) of matrix j, i.e. the fragment of the transpose.
// With the mma.cuh layouts: the non-transposed form of an 8×8 block of a row-major matrix M is
// the B fragment half of B = Mᵀ (b0 = M[g][t..t+1]) and one A-fragment register (A = M); the
// .trans form of a row-major M block is the B fragment half of B = M (b0 = M[t..t+1][g]).
//
// Simulator: cp.async is queued per thread (kernels/sim/runtime.cpp) and lands at the
// cp.async.wait_group that covers its group, as on the GPU, so a tile read before its wait reads
// poison or the previous tile; commit closes a group. Destinations must be 16-byte aligned
// addresses in the block's shared memory, sources 16-byte aligned (checked, as the GPU would
// fault). ldmatrix gathers the 32 row addresses through the warp exchange (a warp-wide meeting
// point, as on the GPU; every lane must take part), checks that each is a 16-byte aligned
// shared address, and each lane reads its own elements from the addressed rows.
#pragma once
#include "common.cuh"

__device__ __forceinline__ void prm_cp_async_16(void* dst, const void* src, bool valid) {
#ifdef __CUDACC__
    const unsigned saddr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(src), "r"(src_bytes) : "memory");
#else
    prm_sim::cp_async_16(dst, src, valid);
#endif
}

__device__ __forceinline__ void prm_cp_async_commit() {
#ifdef __CUDACC__
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
    prm_sim::cp_async_commit();
#endif
}

template <int N>
__device__ __forceinline__ void prm_cp_async_wait() {
#ifdef __CUDACC__
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
    prm_sim::cp_async_wait(N);
#endif
}

#ifndef __CUDACC__
namespace prm_sim {
// ldmatrix .x4 for the simulator: `row` is this lane's row address; see the header comment.
inline void ldmatrix_x4(uint32_t r[4], const void* row, bool trans) {
    check_shared_access(row, 16, 16, trans ? "ldmatrix.trans row" : "ldmatrix row");
    unsigned eff = 0;
    const uint64_t* all = warp_exchange(0xffffffffu, reinterpret_cast<uint64_t>(row), &eff);
    if (eff != 0xffffffffu) kernel_error("ldmatrix needs a full warp (every lane active)");
    const int lane = static_cast<int>(tl_lane);
    for (int j = 0; j < 4; ++j) {
        auto at = [&](int rr, int cc) {
            uint16_t v;
            std::memcpy(&v, reinterpret_cast<const unsigned char*>(all[8 * j + rr]) + 2 * cc, 2);
            return static_cast<uint32_t>(v);
        };
        const int a = lane >> 2, b = 2 * (lane & 3);
        r[j] = trans ? (at(b, a) | (at(b + 1, a) << 16)) : (at(a, b) | (at(a, b + 1) << 16));
    }
}
}  // namespace prm_sim
#endif

__device__ __forceinline__ void prm_ldmatrix_x4(uint32_t r[4], const void* row) {
#ifdef __CUDACC__
    const unsigned saddr = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(saddr));
#else
    prm_sim::ldmatrix_x4(r, row, false);
#endif
}

__device__ __forceinline__ void prm_ldmatrix_x4_trans(uint32_t r[4], const void* row) {
#ifdef __CUDACC__
    const unsigned saddr = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(saddr));
#else
    prm_sim::ldmatrix_x4(r, row, true);
#endif
}
