// attention_tc_common.cuh: the register-level steps that the tensor-core attention kernels v3
// (attention_tc3.cu) and v4 (attention_tc4.cu) share, so that both run the same arithmetic in the
// same order (v4's results are v3's, bit for bit). They work on mma fragments only, never on
// shared memory: the kernels differ in where their operands live, not in these steps.
//
// Fragment layout (mma.cuh's C layout, g = lane / 4, t = 2·(lane % 4)): a warp owns 16 rows; in
// acc[nt][i] of a 16 × (8·N) block, element i is row g + 8·(i / 2), column nt·8 + t + (i % 2).
// rows[r] is the sequence index of row g + 8·r. Scores are scaled by 1/√HD (1/8 at 64); softmax
// runs in log2 units (exp2 with log2(e)/√HD folded into the scale); lse is stored in natural-log
// units.
//
// Head dims: v4 runs heads of 64; v3 every multiple of 8 from 64 to 128 (PrmAttHead<HD>). The
// steps take the head dim as a template parameter defaulting to 64, which is the code they had
// before other head dims existed (the same SASS at 64).
//
// Every multiply-add here is spelled out (PRM_FMUL_RN / PRM_FADD_RN, or fmaf where one rounding is
// meant): nvcc contracts `a * b + c` into an FMA or not depending on the code around it, so the
// same expression in two paths (a whole tile and a masked one, v3 and v4) could round differently
// on the GPU while the simulator, which never contracts, saw the same bits. The spelled-out forms
// are the ones nvcc chose before (sm_90 SASS, 2026-12-04): the softmax's scale, subtraction and
// running sum unfused, the backward's exponent `s·scale − lse` and the forward's lse one FMA.
#pragma once
#include "common.cuh"
#include "mma.cuh"
#include "rounded.cuh"

#define PRM_ATT_SCALE 0.125f                              // 1/√64
#define PRM_ATT_SCALE_LOG2 (0.125f * 1.4426950408889634f)  // 1/√64 · log2(e)
#define PRM_ATT_LOG2E 1.4426950408889634f
#define PRM_ATT_LN2 0.6931471805599453f

// Compile-time shape of heads HD wide in the tensor-core kernels: products over the head dim
// run in k-steps of 16, so a head dim that is not a multiple of 16 (72, 88, 104, 120) is padded
// to KP with zero columns, which add exact zeros.
template <int HD>
struct PrmAttHead {
    static_assert(HD % 8 == 0 && HD >= 64 && HD <= 128, "head dims are multiples of 8, 64 to 128");
    static constexpr int KP = (HD + 15) / 16 * 16;  // the head dim in whole k-steps
    static constexpr int KS = KP / 16;              // k-steps (and 16-column n-tile pairs) over it
    static constexpr int NT = KP / 8;               // 8-column n-tiles over KP (accumulators)
    static constexpr int NS = HD / 8;               // of them, the n-tiles a store writes
};

// The score scale 1/√HD (the reference's fp32 value) and its product with log2(e). At 64 the
// literals the kernels were written with.
template <int HD>
__device__ __forceinline__ float prm_att_scale() {
    return HD == 64 ? PRM_ATT_SCALE : 1.0f / sqrtf((float)HD);
}
template <int HD>
__device__ __forceinline__ float prm_att_scale_log2() {
    return HD == 64 ? PRM_ATT_SCALE_LOG2 : prm_att_scale<HD>() * PRM_ATT_LOG2E;
}

// A compile-time flag passed as a generic lambda's argument (C++17 has no template lambdas):
// `[&](auto full) { constexpr bool FULL = decltype(full)::value; ... }(prm_flag<true>{})`.
template <bool B>
struct prm_flag {
    static constexpr bool value = B;
};

// 2^x with subnormal results flushed to zero: one MUFU.EX2 (`ex2.approx.ftz`). exp2f is the
// same instruction for normal results but adds a range test and two multiplies per call to keep
// the subnormal ones (x < −126), and the softmax takes one per score: P < 2^−126 is nothing to
// a row whose largest element is 1. The simulator flushes the same results.
__device__ __forceinline__ float prm_att_exp2(float x) {
#ifdef __CUDACC__
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#else
    return x < -126.0f ? 0.0f : exp2f(x);
#endif
}

