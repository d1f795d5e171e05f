// update.cu: the optimisers' per-pixel updates and the seeded counter-based RNG.
//
// Launchers: src/gpu/kernels/update.rs. Reference twins: src/attack/optim.rs (`Optimizer`,
// `project`) and src/rng.rs (`ImageRng`, Philox4x32-10).
//
// Layout: a batch of planar images [3, H_i, W_i] packed back to back (f32, values in [0, 1]).
//   offsets [images + 1] (int): image b occupies elements offsets[b] .. offsets[b+1].
//   eps     [images]     (f32): per-image L∞ radius in [0, 1] units.
//   keys    [2 * images] (u32): per-image Philox key (ImageRng::key(), derived on the host).
// Grid: (ceil(max image length / blockDim.x), images); thread (x, b) handles element
// offsets[b] + blockIdx.x * blockDim.x + threadIdx.x of image b. The per-image L1 norm uses one
// block per image.
//
// Precision: fp32, bit-matching the Rust twins: every multiply, add, divide and square root is
// an explicitly rounded operation (no FMA contraction under nvcc), in the same order as the
// Rust expression. The L1 norm for MI-FGSM accumulates in f64 in a fixed order (the Rust twin
// sums in f64), so the result is deterministic.
//
// RNG: counter = (index lo, index hi, stream, 0) with index the element's position inside its
// image, key = the image's key; uniform = (word0 >> 8) * 2^-24 (exactly ImageRng::uniform).
//
// AdamW's per-step scalars come either as kernel arguments (prm_update_adamw_f32) or from a
// device table indexed by a device step counter (prm_update_adamw_scheduled_f32 with
// prm_update_adamw_advance), so a captured graph replays every step with the right t.
#include "common.cuh"
#include "rounded.cuh"

#define UPD_PHILOX_M0 0xD2511F53u
#define UPD_PHILOX_M1 0xCD9E8D57u
#define UPD_PHILOX_W0 0x9E3779B9u
#define UPD_PHILOX_W1 0xBB67AE85u

// Philox4x32-10 (Salmon et al.), as src/rng.rs::philox4x32_10.
__device__ __forceinline__ void prm_philox4x32_10(unsigned c[4], unsigned k0, unsigned k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += UPD_PHILOX_W0;
            k1 += UPD_PHILOX_W1;
        }
        const unsigned hi0 = __umulhi(UPD_PHILOX_M0, c[0]);
        const unsigned lo0 = UPD_PHILOX_M0 * c[0];
        const unsigned hi1 = __umulhi(UPD_PHILOX_M1, c[2]);
        const unsigned lo1 = UPD_PHILOX_M1 * c[2];
        const unsigned n0 = hi1 ^ c[1] ^ k0;
        const unsigned n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = lo1;
        c[2] = n2;
        c[3] = lo0;
    }
}

// ImageRng::uniform(stream, index) for the image whose key is (k0, k1).
__device__ __forceinline__ float prm_philox_uniform(unsigned k0, unsigned k1, unsigned stream,
                                                    unsigned long long index) {
    unsigned c[4] = {(unsigned)index, (unsigned)(index >> 32), stream, 0u};
    prm_philox4x32_10(c, k0, k1);
    return (float)(c[0] >> 8) * (1.0f / 16777216.0f);
}

// Rust's f32::clamp (NaN passes through).
__device__ __forceinline__ float upd_clamp(float v, float lo, float hi) {
    if (v < lo) v = lo;
    if (v > hi) v = hi;
    return v;
}

__device__ __forceinline__ float upd_sign(float v) {
    return v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f);
}

// optim.rs::project for one element.
__device__ __forceinline__ float upd_project(float x, float c, float eps) {
    return upd_clamp(upd_clamp(x, PRM_FSUB_RN(c, eps), PRM_FADD_RN(c, eps)), 0.0f, 1.0f);
}

// Element index of this thread inside image blockIdx.y, or -1 when out of range.
__device__ __forceinline__ long long upd_local(const int* offsets, int* base) {
    const int b = blockIdx.y;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    *base = offsets[b];
    return i < (long long)(offsets[b + 1] - offsets[b]) ? i : -1;
}

// PGD: x = project(x - step * sign(g)).
extern "C" __global__ void prm_update_pgd_f32(float* x, const float* clean, const float* grad,
                                              const int* offsets, const float* eps, float step) {
    int base;
    const long long i = upd_local(offsets, &base);
    if (i < 0) return;
    const long long k = base + i;
    const float v = PRM_FSUB_RN(x[k], PRM_FMUL_RN(step, upd_sign(grad[k])));
    x[k] = upd_project(v, clean[k], eps[blockIdx.y]);
}
PRM_REGISTER_KERNEL(prm_update_pgd_f32);

