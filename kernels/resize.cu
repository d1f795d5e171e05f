// resize.cu: bicubic resize of a batch of planar images with per-image sizes (torch semantics:
// F.interpolate(mode="bicubic", align_corners=False), no antialias), and its exact transpose.
//
// Launchers: src/gpu/kernels/resize.rs (`ResizePlan` builds and uploads the tables below).
// Reference twin: src/reference/resize.rs (`bicubic_resize`, `bicubic_resize_backward`).
//
// Images are planar [C, h, w] f32, packed back to back. Image table, int, RESIZE_TABLE_STRIDE
// (= 9) entries per image:
//   [0] in offset   [1] in h    [2] in w
//   [3] out offset  [4] out h   [5] out w
//   [6] tmp offset  (backward scratch [C, out h, in w])
//   [7] x-axis CSR row-pointer offset, [8] y-axis CSR row-pointer offset (into `csr_ptr`).
// Forward reads entries 0..5 only.
//
// Backward tables (gather form, built on the host from the same f32 taps): for one axis
// in -> out, csr_ptr[p + i] .. csr_ptr[p + i + 1] (absolute indices into csr_idx / csr_w) lists
// the (output index, weight) pairs whose tap lands on input index i, in increasing output index
// then tap order (exactly the reference's `axis_transpose`). An axis whose image keeps its size
// in both dimensions lists the single pair (i, 1).
//
// Forward precision: bit-matching the reference (and ATen's CPU float kernel): scale = in/out,
// src = scale*(dst+0.5) − 0.5, i0 = min(floor(src), in−1), t = clamp(src − i0, 0, 1), Keys
// weights with A = −0.75 in ATen's expression shapes, taps clamped to the border, row sums
// ((p0·wx0 + p1·wx1) + p2·wx2) + p3·wx3, then ((r0·wy0 + r1·wy1) + r2·wy2) + r3·wy3, every
// operation separately rounded (no FMA). Same-size images are copied.
// Backward: fp32 sums in the reference's order (the reference sums in f64): ≤ 1e-6 relative.
//
// Grids: forward (ceil(max C·oh·ow / block), images); backward x pass (ceil(max C·oh·iw / block),
// images), y pass (ceil(max C·ih·iw / block), images). Thread = one output element.
#include "common.cuh"
#include "rounded.cuh"

#define RESIZE_TABLE_STRIDE 9

// ATen cubic_convolution1 / cubic_convolution2 with A = -0.75 (constants folded exactly).
__device__ __forceinline__ float rs_cc1(float x) {
    // ((A + 2) * x - (A + 3)) * x * x + 1
    return PRM_FADD_RN(PRM_FMUL_RN(PRM_FMUL_RN(PRM_FSUB_RN(PRM_FMUL_RN(1.25f, x), 2.25f), x), x), 1.0f);
}
__device__ __forceinline__ float rs_cc2(float x) {
    // ((A * x - 5A) * x + 8A) * x - 4A
    return PRM_FSUB_RN(PRM_FMUL_RN(PRM_FADD_RN(PRM_FMUL_RN(PRM_FSUB_RN(PRM_FMUL_RN(-0.75f, x), -3.75f), x), -6.0f), x), -3.0f);
}

// Taps (clamped indices) and weights of output index `dst` along an axis in -> out.
__device__ __forceinline__ void rs_taps(int in, int out, int dst, int idx[4], float w[4]) {
    const float scale = PRM_FDIV_RN((float)in, (float)out);
    const float src = PRM_FSUB_RN(PRM_FMUL_RN(scale, PRM_FADD_RN((float)dst, 0.5f)), 0.5f);
    long long i0 = (long long)floorf(src);
    if (i0 > in - 1) i0 = in - 1;
    float t = PRM_FSUB_RN(src, (float)i0);
    t = t < 0.0f ? 0.0f : (t > 1.0f ? 1.0f : t);
    const float x2 = PRM_FSUB_RN(1.0f, t);
    w[0] = rs_cc2(PRM_FADD_RN(t, 1.0f));
    w[1] = rs_cc1(t);
    w[2] = rs_cc1(x2);
    w[3] = rs_cc2(PRM_FADD_RN(x2, 1.0f));
    for (int j = 0; j < 4; ++j) {
        long long v = i0 - 1 + j;
        v = v < 0 ? 0 : (v > in - 1 ? in - 1 : v);
        idx[j] = (int)v;
    }
}

