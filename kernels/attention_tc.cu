// attention_tc.cu: fused multi-head attention on tensor cores (mma.sync m16n8k16, bf16 operands,
// fp32 accumulation) over packed variable-length sequences, forward and input-gradient backward.
//
// Launchers: src/gpu/kernels/attention/tc2.rs (attention_forward_tc, attention_backward_tc); the
// engine uses them at --precision bf16. The SIMT kernels of attention.cu stay the fp32 variant
// and the checked reference for these (llm.c style: same contract, two versions).
//
// Layouts (as attention.cu; N = ΣT_i tokens, D = width, HD = head dim, heads = D / HD):
//   qkv        [N, 3D] fp32   q | k | v along features, head h in columns h·HD .. +HD of each part
//   cu_seqlens [B+1]   int
//   out, d_out [N, D]  fp32
//   lse, delta [heads, N] fp32, index h·N + row (scores already scaled by 1/√HD)
//   d_qkv      [N, 3D] fp32, every element written (q part by the dQ kernel, k and v parts by
//              the dK/dV kernel)
// Precision: q, k, v, dO and the probabilities P / dS are rounded to bf16 where they enter a
// product; every product accumulates in fp32; the softmax statistics, lse, delta and all
// outputs are fp32.
// Modes: the forward takes mode 0 (q·kᵀ), 1 (q·qᵀ) and 2 (k·kᵀ), causal or not; the backward
// takes mode 0, causal or not. The launcher sends every other case to attention.cu.
//
// Head dims: every multiple of 8 from 64 to 128, one instantiation each: 64 with the kernels'
// plain names, the others suffixed _hd<HD> (open_clip's ViT-H/14 has 80, ViT-g/14 88,
// ViT-bigG/14 104). Up to 96, dK/dV is one kernel; wider heads run it as two (dV, then dK), each
// holding one 16×HD accumulator a warp, since both together spill registers. Products over the
// head dim run in k-steps of 16: a head dim that is not a multiple of 16 (72, 88, 104, 120) is
// padded with zero columns in the row-major tiles (KP = HD rounded up to 16), which adds exact
// zeros.
//
// Tiling (FlashAttention-2): 128 threads = 4 warps per CTA; a warp owns 16 rows of the CTA's
// 64-row tile and keeps its scores and accumulators in mma fragments (registers). The other
// operand's 64-row tiles pass through shared memory as bf16: row-major [64 rows][KP] or
// transposed [HD][64 keys], every tile max(64, KP) rows of LD = max(64, KP) + 8 elements (36,
// 44, 52, 60, 68 words at KP 64 .. 128: a fragment load's 32 lanes touch 32 distinct banks).
// Dynamic shared memory, sized by tc2.rs (tc2_shared_bytes mirrors the carves below).
//   forward  one CTA per (64-query tile, head, sequence); loops over 64-key tiles with an online
//            softmax; Q and K row-major and V transposed in shared memory (27 KB at 64).
//   dQ       one CTA per (64-query tile, head, sequence); loops over 64-key tiles recomputing
//            P = exp(S − lse); K row-major and transposed, V row-major (27 KB at 64).
//   dK/dV    one CTA per (64-key tile, head, sequence); loops over 64-query tiles recomputing
//            Pᵀ = exp(K·Qᵀ/√HD − lse); Q and dO row-major and transposed (37 KB at 64).
//   delta = rowsum(dO ⊙ O) comes first, from attention.cu's prm_attention_delta_f32.
// CTAs whose tile starts past their sequence's end exit before any barrier. No atomics; fixed
// reduction order; deterministic.
#include "common.cuh"
#include "mma.cuh"

#define TC_TILE 64

// Compile-time shape of one head dim.
template <int HD>
struct PrmTcHead {
    static_assert(HD % 8 == 0 && HD >= 64 && HD <= 128, "head dims are multiples of 8, 64 to 128");
    static constexpr int KP = (HD + 15) / 16 * 16;                // head dim in whole k-steps
    static constexpr int KS = KP / 16;                            // k-steps over the head dim
    static constexpr int NH = HD / 8;                             // n-tiles over the head dim
    static constexpr int ROWS = KP > TC_TILE ? KP : TC_TILE;      // rows of every tile
    static constexpr int LD = ROWS + 8;                           // bf16 row stride of every tile
    static constexpr int TILE = ROWS * LD;                        // bf16 elements of a tile
};

