// loss.cu: the attack objectives at one feature layer, per image, and their feature gradients.
//
// Launchers: src/gpu/kernels/loss.rs. Reference twin: src/attack/loss.rs (`mean_token_cosine`,
// `neg_mean_squared_distance`, `dispersion`).
//
// Layout: packed token features a (adversarial) and c (clean), [ΣT_i, D] row-major f32;
// cu_seqlens [images + 1] (int) gives image b's rows cu_seqlens[b] .. cu_seqlens[b+1].
// skip = 0 selects every token, skip = 1 skips each image's first (CLS) token. n_b = T_b - skip
// selected tokens, N_b = n_b * D selected elements.
//
// Two deterministic phases, no float atomics:
//   1. prm_loss_rows_f32 (prm_loss_rows_f32_d768 for rows of at most 768 elements: mode 0 keeps
//      the row in registers, same bits): one warp per token row (8 rows per 256-thread block). Computes the
//      row's statistic into row_val[row] (fixed-order lane sums, then a fixed xor-shuffle tree)
//      and, for the elementwise-gradient losses, adds the gradient into grad:
//        mode 0 cosine: row_val = cos(a_t, c_t);   grad += w/n_b · (c/(|a||c|) − cos·a/|a|²)
//        mode 1 nrd:    row_val = Σ_d (a−c)²;       grad += w · (−2 (a−c) / N_b)
//        mode 2 dr-sum: row_val = Σ_d a
//        mode 3 dr-dev: row_val = Σ_d (a − mean_b)²  (mean_b = stats[2b])
//      Non-selected rows get row_val = 0 and no gradient.
//   2. prm_loss_images_f32: one block of 256 threads per image sums row_val over the selected
//      rows in a fixed order (strided per thread, then a shared-memory tree) and writes
//        mode 0: loss[b] (+)= w · Σ cos / n_b
//        mode 1: loss[b] (+)= w · (−Σ / N_b)
//        mode 2: stats[2b] = Σ / N_b                         (the mean; no loss)
//        mode 3: std = sqrt(Σ / (N_b − 1)) (unbiased); loss[b] (+)= w · std;
//                stats[2b+1] = w / ((N_b − 1) · max(std, 1e-12))
//      ("(+)=" adds into loss[b] when accumulate != 0, else overwrites.)
//   3. (dr only) prm_loss_rows_f32 mode 4: grad += (a − stats[2b]) · stats[2b+1] on the
//      selected rows (row_val untouched).
// dr is std (w = +1) and dr-official −std (w = −1); the per-layer cosine report is mode 0 with
// no gradient (grad = nullptr) and w = 1.
// grad_copy (nullable; only with grad, in the pass that adds the gradient: modes 0, 1, 4):
// receives bf16(grad) of every row after the update, rounded to nearest even, the unselected
// rows included: the bf16 engine's next product reads the residual gradient as its operand.
//
// Norms are floored at 1e-12 like torch's F.normalize. All arithmetic is fp32; every multiply that
// feeds an add is spelled out (fmaf, PRM_FADD_RN), so that the cached and streaming rows passes
// round alike on the GPU (kernels/README.md). Modes 0 and 1 take their steps from loss_steps.cuh,
// shared with layernorm_loss.cu (the engine's prm and nrd backward: this rows pass fused with
// LN1's backward).
#include "common.cuh"
#include "rounded.cuh"
#include "loss_steps.cuh"

#define LOSS_ROWS_PER_BLOCK 8
#define LOSS_IMAGE_THREADS 256

// Mode 0 (cosine) of one selected row held in registers: lane `lane` holds elements lane + 32k,
// k < PER_LANE. FULL: the row fills every slot (dim == 32·PER_LANE, ViT-B's 768), so no slot
// needs its bounds test; GRAD / COPY: whether the gradient (and its bf16 copy) is written.
// Compile-time flags, so that each variant is straight-line code; the sums are the same either
// way (same order), so are the bits.
template <bool FULL, bool GRAD, bool COPY, int PER_LANE>
__device__ __forceinline__ void loss_cosine_cached(const float* __restrict__ ar, const float* __restrict__ cr,
                                                   float* __restrict__ gr, __nv_bfloat16* __restrict__ gc, int lane,
                                                   int dim, int n_sel, float weight, float* row_val) {
    float av[PER_LANE], cv[PER_LANE], gv[PER_LANE];
    float aa = 0.0f, cc = 0.0f, ac = 0.0f;
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        const int d = lane + 32 * k;
        if (FULL || d < dim) {
            av[k] = ar[d];
            cv[k] = cr[d];
            gv[k] = GRAD ? gr[d] : 0.0f;
            prm_cosine_sums(av[k], cv[k], aa, cc, ac);
        }
    }
    const PrmCosineRow r = prm_cosine_row(aa, cc, ac, n_sel, weight);
    if (lane == 0) *row_val = r.cos;
    if (GRAD) {
#pragma unroll
        for (int k = 0; k < PER_LANE; ++k) {
            const int d = lane + 32 * k;
            if (FULL || d < dim) {
                const float g = prm_cosine_grad(gv[k], av[k], cv[k], r);
                gr[d] = g;
                if (COPY) gc[d] = __float2bfloat16(g);
            }
        }
    }
}

