// layernorm.cu: LayerNorm over the rows of a packed token matrix, forward with saved statistics
// and input-gradient backward (no dγ/dβ: the attack never forms weight gradients).
//
// Layouts (row-major):
//   x, y, dy, dx   [rows, dim]     fp32 (`_f32` kernels) or bf16 storage (`_bf16` kernels)
//   gamma, beta    [dim]           fp32
//   mean, rstd     [rows]          fp32, saved by the forward for the backward
// Precision: all arithmetic in fp32; bf16 values are widened on load and rounded to nearest even
// on store (the bf16 backward's `accumulate` adds in fp32, then rounds once). Every multiply that
// feeds an add is spelled out (fmaf, or PRM_FMUL_RN / PRM_FADD_RN from rounded.cuh), so that the
// cached, full-row and streaming paths and the two widths round alike on the GPU: nvcc contracts
// `a * b + c` or not depending on the code around it (kernels/README.md).
//
// Forward:   y = (x − mean)·rstd·γ + β,  mean = Σx/dim,  rstd = 1/sqrt(Σ(x − mean)²/dim + eps)
//            (two-pass variance, exact sqrt and division, statistics in fp32)
// Backward:  dx (+)= rstd·(g − mean(g) − x̂·mean(g·x̂)),  g = dy·γ,  x̂ = (x − mean)·rstd
//            with `accumulate` != 0 adding into dx (the engine's running residual gradient).
//            `_f32_bf16copy` also writes bf16(dx) (round to nearest even) to dx_bf16: the
//            bf16 engine's next product reads the residual gradient as its operand, and the copy
//            costs one 2-byte store here instead of a conversion pass over dx.
//
// Work split: one warp per row, PRM_LN_ROWS_PER_BLOCK warps per block, no shared memory and no
// __syncthreads. Lane l owns the elements l, l + 32, l + 64, ... of its row (coalesced 128-byte
// accesses). Reductions: each lane sums its elements in increasing index order, then a butterfly
// over the warp (prm_warp_sum). Addition is commutative, so every lane of the butterfly ends with
// the same bit pattern and the result does not depend on scheduling: deterministic.
// Rows of up to PRM_LN_CACHED_DIM (1024) elements are held in registers (32 per lane); wider rows
// take a streaming path that re-reads x from global memory (same arithmetic, same order). The
// cached backward also loads the dx it accumulates into together with x and dy, before the
// reductions, so that its latency overlaps theirs instead of following them.
//
// The backward's per-element steps are layernorm_steps.cuh's, every rounding spelled, shared with
// layernorm_loss.cu (LN1's backward fused with the prm loss rows), which gives the same bits.
//
// Launchers: src/gpu/kernels/layernorm.rs (layernorm_forward_f32, layernorm_backward_f32 and
// their variants; both pick their `_d768` kernels for rows of up to 768 elements).
#include "common.cuh"
#include "rounded.cuh"
#include "layernorm_steps.cuh"

#define PRM_LN_ROWS_PER_BLOCK 4
#define PRM_LN_CACHED_DIM 1024
#define PRM_LN_PER_LANE (PRM_LN_CACHED_DIM / PRM_WARP_SIZE)

__device__ __forceinline__ float prm_ln_load(const float* p) { return *p; }
__device__ __forceinline__ float prm_ln_load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void prm_ln_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void prm_ln_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// The forward of a row cached in registers: lane `lane` holds elements lane + 32k, k < PER_LANE.
// FULL: the row fills every slot (dim == 32·PER_LANE, ViT-B's 768 in the `_d768` kernels), so
// no slot needs its bounds test: the same arithmetic without a third of the instructions.
template <bool FULL, int PER_LANE, typename T, typename TOut>
__device__ __forceinline__ void prm_layernorm_forward_cached(const T* __restrict__ xr, const float* __restrict__ gamma,
                                                             const float* __restrict__ beta, TOut* __restrict__ yr,
                                                             int lane, int dim, float eps, float& mean,
                                                             float& rstd) {
    const float inv_dim = 1.0f / (float)dim;
    float v[PER_LANE];
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        const int i = lane + k * PRM_WARP_SIZE;
        v[k] = (FULL || i < dim) ? prm_ln_load(xr + i) : 0.0f;
        s += v[k];
    }
    mean = prm_ln_row_mean(s, inv_dim);
    float q = 0.0f;
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        const int i = lane + k * PRM_WARP_SIZE;
        const float d = v[k] - mean;
        q = PRM_FADD_RN(q, (FULL || i < dim) ? PRM_FMUL_RN(d, d) : 0.0f);
    }
    rstd = 1.0f / sqrtf(fmaf(prm_warp_sum(q), inv_dim, eps));
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        const int i = lane + k * PRM_WARP_SIZE;
        if (FULL || i < dim) prm_ln_store(yr + i, fmaf((v[k] - mean) * rstd, gamma[i], beta[i]));
    }
}