// 1/√HD rounded to fp32 (0.125 at 64), as the reference computes it.
template <int HD>
__device__ __forceinline__ float prm_tc_scale() {
    return 1.0f / sqrtf((float)HD);
}

// Column offsets of the score operands X (rows) and Y (columns) of S = X·Yᵀ, as in attention.cu.
template <int HD>
__device__ __forceinline__ int prm_tc_xoff(int mode, int width, int h) { return (mode == 2 ? width : 0) + h * HD; }
template <int HD>
__device__ __forceinline__ int prm_tc_yoff(int mode, int width, int h) { return (mode == 1 ? 0 : width) + h * HD; }

// Rows r0 .. r0+64 of an HD-wide fp32 column block (row stride ld, column offset off; rows at or
// past `valid` read as zeros) into shared memory as bf16: row-major into `dst` (dst[r·LD + c],
// columns HD .. KP zero) and/or transposed into `dstT` (dstT[c·LD + r]). Either may be null.
// 16-byte global loads.
template <int HD>
__device__ __forceinline__ void prm_tc_load_tile(__nv_bfloat16* dst, __nv_bfloat16* dstT, const float* g, size_t ld,
                                                 int off, int r0, int valid) {
    constexpr int LD = PrmTcHead<HD>::LD, KP = PrmTcHead<HD>::KP, CH = HD / 4;
    for (int e = threadIdx.x; e < TC_TILE * CH; e += blockDim.x) {
        // Row-major only: a warp reads whole rows (coalesced). With a transposed copy, a warp
        // takes 32 consecutive rows of one 4-column slice instead, so its 2-byte transposed
        // stores fall in 16 consecutive words (no bank conflicts; the column-fast order put them
        // in 2 banks, 16-way conflicts) at the price of 16-byte rather than row-long reads.
        const int r = dstT ? (e & 63) : (int)((unsigned)e / CH);
        const int c = dstT ? ((e >> 6) * 4) : (int)((unsigned)e % CH) * 4;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (r0 + r < valid) v = prm_load_vec<float4>(g + (size_t)(r0 + r) * ld + off + c);
        if (dst) {
            prm_store_vec(dst + r * LD + c, prm_pack_bf16x2(v.x, v.y));
            prm_store_vec(dst + r * LD + c + 2, prm_pack_bf16x2(v.z, v.w));
        }
        if (dstT) {
            dstT[(c + 0) * LD + r] = __float2bfloat16(v.x);
            dstT[(c + 1) * LD + r] = __float2bfloat16(v.y);
            dstT[(c + 2) * LD + r] = __float2bfloat16(v.z);
            dstT[(c + 3) * LD + r] = __float2bfloat16(v.w);
        }
    }
    if constexpr (KP > HD) {  // the padding columns a k-step over the head dim reads: zeros
        constexpr int PAIRS = (KP - HD) / 2;
        if (dst) {
            for (int e = threadIdx.x; e < TC_TILE * PAIRS; e += blockDim.x) {
                const int r = e / PAIRS, c = HD + 2 * (e % PAIRS);
                prm_store_vec(dst + r * LD + c, 0u);
            }
        }
    }
}

// The A fragment of the 16×16 block at (row0, col0) of a row-major bf16 tile of row stride LD.
template <int LD>
__device__ __forceinline__ void prm_tc_frag_a(uint32_t a[4], const __nv_bfloat16* s, int row0, int col0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = (lane & 3) * 2;
    a[0] = prm_ld_bf16x2(s + (row0 + g) * LD + col0 + t);
    a[1] = prm_ld_bf16x2(s + (row0 + g + 8) * LD + col0 + t);
    a[2] = prm_ld_bf16x2(s + (row0 + g) * LD + col0 + t + 8);
    a[3] = prm_ld_bf16x2(s + (row0 + g + 8) * LD + col0 + t + 8);
}

