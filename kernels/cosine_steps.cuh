// cosine_steps.cuh: the cosine loss of one token row (loss.cu's mode 0) as steps, for the kernels
// that compute it: loss.cu (rows cached in registers or streamed) and layernorm_cosine.cu (fused
// with the LayerNorm backward of the same rows). Reference twin: src/attack/loss.rs
// (`mean_token_cosine`).
//
// Per selected row a (adversarial) and c (clean), n_sel selected rows in the image, weight w:
//   each lane sums its elements in increasing index order: aa = fmaf(a, a, aa), cc = fmaf(c, c, cc),
//   ac = fmaf(a, c, ac) (prm_cosine_sums); the warp butterflies them (prm_cosine_row), then
//   cos = ac / (|a||c|),  grad += w/n_sel · (c/(|a||c|) − cos·a/|a|²)      (prm_cosine_grad)
// with norms floored at 1e-12 like torch's F.normalize. Every rounding is spelled out
// (kernels/README.md), so that all of these kernels give the same bits on the GPU.
#pragma once
#include "common.cuh"
#include "rounded.cuh"

struct PrmCosineRow {
    float cos;  // the row's statistic
    float u;    // gradient scale of c: w / (|a||c| n_sel)
    float v;    // gradient scale of a: w·cos / (|a|² n_sel)
};

__device__ __forceinline__ void prm_cosine_sums(float a, float c, float& aa, float& cc, float& ac) {
    aa = fmaf(a, a, aa);
    cc = fmaf(c, c, cc);
    ac = fmaf(a, c, ac);
}

// From the lanes' partial sums: the row's cosine and its gradient scales (every lane).
__device__ __forceinline__ PrmCosineRow prm_cosine_row(float aa, float cc, float ac, int n_sel, float weight) {
    aa = prm_warp_sum(aa);
    cc = prm_warp_sum(cc);
    ac = prm_warp_sum(ac);
    const float na = fmaxf(sqrtf(aa), 1e-12f);
    const float nc = fmaxf(sqrtf(cc), 1e-12f);
    PrmCosineRow r;
    r.cos = ac / (na * nc);
    r.u = weight / (na * nc * (float)n_sel);
    r.v = weight * r.cos / (na * na * (float)n_sel);
    return r;
}

// grad + dcos/da at one element.
__device__ __forceinline__ float prm_cosine_grad(float grad, float a, float c, const PrmCosineRow& r) {
    return PRM_FADD_RN(grad, fmaf(c, r.u, -(a * r.v)));
}