template <bool FULL, int PER_LANE>
__device__ __forceinline__ void loss_cosine_cached(const float* __restrict__ ar, const float* __restrict__ cr,
                                                   float* __restrict__ gr, __nv_bfloat16* __restrict__ gc, int lane,
                                                   int dim, int n_sel, float weight, float* row_val) {
    if (gc) {
        loss_cosine_cached<FULL, true, true, PER_LANE>(ar, cr, gr, gc, lane, dim, n_sel, weight, row_val);
    } else if (gr) {
        loss_cosine_cached<FULL, true, false, PER_LANE>(ar, cr, gr, gc, lane, dim, n_sel, weight, row_val);
    } else {
        loss_cosine_cached<FULL, false, false, PER_LANE>(ar, cr, gr, gc, lane, dim, n_sel, weight, row_val);
    }
}

// The rows pass. PER_LANE > 0 (the _d768 kernel, rows of at most 32·PER_LANE elements): mode 0
// holds the row's a, c and grad in registers, loading grad with a and c before the reductions,
// so the gradient loop reads nothing again (the streaming form re-reads a and c after the
// reductions, about a quarter more memory traffic than the pass needs). Same sums in the same
// order either way: the same bits.
template <int PER_LANE>
__device__ __forceinline__ void loss_rows(const float* a, const float* c, const int* cu_seqlens, int images, int dim,
                                          int skip, int mode, const float* stats, float* grad,
                                          __nv_bfloat16* grad_copy, float weight, float* row_val) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * LOSS_ROWS_PER_BLOCK + (threadIdx.x >> 5);
    const int rows = cu_seqlens[images];
    if (row >= rows) return;  // whole warp leaves together; no block barrier below
    const int b = prm_image_of_row(cu_seqlens, images, row);
    const int first = cu_seqlens[b];
    const int n_sel = cu_seqlens[b + 1] - first - skip;
    const bool selected = row - first >= skip;
    float* gr = grad ? grad + (long long)row * dim : nullptr;
    __nv_bfloat16* gc = (gr && grad_copy) ? grad_copy + (long long)row * dim : nullptr;
    if (!selected) {
        if (lane == 0) row_val[row] = 0.0f;
        if (gc)  // the copy covers every row: the unselected ones as they are
            for (int d = lane; d < dim; d += 32) gc[d] = __float2bfloat16(gr[d]);
        return;
    }
    const float* ar = a + (long long)row * dim;
    const float* cr = c + (long long)row * dim;
    if (PER_LANE > 0 && mode == 0) {
        constexpr int slots = PER_LANE > 0 ? PER_LANE : 1;  // (never run with PER_LANE == 0)
        if (dim == 32 * slots) {
            loss_cosine_cached<true, slots>(ar, cr, gr, gc, lane, dim, n_sel, weight, row_val + row);
        } else {
            loss_cosine_cached<false, slots>(ar, cr, gr, gc, lane, dim, n_sel, weight, row_val + row);
        }
    } else if (mode == 0) {
        float aa = 0.0f, cc = 0.0f, ac = 0.0f;
        for (int d = lane; d < dim; d += 32) prm_cosine_sums(ar[d], cr[d], aa, cc, ac);
        const PrmCosineRow r = prm_cosine_row(aa, cc, ac, n_sel, weight);
        if (lane == 0) row_val[row] = r.cos;
        if (gr) {
            for (int d = lane; d < dim; d += 32) {
                const float g = prm_cosine_grad(gr[d], ar[d], cr[d], r);
                gr[d] = g;
                if (gc) gc[d] = __float2bfloat16(g);
            }
        }
    } else if (mode == 1) {
        float s = 0.0f;
        for (int d = lane; d < dim; d += 32) prm_nrd_sum(ar[d], cr[d], s);
        s = prm_warp_sum(s);
        if (lane == 0) row_val[row] = s;
        if (gr) {
            const float k = prm_nrd_scale(weight, n_sel, dim);
            for (int d = lane; d < dim; d += 32) {
                const float g = prm_nrd_grad(gr[d], ar[d], cr[d], k);
                gr[d] = g;
                if (gc) gc[d] = __float2bfloat16(g);
            }
        }
    } else if (mode == 2) {
        float s = 0.0f;
        for (int d = lane; d < dim; d += 32) s += ar[d];
        s = prm_warp_sum(s);
        if (lane == 0) row_val[row] = s;
    } else if (mode == 3) {
        const float mean = stats[2 * b];
        float s = 0.0f;
        for (int d = lane; d < dim; d += 32) {
            const float e = ar[d] - mean;
            s = fmaf(e, e, s);
        }
        s = prm_warp_sum(s);
        if (lane == 0) row_val[row] = s;
    } else if (gr) {
        const float mean = stats[2 * b], scale = stats[2 * b + 1];
        for (int d = lane; d < dim; d += 32) {
            const float g = fmaf(ar[d] - mean, scale, gr[d]);
            gr[d] = g;
            if (gc) gc[d] = __float2bfloat16(g);
        }
    }
}

