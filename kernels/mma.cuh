// mma.cuh: the tensor-core product wrapper (mma.sync m16n8k16, bf16 operands, fp32 accumulators)
// and its fragment helpers, with a simulator implementation.
//
// Fragment layouts are the PTX ISA's for mma.m16n8k16 with .bf16 operands (g = lane / 4,
// t = 2·(lane % 4); each 32-bit register holds two bf16, the lower column index in the low half):
//   A (16×16, row-major)  a0 = A[g][t..t+1]   a1 = A[g+8][t..t+1]   a2 = A[g][t+8..]   a3 = A[g+8][t+8..]
//   B (16×8, B[k][n])     b0 = B[t..t+1][g]   b1 = B[t+8..t+9][g]
//   C (16×8, fp32)        c0,c1 = C[g][t..t+1]   c2,c3 = C[g+8][t..t+1]
// Under nvcc the product is one `mma.sync` instruction (sm_80+). Under the simulator the warp
// gathers every lane's fragments, each lane forms its own four accumulators from the rows and
// columns of the 16×16 and 16×8 operands they read (bf16 products are exact in fp32; the 16
// products are summed in k order and then added), and the call is a warp-wide meeting point,
// as on the GPU.
#pragma once
#include "common.cuh"

// Two floats rounded to nearest-even bf16 in one register, `lo` in the low half.
__device__ __forceinline__ uint32_t prm_pack_bf16x2(float lo, float hi) {
#ifdef __CUDACC__
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
#else
    return (uint32_t)prm_sim::f32_to_bf16_bits(lo) | ((uint32_t)prm_sim::f32_to_bf16_bits(hi) << 16);
#endif
}

// c += a · b for one m16n8k16 tile (the whole warp calls it together, every lane active).
__device__ __forceinline__ void prm_mma_bf16_16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef __CUDACC__
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    unsigned eff = 0;
    const unsigned char* all = prm_sim::warp_gather_view(0xffffffffu, mine, sizeof(mine), &eff);
    if (eff != 0xffffffffu) prm_sim::kernel_error("mma.sync needs a full warp (every lane active)");
    // This lane's accumulators read rows g and g+8 of A and columns t and t+1 of B, all 16 k of
    // each: decoded once into floats (64 conversions, where an element-wise lookup per product
    // would make 128), then the same sums in the same order as the PTX-level definition above.
    // Lane 4g+q holds A[g][2q..2q+1] (a0), A[g+8][2q..] (a1), A[g][2q+8..] (a2), A[g+8][2q+8..]
    // (a3); lane 4n+q holds B[2q..2q+1][n] (b0) and B[2q+8..2q+9][n] (b1).
    const int lane = (int)prm_sim::tl_lane, g = lane >> 2, t = (lane & 3) * 2;
    auto lo = [](uint32_t r) { return prm_sim::bf16_bits_to_f32((uint16_t)r); };
    auto hi = [](uint32_t r) { return prm_sim::bf16_bits_to_f32((uint16_t)(r >> 16)); };
    float a_rows[2][16], b_cols[2][16];
    for (int q = 0; q < 4; ++q) {
        uint32_t ra[4], rb0[2], rb1[2];
        std::memcpy(ra, all + (4 * g + q) * prm_sim::kGatherStride, sizeof(ra));
        std::memcpy(rb0, all + (4 * t + q) * prm_sim::kGatherStride + 16, sizeof(rb0));
        std::memcpy(rb1, all + (4 * (t + 1) + q) * prm_sim::kGatherStride + 16, sizeof(rb1));
        for (int h = 0; h < 2; ++h) {  // h = 0: k in 2q..2q+1, h = 1: k in 2q+8..2q+9
            const int k = 2 * q + 8 * h;
            a_rows[0][k] = lo(ra[2 * h]), a_rows[0][k + 1] = hi(ra[2 * h]);
            a_rows[1][k] = lo(ra[2 * h + 1]), a_rows[1][k + 1] = hi(ra[2 * h + 1]);
            b_cols[0][k] = lo(rb0[h]), b_cols[0][k + 1] = hi(rb0[h]);
            b_cols[1][k] = lo(rb1[h]), b_cols[1][k + 1] = hi(rb1[h]);
        }
    }
    for (int i = 0; i < 4; ++i) {
        const float* a_row = a_rows[i >> 1];
        const float* b_col = b_cols[i & 1];
        float sum = 0.0f;
        for (int k = 0; k < 16; ++k) sum += a_row[k] * b_col[k];
        c[i] += sum;
    }
#endif
}

// 32-bit load of two adjacent bf16 (4-byte aligned).
__device__ __forceinline__ uint32_t prm_ld_bf16x2(const __nv_bfloat16* p) {
    return prm_load_vec<uint32_t>(p);
}