// PER_LANE: elements per lane held in registers (rows of up to 32·PER_LANE are cached; the
// `_d768` kernels hold 24, ViT-B's width, and skip the 1024-wide kernels' 8 empty slots a lane;
// the arithmetic and its order are the same, since the empty slots only add zeros to sums that
// never hold −0).
template <typename T, typename TOut, int PER_LANE>
__device__ __forceinline__ void prm_layernorm_forward(const T* __restrict__ x, const float* __restrict__ gamma,
                                                      const float* __restrict__ beta, TOut* __restrict__ y,
                                                      float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                                      int rows, int dim, float eps) {
    const int lane = threadIdx.x % PRM_WARP_SIZE;
    const int row = blockIdx.x * PRM_LN_ROWS_PER_BLOCK + threadIdx.x / PRM_WARP_SIZE;
    if (row >= rows) return;  // whole warp leaves together; no block barrier in this kernel
    const T* xr = x + (size_t)row * dim;
    TOut* yr = y + (size_t)row * dim;

    float mean, rstd;
    if (dim == PER_LANE * PRM_WARP_SIZE) {
        prm_layernorm_forward_cached<true, PER_LANE>(xr, gamma, beta, yr, lane, dim, eps, mean, rstd);
    } else if (dim < PER_LANE * PRM_WARP_SIZE) {
        prm_layernorm_forward_cached<false, PER_LANE>(xr, gamma, beta, yr, lane, dim, eps, mean, rstd);
    } else {
        const float inv_dim = 1.0f / (float)dim;
        float s = 0.0f;
        for (int i = lane; i < dim; i += PRM_WARP_SIZE) s += prm_ln_load(xr + i);
        mean = prm_ln_row_mean(s, inv_dim);
        float q = 0.0f;
        for (int i = lane; i < dim; i += PRM_WARP_SIZE) {
            const float d = prm_ln_load(xr + i) - mean;
            q = PRM_FADD_RN(q, PRM_FMUL_RN(d, d));
        }
        rstd = 1.0f / sqrtf(fmaf(prm_warp_sum(q), inv_dim, eps));
        for (int i = lane; i < dim; i += PRM_WARP_SIZE)
            prm_ln_store(yr + i, fmaf((prm_ln_load(xr + i) - mean) * rstd, gamma[i], beta[i]));
    }
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// The forward kernels, each in two widths (the launcher takes `_d768` when the rows fit).
extern "C" __global__ void prm_layernorm_forward_f32(const float* __restrict__ x, const float* __restrict__ gamma,
        const float* __restrict__ beta, float* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
        int rows, int dim, float eps) {
    prm_layernorm_forward<float, float, PRM_LN_PER_LANE>(x, gamma, beta, y, mean, rstd, rows, dim, eps);
}
PRM_REGISTER_KERNEL(prm_layernorm_forward_f32);

extern "C" __global__ void prm_layernorm_forward_f32_d768(const float* __restrict__ x, const float* __restrict__ gamma,
        const float* __restrict__ beta, float* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
        int rows, int dim, float eps) {
    prm_layernorm_forward<float, float, 24>(x, gamma, beta, y, mean, rstd, rows, dim, eps);
}
PRM_REGISTER_KERNEL(prm_layernorm_forward_f32_d768);

extern "C" __global__ void prm_layernorm_forward_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ gamma,
        const float* __restrict__ beta, __nv_bfloat16* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
        int rows, int dim, float eps) {
    prm_layernorm_forward<__nv_bfloat16, __nv_bfloat16, PRM_LN_PER_LANE>(x, gamma, beta, y, mean, rstd, rows, dim, eps);
}
PRM_REGISTER_KERNEL(prm_layernorm_forward_bf16);