// The B fragment (16 k × 8 n) with B[k][n] = s[(n0 + n)·LD + k0 + k]: the tile holds Bᵀ row-major.
template <int LD>
__device__ __forceinline__ void prm_tc_frag_b(uint32_t b[2], const __nv_bfloat16* s, int n0, int k0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = (lane & 3) * 2;
    b[0] = prm_ld_bf16x2(s + (n0 + g) * LD + k0 + t);
    b[1] = prm_ld_bf16x2(s + (n0 + g) * LD + k0 + t + 8);
}

// acc (16 rows × 8·NT) += A (16 × 16·KS, KS k-steps of A fragments) · B where B[k][n] is held
// transposed in the bf16 tile `bt` (bt[n·LD + k]).
template <int KS, int NT, int LD>
__device__ __forceinline__ void prm_tc_mma(float acc[NT][4], const uint32_t a[KS][4], const __nv_bfloat16* bt) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            uint32_t b[2];
            prm_tc_frag_b<LD>(b, bt, nt * 8, ks * 16);
            prm_mma_bf16_16816(acc[nt], a[ks], b);
        }
    }
}

// The A fragments (four k-steps) of a 16×64 block held as accumulators acc[8][4]: n-tiles 2j and
// 2j+1 form k-step j (the C layout of two n-tiles is the A layout of one 16×16 block).
__device__ __forceinline__ void prm_tc_acc_to_a(uint32_t a[4][4], const float acc[8][4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        a[j][0] = prm_pack_bf16x2(acc[2 * j][0], acc[2 * j][1]);
        a[j][1] = prm_pack_bf16x2(acc[2 * j][2], acc[2 * j][3]);
        a[j][2] = prm_pack_bf16x2(acc[2 * j + 1][0], acc[2 * j + 1][1]);
        a[j][3] = prm_pack_bf16x2(acc[2 * j + 1][2], acc[2 * j + 1][3]);
    }
}

template <int NT>
__device__ __forceinline__ void prm_tc_zero(float acc[NT][4]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;
}

// Writes a warp's 16×(8·NT) accumulator block to rows `row0 + rows[0|1]` (local rows below
// `valid`) of a row-major fp32 matrix (stride ld, column offset off), times `mul`.
template <int NT>
__device__ __forceinline__ void prm_tc_store(float* g, size_t ld, int off, const int rows[2], int valid,
                                             const float acc[NT][4], const float mul[2]) {
    const int t = (threadIdx.x & 3) * 2;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (rows[r] >= valid) continue;
        float* dst = g + (size_t)rows[r] * ld + off + t;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
            prm_store_vec(dst + nt * 8, make_float2(acc[nt][2 * r] * mul[r], acc[nt][2 * r + 1] * mul[r]));
    }
}

