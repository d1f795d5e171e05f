// activation.cu: the MLP activation of the ViT block, with the fc1 bias fused into the forward.
//
// Layouts (row-major):
//   x, pre, out, dy, dx   [rows, cols]      (cols = MLP hidden width); fp32 (`_f32` kernels) or
//                                           bf16 storage (`_bf16` kernels)
//   bias                  [cols]            fp32, optional (null: no bias, e.g. the GEMM added it)
// Precision: arithmetic in fp32; bf16 is widened on load and rounded to nearest even on store.
// The derivatives' multiply-adds are spelled as fmaf, so that the 8-wide and one-element paths
// round alike on the GPU (kernels/README.md).
// In bf16 the forward evaluates a() on the *stored* (rounded) pre-activation, so forward and
// backward see the same z.
//
// Activations (`act`): 0 = QuickGELU  a(z) = z·σ(1.702z)
//                      1 = exact GELU a(z) = z·Φ(z) = z·½·erfc(−z/√2)
//                      2 = tanh GELU  a(z) = ½z(1 + tanh u), u = √(2/π)(z + 0.044715z³)
//                                          = z·σ(2u)   (PyTorch's gelu(approximate="tanh"))
// Forward:   pre = x + bias (written when `pre` is not null: the backward needs it),
//            out = a(pre). `out` may alias `x` (in place: each element is read, then written, by
//            the same thread); `pre` must not alias either.
// Backward:  dx = dy · a'(pre), with
//            QuickGELU a'(z) = s + 1.702·z·s·(1 − s),  s = σ(1.702z)
//            GELU      a'(z) = Φ(z) + z·φ(z)
//            tanh GELU a'(z) = ½(1 + t) + ½z(1 − t²)·u'(z),  t = tanh u
//                            = s + z·s·(1 − s)·2u'(z),  s = σ(2u),
//                      2u'(z) = 2√(2/π)(1 + 3·0.044715z²)
//            `dx` may alias `dy` (in place).
// Φ is evaluated through erfcf, and the tanh GELU through σ(2u) = ½(1 + tanh u): both keep full
// relative precision in the negative tail, where 1 + erf(z/√2) and 1 + tanhf(u) would cancel
// (½z(1 + tanhf(u)) in fp32 is off by 1e-5 relative at z = −3 and 5e-4 at z = −4, and is 0 from
// z ≈ −5.16 on, where a(z) is −8e−8). The sigmoid form also shares QuickGELU's 8-wide
// reciprocals (below). Elementwise, fp32 arithmetic, deterministic by construction.
//
// Memory access: each thread moves 8 elements per 16-byte (bf16) or 2×16-byte (fp32) access,
// a flat grid-stride loop over groups of 8, whenever every pointer is 16-byte aligned and, for
// the forward, a row holds whole groups (cols % 8 == 0; the bias column of a group is then
// contiguous). Otherwise, and for the backward's last n % 8 elements, one element at a time:
// the forward with blocks striding over rows and threads over columns, the backward flat. Both
// paths give the same bits: the same arithmetic per element, except that the 8-wide QuickGELU
// and tanh GELU take their sigmoid's reciprocals on the IEEE division's fast path without its
// guard, where that path is exact (prm_sigmoid8; tests/kernel_rowwise.rs
// `activation_vector_and_scalar_paths_agree_bit_for_bit` holds the two paths to each other on
// the values where they could part, on CUDA against the hardware's division).
// (Scalar 2-byte accesses left the bf16 kernels at ~1.4-2.1 TB/s of an H200's 4.8, with the
// SM issue-bound on address arithmetic: ncu, 2026-12-04.)
//
// Launchers: src/gpu/kernels/activation.rs (bias_activation_forward_f32,
// bias_activation_inplace_f32, activation_backward_f32, activation_backward_inplace_f32, and the
// `_bf16out` variants: fp32 in, bf16 out, for the operands of bf16 products).
#include "common.cuh"
#include "mma.cuh"      // prm_pack_bf16x2
#include "rounded.cuh"  // prm_frcp_rn_below_2p126

#define PRM_ACT_QUICK_GELU 0
#define PRM_ACT_GELU 1
#define PRM_ACT_GELU_TANH 2

// σ(x) = 1 / (1 + e^−x); the denominator is shared with the 8-wide form below, so both give
// the same bits.
__device__ __forceinline__ float prm_sigmoid_denominator(float x) { return 1.0f + expf(-x); }
__device__ __forceinline__ float prm_sigmoid(float x) { return 1.0f / prm_sigmoid_denominator(x); }

// The argument x(z) of the activations of the form z·σ(x(z)), in one place for the scalar and
// 8-wide forms: QuickGELU's 1.702z, and the tanh GELU's 2u = z·(c + c·0.044715·z²) with
// c = 2√(2/π) (the fmaf rounds once on both paths). Far out (|z| ≳ 1.7e13) x overflows to ±∞,
// where σ is 0 or 1 as it should be.
template <int ACT>
__device__ __forceinline__ float prm_sigmoid_arg(float z) {
    if constexpr (ACT == PRM_ACT_QUICK_GELU) {
        return 1.702f * z;
    } else {
        return z * fmaf(0.071354816272600250f, z * z, 1.5957691216057308f);
    }
}

