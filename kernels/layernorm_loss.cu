// layernorm_loss.cu: the LayerNorm input-gradient backward of a block's first LayerNorm, fused
// with the loss of the same feature layer (prm's cosine, or nrd), in one pass over the rows.
//
// Launcher: src/gpu/kernels/layernorm_loss.rs. Twin: the two kernels it replaces, run one after
// the other, bit for bit (tests/kernel_loss.rs): prm_layernorm_backward_f32[_bf16copy]_d768 with
// accumulate, then prm_loss_rows_f32_d768 in the same mode with the gradient (references:
// src/attack/loss.rs `mean_token_cosine` / `neg_mean_squared_distance`, and the LayerNorm
// backward of src/reference).
//
// Why: in the attack's backward, block l's LN1 reads F_l (its input) and adds its gradient into
// the running residual gradient dh; the loss at layer l then reads F_l again with the clean F_l,
// and reads and writes dh again (and its bf16 copy). One pass reads x = F_l, dy, dh and the
// clean row once, and writes dh and the copy once: for ViT-B at batch 64 about 135 MB less
// traffic a layer (of 350), and one launch less.
//
// Layouts (row-major, packed tokens, images back to back):
//   x, c, dy, dx   [rows, dim] fp32: F_l adversarial (LayerNorm input and loss input), F_l clean,
//                  the LayerNorm output's gradient, the running gradient (accumulated into)
//   dx_copy        [rows, dim] bf16 or nullptr: receives bf16(dx) of every row as written
//   gamma          [dim] fp32;  mean, rstd  [rows] fp32 (the forward's statistics)
//   cu_seqlens     [images + 1] int, rows = cu_seqlens[images];  row_val [rows] fp32: the row's
//                  statistic (0 for unselected rows), for prm_loss_images_f32 (loss.cu) to sum
// Per row r of image b (n_sel = T_b − skip selected rows; rows before `skip` are not selected):
//   dx[r] = dx[r] + LN_backward(x[r], dy[r])                      (layernorm_steps.cuh)
//   selected, mode 0 (prm): row_val[r] = cos(x[r], c[r]);  dx[r] += weight/n_sel · dcos/dx
//             mode 1 (nrd): row_val[r] = Σ (x[r] − c[r])²;  dx[r] += weight · (−2 (x − c) / (n_sel·dim))
//                                                            (loss_steps.cuh)
// Precision: fp32 throughout, the two additions into dx rounded in that order, as the two
// kernels round them. Rows of at most 768 elements (ViT-B; the launcher refuses wider ones, which
// take the two kernels), held in registers: lane l owns elements l + 32k. One warp per row,
// 4 rows per 128-thread block, no shared memory, no block barrier; deterministic.
#include "common.cuh"
#include "rounded.cuh"
#include "layernorm_steps.cuh"
#include "loss_steps.cuh"

#define PRM_LNLOSS_ROWS_PER_BLOCK 4
#define PRM_LNLOSS_PER_LANE 24

// One row. FULL: dim == 32·PER_LANE (no bounds tests); COPY: write the bf16 copy; MODE: 0 prm,
// 1 nrd, −1 the row is not selected (only the LayerNorm part). x̂ is recomputed where it is
// needed (the same spelled product, so the same value) to keep four rows of registers live,
// not five. The LayerNorm sums add zeros for out-of-range slots, as layernorm.cu's cached rows
// do; the loss sums skip them, as loss.cu's do (the same sums either way).
template <bool FULL, bool COPY, int MODE, int PER_LANE>
__device__ __forceinline__ void prm_lnloss_row(const float* __restrict__ xr, const float* __restrict__ dyr,
                                               const float* __restrict__ gamma, float mean, float rstd,
                                               const float* __restrict__ cr, float* __restrict__ dxr,
                                               __nv_bfloat16* __restrict__ copyr, int lane, int dim, int n_sel,
                                               float weight, float* __restrict__ row_val) {
    constexpr bool LOSS = MODE >= 0;
    const float inv_dim = 1.0f / (float)dim;
    float xv[PER_LANE], cv[PER_LANE], g[PER_LANE], old[PER_LANE];
    // Every load first, so that they are all in flight before the first reduction.
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        const int i = lane + k * PRM_WARP_SIZE;
        const bool in = FULL || i < dim;
        cv[k] = (LOSS && in) ? cr[i] : 0.0f;
        xv[k] = in ? xr[i] : 0.0f;
        g[k] = in ? prm_ln_g(dyr[i], gamma[i]) : 0.0f;
        old[k] = in ? dxr[i] : 0.0f;
    }
    float sg = 0.0f, sgx = 0.0f, aa = 0.0f, cc = 0.0f, ac = 0.0f;
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        const int i = lane + k * PRM_WARP_SIZE;
        const bool in = FULL || i < dim;
        const float xh = in ? prm_ln_xhat(xv[k], mean, rstd) : 0.0f;
        sg = prm_ln_sum_g(sg, g[k]);
        sgx = prm_ln_sum_gx(sgx, g[k], xh);
        if (MODE == 0 && in) prm_cosine_sums(xv[k], cv[k], aa, cc, ac);
        if (MODE == 1 && in) prm_nrd_sum(xv[k], cv[k], aa);
    }
    const float mg = prm_ln_row_mean(sg, inv_dim);
    const float mgx = prm_ln_row_mean(sgx, inv_dim);
    PrmCosineRow r = {0.0f, 0.0f, 0.0f};
    float value = 0.0f, k_nrd = 0.0f;
    if (MODE == 0) {
        r = prm_cosine_row(aa, cc, ac, n_sel, weight);
        value = r.cos;
    } else if (MODE == 1) {
        value = prm_warp_sum(aa);
        k_nrd = prm_nrd_scale(weight, n_sel, dim);
    }
    if (lane == 0) *row_val = value;