extern "C" __global__ void prm_layernorm_forward_bf16_d768(const __nv_bfloat16* __restrict__ x, const float* __restrict__ gamma,
        const float* __restrict__ beta, __nv_bfloat16* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
        int rows, int dim, float eps) {
    prm_layernorm_forward<__nv_bfloat16, __nv_bfloat16, 24>(x, gamma, beta, y, mean, rstd, rows, dim, eps);
}
PRM_REGISTER_KERNEL(prm_layernorm_forward_bf16_d768);

// fp32 x, bf16 y: the normalised rows written straight as the operand of the next bf16 product
// (the engine's --precision bf16), with fp32 statistics. Same arithmetic as the fp32 kernel.
extern "C" __global__ void prm_layernorm_forward_f32_bf16out(const float* __restrict__ x, const float* __restrict__ gamma,
        const float* __restrict__ beta, __nv_bfloat16* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
        int rows, int dim, float eps) {
    prm_layernorm_forward<float, __nv_bfloat16, PRM_LN_PER_LANE>(x, gamma, beta, y, mean, rstd, rows, dim, eps);
}
PRM_REGISTER_KERNEL(prm_layernorm_forward_f32_bf16out);

extern "C" __global__ void prm_layernorm_forward_f32_bf16out_d768(const float* __restrict__ x, const float* __restrict__ gamma,
        const float* __restrict__ beta, __nv_bfloat16* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
        int rows, int dim, float eps) {
    prm_layernorm_forward<float, __nv_bfloat16, 24>(x, gamma, beta, y, mean, rstd, rows, dim, eps);
}
PRM_REGISTER_KERNEL(prm_layernorm_forward_f32_bf16out_d768);

// The backward of a row cached in registers (lane `lane` holds elements lane + 32k,
// k < PER_LANE). FULL: the row fills every slot (no bounds tests); ACCUMULATE: add into dx;
// COPY: also write bf16(dx) to copyr. Compile-time flags, so that each variant is straight-line
// code (a runtime test per element kept predicates in registers: P2R / ISETP on every slot).
template <bool FULL, bool ACCUMULATE, bool COPY, int PER_LANE, typename T>
__device__ __forceinline__ void prm_layernorm_backward_cached(const T* __restrict__ xr, const T* __restrict__ dyr,
                                                              const float* __restrict__ gamma, float mean,
                                                              float rstd, T* __restrict__ dxr,
                                                              __nv_bfloat16* __restrict__ copyr, int lane,
                                                              int dim) {
    const float inv_dim = 1.0f / (float)dim;
    float g[PER_LANE], xh[PER_LANE], old[PER_LANE];
    float sg = 0.0f, sgx = 0.0f;
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        const int i = lane + k * PRM_WARP_SIZE;
        const bool in = FULL || i < dim;
        g[k] = in ? prm_ln_g(prm_ln_load(dyr + i), gamma[i]) : 0.0f;
        xh[k] = in ? prm_ln_xhat(prm_ln_load(xr + i), mean, rstd) : 0.0f;
        old[k] = (ACCUMULATE && in) ? prm_ln_load(dxr + i) : 0.0f;
        sg = prm_ln_sum_g(sg, g[k]);
        sgx = prm_ln_sum_gx(sgx, g[k], xh[k]);
    }
    const float mg = prm_ln_row_mean(sg, inv_dim);
    const float mgx = prm_ln_row_mean(sgx, inv_dim);
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        const int i = lane + k * PRM_WARP_SIZE;
        if (FULL || i < dim) {
            const float out = prm_ln_dx(g[k], xh[k], mg, mgx, rstd, ACCUMULATE, old[k]);
            prm_ln_store(dxr + i, out);
            if (COPY) copyr[i] = __float2bfloat16(out);  // only with fp32 dx: out as stored
        }
    }
}