template <int N>
__device__ __forceinline__ void prm_att_zero(float acc[N][4]) {
#pragma unroll
    for (int nt = 0; nt < N; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;
}

// The A fragment (one k-step) packed to bf16 from two n-tiles of accumulators.
__device__ __forceinline__ void prm_att_pack_a(uint32_t a[4], const float lo[4], const float hi[4]) {
    a[0] = prm_pack_bf16x2(lo[0], lo[1]);
    a[1] = prm_pack_bf16x2(lo[2], lo[3]);
    a[2] = prm_pack_bf16x2(hi[0], hi[1]);
    a[3] = prm_pack_bf16x2(hi[2], hi[3]);
}

// Writes the first N n-tiles (16 × 8·N) of a warp's accumulator block, times mul[r], as bf16 to
// rows rows[r] (below `valid`) of a row-major bf16 matrix g (stride ld, column offset off).
template <int N = 8>
__device__ __forceinline__ void prm_att_store_bf16(__nv_bfloat16* g, size_t ld, int off, const int rows[2], int valid,
                                                   const float acc[][4], const float mul[2]) {
    const int t = (threadIdx.x & 3) * 2;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (rows[r] >= valid) continue;
        __nv_bfloat16* dst = g + (size_t)rows[r] * ld + off + t;
#pragma unroll
        for (int nt = 0; nt < N; ++nt)
            prm_store_vec(dst + nt * 8, prm_pack_bf16x2(acc[nt][2 * r] * mul[r], acc[nt][2 * r + 1] * mul[r]));
    }
}

// One 64-key tile of the forward's online softmax: the raw scores s (16 × 64, keys k0 + column)
// become P = exp2(s·scale − m) with the running row maxima m (log2 units) and sums l updated and
// the context accumulators o (PrmAttHead<HD>::NT n-tiles) rescaled. Columns at or past `kvalid`,
// and (causal) keys after the row, are masked. FULL: the caller knows no column is (kvalid = 64,
// not causal), and the masks are left out (the same arithmetic on the same values).
template <bool FULL = false, int HD = 64>
__device__ __forceinline__ void prm_att_online_softmax(float s[8][4], float m[2], float l[2], float o[][4], int kvalid,
                                                       int causal, int k0, const int rows[2]) {
    const int t = (threadIdx.x & 3) * 2;
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int c = nt * 8 + t + (i & 1), r = i >> 1;
            float v = PRM_FMUL_RN(s[nt][i], prm_att_scale_log2<HD>());
            if (!FULL && (c >= kvalid || (causal && k0 + c > rows[r]))) v = -INFINITY;
            s[nt][i] = v;
            mx[r] = fmaxf(mx[r], v);
        }
    float corr[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        corr[r] = mx[r] == -INFINITY ? 1.0f : prm_att_exp2(m[r] - mx[r]);
        m[r] = mx[r];
    }
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = i >> 1;
            const float p = m[r] == -INFINITY ? 0.0f : prm_att_exp2(PRM_FSUB_RN(s[nt][i], m[r]));
            s[nt][i] = p;
            sum[r] += p;
            if (nt < PrmAttHead<HD>::NT) o[nt][i] *= corr[r];
        }
    // Heads wider than 64 have more context n-tiles than a tile has score n-tiles.
#pragma unroll
    for (int nt = 8; nt < PrmAttHead<HD>::NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[nt][i] *= corr[i >> 1];
    l[0] = PRM_FADD_RN(PRM_FMUL_RN(l[0], corr[0]), sum[0]);
    l[1] = PRM_FADD_RN(PRM_FMUL_RN(l[1], corr[1]), sum[1]);
}