#pragma unroll
    for (int k = 0; k < PER_LANE; ++k) {
        const int i = lane + k * PRM_WARP_SIZE;
        if (FULL || i < dim) {
            const float xh = prm_ln_xhat(xv[k], mean, rstd);
            float out = prm_ln_dx(g[k], xh, mg, mgx, rstd, true, old[k]);
            if (MODE == 0) out = prm_cosine_grad(out, xv[k], cv[k], r);
            if (MODE == 1) out = prm_nrd_grad(out, xv[k], cv[k], k_nrd);
            dxr[i] = out;
            if (COPY) copyr[i] = __float2bfloat16(out);
        }
    }
}

template <bool FULL, int MODE, int PER_LANE>
__device__ __forceinline__ void prm_lnloss_row(const float* xr, const float* dyr, const float* gamma, float mean,
                                               float rstd, const float* cr, float* dxr, __nv_bfloat16* copyr,
                                               int lane, int dim, int n_sel, float weight, float* row_val) {
    if (copyr) {
        prm_lnloss_row<FULL, true, MODE, PER_LANE>(xr, dyr, gamma, mean, rstd, cr, dxr, copyr, lane, dim, n_sel,
                                                   weight, row_val);
    } else {
        prm_lnloss_row<FULL, false, MODE, PER_LANE>(xr, dyr, gamma, mean, rstd, cr, dxr, copyr, lane, dim, n_sel,
                                                    weight, row_val);
    }
}

template <bool FULL, int PER_LANE>
__device__ __forceinline__ void prm_lnloss_row(const float* xr, const float* dyr, const float* gamma, float mean,
                                               float rstd, const float* cr, float* dxr, __nv_bfloat16* copyr,
                                               int lane, int dim, int n_sel, float weight, int mode, bool selected,
                                               float* row_val) {
    if (!selected) {
        prm_lnloss_row<FULL, -1, PER_LANE>(xr, dyr, gamma, mean, rstd, cr, dxr, copyr, lane, dim, n_sel, weight,
                                           row_val);
    } else if (mode == 0) {
        prm_lnloss_row<FULL, 0, PER_LANE>(xr, dyr, gamma, mean, rstd, cr, dxr, copyr, lane, dim, n_sel, weight,
                                          row_val);
    } else {
        prm_lnloss_row<FULL, 1, PER_LANE>(xr, dyr, gamma, mean, rstd, cr, dxr, copyr, lane, dim, n_sel, weight,
                                          row_val);
    }
}

// mode 0 (prm) or 1 (nrd); x may not alias dx or dy; dx_copy: nullptr or [rows, dim] bf16.
// dim <= 768.
extern "C" __global__ void prm_layernorm_loss_backward_f32_d768(
        const float* __restrict__ x, const float* __restrict__ dy, const float* __restrict__ gamma,
        const float* __restrict__ mean, const float* __restrict__ rstd, const float* __restrict__ c,
        const int* __restrict__ cu_seqlens, int images, int dim, int skip, int mode, float weight,
        float* __restrict__ dx, __nv_bfloat16* __restrict__ dx_copy, float* __restrict__ row_val) {
    const int lane = threadIdx.x % PRM_WARP_SIZE;
    const int row = blockIdx.x * PRM_LNLOSS_ROWS_PER_BLOCK + threadIdx.x / PRM_WARP_SIZE;
    const int rows = cu_seqlens[images];
    if (row >= rows) return;  // whole warp leaves together; no block barrier in this kernel
    const int b = prm_image_of_row(cu_seqlens, images, row);
    const int first = cu_seqlens[b];
    const int n_sel = cu_seqlens[b + 1] - first - skip;
    const bool selected = row - first >= skip;
    const size_t at = (size_t)row * dim;
    __nv_bfloat16* copyr = dx_copy ? dx_copy + at : nullptr;
    const float m = mean[row], rs = rstd[row];
    if (dim == PRM_LNLOSS_PER_LANE * PRM_WARP_SIZE) {
        prm_lnloss_row<true, PRM_LNLOSS_PER_LANE>(x + at, dy + at, gamma, m, rs, c + at, dx + at, copyr, lane, dim,
                                                  n_sel, weight, mode, selected, row_val + row);
    } else {
        prm_lnloss_row<false, PRM_LNLOSS_PER_LANE>(x + at, dy + at, gamma, m, rs, c + at, dx + at, copyr, lane, dim,
                                                   n_sel, weight, mode, selected, row_val + row);
    }
}
PRM_REGISTER_KERNEL(prm_layernorm_loss_backward_f32_d768);