// QuickGELU's derivative from s = σ(1.702z), in one place for the scalar and 8-wide forms.
__device__ __forceinline__ float prm_quick_gelu_grad(float z, float s) { return fmaf(1.702f * z * s, 1.0f - s, s); }

// The tanh GELU's derivative from s = σ(2u): s + z·s(1 − s)·2u'(z), 2u'(z) = c + 3c·0.044715·z².
// z·s(1 − s) is formed first: it is exactly 0 wherever s is 0 or 1, which holds for |z| ≥ 16
// (|2u| ≥ 317), and finite elsewhere. Taking 2u' at |z| capped to 16 there keeps it finite past
// |z| ≈ 4e19, where 3c·0.044715·z² overflows and 0·∞ would give NaN; it changes no other result.
// (2u' is not spelled through prm_sigmoid_arg's z·z: nvcc kept the 8 squares of the 8-wide
// backward live from the sigmoid to here, 44 → 56 registers in prm_activation_backward_f32.)
__device__ __forceinline__ float prm_gelu_tanh_grad(float z, float s) {
    const float zc = fminf(fabsf(z), 16.0f);
    const float slope = fmaf(0.21406444881780076f * zc, zc, 1.5957691216057308f);
    return fmaf(z * (s * (1.0f - s)), slope, s);
}

// Φ(z), the standard normal CDF.
__device__ __forceinline__ float prm_normal_cdf(float z) { return 0.5f * erfcf(-z * 0.70710678118654752f); }

__device__ __forceinline__ float prm_act(int act, float z) {
    if (act == PRM_ACT_QUICK_GELU) return z * prm_sigmoid(prm_sigmoid_arg<PRM_ACT_QUICK_GELU>(z));
    if (act == PRM_ACT_GELU_TANH) return z * prm_sigmoid(prm_sigmoid_arg<PRM_ACT_GELU_TANH>(z));
    return z * prm_normal_cdf(z);
}

__device__ __forceinline__ float prm_act_grad(int act, float z) {
    if (act == PRM_ACT_QUICK_GELU) {
        return prm_quick_gelu_grad(z, prm_sigmoid(prm_sigmoid_arg<PRM_ACT_QUICK_GELU>(z)));
    }
    if (act == PRM_ACT_GELU_TANH) {
        return prm_gelu_tanh_grad(z, prm_sigmoid(prm_sigmoid_arg<PRM_ACT_GELU_TANH>(z)));
    }
    const float pdf = expf(-0.5f * z * z) * 0.39894228040143268f;  // 1/sqrt(2π)
    return fmaf(z, pdf, prm_normal_cdf(z));
}

// σ(x(z[k])) for 8 values, the bits of prm_sigmoid(prm_sigmoid_arg<ACT>(z[k])). nvcc's IEEE
// division guards each reciprocal with a branch to its slow path, and the 8 guarded divisions
// did not interleave: about 22 dependent instructions an element, one element after another
// (sm_90 SASS, 2026-12-04), which left the QuickGELU kernels issue-bound below the memory
// roofline. Here the 8 reciprocals take the division's fast path unguarded
// (`prm_frcp_rn_below_2p126`, exact for denominators in [1, 2^126)), and one test per group
// sends the rare group holding a denominator ≥ 2^126 (x ≤ −87.3: QuickGELU's z ≤ −51.3, the
// tanh GELU's z ≤ −10.0), ∞ or NaN back through the division.
// (The rare group recomputes its denominators rather than keep 8 more registers live.)
template <int ACT>
__device__ __forceinline__ void prm_sigmoid8(const float z[8], float s[8]) {
    bool slow = false;
    for (int k = 0; k < 8; ++k) {
        const float d = prm_sigmoid_denominator(prm_sigmoid_arg<ACT>(z[k]));
        slow |= !(d < 0x1p126f);
        s[k] = prm_frcp_rn_below_2p126(d);
    }
    if (slow) {
        for (int k = 0; k < 8; ++k) s[k] = prm_sigmoid(prm_sigmoid_arg<ACT>(z[k]));
    }
}

// act(z[k]) for 8 values in place.
__device__ __forceinline__ void prm_act8(int act, float z[8]) {
    if (act == PRM_ACT_QUICK_GELU) {
        float s[8];
        prm_sigmoid8<PRM_ACT_QUICK_GELU>(z, s);
        for (int k = 0; k < 8; ++k) z[k] *= s[k];
        return;
    }
    if (act == PRM_ACT_GELU_TANH) {
        float s[8];
        prm_sigmoid8<PRM_ACT_GELU_TANH>(z, s);
        for (int k = 0; k < 8; ++k) z[k] *= s[k];
        return;
    }
    for (int k = 0; k < 8; ++k) z[k] = prm_act(act, z[k]);
}

