// activation.cu: the MLP activation of the ViT block, with the fc1 bias fused into the forward.
//
// Layouts (row-major, fp32):
//   x, pre, out, dy, dx   [rows, cols]      (cols = MLP hidden width)
//   bias                  [cols]            optional (null: no bias, e.g. when the GEMM added it)
//
// Activations (`act`): 0 = QuickGELU  a(z) = z·σ(1.702z)
//                      1 = exact GELU a(z) = z·Φ(z) = z·½·erfc(−z/√2)
// Forward:   pre = x + bias (written when `pre` is not null: the backward needs it),
//            out = a(pre). `out` may alias `x` (in place: each element is read, then written, by
//            the same thread); `pre` must not alias either.
// Backward:  dx = dy · a'(pre), with
//            QuickGELU a'(z) = s + 1.702·z·s·(1 − s),  s = σ(1.702z)
//            GELU      a'(z) = Φ(z) + z·φ(z)
//            `dx` may alias `dy` (in place).
// Φ is evaluated through erfcf, which keeps full relative precision in the negative tail where
// 1 + erf(z/√2) would cancel. Elementwise, fp32, grid-stride loops; deterministic by construction.
//
// Launchers: src/gpu/kernels/activation.rs (bias_activation_forward_f32,
// bias_activation_inplace_f32, activation_backward_f32, activation_backward_inplace_f32).
#include "common.cuh"

#define PRM_ACT_QUICK_GELU 0
#define PRM_ACT_GELU 1

__device__ __forceinline__ float prm_sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// Φ(z), the standard normal CDF.
__device__ __forceinline__ float prm_normal_cdf(float z) { return 0.5f * erfcf(-z * 0.70710678118654752f); }

__device__ __forceinline__ float prm_act(int act, float z) {
    if (act == PRM_ACT_QUICK_GELU) return z * prm_sigmoid(1.702f * z);
    return z * prm_normal_cdf(z);
}

__device__ __forceinline__ float prm_act_grad(int act, float z) {
    if (act == PRM_ACT_QUICK_GELU) {
        const float s = prm_sigmoid(1.702f * z);
        return s + 1.702f * z * s * (1.0f - s);
    }
    const float pdf = expf(-0.5f * z * z) * 0.39894228040143268f;  // 1/sqrt(2π)
    return prm_normal_cdf(z) + z * pdf;
}

// `x` and `out` may be the same buffer, so neither is __restrict__.
extern "C" __global__ void prm_activation_forward_f32(const float* x, const float* __restrict__ bias,
                                                       float* __restrict__ pre, float* out,
                                                       int rows, int cols, int act) {
    const size_t n = (size_t)rows * (size_t)cols;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float z = x[i];
        if (bias != nullptr) z += bias[i % (size_t)cols];
        if (pre != nullptr) pre[i] = z;
        out[i] = prm_act(act, z);
    }
}
PRM_REGISTER_KERNEL(prm_activation_forward_f32);

// `dy` and `dx` may be the same buffer, so neither is __restrict__.
extern "C" __global__ void prm_activation_backward_f32(const float* __restrict__ pre, const float* dy,
                                                        float* dx, int rows, int cols, int act) {
    const size_t n = (size_t)rows * (size_t)cols;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        dx[i] = dy[i] * prm_act_grad(act, pre[i]);
    }
}
PRM_REGISTER_KERNEL(prm_activation_backward_f32);
