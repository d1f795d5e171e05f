// attention.cu: fused multi-head attention over packed variable-length sequences, fp32 SIMT.
//
// Launchers: src/gpu/kernels/attention/simt.rs (attention_forward_f32, attention_backward_f32).
//
// Layouts (row-major, packed batch of B sequences, N = ΣT_i tokens, D = width, HD = head dim,
// heads = D / HD):
//   qkv        [N, 3D]   q | k | v along features; head h uses columns h·HD .. h·HD+HD of each part
//   cu_seqlens [B+1] int sequence i holds rows cu_seqlens[i] .. cu_seqlens[i+1]
//   out, d_out [N, D]    head h in columns h·HD .. h·HD+HD
//   lse, delta [heads, N] per (head, row): lse = log Σ_j exp(s_ij) (s already scaled),
//                         delta = Σ_c dO·O (backward scratch). Index h·N + row.
//   d_qkv      [N, 3D]   same layout as qkv; every element is written.
// Head dims: every multiple of 8 from 32 to 128, one instantiation of each kernel per head dim
// (HD 64, the OpenAI towers', keeps the plain names prm_attention_forward_f32, ...; the others
// are suffixed _hd<HD>: open_clip's ViT-H/14 runs prm_attention_forward_f32_hd80). The tensor-
// core versions (attention_tc*.cu) are written for 64 only. scale = 1/√HD in fp32, as the
// reference computes it (0.125 at 64).
//
// Modes (`mode`): 0 = q·kᵀ (standard), 1 = q·qᵀ, 2 = k·kᵀ, 3 = identity (attention matrix I,
// out = v, lse = 0). `causal` != 0 allows key j for query i only when j ≤ i (positions local to
// the sequence). Forward and backward support every mode, causal or not. In modes 1 and 2 the
// score operand appears twice, so its gradient is dS·X + dSᵀ·X: the dK/dV kernel writes the
// dSᵀ·X half and the dQ kernel (launched after it) adds the dS·X half in place; the unused part
// of d_qkv (k in mode 1, q in mode 2, q and k in mode 3) is written with zeros.
//
// Tiling (FlashAttention-2 style, shared memory bounded independently of T):
//   forward   prm_attention_forward_f32: one CTA per (q tile of 64 rows, head, sequence),
//             128 threads, loops over key tiles of 32 with an online softmax kept in registers.
//             Thread t owns rows 4·(t/8) .. +4; in a tile it computes scores for keys t%8 + 8j
//             and accumulates output columns t%8 + 8c. Row statistics are combined across the
//             8 lanes of a row group with shuffles. Dynamic shared memory, sized by the
//             launcher (src/gpu/kernels/attention/simt.rs mirrors each kernel's carve below):
//             41.6 KB at HD 64, 74.4 KB at 128 (opted in above 48 KB).
//   backward  prm_attention_delta_f32: delta = rowsum(dO ⊙ O), one warp per (row, head).
//             prm_attention_bwd_dkdv_f32: one CTA per (key tile of 32, head, sequence), loops
//             over query tiles of 32, recomputes P = exp(s − lse), accumulates dV = Pᵀ·dO and
//             dK = dSᵀ·Q in registers. 42.0 KB shared at HD 64.
//             prm_attention_bwd_dq_f32: one CTA per (query tile of 32, head, sequence), loops over
//             key tiles of 32, accumulates dQ = dS·K in registers. 37.5 KB shared at HD 64.
// Grids are (ceil(max T_i / tile), heads, B); CTAs whose tile starts past their sequence's end
// exit at once (uniformly, before any barrier). No global atomics: every output element is
// owned by exactly one thread of one CTA, reductions run in a fixed order, results are
// bit-for-bit deterministic.
// Precision: fp32 storage and accumulation throughout; expf/logf (not the fast intrinsics).
#include "common.cuh"

#define ATT_THREADS 128

#define FWD_BQ 64
#define FWD_BK 32
#define FWD_LDP (FWD_BK + 1)

#define BWD_B 32                 // query and key tile of the backward kernels
#define BWD_LDP (BWD_B + 1)

// Compile-time shape of one head dim.
template <int HD>
struct PrmAttHead {
    static_assert(HD % 8 == 0 && HD >= 32 && HD <= 128, "head dims are multiples of 8, 32 to 128");
    static constexpr int LD = HD + 1;  // padded shared row stride (odd: no bank conflicts)
    static constexpr int NC = HD / 8;  // output columns a thread owns: t%8 + 8c, c < NC
};