// Per-image inverse L1 norm of grad (f64 sum in a fixed order): inv[b] = l1 > 0 ? 1/l1 : 0.
// One block per image, blockDim.x = 256.
extern "C" __global__ void prm_update_inv_l1_f32(const float* grad, const int* offsets, float* inv) {
    PRM_SHARED_ARRAY(double, part, 256);
    const int b = blockIdx.x;
    const int t = threadIdx.x;
    const int begin = offsets[b], end = offsets[b + 1];
    double acc = 0.0;
    for (int k = begin + t; k < end; k += blockDim.x) acc += (double)fabsf(grad[k]);
    part[t] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) part[t] += part[t + s];
        __syncthreads();
    }
    if (t == 0) {
        const double l1 = part[0];
        inv[b] = l1 > 0.0 ? (float)(1.0 / l1) : 0.0f;
    }
}
PRM_REGISTER_KERNEL(prm_update_inv_l1_f32);

// MI-FGSM: m = momentum * m + g * inv_l1[b]; x = project(x - step * sign(m)).
extern "C" __global__ void prm_update_mifgsm_f32(float* x, float* m, const float* clean,
                                                 const float* grad, const int* offsets,
                                                 const float* eps, const float* inv_l1, float step,
                                                 float momentum) {
    int base;
    const long long i = upd_local(offsets, &base);
    if (i < 0) return;
    const long long k = base + i;
    const float mm = PRM_FADD_RN(PRM_FMUL_RN(momentum, m[k]), PRM_FMUL_RN(grad[k], inv_l1[blockIdx.y]));
    m[k] = mm;
    const float v = PRM_FSUB_RN(x[k], PRM_FMUL_RN(step, upd_sign(mm)));
    x[k] = upd_project(v, clean[k], eps[blockIdx.y]);
}
PRM_REGISTER_KERNEL(prm_update_mifgsm_f32);

// AdamW on δ in 0–255 units with the clamp re-parameterisation (Optimizer::adamw_step), for
// element k of image b. decay = 1 - lr255*wd, step = (lr255 / (1 - β1^t)) as f32,
// bias2_sqrt = sqrt(1 - β2^t) as f32.
__device__ __forceinline__ void upd_adamw_element(float* delta, float* m, float* v,
                                                  const float* clean, const float* grad,
                                                  long long k, float eps_b, float decay,
                                                  float step, float bias2_sqrt) {
    const float one_minus_b1 = 1.0f - 0.9f;    // f32 constant arithmetic, as in Rust
    const float one_minus_b2 = 1.0f - 0.999f;
    const float eps255 = PRM_FMUL_RN(eps_b, 255.0f);
    float d = delta[k];
    const float y = PRM_FADD_RN(PRM_FMUL_RN(clean[k], 255.0f), upd_clamp(d, -eps255, eps255));
    const bool passes = (d >= -eps255 && d <= eps255) && (y >= 0.0f && y <= 255.0f);
    const float g = passes ? PRM_FDIV_RN(grad[k], 255.0f) : 0.0f;
    d = PRM_FMUL_RN(d, decay);
    const float mo = m[k];
    const float mn = PRM_FADD_RN(mo, PRM_FMUL_RN(PRM_FSUB_RN(g, mo), one_minus_b1));
    const float vn = PRM_FADD_RN(PRM_FMUL_RN(v[k], 0.999f), PRM_FMUL_RN(PRM_FMUL_RN(one_minus_b2, g), g));
    m[k] = mn;
    v[k] = vn;
    const float denom = PRM_FADD_RN(PRM_FDIV_RN(PRM_FSQRT_RN(vn), bias2_sqrt), 1e-8f);
    delta[k] = PRM_FSUB_RN(d, PRM_FDIV_RN(PRM_FMUL_RN(step, mn), denom));
}

// AdamW with the per-step scalars passed by the host (see upd_adamw_element).
extern "C" __global__ void prm_update_adamw_f32(float* delta, float* m, float* v, const float* clean,
                                                const float* grad, const int* offsets,
                                                const float* eps, float decay, float step,
                                                float bias2_sqrt) {
    int base;
    const long long i = upd_local(offsets, &base);
    if (i < 0) return;
    upd_adamw_element(delta, m, v, clean, grad, base + i, eps[blockIdx.y], decay, step,
                      bias2_sqrt);
}
PRM_REGISTER_KERNEL(prm_update_adamw_f32);

// AdamW with the per-step scalars read from device memory, so that one captured launch serves
// every step (CUDA graphs): schedule [3 * (steps + 1)] holds (decay, step, bias2_sqrt) of step
// t at 3t (computed on the host by AdamwScalars::new, bit for bit), and *counter holds the
// current t, advanced by prm_update_adamw_advance before each step (t past the table reads its
// last row).
extern "C" __global__ void prm_update_adamw_scheduled_f32(float* delta, float* m, float* v,
                                                          const float* clean, const float* grad,
                                                          const int* offsets, const float* eps,
                                                          const float* schedule,
                                                          const int* counter, int schedule_rows) {
    int base;
    const long long i = upd_local(offsets, &base);
    if (i < 0) return;
    int t = counter[0];
    t = t < 0 ? 0 : (t >= schedule_rows ? schedule_rows - 1 : t);
    const float* s = schedule + 3 * t;
    upd_adamw_element(delta, m, v, clean, grad, base + i, eps[blockIdx.y], s[0], s[1], s[2]);
}
PRM_REGISTER_KERNEL(prm_update_adamw_scheduled_f32);

