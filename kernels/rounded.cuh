// rounded.cuh: IEEE arithmetic rounded once per operation, for the kernels whose results must be
// their Rust twins' bit for bit (update.cu, resize.cu, save.cu).
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
#endif