// 1/√HD rounded to fp32, as the reference computes it (1.0 / (hd as f32).sqrt()): exact at 64.
template <int HD>
__device__ __forceinline__ float prm_att_scale() {
    return 1.0f / sqrtf((float)HD);
}

// Column offsets of the score operands: the "query" operand X and the "key" operand Y of
// S = X·Yᵀ, within a qkv row, for head h.
template <int HD>
__device__ __forceinline__ int prm_att_qoff(int mode, int width, int h) {
    return (mode == 2 ? width : 0) + h * HD;
}
template <int HD>
__device__ __forceinline__ int prm_att_koff(int mode, int width, int h) {
    return (mode == 1 ? 0 : width) + h * HD;
}

// Loads rows r0 .. r0+rows of an HD-wide column block of a row-major matrix (row stride ld,
// column offset off, rows >= valid zero-filled) into shared memory with row stride lds.
template <int HD>
__device__ __forceinline__ void prm_att_load_tile(float* s, int lds, const float* g, size_t ld,
                                                  int off, int r0, int rows, int valid) {
    for (int e = threadIdx.x; e < rows * HD; e += blockDim.x) {
        const int r = (int)((unsigned)e / HD), c = (int)((unsigned)e % HD);  // e >= 0
        s[r * lds + c] = (r0 + r < valid) ? g[(size_t)(r0 + r) * ld + off + c] : 0.0f;
    }
}

template <int HD>
__device__ __forceinline__ void prm_att_forward(const float* __restrict__ qkv,
                                                const int* __restrict__ cu_seqlens,
                                                float* __restrict__ out,
                                                float* __restrict__ lse, int width, int total,
                                                int mode, int causal) {
    constexpr int LD = PrmAttHead<HD>::LD, NC = PrmAttHead<HD>::NC;
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int q0 = blockIdx.x * FWD_BQ;
    if (q0 >= T) return;  // whole CTA, before any barrier
    const int tid = threadIdx.x;
    const size_t ld = (size_t)3 * width;
    const int nq = min(FWD_BQ, T - q0);
    const float* base = qkv + (size_t)row0 * ld;

    if (mode == 3) {  // identity: out = v, lse = 0
        for (int e = tid; e < nq * HD; e += blockDim.x) {
            const int r = (int)((unsigned)e / HD), c = (int)((unsigned)e % HD);  // e >= 0
            out[(size_t)(row0 + q0 + r) * width + h * HD + c] =
                base[(size_t)(q0 + r) * ld + 2 * width + h * HD + c];
        }
        for (int r = tid; r < nq; r += blockDim.x) lse[(size_t)h * total + row0 + q0 + r] = 0.0f;
        return;
    }

    // Shared carve (floats): sQ [64 × LD] | sK [32 × LD] | sV [32 × HD] | sP [64 × 33];
    // forward_shared_bytes in simt.rs.
    PRM_DYNAMIC_SHARED(float, smem);
    float* sQ = smem;
    float* sK = sQ + FWD_BQ * LD;
    float* sV = sK + FWD_BK * LD;
    float* sP = sV + FWD_BK * HD;

    const int qoff = prm_att_qoff<HD>(mode, width, h);
    const int koff = prm_att_koff<HD>(mode, width, h);
    const int voff = 2 * width + h * HD;
    const float scale = prm_att_scale<HD>();
    const int rg = tid >> 3, cg = tid & 7;

    prm_att_load_tile<HD>(sQ, LD, base, ld, qoff, q0, FWD_BQ, T);

    float m[4], l[4], acc[4][NC];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < NC; ++c) acc[i][c] = 0.0f;
    }

    const int kend = causal ? min(T, q0 + nq) : T;
    for (int k0 = 0; k0 < kend; k0 += FWD_BK) {
        __syncthreads();  // the previous tile's sK / sV / sP are consumed (and sQ is loaded)
        prm_att_load_tile<HD>(sK, LD, base, ld, koff, k0, FWD_BK, T);
        prm_att_load_tile<HD>(sV, HD, base, ld, voff, k0, FWD_BK, T);
        __syncthreads();

        float s[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) s[i][j] = 0.0f;
#pragma unroll 4
        for (int d = 0; d < HD; ++d) {
            float qv[4], kv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) qv[i] = sQ[(rg * 4 + i) * LD + d];
#pragma unroll
            for (int j = 0; j < 4; ++j) kv[j] = sK[(cg + 8 * j) * LD + d];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) s[i][j] = fmaf(qv[i], kv[j], s[i][j]);
        }