// The end of a query block in the forward: row sums over the quad, the context o / l stored in
// bf16 to out (row stride width, head h's HD columns), and lse[h·total + row0 + row] in
// natural-log units.
template <int HD = 64>
__device__ __forceinline__ void prm_att_finish(__nv_bfloat16* out, float* lse, const float o[][4], const float m[2],
                                               float l[2], const int rows[2], int T, int row0, int h, int width,
                                               int total) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        inv[r] = 1.0f / l[r];
    }
    prm_att_store_bf16<PrmAttHead<HD>::NS>(out + (size_t)row0 * width, width, h * HD, rows, T, o, inv);
    if ((threadIdx.x & 3) == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r)
            if (rows[r] < T) lse[(size_t)h * total + row0 + rows[r]] = fmaf(m[r], PRM_ATT_LN2, logf(l[r]));
    }
}

// dQ's step for one half tile (keys k0 + half·32 .. +32): s holds S = Q·Kᵀ and dp dP = dO·Vᵀ;
// s becomes dS = P ⊙ (dP − delta) / √HD with P = exp2(S·scale − lse2), masked to 0 at or past
// `kvalid`, for rows past T, and (causal) for keys after the row. FULL: the caller knows nothing
// is masked (kvalid = 64, the warp's 16 rows below T, not causal).
template <bool FULL = false, int HD = 64>
__device__ __forceinline__ void prm_att_dq_ds(float s[4][4], const float dp[4][4], int half, int kvalid, int causal,
                                              int k0, const int rows[2], int T, const float lse2[2],
                                              const float row_delta[2]) {
    const int t = (threadIdx.x & 3) * 2;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int c = half * 32 + nt * 8 + t + (i & 1), r = i >> 1;
            const bool ok = FULL || (rows[r] < T && c < kvalid && !(causal && k0 + c > rows[r]));
            const float p = ok ? prm_att_exp2(fmaf(s[nt][i], prm_att_scale_log2<HD>(), -lse2[r])) : 0.0f;
            s[nt][i] = p * (dp[nt][i] - row_delta[r]) * prm_att_scale<HD>();  // dS, scaled
        }
}

// dK/dV's Pᵀ for one half tile (queries q0 + half·32 .. +32): from Sᵀ = K·Qᵀ in st, Pᵀ =
// exp2(Sᵀ·scale − lse2[query]) (tl: the tile's per-query lse in log2 units), masked to 0 for keys
// past T, queries at or past `qvalid` and (causal) keys after the query, rounded to bf16 once
// into pb (two k-steps of A fragments): it feeds both dV and dS. FULL: the caller knows nothing
// is masked (qvalid = 64, the warp's 16 keys below T, not causal).
template <bool FULL = false, int HD = 64>
__device__ __forceinline__ void prm_att_dkdv_pt(uint32_t pb[2][4], float st[4][4], int half, int qvalid, int causal,
                                                int q0, const int keys[2], int T, const float* tl) {
    const int t = (threadIdx.x & 3) * 2;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int c = half * 32 + nt * 8 + t + (i & 1), r = i >> 1;
            const bool ok = FULL || (keys[r] < T && c < qvalid && !(causal && keys[r] > q0 + c));
            st[nt][i] = ok ? prm_att_exp2(fmaf(st[nt][i], prm_att_scale_log2<HD>(), -tl[c])) : 0.0f;
        }
    prm_att_pack_a(pb[0], st[0], st[1]);
    prm_att_pack_a(pb[1], st[2], st[3]);
}

// dK/dV's dSᵀ for one half tile: dpt holds dPᵀ = V·dOᵀ and becomes Pᵀ ⊙ (dPᵀ − delta[query]) / √HD
// with Pᵀ the bf16 values in pb (tdel: the tile's per-query delta).
template <int HD = 64>
__device__ __forceinline__ void prm_att_dkdv_dst(float dpt[4][4], const uint32_t pb[2][4], int half,
                                                 const float* tdel) {
    const int t = (threadIdx.x & 3) * 2;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int c = half * 32 + nt * 8 + t + (i & 1);
            const uint32_t w = pb[nt >> 1][(nt & 1) * 2 + (i >> 1)];
            const float p = __uint_as_float((i & 1) ? (w & 0xffff0000u) : (w << 16));
            dpt[nt][i] = p * (dpt[nt][i] - tdel[c]) * prm_att_scale<HD>();  // dSᵀ, scaled
        }
}
