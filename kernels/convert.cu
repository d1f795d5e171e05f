// convert.cu: storage conversions for the bf16 path of the GPU engine.
//
// Layouts: flat arrays of n elements (any shape; the conversion is elementwise).
//   x    [n]   fp32
//   out  [n]   bf16, round to nearest even (__float2bfloat16; NaN stays NaN)
// Precision: exact up to the one rounding of each element. The engine converts activations
// and gradients to bf16 just before a matrix product that takes bf16 inputs and accumulates
// in fp32 (src/gpu/gemm.rs, matmul_bf16); everything else stays fp32.
// Grid-stride loop, deterministic by construction.
//
// Launcher: src/gpu/kernels/convert.rs (to_bf16).
#include "common.cuh"

extern "C" __global__ void prm_convert_to_bf16_f32(const float* __restrict__ x, __nv_bfloat16* __restrict__ out,
                                                    unsigned long long n) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += stride) {
        out[i] = __float2bfloat16(x[i]);
    }
}
PRM_REGISTER_KERNEL(prm_convert_to_bf16_f32);