#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int q = q0 + rg * 4 + i;
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int key = k0 + cg + 8 * j;
                const bool ok = key < T && (!causal || key <= q);
                s[i][j] = ok ? s[i][j] * scale : -INFINITY;
                mx = fmaxf(mx, s[i][j]);
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            // Key 0 is allowed for every row, so m_new is finite from the first tile on.
            const float m_new = fmaxf(m[i], mx);
            const float alpha = expf(m[i] - m_new);  // 0 on the first tile (m = -inf)
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float p = expf(s[i][j] - m_new);
                sum += p;
                sP[(rg * 4 + i) * FWD_LDP + cg + 8 * j] = p;
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            sum += __shfl_xor_sync(0xffffffffu, sum, 4);
            l[i] = l[i] * alpha + sum;
            m[i] = m_new;
#pragma unroll
            for (int c = 0; c < NC; ++c) acc[i][c] *= alpha;
        }
        __syncthreads();

#pragma unroll 4
        for (int j = 0; j < FWD_BK; ++j) {
            float pv[4], vv[NC];
#pragma unroll
            for (int i = 0; i < 4; ++i) pv[i] = sP[(rg * 4 + i) * FWD_LDP + j];
#pragma unroll
            for (int c = 0; c < NC; ++c) vv[c] = sV[j * HD + cg + 8 * c];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int c = 0; c < NC; ++c) acc[i][c] = fmaf(pv[i], vv[c], acc[i][c]);
        }
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = rg * 4 + i;
        if (r < nq) {
            const float inv = 1.0f / l[i];
            float* o = out + (size_t)(row0 + q0 + r) * width + h * HD;
#pragma unroll
            for (int c = 0; c < NC; ++c) o[cg + 8 * c] = acc[i][c] * inv;
            if (cg == 0) lse[(size_t)h * total + row0 + q0 + r] = m[i] + logf(l[i]);
        }
    }
}

// delta[h, row] = Σ_c d_out[row, h·HD + c] · out[row, h·HD + c]; one warp per (row, head),
// 256-thread blocks (8 warps), pair p = row·heads + h. Lane l sums columns l, l + 32, ...
template <int HD>
__device__ __forceinline__ void prm_att_delta(const float* __restrict__ out,
                                              const float* __restrict__ d_out,
                                              float* __restrict__ delta, int width, int total) {
    const int heads = width / HD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long p = (long long)blockIdx.x * (blockDim.x >> 5) + warp;
    if (p >= (long long)total * heads) return;  // whole warp; no block barrier in this kernel
    const int row = (int)(p / heads), h = (int)(p % heads);
    const size_t at = (size_t)row * width + h * HD;
    float v = d_out[at + lane] * out[at + lane];
#pragma unroll
    for (int c = lane + 32; c < HD; c += 32) v = fmaf(d_out[at + c], out[at + c], v);
    v = prm_warp_sum(v);
    if (lane == 0) delta[(size_t)h * total + row] = v;
}

