// rounded.cuh: IEEE arithmetic rounded once per operation, for the kernels whose results must be
// their Rust twins' bit for bit (update.cu, resize.cu, save.cu), and an unguarded correctly
// rounded reciprocal for a known range (activation.cu).
//
// Under nvcc these are the `__f*_rn` / `__d*_rn` intrinsics: one correctly rounded operation each,
// which nvcc never contracts into an FMA (a plain `a * b + c` may become one, and differ from the
// twin in the last bit). Under the simulator (C++), every product and sum goes through a volatile,
// so the compiler cannot contract it either, and fp-contract is off for the rest of the file.
// Division and square root are correctly rounded in both.
#pragma once

#ifdef __CUDACC__
#define PRM_FMUL_RN(a, b) __fmul_rn((a), (b))
#define PRM_FADD_RN(a, b) __fadd_rn((a), (b))
#define PRM_FSUB_RN(a, b) __fsub_rn((a), (b))
#define PRM_FDIV_RN(a, b) __fdiv_rn((a), (b))
#define PRM_FSQRT_RN(a) __fsqrt_rn(a)
#define PRM_DMUL_RN(a, b) __dmul_rn((a), (b))
#define PRM_DADD_RN(a, b) __dadd_rn((a), (b))
#define PRM_DSUB_RN(a, b) __dsub_rn((a), (b))
#define PRM_DDIV_RN(a, b) __ddiv_rn((a), (b))
#define PRM_DSQRT_RN(a) __dsqrt_rn(a)
#else
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
static inline float prm_fmul_rn_(float a, float b) { volatile float r = a * b; return r; }
static inline float prm_fadd_rn_(float a, float b) { volatile float r = a + b; return r; }
static inline double prm_dmul_rn_(double a, double b) { volatile double r = a * b; return r; }
static inline double prm_dadd_rn_(double a, double b) { volatile double r = a + b; return r; }
#define PRM_FMUL_RN(a, b) prm_fmul_rn_((a), (b))
#define PRM_FADD_RN(a, b) prm_fadd_rn_((a), (b))
#define PRM_FSUB_RN(a, b) prm_fadd_rn_((a), -(b))
#define PRM_FDIV_RN(a, b) ((a) / (b))
#define PRM_FSQRT_RN(a) std::sqrt(a)
#define PRM_DMUL_RN(a, b) prm_dmul_rn_((a), (b))
#define PRM_DADD_RN(a, b) prm_dadd_rn_((a), (b))
#define PRM_DSUB_RN(a, b) prm_dadd_rn_((a), -(b))
#define PRM_DDIV_RN(a, b) ((a) / (b))
#define PRM_DSQRT_RN(a) std::sqrt(a)
#endif

// 1/d correctly rounded, for d in [1, 2^126) only: the caller must test the range (NaN, ∞ and
// d ≥ 2^126 need the IEEE division). Under nvcc this is the fast path of the compiler's own IEEE
// reciprocal (sm_90 SASS of `1.0f / d`: MUFU.RCP, then one Newton step through two FMAs, taken
// whenever d's exponent field is 1..252), without the branch to the slow path that guards it,
// so that several of them interleave. Under the simulator it is the division itself.
#ifdef __CUDACC__
__device__ __forceinline__ float prm_frcp_rn_below_2p126(float d) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
    const float e = fmaf(-d, r, 1.0f);  // 1 − d·r, one rounding (exact negation of d·r − 1's)
    return fmaf(r, e, r);
}
#else
static inline float prm_frcp_rn_below_2p126(float d) { return 1.0f / d; }
#endif
