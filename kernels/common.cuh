// common.cuh: included first by every kernel file.
//
// Under nvcc this is plain CUDA. Compiled as C++20 for the simulator (no __CUDACC__), it pulls
// in sim/sim.h, which supplies the CUDA execution model on CPU threads: threadIdx & co.,
// __syncthreads, warp intrinsics, atomics, __nv_bfloat16 and the fast-math intrinsics.
//
// Portable macros every kernel uses instead of the raw CUDA spellings:
//   PRM_REGISTER_KERNEL(fn)            after an `extern "C" __global__` kernel: registers it by name
//                                      with the simulator (expands to nothing under nvcc)
//   PRM_SHARED_ARRAY(type, name, n)    a static __shared__ array of n elements
//   PRM_DYNAMIC_SHARED(type, name)     the dynamic (extern __shared__) buffer, as `type* name`
//   PRM_DYNAMIC_SHARED_IN_TEMPLATE(type, name)   the same, inside a function template
// and device helpers: vector loads and stores (prm_load_vec, prm_store_vec), warp sum and max
// (prm_warp_sum, prm_warp_max) and the image of a packed token row (prm_image_of_row).
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cstdint>
#define PRM_REGISTER_KERNEL(fn)
#define PRM_SHARED_ARRAY(type, name, n) __shared__ type name[n]
#define PRM_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) unsigned char prm_dynamic_smem_[]; type* name = reinterpret_cast<type*>(prm_dynamic_smem_)
// The same buffer from inside a function template, under its own name: nvcc warns (#1556) when
// one extern __shared__ name is declared both in templates and in plain functions of a file.
#define PRM_DYNAMIC_SHARED_IN_TEMPLATE(type, name) extern __shared__ __align__(16) unsigned char prm_dynamic_smem_tpl_[]; type* name = reinterpret_cast<type*>(prm_dynamic_smem_tpl_)
#else
#include "sim/sim.h"
#endif

#define PRM_WARP_SIZE 32

// A load or store of a whole T (float2, float4, uint4, a bf16 pair as uint32_t) at p. The GPU
// faults ("misaligned address", which ends the CUDA context) unless p is a multiple of
// sizeof(T); an x86 CPU does not, so the simulator checks it here and fails the launch with the
// thread's name. Every wide access in kernels/ goes through these two.
template <typename T>
__device__ __forceinline__ T prm_load_vec(const void* p) {
#ifndef __CUDACC__
    prm_sim::check_vector_access(p, sizeof(T), "vector load");
#endif
    return *static_cast<const T*>(p);
}
template <typename T>
__device__ __forceinline__ void prm_store_vec(void* p, T v) {
#ifndef __CUDACC__
    prm_sim::check_vector_access(p, sizeof(T), "vector store");
#endif
    *static_cast<T*>(p) = v;
}

// Sum of v over the 32 lanes of a full warp (every lane gets the result).
__device__ __forceinline__ float prm_warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Max of v over the 32 lanes of a full warp.
__device__ __forceinline__ float prm_warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// The image of packed row `row`: the b with cu_seqlens[b] <= row < cu_seqlens[b + 1] (a binary
// search of the [images + 1] offsets table; row < cu_seqlens[images]).
__device__ __forceinline__ int prm_image_of_row(const int* cu_seqlens, int images, int row) {
    int lo = 0, hi = images;  // invariant: cu_seqlens[lo] <= row < cu_seqlens[hi]
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (cu_seqlens[mid] <= row) lo = mid; else hi = mid;
    }
    return lo;
}