// dK/dV (and the dSᵀ·X half in modes 1 and 2): one CTA per (key tile of 32, head, sequence).
// Thread t owns key rows 2·(t/8) .. +2; for a query tile it computes scores for queries
// t%8 + 8b (b < 4) and accumulates gradient columns t%8 + 8c (c < HD/8).
template <int HD>
__device__ __forceinline__ void prm_att_bwd_dkdv(
    const float* __restrict__ qkv, const float* __restrict__ d_out,
    const float* __restrict__ lse, const float* __restrict__ delta,
    const int* __restrict__ cu_seqlens, float* __restrict__ d_qkv, int width, int total, int mode,
    int causal) {
    constexpr int LD = PrmAttHead<HD>::LD, NC = PrmAttHead<HD>::NC;
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int k0 = blockIdx.x * BWD_B;
    if (k0 >= T) return;  // whole CTA, before any barrier
    const int tid = threadIdx.x;
    const size_t ld = (size_t)3 * width;
    const int nk = min(BWD_B, T - k0);
    const float* base = qkv + (size_t)row0 * ld;
    float* dbase = d_qkv + (size_t)row0 * ld;

    if (mode == 3) {  // identity: dv = dO, dq = dk = 0
        for (int e = tid; e < nk * HD; e += blockDim.x) {
            const int r = (int)((unsigned)e / HD), c = (int)((unsigned)e % HD);  // e >= 0
            float* d = dbase + (size_t)(k0 + r) * ld + h * HD + c;
            d[0] = 0.0f;
            d[width] = 0.0f;
            d[2 * width] = d_out[(size_t)(row0 + k0 + r) * width + h * HD + c];
        }
        return;
    }

    // Shared carve (floats): sK, sV, sQ, sdO [32 × LD] | sP, sdS [32 × 33] | sL, sD [32];
    // dkdv_shared_bytes in simt.rs.
    PRM_DYNAMIC_SHARED(float, smem);
    float* sK = smem;
    float* sV = sK + BWD_B * LD;
    float* sQ = sV + BWD_B * LD;
    float* sdO = sQ + BWD_B * LD;
    float* sP = sdO + BWD_B * LD;
    float* sdS = sP + BWD_B * BWD_LDP;
    float* sL = sdS + BWD_B * BWD_LDP;
    float* sD = sL + BWD_B;

    const int qoff = prm_att_qoff<HD>(mode, width, h);
    const int koff = prm_att_koff<HD>(mode, width, h);
    const int voff = 2 * width + h * HD;
    const float scale = prm_att_scale<HD>();
    const int rg = tid >> 3, cg = tid & 7;
    const float* dob = d_out + (size_t)row0 * width;
    const float* lse_h = lse + (size_t)h * total + row0;
    const float* delta_h = delta + (size_t)h * total + row0;

    prm_att_load_tile<HD>(sK, LD, base, ld, koff, k0, BWD_B, T);
    prm_att_load_tile<HD>(sV, LD, base, ld, voff, k0, BWD_B, T);

    float dk[2][NC], dv[2][NC];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int c = 0; c < NC; ++c) dk[a][c] = dv[a][c] = 0.0f;

    // Causal: queries before this key tile see none of its keys.
    const int qstart = causal ? k0 : 0;
    for (int q0 = qstart; q0 < T; q0 += BWD_B) {
        __syncthreads();  // previous tile consumed (and sK / sV loaded)
        prm_att_load_tile<HD>(sQ, LD, base, ld, qoff, q0, BWD_B, T);
        prm_att_load_tile<HD>(sdO, LD, dob, (size_t)width, h * HD, q0, BWD_B, T);
        if (tid < BWD_B) {
            const bool ok = q0 + tid < T;
            sL[tid] = ok ? lse_h[q0 + tid] : 0.0f;
            sD[tid] = ok ? delta_h[q0 + tid] : 0.0f;
        }
        __syncthreads();

        float s[2][4], dp[2][4];
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b) s[a][b] = dp[a][b] = 0.0f;
#pragma unroll 4
        for (int d = 0; d < HD; ++d) {
            float kv[2], vv[2], qv[4], ov[4];
#pragma unroll
            for (int a = 0; a < 2; ++a) {
                kv[a] = sK[(rg * 2 + a) * LD + d];
                vv[a] = sV[(rg * 2 + a) * LD + d];
            }
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                qv[b] = sQ[(cg + 8 * b) * LD + d];
                ov[b] = sdO[(cg + 8 * b) * LD + d];
            }
#pragma unroll
            for (int a = 0; a < 2; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    s[a][b] = fmaf(kv[a], qv[b], s[a][b]);
                    dp[a][b] = fmaf(vv[a], ov[b], dp[a][b]);
                }
        }
#pragma unroll
        for (int a = 0; a < 2; ++a) {
            const int key = k0 + rg * 2 + a;
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const int jl = cg + 8 * b, q = q0 + jl;
                const bool ok = q < T && (!causal || key <= q);
                const float p = ok ? expf(s[a][b] * scale - sL[jl]) : 0.0f;
                sP[(rg * 2 + a) * BWD_LDP + jl] = p;
                sdS[(rg * 2 + a) * BWD_LDP + jl] = p * (dp[a][b] - sD[jl]) * scale;
            }
        }
        __syncthreads();

