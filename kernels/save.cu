// save.cu: an attacked batch as `prm attack` saves it, computed where the batch already is.
//
// Launcher: src/gpu/kernels/save.rs. Reference twin: src/io/output.rs (`quantize_for_saving`:
// `quantize_within_eps`, the levels as floats, `linf_255`), bit for bit.
//
// Layout: a batch of planar images [3, H_i, W_i] packed back to back (f32 in [0, 1]), as in
// update.cu:
//   offsets [images + 1] (int): image b occupies elements offsets[b] .. offsets[b+1].
//   eps     [images]     (f32): per-image L∞ radius in [0, 1] units.
// Outputs, per element: levels (u8, the 8-bit level saved to the PNG) and values (f32,
// level / 255: what the evaluation of the saved image reads). Per image: linf_bits (u64), the
// bits of the f64 max |level − clean·255| (1/255 units), which the launcher zeroes first.
// Grid: (ceil(max image length / (SAVE_BLOCK · SAVE_PER_THREAD)), images), SAVE_BLOCK threads;
// block (x, b) handles elements x·SAVE_BLOCK·SAVE_PER_THREAD + j·SAVE_BLOCK + threadIdx.x of
// image b, j < SAVE_PER_THREAD (coalesced; several elements a thread, so that a block's
// reduction and its atomic are amortised, and the simulator switches fibers less). Each block
// reduces its L∞ in shared memory and folds it into its image's with one 64-bit atomicMax: the
// values are non-negative doubles, whose bit patterns order as the numbers do, so the result
// does not depend on the order (max is exact).
//
// Precision: f64 for the bounds, the rounding and the distance, exactly as the Rust twin:
// every multiply, add and subtract is an explicitly rounded operation (no FMA contraction under
// nvcc: `c·255 − ε·255` would otherwise fuse), round() is half away from zero like Rust's, and
// Rust's clamp / max / `as u8` semantics for NaN are spelled out. The float value is an IEEE
// division, like the twin's `q as f32 / 255.0`.
#include "common.cuh"
#include "rounded.cuh"

// output.rs::BOUND_SLACK_255.
#define SAVE_BOUND_SLACK_255 5e-5
#define SAVE_BLOCK 256
#define SAVE_PER_THREAD 8

// Rust's f64::clamp (NaN passes through).
__device__ __forceinline__ double save_clamp(double v, double lo, double hi) {
    if (v < lo) v = lo;
    if (v > hi) v = hi;
    return v;
}

// output.rs::clean_255: c·255, snapped to the nearest integer within 1e-4 of it.
__device__ __forceinline__ double save_clean_255(float c) {
    const double c255 = PRM_DMUL_RN((double)c, 255.0);
    const double r = round(c255);
    return fabs(PRM_DSUB_RN(c255, r)) < 1e-4 ? r : c255;
}

// output.rs::quantize_level, up to the final cast: the level as a double (NaN only where the
// twin's `as u8` turns it into 0).
__device__ __forceinline__ double save_level(float a, double c255, double eps255) {
    const double nearest_clean = save_clamp(round(c255), 0.0, 255.0);
    // f64::max / f64::min ignore a NaN operand, as fmax / fmin do.
    const double lo = fmax(ceil(PRM_DSUB_RN(PRM_DSUB_RN(c255, eps255), SAVE_BOUND_SLACK_255)), 0.0);
    const double hi = fmin(floor(PRM_DADD_RN(PRM_DADD_RN(c255, eps255), SAVE_BOUND_SLACK_255)), 255.0);
    const double a255 = isfinite(a) ? PRM_DMUL_RN((double)a, 255.0) : c255;
    double q = save_clamp(round(a255), 0.0, 255.0);
    if (lo <= hi) {
        q = save_clamp(q, lo, hi);
    } else if (isfinite(c255)) {
        q = nearest_clean;
    }
    return q;
}

extern "C" __global__ void prm_save_quantize_f32(unsigned char* levels, float* values,
                                                 unsigned long long* linf_bits, const float* adv,
                                                 const float* clean, const int* offsets,
                                                 const float* eps) {
    PRM_SHARED_ARRAY(double, part, SAVE_BLOCK);
    const int b = blockIdx.y;
    const int t = threadIdx.x;
    const int begin = offsets[b];
    const long long len = offsets[b + 1] - begin;
    const double eps255 = PRM_DMUL_RN((double)eps[b], 255.0);
    const long long first = (long long)blockIdx.x * SAVE_BLOCK * SAVE_PER_THREAD + t;
    double distance = 0.0;
#pragma unroll
    for (int j = 0; j < SAVE_PER_THREAD; ++j) {
        const long long i = first + (long long)j * SAVE_BLOCK;
        if (i < len) {
            const long long k = begin + i;
            const double c255 = save_clean_255(clean[k]);
            const double q = save_level(adv[k], c255, eps255);
            // Rust's `as u8` saturates, and maps NaN to 0; q is otherwise an integer in
            // [0, 255].
            const unsigned char level = q == q ? (unsigned char)q : (unsigned char)0;
            levels[k] = level;
            values[k] = PRM_FDIV_RN((float)level, 255.0f);
            // fold(0.0, f64::max): a NaN distance (non-finite clean value) is ignored.
            distance = fmax(distance, fabs(PRM_DSUB_RN((double)level, c255)));
        }
    }
    // Every thread reaches the barriers (no early return).
    part[t] = distance;
    __syncthreads();
    for (int s = SAVE_BLOCK / 2; s > 0; s >>= 1) {
        if (t < s) part[t] = fmax(part[t], part[t + s]);
        __syncthreads();
    }
    if (t == 0) {
        atomicMax(&linf_bits[b], (unsigned long long)__double_as_longlong(part[0]));
    }
}
PRM_REGISTER_KERNEL(prm_save_quantize_f32);