template <bool FULL, int PER_LANE, typename T>
__device__ __forceinline__ void prm_layernorm_backward_cached(const T* __restrict__ xr, const T* __restrict__ dyr,
                                                              const float* __restrict__ gamma, float mean,
                                                              float rstd, T* __restrict__ dxr,
                                                              __nv_bfloat16* __restrict__ copyr, int lane, int dim,
                                                              int accumulate) {
    if (accumulate) {
        if (copyr) {
            prm_layernorm_backward_cached<FULL, true, true, PER_LANE>(xr, dyr, gamma, mean, rstd, dxr, copyr, lane, dim);
        } else {
            prm_layernorm_backward_cached<FULL, true, false, PER_LANE>(xr, dyr, gamma, mean, rstd, dxr, copyr, lane, dim);
        }
    } else if (copyr) {
        prm_layernorm_backward_cached<FULL, false, true, PER_LANE>(xr, dyr, gamma, mean, rstd, dxr, copyr, lane, dim);
    } else {
        prm_layernorm_backward_cached<FULL, false, false, PER_LANE>(xr, dyr, gamma, mean, rstd, dxr, copyr, lane, dim);
    }
}

// dx may not alias x or dy (the engine keeps them apart; the launcher's borrows enforce it).
// dx_copy: nullptr, or a bf16 buffer of dx's shape that receives bf16(dx) as written.
// PER_LANE: elements per lane held in registers (rows of up to 32·PER_LANE are cached). The
// backward keeps three such arrays, so the `_d768` kernels (PER_LANE 24, rows up to 768 as in
// ViT-B) need a quarter fewer registers than the 1024-wide ones; the arithmetic and its order
// are the same (the 1024-wide kernels only add zeros for the lanes' extra slots).
template <typename T, int PER_LANE>
__device__ __forceinline__ void prm_layernorm_backward(const T* __restrict__ x, const T* __restrict__ dy,
                                                       const float* __restrict__ gamma,
                                                       const float* __restrict__ mean_in,
                                                       const float* __restrict__ rstd_in, T* __restrict__ dx,
                                                       __nv_bfloat16* __restrict__ dx_copy, int rows, int dim,
                                                       int accumulate) {
    const int lane = threadIdx.x % PRM_WARP_SIZE;
    const int row = blockIdx.x * PRM_LN_ROWS_PER_BLOCK + threadIdx.x / PRM_WARP_SIZE;
    if (row >= rows) return;  // whole warp leaves together; no block barrier in this kernel
    const T* xr = x + (size_t)row * dim;
    const T* dyr = dy + (size_t)row * dim;
    T* dxr = dx + (size_t)row * dim;
    __nv_bfloat16* copyr = dx_copy ? dx_copy + (size_t)row * dim : nullptr;
    const float mean = mean_in[row];
    const float rstd = rstd_in[row];

    if (dim == PER_LANE * PRM_WARP_SIZE) {
        prm_layernorm_backward_cached<true, PER_LANE>(xr, dyr, gamma, mean, rstd, dxr, copyr, lane, dim, accumulate);
    } else if (dim < PER_LANE * PRM_WARP_SIZE) {
        prm_layernorm_backward_cached<false, PER_LANE>(xr, dyr, gamma, mean, rstd, dxr, copyr, lane, dim, accumulate);
    } else {
        const float inv_dim = 1.0f / (float)dim;
        float sg = 0.0f, sgx = 0.0f;
        for (int i = lane; i < dim; i += PRM_WARP_SIZE) {
            const float g = prm_ln_g(prm_ln_load(dyr + i), gamma[i]);
            sg = prm_ln_sum_g(sg, g);
            sgx = prm_ln_sum_gx(sgx, g, prm_ln_xhat(prm_ln_load(xr + i), mean, rstd));
        }
        const float mg = prm_ln_row_mean(sg, inv_dim);
        const float mgx = prm_ln_row_mean(sgx, inv_dim);
        for (int i = lane; i < dim; i += PRM_WARP_SIZE) {
            const float g = prm_ln_g(prm_ln_load(dyr + i), gamma[i]);
            const float xh = prm_ln_xhat(prm_ln_load(xr + i), mean, rstd);
            const float old = accumulate ? prm_ln_load(dxr + i) : 0.0f;
            const float out = prm_ln_dx(g, xh, mg, mgx, rstd, accumulate != 0, old);
            prm_ln_store(dxr + i, out);
            if (copyr) copyr[i] = __float2bfloat16(out);
        }
    }
}