// Shared carve (bf16 tiles of PrmTcHead<HD>::TILE elements): sQ | sK | sVt.
template <int HD>
__device__ __forceinline__ void prm_tc_forward(const float* __restrict__ qkv, const int* __restrict__ cu_seqlens,
                                               float* __restrict__ out, float* __restrict__ lse, int width, int total,
                                               int mode, int causal) {
    using H = PrmTcHead<HD>;
    constexpr int LD = H::LD, KS = H::KS, NH = H::NH;
    PRM_DYNAMIC_SHARED(__nv_bfloat16, smem);
    __nv_bfloat16* sQ = smem;
    __nv_bfloat16* sK = sQ + H::TILE;
    __nv_bfloat16* sVt = sK + H::TILE;
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int q0 = blockIdx.x * TC_TILE;
    if (q0 >= T) return;  // whole CTA, before any barrier
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = (lane & 3) * 2;
    const size_t ld = 3 * (size_t)width;
    const float* base = qkv + (size_t)row0 * ld;
    const int rows[2] = {q0 + warp * 16 + (lane >> 2), q0 + warp * 16 + (lane >> 2) + 8};
    const float scale = prm_tc_scale<HD>();

    prm_tc_load_tile<HD>(sQ, nullptr, base, ld, prm_tc_xoff<HD>(mode, width, h), q0, T);
    __syncthreads();
    uint32_t qa[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) prm_tc_frag_a<LD>(qa[ks], sQ, warp * 16, ks * 16);

    float o[NH][4];
    prm_tc_zero<NH>(o);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    const int kend = causal ? min(T, q0 + TC_TILE) : T;
    for (int k0 = 0; k0 < kend; k0 += TC_TILE) {
        __syncthreads();  // the previous tile's sK / sVt are consumed
        prm_tc_load_tile<HD>(sK, nullptr, base, ld, prm_tc_yoff<HD>(mode, width, h), k0, T);
        prm_tc_load_tile<HD>(nullptr, sVt, base, ld, 2 * width + h * HD, k0, T);
        __syncthreads();
        float s[8][4];
        prm_tc_zero<8>(s);
        prm_tc_mma<KS, 8, LD>(s, qa, sK);

        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int col = k0 + nt * 8 + t + (i & 1), r = i >> 1;
                float v = s[nt][i] * scale;
                if (col >= T || (causal && col > rows[r])) v = -INFINITY;
                s[nt][i] = v;
                mx[r] = fmaxf(mx[r], v);
            }
        float corr[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            corr[r] = mx[r] == -INFINITY ? 1.0f : __expf(m[r] - mx[r]);
            m[r] = mx[r];
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = i >> 1;
                const float p = m[r] == -INFINITY ? 0.0f : __expf(s[nt][i] - m[r]);
                s[nt][i] = p;
                sum[r] += p;
            }
#pragma unroll
        for (int nt = 0; nt < NH; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) o[nt][i] *= corr[i >> 1];
        l[0] = l[0] * corr[0] + sum[0];
        l[1] = l[1] * corr[1] + sum[1];
        uint32_t pa[4][4];
        prm_tc_acc_to_a(pa, s);
        prm_tc_mma<4, NH, LD>(o, pa, sVt);
    }
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        inv[r] = 1.0f / l[r];
    }
    prm_tc_store<NH>(out + (size_t)row0 * width, width, h * HD, rows, T, o, inv);
    if (t == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r)
            if (rows[r] < T) lse[(size_t)h * total + row0 + rows[r]] = m[r] + logf(l[r]);
    }
}

// Shared carve (bf16 tiles): sK | sKt | sV.
template <int HD>
__device__ __forceinline__ void prm_tc_bwd_dq(const float* __restrict__ qkv, const float* __restrict__ d_out,
                                              const float* __restrict__ lse, const float* __restrict__ delta,
                                              const int* __restrict__ cu_seqlens, float* __restrict__ d_qkv,
                                              int width, int total, int causal) {
    using H = PrmTcHead<HD>;
    constexpr int LD = H::LD, KS = H::KS, NH = H::NH;
    PRM_DYNAMIC_SHARED(__nv_bfloat16, smem);
    __nv_bfloat16* sK = smem;
    __nv_bfloat16* sKt = sK + H::TILE;
    __nv_bfloat16* sV = sKt + H::TILE;
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int q0 = blockIdx.x * TC_TILE;
    if (q0 >= T) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = (lane & 3) * 2;
    const size_t ld = 3 * (size_t)width;
    const float* base = qkv + (size_t)row0 * ld;
    const int rows[2] = {q0 + warp * 16 + (lane >> 2), q0 + warp * 16 + (lane >> 2) + 8};
    const float scale = prm_tc_scale<HD>();

    // Q and dO fragments of this warp's rows, staged through the K / V tiles.
    prm_tc_load_tile<HD>(sK, nullptr, base, ld, h * HD, q0, T);
    prm_tc_load_tile<HD>(sV, nullptr, d_out + (size_t)row0 * width, width, h * HD, q0, T);
    __syncthreads();
    uint32_t qa[KS][4], da[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        prm_tc_frag_a<LD>(qa[ks], sK, warp * 16, ks * 16);
        prm_tc_frag_a<LD>(da[ks], sV, warp * 16, ks * 16);
    }
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const bool ok = rows[r] < T;
        row_lse[r] = ok ? lse[(size_t)h * total + row0 + rows[r]] : 0.0f;
        row_delta[r] = ok ? delta[(size_t)h * total + row0 + rows[r]] : 0.0f;
    }

    float dq[NH][4];
    prm_tc_zero<NH>(dq);
    const int kend = causal ? min(T, q0 + TC_TILE) : T;
    for (int k0 = 0; k0 < kend; k0 += TC_TILE) {
        __syncthreads();  // previous tiles consumed (and the staging reads done)
        prm_tc_load_tile<HD>(sK, sKt, base, ld, width + h * HD, k0, T);
        prm_tc_load_tile<HD>(sV, nullptr, base, ld, 2 * width + h * HD, k0, T);
        __syncthreads();
        float s[8][4], dp[8][4];
        prm_tc_zero<8>(s);
        prm_tc_zero<8>(dp);
        prm_tc_mma<KS, 8, LD>(s, qa, sK);   // S = Q·Kᵀ
        prm_tc_mma<KS, 8, LD>(dp, da, sV);  // dP = dO·Vᵀ
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int col = k0 + nt * 8 + t + (i & 1), r = i >> 1;
                const bool ok = rows[r] < T && col < T && !(causal && col > rows[r]);
                const float p = ok ? __expf(s[nt][i] * scale - row_lse[r]) : 0.0f;
                s[nt][i] = p * (dp[nt][i] - row_delta[r]) * scale;  // dS, scaled
            }
        uint32_t dsa[4][4];
        prm_tc_acc_to_a(dsa, s);
        prm_tc_mma<4, NH, LD>(dq, dsa, sKt);  // dQ += dS·K
    }
    const float one[2] = {1.0f, 1.0f};
    prm_tc_store<NH>(d_qkv + (size_t)row0 * ld, ld, h * HD, rows, T, dq, one);
}

