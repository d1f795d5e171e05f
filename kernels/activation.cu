// activation.cu: the MLP activation of the ViT block, with the fc1 bias fused into the forward.
//
// Layouts (row-major):
//   x, pre, out, dy, dx   [rows, cols]      (cols = MLP hidden width); fp32 (`_f32` kernels) or
//                                           bf16 storage (`_bf16` kernels)
//   bias                  [cols]            fp32, optional (null: no bias, e.g. the GEMM added it)
// Precision: arithmetic in fp32; bf16 is widened on load and rounded to nearest even on store.
// In bf16 the forward evaluates a() on the *stored* (rounded) pre-activation, so forward and
// backward see the same z.
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
// 1 + erf(z/√2) would cancel. Elementwise, fp32 arithmetic, deterministic by construction.
// Forward: blocks stride over rows, threads over columns. Backward: flat grid-stride loop.
//
// Launchers: src/gpu/kernels/activation.rs (bias_activation_forward_f32,
// bias_activation_inplace_f32, activation_backward_f32, activation_backward_inplace_f32, and the
// `_bf16out` variants: fp32 in, bf16 out, for the operands of bf16 products).
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

__device__ __forceinline__ float prm_act_load(const float* p) { return *p; }
__device__ __forceinline__ float prm_act_load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void prm_act_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void prm_act_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// `x` and `out` may be the same buffer, so neither is __restrict__.
template <typename T, typename TOut>
__device__ __forceinline__ void prm_activation_forward(const T* x, const float* __restrict__ bias,
                                                       T* __restrict__ pre, TOut* out, int rows, int cols, int act) {
    // Blocks stride over rows, threads over the columns of a row: no index division, and the
    // bias of a column is read by the same thread for every row it visits.
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const size_t base = (size_t)r * (size_t)cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const size_t i = base + c;
            float z = prm_act_load(x + i);
            if (bias != nullptr) z += bias[c];
            if (pre != nullptr) {
                prm_act_store(pre + i, z);
                z = prm_act_load(pre + i);  // the backward sees the stored (rounded) pre-activation
            }
            prm_act_store(out + i, prm_act(act, z));
        }
    }
}

// `dy` and `dx` may be the same buffer, so neither is __restrict__.
template <typename T, typename TOut>
__device__ __forceinline__ void prm_activation_backward(const T* __restrict__ pre, const T* dy, TOut* dx, int rows,
                                                        int cols, int act) {
    const size_t n = (size_t)rows * (size_t)cols;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        prm_act_store(dx + i, prm_act_load(dy + i) * prm_act_grad(act, prm_act_load(pre + i)));
    }
}

extern "C" __global__ void prm_activation_forward_f32(const float* x, const float* __restrict__ bias,
                                                       float* __restrict__ pre, float* out, int rows, int cols,
                                                       int act) {
    prm_activation_forward(x, bias, pre, out, rows, cols, act);
}
PRM_REGISTER_KERNEL(prm_activation_forward_f32);

extern "C" __global__ void prm_activation_forward_bf16(const __nv_bfloat16* x, const float* __restrict__ bias,
                                                        __nv_bfloat16* __restrict__ pre, __nv_bfloat16* out,
                                                        int rows, int cols, int act) {
    prm_activation_forward(x, bias, pre, out, rows, cols, act);
}
PRM_REGISTER_KERNEL(prm_activation_forward_bf16);

extern "C" __global__ void prm_activation_backward_f32(const float* __restrict__ pre, const float* dy, float* dx,
                                                        int rows, int cols, int act) {
    prm_activation_backward(pre, dy, dx, rows, cols, act);
}
PRM_REGISTER_KERNEL(prm_activation_backward_f32);

extern "C" __global__ void prm_activation_backward_bf16(const __nv_bfloat16* __restrict__ pre,
                                                         const __nv_bfloat16* dy, __nv_bfloat16* dx, int rows,
                                                         int cols, int act) {
    prm_activation_backward(pre, dy, dx, rows, cols, act);
}
PRM_REGISTER_KERNEL(prm_activation_backward_bf16);

// Mixed storage for the engine's bf16 products: fp32 input, pre-activation and incoming
// gradient, bf16 output, which is exactly the operand the next product reads (no separate
// conversion pass). `out` / `dx` must not alias the fp32 buffers.
extern "C" __global__ void prm_activation_forward_f32_bf16out(const float* x, const float* __restrict__ bias,
                                                              float* __restrict__ pre, __nv_bfloat16* __restrict__ out,
                                                              int rows, int cols, int act) {
    prm_activation_forward(x, bias, pre, out, rows, cols, act);
}
PRM_REGISTER_KERNEL(prm_activation_forward_f32_bf16out);

extern "C" __global__ void prm_activation_backward_f32_bf16out(const float* __restrict__ pre, const float* dy,
                                                               __nv_bfloat16* __restrict__ dx, int rows, int cols,
                                                               int act) {
    prm_activation_backward(pre, dy, dx, rows, cols, act);
}
PRM_REGISTER_KERNEL(prm_activation_backward_f32_bf16out);