// The backward kernels in two widths: rows cached up to 1024 elements (PRM_LN_PER_LANE per
// lane), and `_d768` up to 768 (24 per lane: ViT-B's width with fewer registers). The launcher
// takes the narrower one when the rows fit.
extern "C" __global__ void prm_layernorm_backward_f32(const float* __restrict__ x, const float* __restrict__ dy,
                                                       const float* __restrict__ gamma,
                                                       const float* __restrict__ mean,
                                                       const float* __restrict__ rstd, float* __restrict__ dx,
                                                       int rows, int dim, int accumulate) {
    prm_layernorm_backward<float, PRM_LN_PER_LANE>(x, dy, gamma, mean, rstd, dx, (__nv_bfloat16*)nullptr, rows, dim,
                                          accumulate);
}
PRM_REGISTER_KERNEL(prm_layernorm_backward_f32);

// fp32 backward that also writes bf16(dx) to dx_bf16 (same arithmetic and fp32 result as
// prm_layernorm_backward_f32; the copy is the fp32 dx rounded to nearest even).
extern "C" __global__ void prm_layernorm_backward_f32_bf16copy(const float* __restrict__ x,
                                                                const float* __restrict__ dy,
                                                                const float* __restrict__ gamma,
                                                                const float* __restrict__ mean,
                                                                const float* __restrict__ rstd,
                                                                float* __restrict__ dx,
                                                                __nv_bfloat16* __restrict__ dx_bf16, int rows,
                                                                int dim, int accumulate) {
    prm_layernorm_backward<float, PRM_LN_PER_LANE>(x, dy, gamma, mean, rstd, dx, dx_bf16, rows, dim, accumulate);
}
PRM_REGISTER_KERNEL(prm_layernorm_backward_f32_bf16copy);

extern "C" __global__ void prm_layernorm_backward_bf16(const __nv_bfloat16* __restrict__ x,
                                                        const __nv_bfloat16* __restrict__ dy,
                                                        const float* __restrict__ gamma,
                                                        const float* __restrict__ mean,
                                                        const float* __restrict__ rstd,
                                                        __nv_bfloat16* __restrict__ dx, int rows, int dim,
                                                        int accumulate) {
    prm_layernorm_backward<__nv_bfloat16, PRM_LN_PER_LANE>(x, dy, gamma, mean, rstd, dx, (__nv_bfloat16*)nullptr, rows,
                                                  dim, accumulate);
}
PRM_REGISTER_KERNEL(prm_layernorm_backward_bf16);

extern "C" __global__ void prm_layernorm_backward_f32_d768(const float* __restrict__ x, const float* __restrict__ dy,
                                                       const float* __restrict__ gamma,
                                                       const float* __restrict__ mean,
                                                       const float* __restrict__ rstd, float* __restrict__ dx,
                                                       int rows, int dim, int accumulate) {
    prm_layernorm_backward<float, 24>(x, dy, gamma, mean, rstd, dx, (__nv_bfloat16*)nullptr, rows, dim,
                                          accumulate);
}
PRM_REGISTER_KERNEL(prm_layernorm_backward_f32_d768);

// fp32 backward that also writes bf16(dx) to dx_bf16 (same arithmetic and fp32 result as
// prm_layernorm_backward_f32_d768; the copy is the fp32 dx rounded to nearest even).
extern "C" __global__ void prm_layernorm_backward_f32_bf16copy_d768(const float* __restrict__ x,
                                                                const float* __restrict__ dy,
                                                                const float* __restrict__ gamma,
                                                                const float* __restrict__ mean,
                                                                const float* __restrict__ rstd,
                                                                float* __restrict__ dx,
                                                                __nv_bfloat16* __restrict__ dx_bf16, int rows,
                                                                int dim, int accumulate) {
    prm_layernorm_backward<float, 24>(x, dy, gamma, mean, rstd, dx, dx_bf16, rows, dim, accumulate);
}
PRM_REGISTER_KERNEL(prm_layernorm_backward_f32_bf16copy_d768);

extern "C" __global__ void prm_layernorm_backward_bf16_d768(const __nv_bfloat16* __restrict__ x,
                                                        const __nv_bfloat16* __restrict__ dy,
                                                        const float* __restrict__ gamma,
                                                        const float* __restrict__ mean,
                                                        const float* __restrict__ rstd,
                                                        __nv_bfloat16* __restrict__ dx, int rows, int dim,
                                                        int accumulate) {
    prm_layernorm_backward<__nv_bfloat16, 24>(x, dy, gamma, mean, rstd, dx, (__nv_bfloat16*)nullptr, rows,
                                                  dim, accumulate);
}
PRM_REGISTER_KERNEL(prm_layernorm_backward_bf16_d768);