// Shared carve (bf16 tiles, then fp32): sQ | sQt | sD | sDt | sLse [64] | sDelta [64].
// PART: PRM_TC_DKDV both gradients in one pass (head dims to 96); PRM_TC_DV or PRM_TC_DK one of
// them (wider heads, two launches: a warp then holds one 16×HD accumulator instead of two, so
// the kernel fits the register file without spilling). Each part computes its gradient with
// the same operations in the same order as the one-pass kernel.
#define PRM_TC_DKDV 0
#define PRM_TC_DV 1
#define PRM_TC_DK 2
template <int HD, int PART>
__device__ __forceinline__ void prm_tc_bwd_dkdv(const float* __restrict__ qkv, const float* __restrict__ d_out,
                                                const float* __restrict__ lse, const float* __restrict__ delta,
                                                const int* __restrict__ cu_seqlens, float* __restrict__ d_qkv,
                                                int width, int total, int causal) {
    using H = PrmTcHead<HD>;
    constexpr int LD = H::LD, KS = H::KS, NH = H::NH;
    constexpr bool WANT_DV = PART != PRM_TC_DK, WANT_DK = PART != PRM_TC_DV;
    PRM_DYNAMIC_SHARED(__nv_bfloat16, smem);
    __nv_bfloat16* sQ = smem;
    __nv_bfloat16* sQt = sQ + H::TILE;
    __nv_bfloat16* sD = sQt + H::TILE;
    __nv_bfloat16* sDt = sD + H::TILE;
    float* sLse = reinterpret_cast<float*>(sDt + H::TILE);  // TILE is even: 4-byte aligned
    float* sDelta = sLse + TC_TILE;
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int k0 = blockIdx.x * TC_TILE;
    if (k0 >= T) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = (lane & 3) * 2;
    const size_t ld = 3 * (size_t)width;
    const float* base = qkv + (size_t)row0 * ld;
    const float* dbase = d_out + (size_t)row0 * width;
    const int keys[2] = {k0 + warp * 16 + (lane >> 2), k0 + warp * 16 + (lane >> 2) + 8};
    const float scale = prm_tc_scale<HD>();

    // K and V fragments of this warp's keys, staged through the Q / dO tiles (V only for dK).
    prm_tc_load_tile<HD>(sQ, nullptr, base, ld, width + h * HD, k0, T);
    if constexpr (WANT_DK) prm_tc_load_tile<HD>(sD, nullptr, base, ld, 2 * width + h * HD, k0, T);
    __syncthreads();
    uint32_t ka[KS][4], va[WANT_DK ? KS : 1][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        prm_tc_frag_a<LD>(ka[ks], sQ, warp * 16, ks * 16);
        if constexpr (WANT_DK) prm_tc_frag_a<LD>(va[ks], sD, warp * 16, ks * 16);
    }

    float dk[WANT_DK ? NH : 1][4], dv[WANT_DV ? NH : 1][4];
    if constexpr (WANT_DK) prm_tc_zero<NH>(dk);
    if constexpr (WANT_DV) prm_tc_zero<NH>(dv);
    // Causal: queries before this key tile see none of its keys (tiles are 64-aligned).
    for (int q0 = causal ? k0 : 0; q0 < T; q0 += TC_TILE) {
        __syncthreads();  // previous tiles consumed (and the staging reads done)
        prm_tc_load_tile<HD>(sQ, WANT_DK ? sQt : nullptr, base, ld, h * HD, q0, T);
        prm_tc_load_tile<HD>(WANT_DK ? sD : nullptr, WANT_DV ? sDt : nullptr, dbase, width, h * HD, q0, T);
        for (int i = threadIdx.x; i < TC_TILE; i += blockDim.x) {
            const bool ok = q0 + i < T;
            sLse[i] = ok ? lse[(size_t)h * total + row0 + q0 + i] : 0.0f;
            sDelta[i] = ok ? delta[(size_t)h * total + row0 + q0 + i] : 0.0f;
        }
        __syncthreads();
        float st[8][4], dpt[WANT_DK ? 8 : 1][4];
        prm_tc_zero<8>(st);
        prm_tc_mma<KS, 8, LD>(st, ka, sQ);  // Sᵀ = K·Qᵀ
        if constexpr (WANT_DK) {
            prm_tc_zero<8>(dpt);
            prm_tc_mma<KS, 8, LD>(dpt, va, sD);  // dPᵀ = V·dOᵀ
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int c = nt * 8 + t + (i & 1), q = q0 + c, r = i >> 1;
                const bool ok = keys[r] < T && q < T && !(causal && keys[r] > q);
                const float p = ok ? __expf(st[nt][i] * scale - sLse[c]) : 0.0f;
                st[nt][i] = p;
                if constexpr (WANT_DK) dpt[nt][i] = p * (dpt[nt][i] - sDelta[c]) * scale;  // dSᵀ, scaled
            }
        uint32_t pa[4][4];
        if constexpr (WANT_DV) {
            prm_tc_acc_to_a(pa, st);
            prm_tc_mma<4, NH, LD>(dv, pa, sDt);  // dV += Pᵀ·dO
        }
        if constexpr (WANT_DK) {
            prm_tc_acc_to_a(pa, dpt);
            prm_tc_mma<4, NH, LD>(dk, pa, sQt);  // dK += dSᵀ·Q
        }
    }
    const float one[2] = {1.0f, 1.0f};
    if constexpr (WANT_DK) prm_tc_store<NH>(d_qkv + (size_t)row0 * ld, ld, width + h * HD, keys, T, dk, one);
    if constexpr (WANT_DV) prm_tc_store<NH>(d_qkv + (size_t)row0 * ld, ld, 2 * width + h * HD, keys, T, dv, one);
}