#pragma unroll 4
        for (int j = 0; j < BWD_B; ++j) {
            float pv[2], dsv[2], ov[NC], qv[NC];
#pragma unroll
            for (int a = 0; a < 2; ++a) {
                pv[a] = sP[(rg * 2 + a) * BWD_LDP + j];
                dsv[a] = sdS[(rg * 2 + a) * BWD_LDP + j];
            }
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                ov[c] = sdO[j * LD + cg + 8 * c];
                qv[c] = sQ[j * LD + cg + 8 * c];
            }
#pragma unroll
            for (int a = 0; a < 2; ++a)
#pragma unroll
                for (int c = 0; c < NC; ++c) {
                    dv[a][c] = fmaf(pv[a], ov[c], dv[a][c]);
                    dk[a][c] = fmaf(dsv[a], qv[c], dk[a][c]);
                }
        }
    }

    // The part of d_qkv no score operand uses (k in mode 1, q in mode 2) gets zeros.
    const int zoff = mode == 1 ? width + h * HD : (mode == 2 ? h * HD : -1);
#pragma unroll
    for (int a = 0; a < 2; ++a) {
        const int r = rg * 2 + a;
        if (r < nk) {
            float* d = dbase + (size_t)(k0 + r) * ld;
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                d[koff + cg + 8 * c] = dk[a][c];
                d[voff + cg + 8 * c] = dv[a][c];
                if (zoff >= 0) d[zoff + cg + 8 * c] = 0.0f;
            }
        }
    }
}

// dQ = dS·K (the query operand's gradient): one CTA per (query tile of 32, head, sequence).
// Thread t owns query rows 2·(t/8) .. +2; per key tile it computes scores for keys t%8 + 8b and
// accumulates columns t%8 + 8c. Launched after the dK/dV kernel; in modes 1 and 2 (query
// operand == key operand) it adds to the dSᵀ·X half that kernel wrote. Not for mode 3.
template <int HD>
__device__ __forceinline__ void prm_att_bwd_dq(
    const float* __restrict__ qkv, const float* __restrict__ d_out,
    const float* __restrict__ lse, const float* __restrict__ delta,
    const int* __restrict__ cu_seqlens, float* __restrict__ d_qkv, int width, int total, int mode,
    int causal) {
    constexpr int LD = PrmAttHead<HD>::LD, NC = PrmAttHead<HD>::NC;
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int q0 = blockIdx.x * BWD_B;
    if (q0 >= T || mode == 3) return;  // whole CTA, before any barrier
    const int tid = threadIdx.x;
    const size_t ld = (size_t)3 * width;
    const int nq = min(BWD_B, T - q0);
    const float* base = qkv + (size_t)row0 * ld;

    // Shared carve (floats): sQ, sdO, sK, sV [32 × LD] | sdS [32 × 33]; dq_shared_bytes in
    // simt.rs.
    PRM_DYNAMIC_SHARED(float, smem);
    float* sQ = smem;
    float* sdO = sQ + BWD_B * LD;
    float* sK = sdO + BWD_B * LD;
    float* sV = sK + BWD_B * LD;
    float* sdS = sV + BWD_B * LD;

    const int qoff = prm_att_qoff<HD>(mode, width, h);
    const int koff = prm_att_koff<HD>(mode, width, h);
    const int voff = 2 * width + h * HD;
    const float scale = prm_att_scale<HD>();
    const int rg = tid >> 3, cg = tid & 7;
    const float* dob = d_out + (size_t)row0 * width;

    prm_att_load_tile<HD>(sQ, LD, base, ld, qoff, q0, BWD_B, T);
    prm_att_load_tile<HD>(sdO, LD, dob, (size_t)width, h * HD, q0, BWD_B, T);
    float L[2], Dl[2];
#pragma unroll
    for (int a = 0; a < 2; ++a) {
        const int r = rg * 2 + a;
        L[a] = r < nq ? lse[(size_t)h * total + row0 + q0 + r] : 0.0f;
        Dl[a] = r < nq ? delta[(size_t)h * total + row0 + q0 + r] : 0.0f;
    }

    float dq[2][NC];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int c = 0; c < NC; ++c) dq[a][c] = 0.0f;

    const int kend = causal ? min(T, q0 + nq) : T;
    for (int k0 = 0; k0 < kend; k0 += BWD_B) {
        __syncthreads();  // previous tile consumed (and sQ / sdO loaded)
        prm_att_load_tile<HD>(sK, LD, base, ld, koff, k0, BWD_B, T);
        prm_att_load_tile<HD>(sV, LD, base, ld, voff, k0, BWD_B, T);
        __syncthreads();

        float s[2][4], dp[2][4];
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int b = 0; b < 4; ++b) s[a][b] = dp[a][b] = 0.0f;
#pragma unroll 4
        for (int d = 0; d < HD; ++d) {
            float qv[2], ov[2], kv[4], vv[4];
#pragma unroll
            for (int a = 0; a < 2; ++a) {
                qv[a] = sQ[(rg * 2 + a) * LD + d];
                ov[a] = sdO[(rg * 2 + a) * LD + d];
            }
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                kv[b] = sK[(cg + 8 * b) * LD + d];
                vv[b] = sV[(cg + 8 * b) * LD + d];
            }
