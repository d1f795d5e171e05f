// layernorm_steps.cuh: the per-element steps of the LayerNorm input-gradient backward, every
// rounding spelled out (rounded.cuh), for the kernels that build a row's backward from them:
// layernorm.cu (rows cached in registers, whole or masked, and streamed) and
// layernorm_loss.cu (the backward fused with the cosine loss of the same rows).
//
//   dx (+)= rstd·(g − mean(g) − x̂·mean(g·x̂)),  g = dy·γ,  x̂ = (x − mean)·rstd
//
// Each lane sums its elements in increasing index order with
//   sg = sg + g (prm_ln_sum_g), sgx = fmaf(g, x̂, sgx) (prm_ln_sum_gx),
// then prm_ln_row_mean turns a lane's sum into the row's mean (warp butterfly, one product).
// Why spelled: nvcc contracts a product into a following add or not depending on the code around
// it (a select, a second use), and these kernels promise each other the same bits on the GPU
// (kernels/README.md). The simulator, which never contracts, computes the same values.
#pragma once
#include "common.cuh"
#include "rounded.cuh"

__device__ __forceinline__ float prm_ln_g(float dy, float gamma) { return PRM_FMUL_RN(dy, gamma); }

__device__ __forceinline__ float prm_ln_xhat(float x, float mean, float rstd) {
    return PRM_FMUL_RN(PRM_FSUB_RN(x, mean), rstd);
}

__device__ __forceinline__ float prm_ln_sum_g(float sg, float g) { return PRM_FADD_RN(sg, g); }

__device__ __forceinline__ float prm_ln_sum_gx(float sgx, float g, float xhat) { return fmaf(g, xhat, sgx); }

// The row's mean of a per-lane partial sum (all lanes of the warp get it).
__device__ __forceinline__ float prm_ln_row_mean(float lane_sum, float inv_dim) {
    return PRM_FMUL_RN(prm_warp_sum(lane_sum), inv_dim);
}

// One element of dx: accumulated into `old` (one rounding: fmaf) or written (one product).
__device__ __forceinline__ float prm_ln_dx(float g, float xhat, float mg, float mgx, float rstd, bool accumulate,
                                          float old) {
    const float t = fmaf(-xhat, mgx, PRM_FSUB_RN(g, mg));
    return accumulate ? fmaf(rstd, t, old) : PRM_FMUL_RN(rstd, t);
}