// d[k] · act'(z[k]) for 8 values, into d.
__device__ __forceinline__ void prm_act_grad8(int act, const float z[8], float d[8]) {
    if (act == PRM_ACT_QUICK_GELU) {
        float s[8];
        prm_sigmoid8<PRM_ACT_QUICK_GELU>(z, s);
        for (int k = 0; k < 8; ++k) d[k] *= prm_quick_gelu_grad(z[k], s[k]);
        return;
    }
    if (act == PRM_ACT_GELU_TANH) {
        float s[8];
        prm_sigmoid8<PRM_ACT_GELU_TANH>(z, s);
        for (int k = 0; k < 8; ++k) d[k] *= prm_gelu_tanh_grad(z[k], s[k]);
        return;
    }
    for (int k = 0; k < 8; ++k) d[k] *= prm_act_grad(act, z[k]);
}

__device__ __forceinline__ float prm_act_load(const float* p) { return *p; }
__device__ __forceinline__ float prm_act_load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void prm_act_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void prm_act_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// Eight consecutive elements, widened to fp32 / rounded from it (16-byte aligned `p`).
__device__ __forceinline__ void prm_act_load8(const float* p, float v[8]) {
    const float4 a = prm_load_vec<float4>(p);
    const float4 b = prm_load_vec<float4>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void prm_act_load8(const __nv_bfloat16* p, float v[8]) {
    const uint4 u = prm_load_vec<uint4>(p);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
    for (int k = 0; k < 4; ++k) {  // the lower element in the low half (little-endian)
        v[2 * k] = __uint_as_float(w[k] << 16);
        v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}
__device__ __forceinline__ void prm_act_store8(float* p, const float v[8]) {
    prm_store_vec(p, make_float4(v[0], v[1], v[2], v[3]));
    prm_store_vec(p + 4, make_float4(v[4], v[5], v[6], v[7]));
}
__device__ __forceinline__ void prm_act_store8(__nv_bfloat16* p, const float v[8]) {
    prm_store_vec(p, make_uint4(prm_pack_bf16x2(v[0], v[1]), prm_pack_bf16x2(v[2], v[3]),
                                prm_pack_bf16x2(v[4], v[5]), prm_pack_bf16x2(v[6], v[7])));
}
// v as `T` stores it (what a load of the stored value gives back).
__device__ __forceinline__ float prm_act_stored(const float*, float v) { return v; }
__device__ __forceinline__ float prm_act_stored(const __nv_bfloat16*, float v) {
    return __bfloat162float(__float2bfloat16(v));
}

__device__ __forceinline__ bool prm_act_aligned16(const void* p) { return ((size_t)p & 15) == 0; }

// `x` and `out` may be the same buffer, so neither is __restrict__.
template <typename T, typename TOut>
__device__ __forceinline__ void prm_activation_forward(const T* x, const float* __restrict__ bias,
                                                       T* __restrict__ pre, TOut* out, int rows, int cols, int act) {
    const bool vec = cols % 8 == 0 && prm_act_aligned16(x) && prm_act_aligned16(out) &&
                     (pre == nullptr || prm_act_aligned16(pre)) && (bias == nullptr || prm_act_aligned16(bias));
    if (vec) {
        // Groups of 8 never straddle a row; the group's bias columns are c0 .. c0 + 7. In place
        // (out == x), each group is read whole before it is written, by the same thread.
        const size_t groups = (size_t)rows * (size_t)cols / 8;
        const size_t stride = (size_t)gridDim.x * blockDim.x;
        for (size_t g = (size_t)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += stride) {
            const size_t i = 8 * g;
            float z[8];
            prm_act_load8(x + i, z);
            if (bias != nullptr) {
                float b[8];
                prm_act_load8(bias + (int)(i % (size_t)cols), b);
                for (int k = 0; k < 8; ++k) z[k] += b[k];
            }
            if (pre != nullptr) {
                prm_act_store8(pre + i, z);
                for (int k = 0; k < 8; ++k) z[k] = prm_act_stored(pre, z[k]);
            }
            prm_act8(act, z);
            prm_act_store8(out + i, z);
        }
        return;
    }
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
    const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t done = 0;  // elements handled in groups of 8
    if (prm_act_aligned16(pre) && prm_act_aligned16(dy) && prm_act_aligned16(dx)) {
        const size_t groups = n / 8;
        for (size_t g = first; g < groups; g += stride) {
            float z[8], d[8];
            prm_act_load8(pre + 8 * g, z);
            prm_act_load8(dy + 8 * g, d);
            prm_act_grad8(act, z, d);
            prm_act_store8(dx + 8 * g, d);
        }
        done = 8 * groups;
    }
    for (size_t i = done + first; i < n; i += stride) {
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