extern "C" __global__ void prm_loss_rows_f32(const float* a, const float* c, const int* cu_seqlens,
                                             int images, int dim, int skip, int mode,
                                             const float* stats, float* grad,
                                             __nv_bfloat16* grad_copy, float weight,
                                             float* row_val) {
    loss_rows<0>(a, c, cu_seqlens, images, dim, skip, mode, stats, grad, grad_copy, weight, row_val);
}
PRM_REGISTER_KERNEL(prm_loss_rows_f32);

// Rows of at most 768 elements (ViT-B's width; the launcher picks it): mode 0 from registers.
extern "C" __global__ void prm_loss_rows_f32_d768(const float* a, const float* c, const int* cu_seqlens,
                                                  int images, int dim, int skip, int mode,
                                                  const float* stats, float* grad,
                                                  __nv_bfloat16* grad_copy, float weight,
                                                  float* row_val) {
    loss_rows<24>(a, c, cu_seqlens, images, dim, skip, mode, stats, grad, grad_copy, weight, row_val);
}
PRM_REGISTER_KERNEL(prm_loss_rows_f32_d768);

extern "C" __global__ void prm_loss_images_f32(const float* row_val, const int* cu_seqlens, int dim,
                                               int skip, int mode, float weight, float* loss,
                                               int accumulate, float* stats) {
    PRM_SHARED_ARRAY(float, part, LOSS_IMAGE_THREADS);
    const int b = blockIdx.x;
    const int t = threadIdx.x;
    const int begin = cu_seqlens[b] + skip, end = cu_seqlens[b + 1];
    float s = 0.0f;
    for (int r = begin + t; r < end; r += LOSS_IMAGE_THREADS) s += row_val[r];
    part[t] = s;
    __syncthreads();
    for (int h = LOSS_IMAGE_THREADS / 2; h > 0; h >>= 1) {
        if (t < h) part[t] += part[t + h];
        __syncthreads();
    }
    if (t == 0) {
        const float sum = part[0];
        const float n_sel = (float)(end - begin);
        // Spelled out (two roundings, as the Rust twin): nvcc could otherwise contract a
        // product with the add or subtract that follows it, and the simulator never does.
        const float n_el = PRM_FMUL_RN(n_sel, (float)dim);
        float value = 0.0f;
        bool has_loss = true;
        if (mode == 0) {
            value = sum / n_sel;
        } else if (mode == 1) {
            value = -sum / n_el;
        } else if (mode == 2) {
            stats[2 * b] = sum / n_el;
            has_loss = false;
        } else {
            const float sd = sqrtf(sum / (n_el - 1.0f));
            value = sd;
            stats[2 * b + 1] = weight / ((n_el - 1.0f) * fmaxf(sd, 1e-12f));
        }
        if (has_loss) {
            const float contrib = PRM_FMUL_RN(weight, value);
            loss[b] = accumulate ? PRM_FADD_RN(loss[b], contrib) : contrib;
        }
    }
}
PRM_REGISTER_KERNEL(prm_loss_images_f32);