// The entry points of one head dim (parameter lists as tc2.rs passes them): forward and dQ,
// then dK/dV as one kernel (PRM_TC2_KERNELS) or as dV and dK (PRM_TC2_KERNELS_SPLIT, wider heads).
#define PRM_TC2_FORWARD_DQ(HD, SUFFIX)                                                                                 \
    extern "C" __global__ void prm_attention_forward_tc##SUFFIX(                                                       \
        const float* __restrict__ qkv, const int* __restrict__ cu_seqlens, float* __restrict__ out,                    \
        float* __restrict__ lse, int width, int total, int mode, int causal) {                                         \
        prm_tc_forward<HD>(qkv, cu_seqlens, out, lse, width, total, mode, causal);                                     \
    }                                                                                                                  \
    extern "C" __global__ void prm_attention_bwd_dq_tc##SUFFIX(                                                        \
        const float* __restrict__ qkv, const float* __restrict__ d_out, const float* __restrict__ lse,                 \
        const float* __restrict__ delta, const int* __restrict__ cu_seqlens, float* __restrict__ d_qkv, int width,     \
        int total, int causal) {                                                                                       \
        prm_tc_bwd_dq<HD>(qkv, d_out, lse, delta, cu_seqlens, d_qkv, width, total, causal);                            \
    }

