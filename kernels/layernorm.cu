// layernorm.cu: LayerNorm over the rows of a packed token matrix, forward with saved statistics
// and input-gradient backward (no dγ/dβ: the attack never forms weight gradients).
//
// Layouts (row-major, fp32):
//   x, y, dy, dx   [rows, dim]
//   gamma, beta    [dim]
//   mean, rstd     [rows]          saved by the forward for the backward
//
// Forward:   y = (x − mean)·rstd·γ + β,  mean = Σx/dim,  rstd = 1/sqrt(Σ(x − mean)²/dim + eps)
//            (two-pass variance, exact sqrt and division, statistics in fp32)
// Backward:  dx (+)= rstd·(g − mean(g) − x̂·mean(g·x̂)),  g = dy·γ,  x̂ = (x − mean)·rstd
//            with `accumulate` != 0 adding into dx (the engine's running residual gradient).
//
// Work split: one warp per row, PRM_LN_ROWS_PER_BLOCK warps per block, no shared memory and no
// __syncthreads. Lane l owns the elements l, l + 32, l + 64, ... of its row (coalesced 128-byte
// accesses). Reductions: each lane sums its elements in increasing index order, then a butterfly
// over the warp (prm_warp_sum). Addition is commutative, so every lane of the butterfly ends with
// the same bit pattern and the result does not depend on scheduling: deterministic.
// Rows of up to PRM_LN_CACHED_DIM (1024) elements are held in registers (32 per lane); wider rows
// take a streaming path that re-reads x from global memory (same arithmetic, same order).
//
// Launchers: src/gpu/kernels/layernorm.rs (layernorm_forward_f32, layernorm_backward_f32).
#include "common.cuh"

#define PRM_LN_ROWS_PER_BLOCK 4
#define PRM_LN_CACHED_DIM 1024
#define PRM_LN_PER_LANE (PRM_LN_CACHED_DIM / PRM_WARP_SIZE)

extern "C" __global__ void prm_layernorm_forward_f32(const float* __restrict__ x,
                                                      const float* __restrict__ gamma,
                                                      const float* __restrict__ beta,
                                                      float* __restrict__ y,
                                                      float* __restrict__ mean_out,
                                                      float* __restrict__ rstd_out,
                                                      int rows, int dim, float eps) {
    const int lane = threadIdx.x % PRM_WARP_SIZE;
    const int row = blockIdx.x * PRM_LN_ROWS_PER_BLOCK + threadIdx.x / PRM_WARP_SIZE;
    if (row >= rows) return;  // whole warp leaves together; no block barrier in this kernel
    const float* xr = x + (size_t)row * dim;
    float* yr = y + (size_t)row * dim;
    const float inv_dim = 1.0f / (float)dim;

    float mean, rstd;
    if (dim <= PRM_LN_CACHED_DIM) {
        float v[PRM_LN_PER_LANE];
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < PRM_LN_PER_LANE; ++k) {
            const int i = lane + k * PRM_WARP_SIZE;
            v[k] = i < dim ? xr[i] : 0.0f;
            s += v[k];
        }
        mean = prm_warp_sum(s) * inv_dim;
        float q = 0.0f;
#pragma unroll
        for (int k = 0; k < PRM_LN_PER_LANE; ++k) {
            const int i = lane + k * PRM_WARP_SIZE;
            const float d = v[k] - mean;
            q += i < dim ? d * d : 0.0f;
        }
        rstd = 1.0f / sqrtf(prm_warp_sum(q) * inv_dim + eps);
#pragma unroll
        for (int k = 0; k < PRM_LN_PER_LANE; ++k) {
            const int i = lane + k * PRM_WARP_SIZE;
            if (i < dim) yr[i] = ((v[k] - mean) * rstd) * gamma[i] + beta[i];
        }
    } else {
        float s = 0.0f;
        for (int i = lane; i < dim; i += PRM_WARP_SIZE) s += xr[i];
        mean = prm_warp_sum(s) * inv_dim;
        float q = 0.0f;
        for (int i = lane; i < dim; i += PRM_WARP_SIZE) {
            const float d = xr[i] - mean;
            q += d * d;
        }
        rstd = 1.0f / sqrtf(prm_warp_sum(q) * inv_dim + eps);
        for (int i = lane; i < dim; i += PRM_WARP_SIZE) yr[i] = ((xr[i] - mean) * rstd) * gamma[i] + beta[i];
    }
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}
PRM_REGISTER_KERNEL(prm_layernorm_forward_f32);

// dx may not alias x or dy (the engine keeps them apart; the launcher's borrows enforce it).
extern "C" __global__ void prm_layernorm_backward_f32(const float* __restrict__ x,
                                                       const float* __restrict__ dy,
                                                       const float* __restrict__ gamma,
                                                       const float* __restrict__ mean_in,
                                                       const float* __restrict__ rstd_in,
                                                       float* __restrict__ dx,
                                                       int rows, int dim, int accumulate) {
    const int lane = threadIdx.x % PRM_WARP_SIZE;
    const int row = blockIdx.x * PRM_LN_ROWS_PER_BLOCK + threadIdx.x / PRM_WARP_SIZE;
    if (row >= rows) return;  // whole warp leaves together; no block barrier in this kernel
    const float* xr = x + (size_t)row * dim;
    const float* dyr = dy + (size_t)row * dim;
    float* dxr = dx + (size_t)row * dim;
    const float mean = mean_in[row];
    const float rstd = rstd_in[row];
    const float inv_dim = 1.0f / (float)dim;

    if (dim <= PRM_LN_CACHED_DIM) {
        float g[PRM_LN_PER_LANE], xh[PRM_LN_PER_LANE];
        float sg = 0.0f, sgx = 0.0f;
#pragma unroll
        for (int k = 0; k < PRM_LN_PER_LANE; ++k) {
            const int i = lane + k * PRM_WARP_SIZE;
            g[k] = i < dim ? dyr[i] * gamma[i] : 0.0f;
            xh[k] = i < dim ? (xr[i] - mean) * rstd : 0.0f;
            sg += g[k];
            sgx += g[k] * xh[k];
        }
        const float mg = prm_warp_sum(sg) * inv_dim;
        const float mgx = prm_warp_sum(sgx) * inv_dim;
#pragma unroll
        for (int k = 0; k < PRM_LN_PER_LANE; ++k) {
            const int i = lane + k * PRM_WARP_SIZE;
            if (i < dim) {
                const float v = rstd * (g[k] - mg - xh[k] * mgx);
                dxr[i] = accumulate ? dxr[i] + v : v;
            }
        }
    } else {
        float sg = 0.0f, sgx = 0.0f;
        for (int i = lane; i < dim; i += PRM_WARP_SIZE) {
            const float g = dyr[i] * gamma[i];
            sg += g;
            sgx += g * ((xr[i] - mean) * rstd);
        }
        const float mg = prm_warp_sum(sg) * inv_dim;
        const float mgx = prm_warp_sum(sgx) * inv_dim;
        for (int i = lane; i < dim; i += PRM_WARP_SIZE) {
            const float g = dyr[i] * gamma[i];
            const float v = rstd * (g - mg - ((xr[i] - mean) * rstd) * mgx);
            dxr[i] = accumulate ? dxr[i] + v : v;
        }
    }
}
PRM_REGISTER_KERNEL(prm_layernorm_backward_f32);
