// loss_steps.cuh: the per-row losses with an elementwise gradient (loss.cu's modes 0 and 1) as
// steps, for the kernels that compute them: loss.cu (rows cached in registers or streamed) and
// layernorm_loss.cu (fused with the LayerNorm backward of the same rows). Reference twins:
// src/attack/loss.rs (`mean_token_cosine`, `neg_mean_squared_distance`).
//
// Per selected row a (adversarial) and c (clean) of dim elements, n_sel selected rows in the
// image, weight w; each lane sums its elements in increasing index order, then the warp
// butterflies the sums:
//   prm (cosine): aa = fmaf(a, a, aa), cc = fmaf(c, c, cc), ac = fmaf(a, c, ac)
//     (prm_cosine_sums, prm_cosine_row); cos = ac / (|a||c|),
//     grad += w/n_sel · (c/(|a||c|) − cos·a/|a|²)                       (prm_cosine_grad)
//     with norms floored at 1e-12 like torch's F.normalize;
//   nrd: s = fmaf(e, e, s), e = a − c (prm_nrd_sum); the row's value is Σ e²,
//     grad = fmaf(e, k, grad), k = w·(−2 / (n_sel·dim))                  (prm_nrd_scale, _grad).
// Every rounding is spelled out (kernels/README.md), so that all of these kernels give the same
// bits on the GPU.
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

__device__ __forceinline__ void prm_nrd_sum(float a, float c, float& s) {
    const float e = a - c;
    s = fmaf(e, e, s);
}

// The gradient scale of nrd: w · (−2 / (n_sel · dim)).
__device__ __forceinline__ float prm_nrd_scale(float weight, int n_sel, int dim) {
    return weight * (-2.0f / ((float)n_sel * (float)dim));
}

// grad + dnrd/da at one element.
__device__ __forceinline__ float prm_nrd_grad(float grad, float a, float c, float k) { return fmaf(a - c, k, grad); }