// A dK/dV entry point: NAME runs prm_tc_bwd_dkdv<HD, PART>.
#define PRM_TC2_DKDV(NAME, HD, PART)                                                                                   \
    extern "C" __global__ void NAME(const float* __restrict__ qkv, const float* __restrict__ d_out,                    \
                                    const float* __restrict__ lse, const float* __restrict__ delta,                    \
                                    const int* __restrict__ cu_seqlens, float* __restrict__ d_qkv, int width,          \
                                    int total, int causal) {                                                           \
        prm_tc_bwd_dkdv<HD, PART>(qkv, d_out, lse, delta, cu_seqlens, d_qkv, width, total, causal);                    \
    }

#define PRM_TC2_KERNELS(HD, SUFFIX)                                                                                    \
    PRM_TC2_FORWARD_DQ(HD, SUFFIX)                                                                                     \
    PRM_TC2_DKDV(prm_attention_bwd_dkdv_tc##SUFFIX, HD, PRM_TC_DKDV)

#define PRM_TC2_KERNELS_SPLIT(HD, SUFFIX)                                                                              \
    PRM_TC2_FORWARD_DQ(HD, SUFFIX)                                                                                     \
    PRM_TC2_DKDV(prm_attention_bwd_dv_tc##SUFFIX, HD, PRM_TC_DV)                                                       \
    PRM_TC2_DKDV(prm_attention_bwd_dk_tc##SUFFIX, HD, PRM_TC_DK)

PRM_TC2_KERNELS(64, )
PRM_TC2_KERNELS(72, _hd72)
PRM_TC2_KERNELS(80, _hd80)
PRM_TC2_KERNELS(88, _hd88)
PRM_TC2_KERNELS(96, _hd96)
PRM_TC2_KERNELS_SPLIT(104, _hd104)
PRM_TC2_KERNELS_SPLIT(112, _hd112)
PRM_TC2_KERNELS_SPLIT(120, _hd120)
PRM_TC2_KERNELS_SPLIT(128, _hd128)

// One line per head dim (build/sim.rs reads every PRM_REGISTER_KERNEL on such a line).
PRM_REGISTER_KERNEL(prm_attention_forward_tc); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_tc);
PRM_REGISTER_KERNEL(prm_attention_forward_tc_hd72); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc_hd72); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_tc_hd72);
PRM_REGISTER_KERNEL(prm_attention_forward_tc_hd80); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc_hd80); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_tc_hd80);
PRM_REGISTER_KERNEL(prm_attention_forward_tc_hd88); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc_hd88); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_tc_hd88);
PRM_REGISTER_KERNEL(prm_attention_forward_tc_hd96); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc_hd96); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_tc_hd96);
PRM_REGISTER_KERNEL(prm_attention_forward_tc_hd104); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc_hd104); PRM_REGISTER_KERNEL(prm_attention_bwd_dv_tc_hd104); PRM_REGISTER_KERNEL(prm_attention_bwd_dk_tc_hd104);
PRM_REGISTER_KERNEL(prm_attention_forward_tc_hd112); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc_hd112); PRM_REGISTER_KERNEL(prm_attention_bwd_dv_tc_hd112); PRM_REGISTER_KERNEL(prm_attention_bwd_dk_tc_hd112);
PRM_REGISTER_KERNEL(prm_attention_forward_tc_hd120); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc_hd120); PRM_REGISTER_KERNEL(prm_attention_bwd_dv_tc_hd120); PRM_REGISTER_KERNEL(prm_attention_bwd_dk_tc_hd120);
PRM_REGISTER_KERNEL(prm_attention_forward_tc_hd128); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc_hd128); PRM_REGISTER_KERNEL(prm_attention_bwd_dv_tc_hd128); PRM_REGISTER_KERNEL(prm_attention_bwd_dk_tc_hd128);