#pragma unroll
            for (int a = 0; a < 2; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    s[a][b] = fmaf(qv[a], kv[b], s[a][b]);
                    dp[a][b] = fmaf(ov[a], vv[b], dp[a][b]);
                }
        }
#pragma unroll
        for (int a = 0; a < 2; ++a) {
            const int q = q0 + rg * 2 + a;
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const int kl = cg + 8 * b, key = k0 + kl;
                const bool ok = key < T && (!causal || key <= q);
                const float p = ok ? expf(s[a][b] * scale - L[a]) : 0.0f;
                sdS[(rg * 2 + a) * BWD_LDP + kl] = p * (dp[a][b] - Dl[a]) * scale;
            }
        }
        __syncthreads();

#pragma unroll 4
        for (int j = 0; j < BWD_B; ++j) {
            float dsv[2], kv[NC];
#pragma unroll
            for (int a = 0; a < 2; ++a) dsv[a] = sdS[(rg * 2 + a) * BWD_LDP + j];
#pragma unroll
            for (int c = 0; c < NC; ++c) kv[c] = sK[j * LD + cg + 8 * c];
#pragma unroll
            for (int a = 0; a < 2; ++a)
#pragma unroll
                for (int c = 0; c < NC; ++c) dq[a][c] = fmaf(dsv[a], kv[c], dq[a][c]);
        }
    }

    const bool add = (mode == 1 || mode == 2);
#pragma unroll
    for (int a = 0; a < 2; ++a) {
        const int r = rg * 2 + a;
        if (r < nq) {
            float* d = d_qkv + (size_t)(row0 + q0 + r) * ld + qoff;
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                const float g = dq[a][c];
                d[cg + 8 * c] = add ? d[cg + 8 * c] + g : g;
            }
        }
    }
}

// The entry points of one head dim: forward, delta, dK/dV, dQ (parameter lists as the
// launchers in simt.rs pass them). Registered by name below, one line per head dim.
#define PRM_ATT_SIMT_KERNELS(HD, SUFFIX)                                                           \
    extern "C" __global__ void prm_attention_forward_f32##SUFFIX(                                  \
        const float* __restrict__ qkv, const int* __restrict__ cu_seqlens,                         \
        float* __restrict__ out, float* __restrict__ lse, int width, int total, int mode,          \
        int causal) {                                                                              \
        prm_att_forward<HD>(qkv, cu_seqlens, out, lse, width, total, mode, causal);                \
    }                                                                                              \
    extern "C" __global__ void prm_attention_delta_f32##SUFFIX(                                    \
        const float* __restrict__ out, const float* __restrict__ d_out,                            \
        float* __restrict__ delta, int width, int total) {                                         \
        prm_att_delta<HD>(out, d_out, delta, width, total);                                        \
    }                                                                                              \
    extern "C" __global__ void prm_attention_bwd_dkdv_f32##SUFFIX(                                 \
        const float* __restrict__ qkv, const float* __restrict__ d_out,                            \
        const float* __restrict__ lse, const float* __restrict__ delta,                            \
        const int* __restrict__ cu_seqlens, float* __restrict__ d_qkv, int width, int total,       \
        int mode, int causal) {                                                                    \
        prm_att_bwd_dkdv<HD>(qkv, d_out, lse, delta, cu_seqlens, d_qkv, width, total, mode,        \
                             causal);                                                              \
    }                                                                                              \
    extern "C" __global__ void prm_attention_bwd_dq_f32##SUFFIX(                                   \
        const float* __restrict__ qkv, const float* __restrict__ d_out,                            \
        const float* __restrict__ lse, const float* __restrict__ delta,                            \
        const int* __restrict__ cu_seqlens, float* __restrict__ d_qkv, int width, int total,       \
        int mode, int causal) {                                                                    \
        prm_att_bwd_dq<HD>(qkv, d_out, lse, delta, cu_seqlens, d_qkv, width, total, mode, causal); \
    }