// AdamW's step counter: *counter += 1 (one thread).
extern "C" __global__ void prm_update_adamw_advance(int* counter) {
    if (blockIdx.x == 0 && threadIdx.x == 0) counter[0] += 1;
}
PRM_REGISTER_KERNEL(prm_update_adamw_advance);

// δ₂₅₅ from a start image: delta = (start - clean) * 255 (Optimizer::new).
extern "C" __global__ void prm_update_adamw_init_f32(float* delta, const float* start,
                                                     const float* clean, const int* offsets) {
    int base;
    const long long i = upd_local(offsets, &base);
    if (i < 0) return;
    const long long k = base + i;
    delta[k] = PRM_FMUL_RN(PRM_FSUB_RN(start[k], clean[k]), 255.0f);
}
PRM_REGISTER_KERNEL(prm_update_adamw_init_f32);

// The adversarial image of AdamW's δ (Optimizer::image):
// x = clamp(clean*255 + clamp(δ, -ε255, ε255), 0, 255) / 255.
extern "C" __global__ void prm_update_adamw_image_f32(float* x, const float* delta, const float* clean,
                                                      const int* offsets, const float* eps) {
    int base;
    const long long i = upd_local(offsets, &base);
    if (i < 0) return;
    const long long k = base + i;
    const float eps255 = PRM_FMUL_RN(eps[blockIdx.y], 255.0f);
    const float y = PRM_FADD_RN(PRM_FMUL_RN(clean[k], 255.0f), upd_clamp(delta[k], -eps255, eps255));
    x[k] = PRM_FDIV_RN(upd_clamp(y, 0.0f, 255.0f), 255.0f);
}
PRM_REGISTER_KERNEL(prm_update_adamw_image_f32);

// The escape step (Optimizer::escape_step) with the seeded signs of image.rs:
// s = uniform(stream, i) < 0.5 ? -1 : +1.
// adamw != 0: delta = delta*decay - lr255*s, on `state` = δ₂₅₅ (clean and eps unused);
// adamw == 0: x = project(x - step*s), on `state` = x (step = `scalar`).
extern "C" __global__ void prm_update_escape_f32(float* state, const float* clean, const int* offsets,
                                                 const float* eps, const unsigned* keys,
                                                 unsigned stream, int adamw, float decay,
                                                 float scalar) {
    int base;
    const long long i = upd_local(offsets, &base);
    if (i < 0) return;
    const long long k = base + i;
    const int b = blockIdx.y;
    const float u = prm_philox_uniform(keys[2 * b], keys[2 * b + 1], stream, (unsigned long long)i);
    const float s = u < 0.5f ? -1.0f : 1.0f;
    if (adamw) {
        state[k] = PRM_FSUB_RN(PRM_FMUL_RN(state[k], decay), PRM_FMUL_RN(scalar, s));
    } else {
        const float v = PRM_FSUB_RN(state[k], PRM_FMUL_RN(scalar, s));
        state[k] = upd_project(v, clean[k], eps[b]);
    }
}
PRM_REGISTER_KERNEL(prm_update_escape_f32);

// Random start (image.rs `start` with Init::Random): x = project(c + eps*(2u - 1)).
extern "C" __global__ void prm_update_random_start_f32(float* x, const float* clean, const int* offsets,
                                                       const float* eps, const unsigned* keys,
                                                       unsigned stream) {
    int base;
    const long long i = upd_local(offsets, &base);
    if (i < 0) return;
    const long long k = base + i;
    const int b = blockIdx.y;
    const float u = prm_philox_uniform(keys[2 * b], keys[2 * b + 1], stream, (unsigned long long)i);
    const float e = eps[b];
    const float c = clean[k];
    const float v = PRM_FADD_RN(c, PRM_FMUL_RN(e, PRM_FSUB_RN(PRM_FMUL_RN(2.0f, u), 1.0f)));
    x[k] = upd_project(v, c, e);
}
PRM_REGISTER_KERNEL(prm_update_random_start_f32);

// Raw uniforms: out[offsets[b] + i] = ImageRng(key b).uniform(stream, i).
extern "C" __global__ void prm_update_uniform_f32(float* out, const int* offsets, const unsigned* keys,
                                                  unsigned stream) {
    int base;
    const long long i = upd_local(offsets, &base);
    if (i < 0) return;
    const int b = blockIdx.y;
    out[base + i] = prm_philox_uniform(keys[2 * b], keys[2 * b + 1], stream, (unsigned long long)i);
}
PRM_REGISTER_KERNEL(prm_update_uniform_f32);