extern "C" __global__ void prm_resize_bicubic_forward_f32(const float* in, float* out, const int* table,
                                                          int channels) {
    const int* e = table + RESIZE_TABLE_STRIDE * blockIdx.y;
    const int ih = e[1], iw = e[2], oh = e[4], ow = e[5];
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long plane_out = (long long)oh * ow;
    if (k >= plane_out * channels) return;
    const int ch = (int)(k / plane_out);
    const int p = (int)(k - (long long)ch * plane_out);
    const int oy = p / ow, ox = p - oy * ow;
    const float* src = in + e[0] + (long long)ch * ih * iw;
    float* dst = out + e[3];
    if (ih == oh && iw == ow) {
        dst[k] = src[p];
        return;
    }
    int yi[4], xi[4];
    float wy[4], wx[4];
    rs_taps(ih, oh, oy, yi, wy);
    rs_taps(iw, ow, ox, xi, wx);
    float acc = 0.0f;
    for (int i = 0; i < 4; ++i) {
        const float* row = src + (long long)yi[i] * iw;
        float r = PRM_FMUL_RN(row[xi[0]], wx[0]);
        r = PRM_FADD_RN(r, PRM_FMUL_RN(row[xi[1]], wx[1]));
        r = PRM_FADD_RN(r, PRM_FMUL_RN(row[xi[2]], wx[2]));
        r = PRM_FADD_RN(r, PRM_FMUL_RN(row[xi[3]], wx[3]));
        acc = i == 0 ? PRM_FMUL_RN(r, wy[0]) : PRM_FADD_RN(acc, PRM_FMUL_RN(r, wy[i]));
    }
    dst[k] = acc;
}
PRM_REGISTER_KERNEL(prm_resize_bicubic_forward_f32);

// Backward pass 1, along x: tmp[c, oy, ix] = Σ_{(ox, w) ∈ csr_x(ix)} g[c, oy, ox] · w.
extern "C" __global__ void prm_resize_bicubic_backward_x_f32(const float* grad_out, float* tmp,
                                                             const int* table, const int* csr_ptr,
                                                             const int* csr_idx, const float* csr_w,
                                                             int channels) {
    const int* e = table + RESIZE_TABLE_STRIDE * blockIdx.y;
    const int iw = e[2], oh = e[4], ow = e[5];
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= (long long)channels * oh * iw) return;
    const long long r = k / iw;  // (c, oy) row
    const int ix = (int)(k - r * iw);
    const float* g = grad_out + e[3] + r * ow;
    const int* ptr = csr_ptr + e[7];
    float acc = 0.0f;
    for (int q = ptr[ix]; q < ptr[ix + 1]; ++q) acc = PRM_FADD_RN(acc, PRM_FMUL_RN(g[csr_idx[q]], csr_w[q]));
    tmp[e[6] + k] = acc;
}
PRM_REGISTER_KERNEL(prm_resize_bicubic_backward_x_f32);

// Backward pass 2, along y: grad_in[c, iy, ix] (+)= Σ_{(oy, w) ∈ csr_y(iy)} tmp[c, oy, ix] · w.
// accumulate != 0 adds into grad_in, else overwrites it.
extern "C" __global__ void prm_resize_bicubic_backward_y_f32(const float* tmp, float* grad_in,
                                                             const int* table, const int* csr_ptr,
                                                             const int* csr_idx, const float* csr_w,
                                                             int channels, int accumulate) {
    const int* e = table + RESIZE_TABLE_STRIDE * blockIdx.y;
    const int ih = e[1], iw = e[2], oh = e[4];
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long plane_in = (long long)ih * iw;
    if (k >= plane_in * channels) return;
    const int ch = (int)(k / plane_in);
    const int p = (int)(k - (long long)ch * plane_in);
    const int iy = p / iw, ix = p - iy * iw;
    const float* t = tmp + e[6] + (long long)ch * oh * iw + ix;
    const int* ptr = csr_ptr + e[8];
    float acc = 0.0f;
    for (int q = ptr[iy]; q < ptr[iy + 1]; ++q)
        acc = PRM_FADD_RN(acc, PRM_FMUL_RN(t[(long long)csr_idx[q] * iw], csr_w[q]));
    float* gi = grad_in + e[0] + k;
    *gi = accumulate ? PRM_FADD_RN(*gi, acc) : acc;
}
PRM_REGISTER_KERNEL(prm_resize_bicubic_backward_y_f32);