PRM_ATT_SIMT_KERNELS(64, )
PRM_ATT_SIMT_KERNELS(32, _hd32)
PRM_ATT_SIMT_KERNELS(40, _hd40)
PRM_ATT_SIMT_KERNELS(48, _hd48)
PRM_ATT_SIMT_KERNELS(56, _hd56)
PRM_ATT_SIMT_KERNELS(72, _hd72)
PRM_ATT_SIMT_KERNELS(80, _hd80)
PRM_ATT_SIMT_KERNELS(88, _hd88)
PRM_ATT_SIMT_KERNELS(96, _hd96)
PRM_ATT_SIMT_KERNELS(104, _hd104)
PRM_ATT_SIMT_KERNELS(112, _hd112)
PRM_ATT_SIMT_KERNELS(120, _hd120)
PRM_ATT_SIMT_KERNELS(128, _hd128)

// One line per head dim (build/sim.rs reads every PRM_REGISTER_KERNEL on such a line).
PRM_REGISTER_KERNEL(prm_attention_forward_f32); PRM_REGISTER_KERNEL(prm_attention_delta_f32); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_f32); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_f32);
PRM_REGISTER_KERNEL(prm_attention_forward_f32_hd32); PRM_REGISTER_KERNEL(prm_attention_delta_f32_hd32); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_f32_hd32); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_f32_hd32);
PRM_REGISTER_KERNEL(prm_attention_forward_f32_hd40); PRM_REGISTER_KERNEL(prm_attention_delta_f32_hd40); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_f32_hd40); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_f32_hd40);
PRM_REGISTER_KERNEL(prm_attention_forward_f32_hd48); PRM_REGISTER_KERNEL(prm_attention_delta_f32_hd48); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_f32_hd48); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_f32_hd48);
PRM_REGISTER_KERNEL(prm_attention_forward_f32_hd56); PRM_REGISTER_KERNEL(prm_attention_delta_f32_hd56); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_f32_hd56); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_f32_hd56);
PRM_REGISTER_KERNEL(prm_attention_forward_f32_hd72); PRM_REGISTER_KERNEL(prm_attention_delta_f32_hd72); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_f32_hd72); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_f32_hd72);
PRM_REGISTER_KERNEL(prm_attention_forward_f32_hd80); PRM_REGISTER_KERNEL(prm_attention_delta_f32_hd80); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_f32_hd80); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_f32_hd80);
PRM_REGISTER_KERNEL(prm_attention_forward_f32_hd88); PRM_REGISTER_KERNEL(prm_attention_delta_f32_hd88); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_f32_hd88); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_f32_hd88);
PRM_REGISTER_KERNEL(prm_attention_forward_f32_hd96); PRM_REGISTER_KERNEL(prm_attention_delta_f32_hd96); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_f32_hd96); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_f32_hd96);
PRM_REGISTER_KERNEL(prm_attention_forward_f32_hd104); PRM_REGISTER_KERNEL(prm_attention_delta_f32_hd104); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_f32_hd104); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_f32_hd104);
PRM_REGISTER_KERNEL(prm_attention_forward_f32_hd112); PRM_REGISTER_KERNEL(prm_attention_delta_f32_hd112); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_f32_hd112); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_f32_hd112);
PRM_REGISTER_KERNEL(prm_attention_forward_f32_hd120); PRM_REGISTER_KERNEL(prm_attention_delta_f32_hd120); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_f32_hd120); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_f32_hd120);
PRM_REGISTER_KERNEL(prm_attention_forward_f32_hd128); PRM_REGISTER_KERNEL(prm_attention_delta_f32_hd128); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_f32_hd128); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_f32_hd128);
