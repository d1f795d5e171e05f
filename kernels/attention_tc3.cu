// attention_tc3.cu: fused multi-head attention v3 on tensor cores (mma.sync m16n8k16, bf16
// operands, fp32 accumulation) over packed variable-length sequences, forward and
// input-gradient backward, FlashAttention-2 style, tuned for head dim 64 at 50–1201 tokens, and
// instantiated for every head dim that is a multiple of 8 from 72 to 128 (the end of this file).
//
// Launchers: src/gpu/kernels/attention/tc3.rs (attention_forward_tc3, attention_backward_tc3); the
// engine uses them at --precision bf16 unless PRM_ATTENTION=v2. Versions (llm.c style, same
// math, checked against each other and a float64 twin in tests/kernel_attention.rs):
//   attention.cu      v1, SIMT fp32: the fp32 engine's kernels and the reference
//   attention_tc.cu   v2, tensor cores, fp32 qkv converted while loading, one load stage
//   attention_tc3.cu  v3, this file: bf16 in and out, cp.async double buffering, ldmatrix
//
// Layouts (N = ΣT_i tokens, D = width, HD = 64 (or the _hd<HD> kernels' HD), heads = D / HD,
// head h in columns h·HD .. +HD):
//   qkv        [N, 3D] bf16   q | k | v along features
//   cu_seqlens [B+1]   int
//   out        [N, D]  bf16   the context, i.e. the out-projection's bf16 operand
//   lse, delta [heads, N] fp32, index h·N + row (natural log; scores scaled by 1/√HD)
//   d_out      [N, D]  fp32 in the delta kernel, which also writes its bf16 copy d_out_bf16;
//                      or bf16 already (the _bf16 delta kernel; the engine's path)
//   d_qkv      [N, 3D] bf16, every element written (q part by the dQ kernel, k and v parts by
//              the dK/dV kernel): the bf16 operand of the QKV input-gradient product
// Precision: bf16 storage of q, k, v, out, dO and d_qkv; P and dS rounded to bf16 where they
// enter a product (dS is formed from the bf16-rounded P in the dK/dV kernel); products
// accumulate in fp32; softmax statistics (exp2 with log2(e)/8 folded into the scale), lse and
// delta (from fp32 dO and bf16 O) are fp32.
// Modes: the forward takes mode 0 (q·kᵀ), 1 (q·qᵀ) and 2 (k·kᵀ), causal or not; the backward
// takes mode 0, causal or not.
// Straight tiles (`straight` != 0, the launcher's default; PRM_ATTENTION_STRAIGHT=0 turns them
// off): a tile with nothing to mask (64 keys or queries, the warp's 16 rows inside the sequence,
// not causal) runs as straight-line code, FULL in the tile steps: no branch (and warp
// re-convergence) around every n-tile, so the fragment loads run ahead of the products, and no
// masks. The same operations on the same values: the same bits (attention_tc_common.cuh spells
// its multiply-adds so that nvcc cannot round the two forms differently). 197 tokens: 3 of the
// 4 tiles. sm_80's dK/dV keeps the masked form (its straight tile spills at 128 registers).
//
// The register-level steps (online softmax, the end of a query block, dS and Pᵀ formation,
// bf16 stores) are attention_tc_common.cuh's, shared with v4 (attention_tc4.cu), which gives the
// same bits. (Moving them there left this file's SASS the same but for register numbering in
// the forward: 256 bytes of its cubin, same size, same ptxas register counts.)
// Tiling: 128 threads = 4 warps per CTA, 64-row tiles, a warp owns 16 rows and keeps its
// scores and accumulators in mma fragments. Shared tiles are bf16 64×64 with a row stride of
// 72 elements (144 bytes: rows stay 16-byte aligned for cp.async, and the 8 rows of one
// ldmatrix 8×8 matrix start 4 banks apart, so fragment loads are conflict-free). Streamed
// tiles are double-buffered: the cp.async of tile i+1 is issued before the products of tile i.
// Rows past a sequence's end are zero-filled by cp.async (src-size 0). A warp whose 16 rows all
// lie past the end skips its products (it still loads and meets the barriers), and key/query
// blocks of 16 past the end of the last tile are skipped (197 = 3·64 + 5 costs one 16-block
// of the last tile, not 64).
//   forward  prm_attention_forward_tc3: one CTA per (64-query tile, head, sequence); Q tile
//            resident, K/V tiles streamed. Dynamic shared memory 5 tiles = 46,080 B.
//            prm_attention_forward_tc3_pairs (TcOptions::paired_rows): one CTA per 128-query
//            tile, each warp running two 16-row blocks at once (each K/V fragment feeds both
//            blocks' products); the same bits. 6 tiles = 55,296 B; 210 / 228 registers (sm_80 /
//            sm_90), __launch_bounds__(128, 2).
//   delta    prm_attention_delta_tc3: delta = rowsum(dO ⊙ O) and dO → bf16, one warp per 4
//            (row, head) pairs; prm_attention_delta_bf16_tc3 when dO is already bf16 (delta
//            only).
//   dQ       prm_attention_bwd_dq_tc3: one CTA per (64-query tile, head, sequence); Q and dO
//            tiles resident, K/V streamed. 6 tiles = 55,296 B.
//            prm_attention_bwd_dq_delta_tc3 (the engine's bf16-dO path): the same, forming
//            delta for its rows itself from the resident dO tile and the context (v3_delta's
//            arithmetic and order: the same bits) and writing it for dK/dV, which then runs
//            after it: no delta kernel (PRM_ATTENTION_DELTA_IN_DQ=0 brings it back).
//   dK/dV    prm_attention_bwd_dkdv_tc3: one CTA per (64-key tile, head, sequence); K and V
//            resident, Q/dO tiles and their lse/delta streamed. 6 tiles + 1 KB = 56,320 B.
//   paired backward (TcOptions::paired_rows): prm_attention_bwd_dq_tc3_pairs,
//            prm_attention_bwd_dq_delta_tc3_pairs (one CTA per 128-query tile; 8 tiles =
//            73,728 B) and prm_attention_bwd_dkdv_tc3_pairs (one CTA per 128-key tile; 8 tiles
//            + 1 KB = 74,752 B): each warp runs two 16-row blocks at once, as the paired
//            forward does; the same bits. Straight tiles when both blocks are whole. ptxas
//            (sm_80 / sm_90), no spills: dQ 228 / 236, dQ with delta 231 / 240, dK/dV 243 / 254
//            registers; __launch_bounds__(128, 2).
// The backward kernels form scores 32 columns at a time (two halves of the 64-wide tile) so
// that at most 128 registers are live. ptxas (nvcc 13.0, sm_80 / sm_90), no spills:
//   forward 127 / 127 registers, dQ 128 / 127 (with delta 128 / 128), dK/dV 128 / 128,
//   delta 54 / 48 (the bf16-dO delta 31 / 30);
// with __launch_bounds__(128, 4) and ≤ 56.3 KB of shared memory each, 4 CTAs fit on an SM (the
// paired kernels: (128, 2), ≤ 73 KB, 2 CTAs).
// CTAs whose tile starts past their sequence's end exit before any barrier. No atomics; fixed
// reduction order; deterministic.
#include "common.cuh"
#include "mma.cuh"
#include "tile_io.cuh"
#include "attention_tc_common.cuh"

#define V3_HD 64
#define V3_TILE 64
#define V3_LD 72
#define V3_TILE_ELEMS (V3_TILE * V3_LD)

typedef __nv_bfloat16 bf16;

// Shared tiles of heads HD wide: 64 rows of KP columns (HD, padded to whole k-steps with zero
// columns), row stride LD = KP + 8 elements (an odd number of 16-byte units, 9 to 17: the 8 rows
// of an ldmatrix 8×8 matrix fall in distinct bank groups). V3Tile<64> is V3_LD / V3_TILE_ELEMS.
template <int HD>
struct V3Tile {
    static constexpr int LD = PrmAttHead<HD>::KP + 8;
    static constexpr int ELEMS = V3_TILE * LD;
};

// Rows r0 .. r0+64 of an HD-wide bf16 column block `g` (row stride ld elements) into the
// shared tile `s` by cp.async; rows at or past `valid`, and the padding columns HD .. KP, are
// zero-filled. Every thread issues KP / 16 16-byte copies; the caller commits the group.
template <int HD = V3_HD>
__device__ __forceinline__ void v3_load_tile(bf16* s, const bf16* g, size_t ld, int r0, int valid) {
    constexpr int CH = PrmAttHead<HD>::KP / 8;  // 16-byte chunks a row, padding included
    constexpr int LD = V3Tile<HD>::LD;
#pragma unroll
    for (int i = 0; i < V3_TILE * CH / 128; ++i) {
        const int e = threadIdx.x + i * 128;
        // At 64 (8 chunks a row) the shifts the kernels were tuned with; other widths divide.
        const int r = CH == 8 ? e >> 3 : (int)((unsigned)e / CH);
        const int c = CH == 8 ? (e & 7) * 8 : (int)((unsigned)e % CH) * 8;
        const bool ok = r0 + r < valid && (HD == PrmAttHead<HD>::KP || c < HD);
        prm_cp_async_16(s + r * LD + c, ok ? g + (size_t)(r0 + r) * ld + c : g, ok);
    }
}

// The A fragment of the 16×16 block at (row0, col0) of the row-major tile s (row stride LD).
template <int LD = V3_LD>
__device__ __forceinline__ void v3_frag_a(uint32_t a[4], const bf16* s, int row0, int col0) {
    const int lane = threadIdx.x & 31;
    prm_ldmatrix_x4(a, s + (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + col0 + (lane >> 4) * 8);
}

// B fragments of two n-tiles (n0 and n0+8) at k-step k0 for B = Mᵀ, M the row-major tile s
// (M[n][k]): b[0..1] for n-tile n0, b[2..3] for n-tile n0+8.
template <int LD = V3_LD>
__device__ __forceinline__ void v3_frag_bt(uint32_t b[4], const bf16* s, int n0, int k0) {
    const int lane = threadIdx.x & 31;
    prm_ldmatrix_x4(b, s + (n0 + (lane & 7) + ((lane >> 4) & 1) * 8) * LD + k0 + ((lane >> 3) & 1) * 8);
}

// B fragments of two n-tiles (n0, n0+8) at k-step k0 for B = M, M the row-major tile s
// (M[k][n]), through ldmatrix.trans.
template <int LD = V3_LD>
__device__ __forceinline__ void v3_frag_b(uint32_t b[4], const bf16* s, int k0, int n0) {
    const int lane = threadIdx.x & 31;
    prm_ldmatrix_x4_trans(b, s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + n0 + (lane >> 4) * 8);
}

// acc (16 × 64) = A · Mᵀ with A's fragments read from the row-major tile `sa` (rows arow0 ..
// +16, the head's KP columns) and M the row-major tile `sm` (64 × KP). Only n-tile pairs below
// `ncols` are formed (the others stay zero); FULL: all of them (ncols = 64, no per-tile
// branches).
template <bool FULL = false, int HD = V3_HD>
__device__ __forceinline__ void v3_mma_abt(float acc[8][4], const bf16* sa, int arow0, const bf16* sm, int ncols) {
    constexpr int LD = V3Tile<HD>::LD;
#pragma unroll
    for (int ks = 0; ks < PrmAttHead<HD>::KS; ++ks) {
        uint32_t a[4];
        v3_frag_a<LD>(a, sa, arow0, ks * 16);
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            if (!FULL && np * 16 >= ncols) continue;
            uint32_t b[4];
            v3_frag_bt<LD>(b, sm, np * 16, ks * 16);
            prm_mma_bf16_16816(acc[2 * np], a, b);
            prm_mma_bf16_16816(acc[2 * np + 1], a, b + 2);
        }
    }
}

// acc (16 × KP) += A · M with A given as the bf16 packing of the accumulators p[8][4] (16 × 64:
// n-tiles 2j, 2j+1 form k-step j) and M the row-major tile `sm` (64 × KP, M[k][n]). k-steps at
// or past `kvalid` are skipped (their A columns must be zero); FULL: none (kvalid = 64).
template <bool FULL = false, int HD = V3_HD>
__device__ __forceinline__ void v3_mma_pb(float acc[][4], const float p[8][4], const bf16* sm, int kvalid) {
    constexpr int LD = V3Tile<HD>::LD;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
        if (!FULL && ks * 16 >= kvalid) continue;
        uint32_t a[4];
        a[0] = prm_pack_bf16x2(p[2 * ks][0], p[2 * ks][1]);
        a[1] = prm_pack_bf16x2(p[2 * ks][2], p[2 * ks][3]);
        a[2] = prm_pack_bf16x2(p[2 * ks + 1][0], p[2 * ks + 1][1]);
        a[3] = prm_pack_bf16x2(p[2 * ks + 1][2], p[2 * ks + 1][3]);
#pragma unroll
        for (int np = 0; np < PrmAttHead<HD>::KS; ++np) {
            uint32_t b[4];
            v3_frag_b<LD>(b, sm, ks * 16, np * 16);
            prm_mma_bf16_16816(acc[2 * np], a, b);
            prm_mma_bf16_16816(acc[2 * np + 1], a, b + 2);
        }
    }
}

// acc (16 × KP) += A · M[ks·16 .. +16, :] for one k-step with A given as fragment registers and
// M the row-major tile `sm` (M[k][n], KP columns).
template <int HD = V3_HD>
__device__ __forceinline__ void v3_mma_ab_step(float acc[][4], const uint32_t a[4], const bf16* sm, int ks) {
#pragma unroll
    for (int np = 0; np < PrmAttHead<HD>::KS; ++np) {
        uint32_t b[4];
        v3_frag_b<V3Tile<HD>::LD>(b, sm, ks * 16, np * 16);
        prm_mma_bf16_16816(acc[2 * np], a, b);
        prm_mma_bf16_16816(acc[2 * np + 1], a, b + 2);
    }
}

// Half-width forms for the backward kernels (fewer live registers): columns / k-rows
// half·32 .. +32 of the 64-wide tile.
// acc (16 × 32) = A · Mᵀ restricted to M rows half·32 .. +32 (n-tile pairs below `ncols`; FULL:
// all).
template <bool FULL = false, int HD = V3_HD>
__device__ __forceinline__ void v3_mma_abt_half(float acc[4][4], const bf16* sa, int arow0, const bf16* sm, int half,
                                                int ncols) {
    constexpr int LD = V3Tile<HD>::LD;
#pragma unroll
    for (int ks = 0; ks < PrmAttHead<HD>::KS; ++ks) {
        uint32_t a[4];
        v3_frag_a<LD>(a, sa, arow0, ks * 16);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int np = half * 2 + j;
            if (!FULL && np * 16 >= ncols) continue;
            uint32_t b[4];
            v3_frag_bt<LD>(b, sm, np * 16, ks * 16);
            prm_mma_bf16_16816(acc[2 * j], a, b);
            prm_mma_bf16_16816(acc[2 * j + 1], a, b + 2);
        }
    }
}

// acc (16 × KP) += A · M[half·32 .. +32, :] with A the bf16 packing of p[4][4] (16 × 32);
// k-steps at or past `kvalid` are skipped (their A columns must be zero; FULL: none are).
template <bool FULL = false, int HD = V3_HD>
__device__ __forceinline__ void v3_mma_pb_half(float acc[][4], const float p[4][4], const bf16* sm, int half,
                                               int kvalid) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int ks = half * 2 + j;
        if (!FULL && ks * 16 >= kvalid) continue;
        uint32_t a[4];
        prm_att_pack_a(a, p[2 * j], p[2 * j + 1]);
        v3_mma_ab_step<HD>(acc, a, sm, ks);
    }
}

// The forward's body for heads HD wide (prm_attention_forward_tc3 and its _hd<HD> siblings).
template <int HD>
__device__ __forceinline__ void v3_forward(const bf16* __restrict__ qkv, const int* __restrict__ cu_seqlens,
                                           bf16* __restrict__ out, float* __restrict__ lse, int width, int total,
                                           int mode, int causal, int straight) {
    PRM_DYNAMIC_SHARED_IN_TEMPLATE(bf16, smem);
    constexpr int ELEMS = V3Tile<HD>::ELEMS;
    bf16* sQ = smem;
    bf16* sK = smem + ELEMS;      // two stages
    bf16* sV = smem + 3 * ELEMS;  // two stages
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int q0 = blockIdx.x * V3_TILE;
    if (q0 >= T) return;  // whole CTA, before any barrier
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t ld = 3 * (size_t)width;
    const bf16* base = qkv + (size_t)row0 * ld;
    const bf16* gx = base + (mode == 2 ? width : 0) + h * HD;
    const bf16* gy = base + (mode == 1 ? 0 : width) + h * HD;
    const bf16* gv = base + 2 * width + h * HD;
    const int wq0 = q0 + warp * 16;
    const bool active = wq0 < T;  // warp-uniform
    const int rows[2] = {wq0 + (lane >> 2), wq0 + (lane >> 2) + 8};
    const int kend = causal ? min(T, q0 + V3_TILE) : T;
    const int ntiles = (kend + V3_TILE - 1) / V3_TILE;

    v3_load_tile<HD>(sQ, gx, ld, q0, T);
    v3_load_tile<HD>(sK, gy, ld, 0, T);
    v3_load_tile<HD>(sV, gv, ld, 0, T);
    prm_cp_async_commit();

    float o[PrmAttHead<HD>::NT][4];
    prm_att_zero<PrmAttHead<HD>::NT>(o);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // m in log2 units
    for (int kt = 0; kt < ntiles; ++kt) {
        const int k0 = kt * V3_TILE, stage = kt & 1;
        if (kt + 1 < ntiles) {
            // The other stage was consumed in iteration kt − 1 (barrier at its end).
            v3_load_tile<HD>(sK + (stage ^ 1) * ELEMS, gy, ld, k0 + V3_TILE, T);
            v3_load_tile<HD>(sV + (stage ^ 1) * ELEMS, gv, ld, k0 + V3_TILE, T);
            prm_cp_async_commit();
            prm_cp_async_wait<1>();
        } else {
            prm_cp_async_wait<0>();
        }
        __syncthreads();
        if (active) {
            // Keys of this tile the warp needs: below the end, and (causal) up to its last row.
            int kvalid = min(V3_TILE, kend - k0);
            if (causal) kvalid = min(kvalid, wq0 + 16 - k0);
            // FULL: a whole tile with nothing masked, as straight-line code (the per-n-tile
            // skips and masks kept the fragment loads from running ahead of the products).
            auto tile = [&](auto full) {
                constexpr bool FULL = decltype(full)::value;
                float s[8][4];
                prm_att_zero<8>(s);
                v3_mma_abt<FULL, HD>(s, sQ, warp * 16, sK + stage * ELEMS, kvalid);
                prm_att_online_softmax<FULL, HD>(s, m, l, o, kvalid, causal, k0, rows);
                v3_mma_pb<FULL, HD>(o, s, sV + stage * ELEMS, kvalid);
            };
            if (straight && kvalid == V3_TILE && !causal) {
                tile(prm_flag<true>{});
            } else {
                tile(prm_flag<false>{});
            }
        }
        __syncthreads();  // this stage is consumed before iteration kt + 1 refills it
    }
    if (!active) return;  // after the last barrier
    prm_att_finish<HD>(out, lse, o, m, l, rows, T, row0, h, width, total);
}

extern "C" __global__ void __launch_bounds__(128, 4)
    prm_attention_forward_tc3(const bf16* __restrict__ qkv, const int* __restrict__ cu_seqlens, bf16* __restrict__ out,
                              float* __restrict__ lse, int width, int total, int mode, int causal, int straight) {
    v3_forward<V3_HD>(qkv, cu_seqlens, out, lse, width, total, mode, causal, straight);
}
PRM_REGISTER_KERNEL(prm_attention_forward_tc3);

// acc[k] (16 × 64) = A_k · Mᵀ for the two 16-row blocks A_0 (rows arow0 .. +16 of `sa`) and
// A_1 (the 16 rows after), sharing each B fragment of `sm`: v3_mma_abt's order for each. Only
// n-tile pairs below `ncols` are formed; FULL: all.
template <bool FULL = false>
__device__ __forceinline__ void v3_mma_abt_pair(float acc[2][8][4], const bf16* sa, int arow0, const bf16* sm,
                                                int ncols) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
        uint32_t a[2][4];
        v3_frag_a(a[0], sa, arow0, ks * 16);
        v3_frag_a(a[1], sa, arow0 + 16, ks * 16);
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            if (!FULL && np * 16 >= ncols) continue;
            uint32_t b[4];
            v3_frag_bt(b, sm, np * 16, ks * 16);
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                prm_mma_bf16_16816(acc[k][2 * np], a[k], b);
                prm_mma_bf16_16816(acc[k][2 * np + 1], a[k], b + 2);
            }
        }
    }
}

// acc[k] (16 × 64) += A_k · M for k = 0, 1, A_k the bf16 packing of p[k] (v3_mma_pb's order for
// each), sharing each B fragment; k-steps at or past `kvalid` are skipped (FULL: none).
template <bool FULL = false>
__device__ __forceinline__ void v3_mma_pb_pair(float acc[2][8][4], const float p[2][8][4], const bf16* sm,
                                               int kvalid) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
        if (!FULL && ks * 16 >= kvalid) continue;
        uint32_t a[2][4];
        prm_att_pack_a(a[0], p[0][2 * ks], p[0][2 * ks + 1]);
        prm_att_pack_a(a[1], p[1][2 * ks], p[1][2 * ks + 1]);
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            uint32_t b[4];
            v3_frag_b(b, sm, ks * 16, np * 16);
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                prm_mma_bf16_16816(acc[k][2 * np], a[k], b);
                prm_mma_bf16_16816(acc[k][2 * np + 1], a[k], b + 2);
            }
        }
    }
}

// The forward with paired blocks (TcOptions::paired_rows; v4's forward past its 512 tokens runs
// it too): one CTA per (128-query tile, head, sequence), each warp running two 16-row blocks,
// rows q0 + 32·warp .. +16 and the 16 after, at once, so each K and V fragment read from shared
// memory feeds both blocks' products and the warp has two independent chains. Each row's
// arithmetic is prm_attention_forward_tc3's, in its order: the same bits. Key tiles are v3's 64-key tiles,
// streamed through the same two stages. Per block, the keys a tile offers are v3's: below the
// end and (causal) up to the block's last row. The score products run to the second block's
// count; the first block's extra columns are masked as in v3 (there they are never formed), and
// its P is zero in them, so the extra k-steps of P·V add zero products. Under a causal mask a
// warp skips the tiles past its second block's last row (the CTA's tiles reach 128 rows); a
// pair's 32 rows start at a multiple of 32, so no tile it runs is past its first block's rows.
// A second block past the sequence's end runs on zero rows and stores nothing. Shared memory:
// Q 128 rows and two stages of K and V: 6 tiles = 55,296 B; (128, 2): two CTAs an SM.
extern "C" __global__ void __launch_bounds__(128, 2)
    prm_attention_forward_tc3_pairs(const bf16* __restrict__ qkv, const int* __restrict__ cu_seqlens,
                                    bf16* __restrict__ out, float* __restrict__ lse, int width, int total, int mode,
                                    int causal, int straight) {
    PRM_DYNAMIC_SHARED(bf16, smem);
    bf16* sQ = smem;                      // two tiles: 128 rows
    bf16* sK = smem + 2 * V3_TILE_ELEMS;  // two stages
    bf16* sV = smem + 4 * V3_TILE_ELEMS;  // two stages
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int q0 = blockIdx.x * 2 * V3_TILE;
    if (q0 >= T) return;  // whole CTA, before any barrier
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t ld = 3 * (size_t)width;
    const bf16* base = qkv + (size_t)row0 * ld;
    const bf16* gx = base + (mode == 2 ? width : 0) + h * V3_HD;
    const bf16* gy = base + (mode == 1 ? 0 : width) + h * V3_HD;
    const bf16* gv = base + 2 * width + h * V3_HD;
    const int wq0 = q0 + warp * 32;
    const bool active = wq0 < T;  // warp-uniform: the first block has rows
    const int rows[2][2] = {{wq0 + (lane >> 2), wq0 + (lane >> 2) + 8},
                            {wq0 + 16 + (lane >> 2), wq0 + 24 + (lane >> 2)}};
    const int kend = causal ? min(T, q0 + 2 * V3_TILE) : T;
    const int ntiles = (kend + V3_TILE - 1) / V3_TILE;

    v3_load_tile(sQ, gx, ld, q0, T);
    v3_load_tile(sQ + V3_TILE_ELEMS, gx, ld, q0 + V3_TILE, T);
    v3_load_tile(sK, gy, ld, 0, T);
    v3_load_tile(sV, gv, ld, 0, T);
    prm_cp_async_commit();

    float o[2][8][4];
    prm_att_zero<8>(o[0]);
    prm_att_zero<8>(o[1]);
    float m[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};  // log2 units
    float l[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
    for (int kt = 0; kt < ntiles; ++kt) {
        const int k0 = kt * V3_TILE, stage = kt & 1;
        if (kt + 1 < ntiles) {
            // The other stage was consumed in iteration kt − 1 (barrier at its end).
            v3_load_tile(sK + (stage ^ 1) * V3_TILE_ELEMS, gy, ld, k0 + V3_TILE, T);
            v3_load_tile(sV + (stage ^ 1) * V3_TILE_ELEMS, gv, ld, k0 + V3_TILE, T);
            prm_cp_async_commit();
            prm_cp_async_wait<1>();
        } else {
            prm_cp_async_wait<0>();
        }
        __syncthreads();
        if (active && !(causal && k0 > wq0 + 31)) {
            // Keys of this tile each block needs (v3's count for that block).
            const int kvalid = min(V3_TILE, kend - k0);
            const int kv[2] = {causal ? min(kvalid, wq0 + 16 - k0) : kvalid,
                               causal ? min(kvalid, wq0 + 32 - k0) : kvalid};
            auto tile = [&](auto full) {
                constexpr bool FULL = decltype(full)::value;
                float s[2][8][4];
                prm_att_zero<8>(s[0]);
                prm_att_zero<8>(s[1]);
                v3_mma_abt_pair<FULL>(s, sQ, warp * 32, sK + stage * V3_TILE_ELEMS, kv[1]);
                prm_att_online_softmax<FULL>(s[0], m[0], l[0], o[0], kv[0], causal, k0, rows[0]);
                prm_att_online_softmax<FULL>(s[1], m[1], l[1], o[1], kv[1], causal, k0, rows[1]);
                v3_mma_pb_pair<FULL>(o, s, sV + stage * V3_TILE_ELEMS, kv[1]);
            };
            if (straight && kvalid == V3_TILE && !causal) {
                tile(prm_flag<true>{});
            } else {
                tile(prm_flag<false>{});
            }
        }
        __syncthreads();  // this stage is consumed before iteration kt + 1 refills it
    }
    if (!active) return;  // after the last barrier
    prm_att_finish(out, lse, o[0], m[0], l[0], rows[0], T, row0, h, width, total);
    prm_att_finish(out, lse, o[1], m[1], l[1], rows[1], T, row0, h, width, total);
}
PRM_REGISTER_KERNEL(prm_attention_forward_tc3_pairs);

// Two adjacent elements of a row, widened to fp32 (bf16 widening is exact).
__device__ __forceinline__ float2 v3_load_pair(const float* p) { return prm_load_vec<float2>(p); }
__device__ __forceinline__ float2 v3_load_pair(const bf16* p) {
    const uint32_t b = prm_load_vec<uint32_t>(p);
    return make_float2(__uint_as_float(b << 16), __uint_as_float(b & 0xffff0000u));
}

// The 64-column groups of a head HD wide: lane l takes columns 64·g + 2l and the one after of
// each group g, where they lie inside the head (at 80, lanes 0..7 take a second pair).
template <int HD>
struct V3Groups {
    static constexpr int G = (HD + 63) / 64;
    static __device__ __forceinline__ bool has(int g, int lane) { return 64 * g + 2 * lane < HD; }
};

// A lane's share of rowsum(dO ⊙ O) over its column pairs d[g], o[g] (V3Groups<HD>): the first
// pair as fmaf(d.y, o.y, d.x·o.x) (at 64 the only one), each further pair added x then y.
template <int HD>
__device__ __forceinline__ float v3_lane_dot(const float2 d[], const float2 o[]) {
    float v = fmaf(d[0].y, o[0].y, d[0].x * o[0].x);
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int g = 1; g < V3Groups<HD>::G; ++g)
        if (V3Groups<HD>::has(g, lane)) v = fmaf(d[g].y, o[g].y, fmaf(d[g].x, o[g].x, v));
    return v;
}

// delta[h·N + row] = Σ_c dO[row, h·HD + c] · O[row, h·HD + c] (bf16 O; dO fp32 or bf16), and
// with d_out_bf16 != nullptr, d_out_bf16 = bf16(dO). A warp takes V3_DELTA_PAIRS consecutive
// (row, head) pairs (8 warps per block) and loads all of them before it reduces any: with one
// pair a warp had 256 bytes in flight, too few to cover memory latency (1.8 TB/s on an H200).
// Each lane takes two adjacent columns of each 64-column group of each pair (v3_lane_dot).
#define V3_DELTA_PAIRS 4
template <int HD, typename D>
__device__ __forceinline__ void v3_delta(const bf16* __restrict__ out, const D* __restrict__ d_out,
                                         float* __restrict__ delta, bf16* __restrict__ d_out_bf16, int width,
                                         int total) {
    using Gr = V3Groups<HD>;
    const int heads = width / HD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long pairs = (long long)total * heads;
    const long long p0 = ((long long)blockIdx.x * (blockDim.x >> 5) + warp) * V3_DELTA_PAIRS;
    if (p0 >= pairs) return;  // whole warp; no block barrier in this kernel
    // Pair p is (row p / heads, head p % heads): one division for the warp's first pair, then
    // the next pairs step through the heads (a 64-bit division per pair cost more instructions
    // than the pair's loads).
    int rows[V3_DELTA_PAIRS], hs[V3_DELTA_PAIRS];
    {
        int row = (int)(p0 / heads), h = (int)(p0 % heads);
#pragma unroll
        for (int j = 0; j < V3_DELTA_PAIRS; ++j) {
            rows[j] = row;
            hs[j] = h;
            if (++h == heads) {
                h = 0;
                ++row;
            }
        }
    }
    float2 d[V3_DELTA_PAIRS][Gr::G], o[V3_DELTA_PAIRS][Gr::G];
#pragma unroll
    for (int j = 0; j < V3_DELTA_PAIRS; ++j) {
        if (p0 + j >= pairs) continue;
        const size_t at = (size_t)rows[j] * width + hs[j] * HD + 2 * lane;
#pragma unroll
        for (int g = 0; g < Gr::G; ++g) {
            if (!Gr::has(g, lane)) continue;
            d[j][g] = v3_load_pair(d_out + at + 64 * g);
            o[j][g] = v3_load_pair(out + at + 64 * g);
        }
    }
#pragma unroll
    for (int j = 0; j < V3_DELTA_PAIRS; ++j) {
        if (p0 + j >= pairs) continue;  // warp-uniform
        const int row = rows[j], h = hs[j];
        const size_t at = (size_t)row * width + h * HD + 2 * lane;
        if (d_out_bf16) {
#pragma unroll
            for (int g = 0; g < Gr::G; ++g)
                if (Gr::has(g, lane))
                    prm_store_vec(d_out_bf16 + at + 64 * g, prm_pack_bf16x2(d[j][g].x, d[j][g].y));
        }
        const float v = prm_warp_sum(v3_lane_dot<HD>(d[j], o[j]));
        if (lane == 0) delta[(size_t)h * total + row] = v;
    }
}

// fp32 dO: delta, and dO's bf16 copy for the dQ and dK/dV kernels.
extern "C" __global__ void prm_attention_delta_tc3(const bf16* __restrict__ out, const float* __restrict__ d_out,
                                                   float* __restrict__ delta, bf16* __restrict__ d_out_bf16,
                                                   int width, int total) {
    v3_delta<V3_HD>(out, d_out, delta, d_out_bf16, width, total);
}
PRM_REGISTER_KERNEL(prm_attention_delta_tc3);

// dO already in bf16 (the out-projection's input-gradient product wrote it, as PyTorch autocast
// does): delta only, the same arithmetic on the widened values.
extern "C" __global__ void prm_attention_delta_bf16_tc3(const bf16* __restrict__ out, const bf16* __restrict__ d_out,
                                                        float* __restrict__ delta, int width, int total) {
    v3_delta<V3_HD>(out, d_out, delta, (bf16*)nullptr, width, total);
}
PRM_REGISTER_KERNEL(prm_attention_delta_bf16_tc3);

// The dQ kernel's body. WITH_DELTA: the kernel forms delta for its own 64 query rows from the
// resident dO tile and the context `out` (global), exactly as v3_delta does (each lane's two
// columns, fmaf(d.y, o.y, d.x·o.x), the same warp butterfly), uses it, and writes it to `delta`
// for the dK/dV kernel that runs after it: the delta kernel's launch and its pass over dO and O
// are saved. Otherwise it reads delta from the delta kernel.
// delta = rowsum(dO ⊙ O) of the 16 rows b0 .. b0+16 of a warp's block (v3_delta's arithmetic
// and order), now that the block's dO rows have landed in shared memory at sDb (row stride
// V3_LD): the context's two columns of each row (all loads first; rows past the end read
// nothing and are skipped), then every lane gets each row's sum; lane 0 writes it for dK/dV,
// and each lane keeps its own two rows' in row_delta. (Loaded here, after the first tile wait,
// not before it: held across it, the 16 registers spilled on sm_80.)
template <int HD = V3_HD>
__device__ __forceinline__ void v3_block_delta(const bf16* __restrict__ out, float* __restrict__ delta,
                                               const bf16* sDb, int b0, int T, int row0, int h, int width,
                                               int total, float row_delta[2]) {
    using Gr = V3Groups<HD>;
    const int lane = threadIdx.x & 31;
    float2 o[16][Gr::G];
#pragma unroll
    for (int r = 0; r < 16; ++r) {
        const size_t at = (size_t)(row0 + b0 + r) * width + h * HD + 2 * lane;
#pragma unroll
        for (int g = 0; g < Gr::G; ++g)
            if (Gr::has(g, lane)) o[r][g] = b0 + r < T ? v3_load_pair(out + at + 64 * g) : make_float2(0.0f, 0.0f);
    }
#pragma unroll
    for (int r = 0; r < 16; ++r) {
        if (b0 + r < T) {  // warp-uniform
            float2 d[Gr::G];
#pragma unroll
            for (int g = 0; g < Gr::G; ++g)
                if (Gr::has(g, lane)) d[g] = v3_load_pair(sDb + r * V3Tile<HD>::LD + 64 * g + 2 * lane);
            const float v = prm_warp_sum(v3_lane_dot<HD>(d, o[r]));
            if (lane == 0) delta[(size_t)h * total + row0 + b0 + r] = v;
            if (r == (lane >> 2)) row_delta[0] = v;
            if (r == (lane >> 2) + 8) row_delta[1] = v;
        }
    }
}

template <bool WITH_DELTA, int HD = V3_HD>
__device__ __forceinline__ void v3_bwd_dq(const bf16* __restrict__ qkv, const bf16* __restrict__ d_out,
                                          const float* __restrict__ lse, float* __restrict__ delta,
                                          const int* __restrict__ cu_seqlens, bf16* __restrict__ d_qkv, int width,
                                          int total, int causal, int straight, const bf16* __restrict__ out,
                                          bf16* smem) {
    using H = PrmAttHead<HD>;
    constexpr int ELEMS = V3Tile<HD>::ELEMS, LD = V3Tile<HD>::LD;
    bf16* sQ = smem;
    bf16* sD = smem + ELEMS;
    bf16* sK = smem + 2 * ELEMS;  // two stages
    bf16* sV = smem + 4 * ELEMS;  // two stages
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int q0 = blockIdx.x * V3_TILE;
    if (q0 >= T) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t ld = 3 * (size_t)width;
    const bf16* base = qkv + (size_t)row0 * ld;
    const bf16* gq = base + h * HD;
    const bf16* gk = base + width + h * HD;
    const bf16* gv = base + 2 * width + h * HD;
    const int wq0 = q0 + warp * 16;
    const bool active = wq0 < T;
    const int rows[2] = {wq0 + (lane >> 2), wq0 + (lane >> 2) + 8};
    const int kend = causal ? min(T, q0 + V3_TILE) : T;
    const int ntiles = (kend + V3_TILE - 1) / V3_TILE;

    v3_load_tile<HD>(sQ, gq, ld, q0, T);
    v3_load_tile<HD>(sD, d_out + (size_t)row0 * width + h * HD, width, q0, T);
    v3_load_tile<HD>(sK, gk, ld, 0, T);
    v3_load_tile<HD>(sV, gv, ld, 0, T);
    prm_cp_async_commit();

    float lse2[2], row_delta[2];  // lse in log2 units
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const bool ok = rows[r] < T;
        lse2[r] = ok ? lse[(size_t)h * total + row0 + rows[r]] * PRM_ATT_LOG2E : 0.0f;
        row_delta[r] = (!WITH_DELTA && ok) ? delta[(size_t)h * total + row0 + rows[r]] : 0.0f;
    }
    float dq[H::NT][4];
    prm_att_zero<H::NT>(dq);
    for (int kt = 0; kt < ntiles; ++kt) {
        const int k0 = kt * V3_TILE, stage = kt & 1;
        if (kt + 1 < ntiles) {
            v3_load_tile<HD>(sK + (stage ^ 1) * ELEMS, gk, ld, k0 + V3_TILE, T);
            v3_load_tile<HD>(sV + (stage ^ 1) * ELEMS, gv, ld, k0 + V3_TILE, T);
            prm_cp_async_commit();
            prm_cp_async_wait<1>();
        } else {
            prm_cp_async_wait<0>();
        }
        __syncthreads();
        if (WITH_DELTA && active && kt == 0)
            v3_block_delta<HD>(out, delta, sD + warp * 16 * LD, wq0, T, row0, h, width, total, row_delta);
        if (active) {
            int kvalid = min(V3_TILE, kend - k0);
            if (causal) kvalid = min(kvalid, wq0 + 16 - k0);
            const bf16* tk = sK + stage * ELEMS;
            const bf16* tv = sV + stage * ELEMS;
            // FULL: a whole tile, all 16 rows below T, nothing masked: straight-line code.
            auto tile = [&](auto full) {
                constexpr bool FULL = decltype(full)::value;
                // 32 keys at a time: half the score registers live at once (a loop, not
                // unrolled: interleaving the halves needed more than 128 registers).
#pragma unroll 1
                for (int half = 0; half < 2; ++half) {
                    if (!FULL && half * 32 >= kvalid) continue;
                    float s[4][4], dp[4][4];
#pragma unroll
                    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                        for (int i = 0; i < 4; ++i) s[nt][i] = dp[nt][i] = 0.0f;
                    v3_mma_abt_half<FULL, HD>(s, sQ, warp * 16, tk, half, kvalid);   // S = Q·Kᵀ
                    v3_mma_abt_half<FULL, HD>(dp, sD, warp * 16, tv, half, kvalid);  // dP = dO·Vᵀ
                    prm_att_dq_ds<FULL, HD>(s, dp, half, kvalid, causal, k0, rows, T, lse2, row_delta);
                    v3_mma_pb_half<FULL, HD>(dq, s, tk, half, kvalid);  // dQ += dS·K
                }
            };
            if (straight && kvalid == V3_TILE && !causal && wq0 + 16 <= T) {
                tile(prm_flag<true>{});
            } else {
                tile(prm_flag<false>{});
            }
        }
        __syncthreads();
    }
    if (!active) return;
    const float one[2] = {1.0f, 1.0f};
    prm_att_store_bf16<H::NS>(d_qkv + (size_t)row0 * ld, ld, h * HD, rows, T, dq, one);
}

// dQ after the delta kernel (delta read).
extern "C" __global__ void __launch_bounds__(128, 4)
    prm_attention_bwd_dq_tc3(const bf16* __restrict__ qkv, const bf16* __restrict__ d_out, const float* __restrict__ lse,
                             const float* __restrict__ delta, const int* __restrict__ cu_seqlens,
                             bf16* __restrict__ d_qkv, int width, int total, int causal, int straight) {
    PRM_DYNAMIC_SHARED(bf16, smem);
    v3_bwd_dq<false>(qkv, d_out, lse, const_cast<float*>(delta), cu_seqlens, d_qkv, width, total, causal, straight,
                     nullptr, smem);
}
PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc3);

// dQ forming delta itself from dO (bf16) and the context `out` (bf16), and writing it for the
// dK/dV kernel, which must run after it (the engine's path: no delta kernel).
extern "C" __global__ void __launch_bounds__(128, 4)
    prm_attention_bwd_dq_delta_tc3(const bf16* __restrict__ qkv, const bf16* __restrict__ d_out,
                                   const float* __restrict__ lse, float* __restrict__ delta,
                                   const int* __restrict__ cu_seqlens, bf16* __restrict__ d_qkv, int width,
                                   int total, int causal, int straight, const bf16* __restrict__ out) {
    PRM_DYNAMIC_SHARED(bf16, smem);
    v3_bwd_dq<true>(qkv, d_out, lse, delta, cu_seqlens, d_qkv, width, total, causal, straight, out, smem);
}
PRM_REGISTER_KERNEL(prm_attention_bwd_dq_delta_tc3);

// What a dK/dV kernel forms: both (one pass), or dV or dK alone (heads wider than 96, whose two
// 16×KP accumulators a warp would spill registers: two kernels, each running the one-pass
// kernel's operations for its half in the same order, at the price of forming Pᵀ twice).
#define V3_DKDV 0
#define V3_DV 1
#define V3_DK 2

// The dK/dV kernel's body for heads HD wide.
template <int HD, int PART>
__device__ __forceinline__ void v3_bwd_dkdv(const bf16* __restrict__ qkv, const bf16* __restrict__ d_out,
                                            const float* __restrict__ lse, const float* __restrict__ delta,
                                            const int* __restrict__ cu_seqlens, bf16* __restrict__ d_qkv, int width,
                                            int total, int causal, int straight) {
    PRM_DYNAMIC_SHARED_IN_TEMPLATE(bf16, smem);
    using H = PrmAttHead<HD>;
    constexpr int ELEMS = V3Tile<HD>::ELEMS;
    constexpr bool WANT_DV = PART != V3_DK, WANT_DK = PART != V3_DV;
    bf16* sK = smem;
    bf16* sV = smem + ELEMS;
    bf16* sQ = smem + 2 * ELEMS;  // two stages
    bf16* sD = smem + 4 * ELEMS;  // two stages
    float* sLse = reinterpret_cast<float*>(smem + 6 * ELEMS);  // two stages of 64, log2 units
    float* sDelta = sLse + 2 * V3_TILE;                                 // two stages of 64
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int k0 = blockIdx.x * V3_TILE;
    if (k0 >= T) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t ld = 3 * (size_t)width;
    const bf16* base = qkv + (size_t)row0 * ld;
    const bf16* gq = base + h * HD;
    const bf16* gd = d_out + (size_t)row0 * width + h * HD;
    const int wk0 = k0 + warp * 16;
    const bool active = wk0 < T;
    const int keys[2] = {wk0 + (lane >> 2), wk0 + (lane >> 2) + 8};
    // Causal: queries before this key tile see none of its keys (tiles are 64-aligned).
    const int qstart = causal ? k0 : 0;
    const int ntiles = (T - qstart + V3_TILE - 1) / V3_TILE;

    // Per-query softmax statistics of query tile q0 into stage `st` (plain stores; the
    // barrier before their use publishes them).
    auto load_stats = [&](int st, int q0) {
        if (threadIdx.x < V3_TILE) {
            const int q = q0 + threadIdx.x;
            const bool ok = q < T;
            sLse[st * V3_TILE + threadIdx.x] = ok ? lse[(size_t)h * total + row0 + q] * PRM_ATT_LOG2E : 0.0f;
            sDelta[st * V3_TILE + threadIdx.x] = ok ? delta[(size_t)h * total + row0 + q] : 0.0f;
        }
    };

    v3_load_tile<HD>(sK, base + width + h * HD, ld, k0, T);
    if (WANT_DK) v3_load_tile<HD>(sV, base + 2 * width + h * HD, ld, k0, T);  // dPᵀ = V·dOᵀ is dK's
    v3_load_tile<HD>(sQ, gq, ld, qstart, T);
    v3_load_tile<HD>(sD, gd, width, qstart, T);
    prm_cp_async_commit();
    load_stats(0, qstart);

    // One accumulator a part: the one-pass kernel holds both, a split kernel only its own.
    float dk[WANT_DK ? H::NT : 1][4], dv[WANT_DV ? H::NT : 1][4];
    prm_att_zero<WANT_DK ? H::NT : 1>(dk);
    prm_att_zero<WANT_DV ? H::NT : 1>(dv);
    for (int it = 0; it < ntiles; ++it) {
        const int q0 = qstart + it * V3_TILE, stage = it & 1;
        if (it + 1 < ntiles) {
            v3_load_tile<HD>(sQ + (stage ^ 1) * ELEMS, gq, ld, q0 + V3_TILE, T);
            v3_load_tile<HD>(sD + (stage ^ 1) * ELEMS, gd, width, q0 + V3_TILE, T);
            prm_cp_async_commit();
            load_stats(stage ^ 1, q0 + V3_TILE);
            prm_cp_async_wait<1>();
        } else {
            prm_cp_async_wait<0>();
        }
        __syncthreads();
        if (active) {
            const int qvalid = min(V3_TILE, T - q0);
            const bf16* tq = sQ + stage * ELEMS;
            const bf16* td = sD + stage * ELEMS;
            const float* tl = sLse + stage * V3_TILE;
            const float* tdel = sDelta + stage * V3_TILE;
            // FULL: a whole tile, all 16 keys below T, nothing masked: straight-line code.
            auto tile = [&](auto full) {
                constexpr bool FULL = decltype(full)::value;
                // 32 queries at a time: half the score registers live at once (a loop, not
                // unrolled: interleaving the halves needed more than 128 registers).
#pragma unroll 1
                for (int half = 0; half < 2; ++half) {
                    if (!FULL && half * 32 >= qvalid) continue;
                    // Pᵀ = exp(K·Qᵀ/8 − lse), rounded to bf16 once: it feeds dV and dS.
                    uint32_t pb[2][4];
                    {
                        float st[4][4];
#pragma unroll
                        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                            for (int i = 0; i < 4; ++i) st[nt][i] = 0.0f;
                        v3_mma_abt_half<FULL, HD>(st, sK, warp * 16, tq, half, qvalid);  // Sᵀ = K·Qᵀ
                        prm_att_dkdv_pt<FULL, HD>(pb, st, half, qvalid, causal, q0, keys, T, tl);
                    }
                    // dV += Pᵀ·dO
                    if constexpr (WANT_DV) {
#pragma unroll
                        for (int j = 0; j < 2; ++j)
                            if (FULL || (half * 2 + j) * 16 < qvalid)
                                v3_mma_ab_step<HD>(dv, pb[j], td, half * 2 + j);
                    }
                    if constexpr (WANT_DK) {
                        float dpt[4][4];
#pragma unroll
                        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                            for (int i = 0; i < 4; ++i) dpt[nt][i] = 0.0f;
                        v3_mma_abt_half<FULL, HD>(dpt, sV, warp * 16, td, half, qvalid);  // dPᵀ = V·dOᵀ
                        prm_att_dkdv_dst<HD>(dpt, pb, half, tdel);
                        v3_mma_pb_half<FULL, HD>(dk, dpt, tq, half, qvalid);  // dK += dSᵀ·Q
                    }
                }
            };
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
            constexpr bool arch_straight = false;  // sm_80's straight-line tile spills at 128 registers
#else
            constexpr bool arch_straight = true;
#endif
            if (arch_straight && straight && qvalid == V3_TILE && !causal && wk0 + 16 <= T) {
                tile(prm_flag<true>{});
            } else {
                tile(prm_flag<false>{});
            }
        }
        __syncthreads();
    }
    if (!active) return;
    const float one[2] = {1.0f, 1.0f};
    if constexpr (WANT_DK) prm_att_store_bf16<H::NS>(d_qkv + (size_t)row0 * ld, ld, width + h * HD, keys, T, dk, one);
    if constexpr (WANT_DV)
        prm_att_store_bf16<H::NS>(d_qkv + (size_t)row0 * ld, ld, 2 * width + h * HD, keys, T, dv, one);
}

extern "C" __global__ void __launch_bounds__(128, 4)
    prm_attention_bwd_dkdv_tc3(const bf16* __restrict__ qkv, const bf16* __restrict__ d_out,
                               const float* __restrict__ lse, const float* __restrict__ delta,
                               const int* __restrict__ cu_seqlens, bf16* __restrict__ d_qkv, int width, int total,
                               int causal, int straight) {
    v3_bwd_dkdv<V3_HD, V3_DKDV>(qkv, d_out, lse, delta, cu_seqlens, d_qkv, width, total, causal, straight);
}
PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_tc3);

// ---------------------------------------------------------------------------------------------
// The backward with paired blocks (TcOptions::paired_rows): one CTA per 128-row tile, each warp
// running two 16-row blocks (rows or keys 32·warp .. +16 of the tile and the 16 after) at once,
// so that every fragment of the streamed tiles read from shared memory feeds both blocks'
// products, and the warp has two independent chains. Each row's (dQ) or key's (dK/dV)
// arithmetic is the single-block kernel's, in its order: the same bits.
// ---------------------------------------------------------------------------------------------

// acc[k] (16 × 32) = A_k · Mᵀ restricted to M rows half·32 .. +32, for A_0 rows arow0 .. +16 of
// `sa` and A_1 the 16 after, sharing each B fragment of `sm` (v3_mma_abt_half's order for each).
template <bool FULL = false>
__device__ __forceinline__ void v3_mma_abt_half_pair(float acc[2][4][4], const bf16* sa, int arow0, const bf16* sm,
                                                     int half, int ncols) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
        uint32_t a[2][4];
        v3_frag_a(a[0], sa, arow0, ks * 16);
        v3_frag_a(a[1], sa, arow0 + 16, ks * 16);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int np = half * 2 + j;
            if (!FULL && np * 16 >= ncols) continue;
            uint32_t b[4];
            v3_frag_bt(b, sm, np * 16, ks * 16);
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                prm_mma_bf16_16816(acc[k][2 * j], a[k], b);
                prm_mma_bf16_16816(acc[k][2 * j + 1], a[k], b + 2);
            }
        }
    }
}

// acc[k] (16 × 64) += A_k · M[ks·16 .. +16, :] for k = 0, 1, sharing each B fragment
// (v3_mma_ab_step's order for each).
__device__ __forceinline__ void v3_mma_ab_step_pair(float acc[2][8][4], const uint32_t a[2][4], const bf16* sm,
                                                    int ks) {
#pragma unroll
    for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        v3_frag_b(b, sm, ks * 16, np * 16);
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            prm_mma_bf16_16816(acc[k][2 * np], a[k], b);
            prm_mma_bf16_16816(acc[k][2 * np + 1], a[k], b + 2);
        }
    }
}

// acc[k] (16 × 64) += A_k · M[half·32 .. +32, :], A_k the bf16 packing of p[k] (16 × 32), for
// k = 0, 1; k-steps at or past `kvalid` skipped (FULL: none). v3_mma_pb_half's order for each.
template <bool FULL = false>
__device__ __forceinline__ void v3_mma_pb_half_pair(float acc[2][8][4], const float p[2][4][4], const bf16* sm,
                                                    int half, int kvalid) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int ks = half * 2 + j;
        if (!FULL && ks * 16 >= kvalid) continue;
        uint32_t a[2][4];
        prm_att_pack_a(a[0], p[0][2 * j], p[0][2 * j + 1]);
        prm_att_pack_a(a[1], p[1][2 * j], p[1][2 * j + 1]);
        v3_mma_ab_step_pair(acc, a, sm, ks);
    }
}

// dQ with paired blocks: one CTA per (128-query tile, head, sequence); Q and dO resident (two
// tiles each), K and V streamed through two stages, as v3_bwd_dq does for 64 queries. Per
// block, the keys a tile offers are v3_bwd_dq's: below the end and (causal) up to the block's
// last row. The products run to the second block's count: the first block's extra keys lie
// after its rows, where dS = 0, and adding those zero products changes nothing. Under a causal
// mask a warp skips the tiles past its second block's last row; a pair starts at a multiple of
// 32, so no tile it runs lies wholly past its first block. WITH_DELTA: delta formed for both
// blocks' rows from the resident dO and the context, as v3_bwd_dq does for one.
template <bool WITH_DELTA>
__device__ __forceinline__ void v3_bwd_dq_pairs(const bf16* __restrict__ qkv, const bf16* __restrict__ d_out,
                                                const float* __restrict__ lse, float* __restrict__ delta,
                                                const int* __restrict__ cu_seqlens, bf16* __restrict__ d_qkv,
                                                int width, int total, int causal, int straight,
                                                const bf16* __restrict__ out, bf16* smem) {
    bf16* sQ = smem;                      // two tiles: 128 rows
    bf16* sD = smem + 2 * V3_TILE_ELEMS;  // two tiles: 128 rows
    bf16* sK = smem + 4 * V3_TILE_ELEMS;  // two stages
    bf16* sV = smem + 6 * V3_TILE_ELEMS;  // two stages
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int q0 = blockIdx.x * 2 * V3_TILE;
    if (q0 >= T) return;  // whole CTA, before any barrier
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t ld = 3 * (size_t)width;
    const bf16* base = qkv + (size_t)row0 * ld;
    const bf16* gq = base + h * V3_HD;
    const bf16* gd = d_out + (size_t)row0 * width + h * V3_HD;
    const bf16* gk = base + width + h * V3_HD;
    const bf16* gv = base + 2 * width + h * V3_HD;
    const int wq0 = q0 + warp * 32;
    const bool active = wq0 < T;  // warp-uniform: the first block has rows
    const int rows[2][2] = {{wq0 + (lane >> 2), wq0 + (lane >> 2) + 8},
                            {wq0 + 16 + (lane >> 2), wq0 + 24 + (lane >> 2)}};
    const int kend = causal ? min(T, q0 + 2 * V3_TILE) : T;
    const int ntiles = (kend + V3_TILE - 1) / V3_TILE;

    v3_load_tile(sQ, gq, ld, q0, T);
    v3_load_tile(sQ + V3_TILE_ELEMS, gq, ld, q0 + V3_TILE, T);
    v3_load_tile(sD, gd, width, q0, T);
    v3_load_tile(sD + V3_TILE_ELEMS, gd, width, q0 + V3_TILE, T);
    v3_load_tile(sK, gk, ld, 0, T);
    v3_load_tile(sV, gv, ld, 0, T);
    prm_cp_async_commit();

    float lse2[2][2], row_delta[2][2];  // lse in log2 units
#pragma unroll
    for (int k = 0; k < 2; ++k)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const bool ok = rows[k][r] < T;
            lse2[k][r] = ok ? lse[(size_t)h * total + row0 + rows[k][r]] * PRM_ATT_LOG2E : 0.0f;
            row_delta[k][r] = (!WITH_DELTA && ok) ? delta[(size_t)h * total + row0 + rows[k][r]] : 0.0f;
        }
    float dq[2][8][4];
    prm_att_zero<8>(dq[0]);
    prm_att_zero<8>(dq[1]);
    for (int kt = 0; kt < ntiles; ++kt) {
        const int k0 = kt * V3_TILE, stage = kt & 1;
        if (kt + 1 < ntiles) {
            v3_load_tile(sK + (stage ^ 1) * V3_TILE_ELEMS, gk, ld, k0 + V3_TILE, T);
            v3_load_tile(sV + (stage ^ 1) * V3_TILE_ELEMS, gv, ld, k0 + V3_TILE, T);
            prm_cp_async_commit();
            prm_cp_async_wait<1>();
        } else {
            prm_cp_async_wait<0>();
        }
        __syncthreads();
        if (WITH_DELTA && active && kt == 0) {
            // Each block's 16 rows in turn (the first tile is never skipped). Unrolled:
            // row_delta[k] indexed at run time would live in local memory.
#pragma unroll
            for (int k = 0; k < 2; ++k)
                v3_block_delta(out, delta, sD + (warp * 32 + 16 * k) * V3_LD, wq0 + 16 * k, T, row0, h, width,
                               total, row_delta[k]);
        }
        if (active && !(causal && k0 > wq0 + 31)) {
            const int kvalid = min(V3_TILE, kend - k0);
            const int kv[2] = {causal ? min(kvalid, wq0 + 16 - k0) : kvalid,
                               causal ? min(kvalid, wq0 + 32 - k0) : kvalid};
            const bf16* tk = sK + stage * V3_TILE_ELEMS;
            const bf16* tv = sV + stage * V3_TILE_ELEMS;
            auto tile = [&](auto full) {
                constexpr bool FULL = decltype(full)::value;
#pragma unroll 1
                for (int half = 0; half < 2; ++half) {
                    if (!FULL && half * 32 >= kv[1]) continue;
                    float s[2][4][4], dp[2][4][4];
#pragma unroll
                    for (int k = 0; k < 2; ++k) {
                        prm_att_zero<4>(s[k]);
                        prm_att_zero<4>(dp[k]);
                    }
                    v3_mma_abt_half_pair<FULL>(s, sQ, warp * 32, tk, half, kv[1]);   // S = Q·Kᵀ
                    v3_mma_abt_half_pair<FULL>(dp, sD, warp * 32, tv, half, kv[1]);  // dP = dO·Vᵀ
#pragma unroll
                    for (int k = 0; k < 2; ++k)
                        prm_att_dq_ds<FULL>(s[k], dp[k], half, kv[k], causal, k0, rows[k], T, lse2[k], row_delta[k]);
                    v3_mma_pb_half_pair<FULL>(dq, s, tk, half, kv[1]);  // dQ += dS·K
                }
            };
            if (straight && kvalid == V3_TILE && !causal && wq0 + 32 <= T) {
                tile(prm_flag<true>{});
            } else {
                tile(prm_flag<false>{});
            }
        }
        __syncthreads();
    }
    if (!active) return;  // after the last barrier
    const float one[2] = {1.0f, 1.0f};
#pragma unroll
    for (int k = 0; k < 2; ++k) prm_att_store_bf16(d_qkv + (size_t)row0 * ld, ld, h * V3_HD, rows[k], T, dq[k], one);
}

// dQ with paired blocks after the delta kernel (delta read).
extern "C" __global__ void __launch_bounds__(128, 2)
    prm_attention_bwd_dq_tc3_pairs(const bf16* __restrict__ qkv, const bf16* __restrict__ d_out,
                                   const float* __restrict__ lse, const float* __restrict__ delta,
                                   const int* __restrict__ cu_seqlens, bf16* __restrict__ d_qkv, int width, int total,
                                   int causal, int straight) {
    PRM_DYNAMIC_SHARED(bf16, smem);
    v3_bwd_dq_pairs<false>(qkv, d_out, lse, const_cast<float*>(delta), cu_seqlens, d_qkv, width, total, causal,
                           straight, nullptr, smem);
}
PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc3_pairs);

// dQ with paired blocks, forming delta itself and writing it for the dK/dV kernel after it.
extern "C" __global__ void __launch_bounds__(128, 2)
    prm_attention_bwd_dq_delta_tc3_pairs(const bf16* __restrict__ qkv, const bf16* __restrict__ d_out,
                                         const float* __restrict__ lse, float* __restrict__ delta,
                                         const int* __restrict__ cu_seqlens, bf16* __restrict__ d_qkv, int width,
                                         int total, int causal, int straight, const bf16* __restrict__ out) {
    PRM_DYNAMIC_SHARED(bf16, smem);
    v3_bwd_dq_pairs<true>(qkv, d_out, lse, delta, cu_seqlens, d_qkv, width, total, causal, straight, out, smem);
}
PRM_REGISTER_KERNEL(prm_attention_bwd_dq_delta_tc3_pairs);

// dK/dV with paired blocks: one CTA per (128-key tile, head, sequence); K and V resident (two
// tiles each), Q/dO tiles and their lse/delta streamed through two stages, as
// prm_attention_bwd_dkdv_tc3 does for 64 keys. A pair lies inside one 64-key tile, so both
// blocks start at the query tile v3 starts them at: under a causal mask the CTA streams from
// its first key on, and a warp skips the query tiles that lie wholly before its keys. A second
// block past the sequence's end runs on zero rows (masked: P = 0) and stores nothing. Both
// causal skips, here and in the paired dQ, only save work: a tile they skip would add zero
// products.
extern "C" __global__ void __launch_bounds__(128, 2)
    prm_attention_bwd_dkdv_tc3_pairs(const bf16* __restrict__ qkv, const bf16* __restrict__ d_out,
                                     const float* __restrict__ lse, const float* __restrict__ delta,
                                     const int* __restrict__ cu_seqlens, bf16* __restrict__ d_qkv, int width,
                                     int total, int causal, int straight) {
    PRM_DYNAMIC_SHARED(bf16, smem);
    bf16* sK = smem;                      // two tiles: 128 keys
    bf16* sV = smem + 2 * V3_TILE_ELEMS;  // two tiles: 128 keys
    bf16* sQ = smem + 4 * V3_TILE_ELEMS;  // two stages
    bf16* sD = smem + 6 * V3_TILE_ELEMS;  // two stages
    float* sLse = reinterpret_cast<float*>(smem + 8 * V3_TILE_ELEMS);  // two stages of 64, log2 units
    float* sDelta = sLse + 2 * V3_TILE;                                 // two stages of 64
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int k0 = blockIdx.x * 2 * V3_TILE;
    if (k0 >= T) return;  // whole CTA, before any barrier
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t ld = 3 * (size_t)width;
    const bf16* base = qkv + (size_t)row0 * ld;
    const bf16* gq = base + h * V3_HD;
    const bf16* gd = d_out + (size_t)row0 * width + h * V3_HD;
    const int wk0 = k0 + warp * 32;
    const bool active = wk0 < T;  // warp-uniform: the first block has keys
    const int keys[2][2] = {{wk0 + (lane >> 2), wk0 + (lane >> 2) + 8},
                            {wk0 + 16 + (lane >> 2), wk0 + 24 + (lane >> 2)}};
    // Causal: queries before this CTA's first key see none of its keys.
    const int qstart = causal ? k0 : 0;
    const int ntiles = (T - qstart + V3_TILE - 1) / V3_TILE;

    auto load_stats = [&](int st, int q0) {
        if (threadIdx.x < V3_TILE) {
            const int q = q0 + threadIdx.x;
            const bool ok = q < T;
            sLse[st * V3_TILE + threadIdx.x] = ok ? lse[(size_t)h * total + row0 + q] * PRM_ATT_LOG2E : 0.0f;
            sDelta[st * V3_TILE + threadIdx.x] = ok ? delta[(size_t)h * total + row0 + q] : 0.0f;
        }
    };

    v3_load_tile(sK, base + width + h * V3_HD, ld, k0, T);
    v3_load_tile(sK + V3_TILE_ELEMS, base + width + h * V3_HD, ld, k0 + V3_TILE, T);
    v3_load_tile(sV, base + 2 * width + h * V3_HD, ld, k0, T);
    v3_load_tile(sV + V3_TILE_ELEMS, base + 2 * width + h * V3_HD, ld, k0 + V3_TILE, T);
    v3_load_tile(sQ, gq, ld, qstart, T);
    v3_load_tile(sD, gd, width, qstart, T);
    prm_cp_async_commit();
    load_stats(0, qstart);

    float dk[2][8][4], dv[2][8][4];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        prm_att_zero<8>(dk[k]);
        prm_att_zero<8>(dv[k]);
    }
    for (int it = 0; it < ntiles; ++it) {
        const int q0 = qstart + it * V3_TILE, stage = it & 1;
        if (it + 1 < ntiles) {
            v3_load_tile(sQ + (stage ^ 1) * V3_TILE_ELEMS, gq, ld, q0 + V3_TILE, T);
            v3_load_tile(sD + (stage ^ 1) * V3_TILE_ELEMS, gd, width, q0 + V3_TILE, T);
            prm_cp_async_commit();
            load_stats(stage ^ 1, q0 + V3_TILE);
            prm_cp_async_wait<1>();
        } else {
            prm_cp_async_wait<0>();
        }
        __syncthreads();
        if (active && !(causal && q0 + V3_TILE <= wk0)) {
            const int qvalid = min(V3_TILE, T - q0);
            const bf16* tq = sQ + stage * V3_TILE_ELEMS;
            const bf16* td = sD + stage * V3_TILE_ELEMS;
            const float* tl = sLse + stage * V3_TILE;
            const float* tdel = sDelta + stage * V3_TILE;
            // FULL: a whole tile, both blocks' 32 keys below T, nothing masked.
            auto tile = [&](auto full) {
                constexpr bool FULL = decltype(full)::value;
#pragma unroll 1
                for (int half = 0; half < 2; ++half) {
                    if (!FULL && half * 32 >= qvalid) continue;
                    // Pᵀ = exp(K·Qᵀ/8 − lse), rounded to bf16 once: it feeds dV and dS.
                    uint32_t pb[2][2][4];
                    {
                        float st[2][4][4];
                        prm_att_zero<4>(st[0]);
                        prm_att_zero<4>(st[1]);
                        v3_mma_abt_half_pair<FULL>(st, sK, warp * 32, tq, half, qvalid);  // Sᵀ = K·Qᵀ
#pragma unroll
                        for (int k = 0; k < 2; ++k)
                            prm_att_dkdv_pt<FULL>(pb[k], st[k], half, qvalid, causal, q0, keys[k], T, tl);
                    }
                    // dV += Pᵀ·dO
#pragma unroll
                    for (int j = 0; j < 2; ++j)
                        if (FULL || (half * 2 + j) * 16 < qvalid) {
                            const uint32_t a[2][4] = {{pb[0][j][0], pb[0][j][1], pb[0][j][2], pb[0][j][3]},
                                                      {pb[1][j][0], pb[1][j][1], pb[1][j][2], pb[1][j][3]}};
                            v3_mma_ab_step_pair(dv, a, td, half * 2 + j);
                        }
                    float dpt[2][4][4];
                    prm_att_zero<4>(dpt[0]);
                    prm_att_zero<4>(dpt[1]);
                    v3_mma_abt_half_pair<FULL>(dpt, sV, warp * 32, td, half, qvalid);  // dPᵀ = V·dOᵀ
#pragma unroll
                    for (int k = 0; k < 2; ++k) prm_att_dkdv_dst(dpt[k], pb[k], half, tdel);
                    v3_mma_pb_half_pair<FULL>(dk, dpt, tq, half, qvalid);  // dK += dSᵀ·Q
                }
            };
            if (straight && qvalid == V3_TILE && !causal && wk0 + 32 <= T) {
                tile(prm_flag<true>{});
            } else {
                tile(prm_flag<false>{});
            }
        }
        __syncthreads();
    }
    if (!active) return;  // after the last barrier
    const float one[2] = {1.0f, 1.0f};
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        prm_att_store_bf16(d_qkv + (size_t)row0 * ld, ld, width + h * V3_HD, keys[k], T, dk[k], one);
        prm_att_store_bf16(d_qkv + (size_t)row0 * ld, ld, 2 * width + h * V3_HD, keys[k], T, dv[k], one);
    }
}
PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_tc3_pairs);

// ---------------------------------------------------------------------------------------------
// Heads other than 64 wide: every multiple of 8 from 72 to 128 (open_clip's ViT-H/14 has 80,
// ViT-g/14 88, ViT-bigG/14 104), the kernels above instantiated for HD, their names suffixed
// _hd<HD>: the forward, both delta kernels, dQ (with and without delta) and dK/dV, as one kernel
// up to 96 and as dV then dK above (each one 16×KP accumulator a warp). The paired kernels and
// v4 stay 64-only. Tiles are 64 rows of KP + 8 elements, so shared memory grows with the head
// dim (tc3.rs sizes it); __launch_bounds__(128, 2) lets a thread hold the wider accumulators.
// ---------------------------------------------------------------------------------------------
#define PRM_V3_COMMON(HD)                                                                                             \
    extern "C" __global__ void __launch_bounds__(128, 2) prm_attention_forward_tc3_hd##HD(                            \
        const bf16* __restrict__ qkv, const int* __restrict__ cu_seqlens, bf16* __restrict__ out,                      \
        float* __restrict__ lse, int width, int total, int mode, int causal, int straight) {                           \
        v3_forward<HD>(qkv, cu_seqlens, out, lse, width, total, mode, causal, straight);                               \
    }                                                                                                                  \
    extern "C" __global__ void prm_attention_delta_tc3_hd##HD(const bf16* __restrict__ out,                           \
                                                             const float* __restrict__ d_out,                         \
                                                             float* __restrict__ delta, bf16* __restrict__ d_out_bf16, \
                                                             int width, int total) {                                  \
        v3_delta<HD>(out, d_out, delta, d_out_bf16, width, total);                                                     \
    }                                                                                                                  \
    extern "C" __global__ void prm_attention_delta_bf16_tc3_hd##HD(                                                    \
        const bf16* __restrict__ out, const bf16* __restrict__ d_out, float* __restrict__ delta, int width,            \
        int total) {                                                                                                   \
        v3_delta<HD>(out, d_out, delta, (bf16*)nullptr, width, total);                                                 \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128, 2) prm_attention_bwd_dq_tc3_hd##HD(                             \
        const bf16* __restrict__ qkv, const bf16* __restrict__ d_out, const float* __restrict__ lse,                   \
        const float* __restrict__ delta, const int* __restrict__ cu_seqlens, bf16* __restrict__ d_qkv, int width,      \
        int total, int causal, int straight) {                                                                         \
        PRM_DYNAMIC_SHARED(bf16, smem);                                                                                \
        v3_bwd_dq<false, HD>(qkv, d_out, lse, const_cast<float*>(delta), cu_seqlens, d_qkv, width, total, causal,      \
                             straight, nullptr, smem);                                                                 \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128, 2) prm_attention_bwd_dq_delta_tc3_hd##HD(                       \
        const bf16* __restrict__ qkv, const bf16* __restrict__ d_out, const float* __restrict__ lse,                   \
        float* __restrict__ delta, const int* __restrict__ cu_seqlens, bf16* __restrict__ d_qkv, int width,            \
        int total, int causal, int straight, const bf16* __restrict__ out) {                                           \
        PRM_DYNAMIC_SHARED(bf16, smem);                                                                                \
        v3_bwd_dq<true, HD>(qkv, d_out, lse, delta, cu_seqlens, d_qkv, width, total, causal, straight, out, smem);     \
    }

// A dK/dV entry point: NAME runs v3_bwd_dkdv<HD, PART>.
#define PRM_V3_DKDV(NAME, HD, PART)                                                                                   \
    extern "C" __global__ void __launch_bounds__(128, 2)                                                               \
        NAME(const bf16* __restrict__ qkv, const bf16* __restrict__ d_out, const float* __restrict__ lse,              \
             const float* __restrict__ delta, const int* __restrict__ cu_seqlens, bf16* __restrict__ d_qkv,            \
             int width, int total, int causal, int straight) {                                                         \
        v3_bwd_dkdv<HD, PART>(qkv, d_out, lse, delta, cu_seqlens, d_qkv, width, total, causal, straight);              \
    }

#define PRM_V3_KERNELS(HD)                                                                                            \
    PRM_V3_COMMON(HD)                                                                                                  \
    PRM_V3_DKDV(prm_attention_bwd_dkdv_tc3_hd##HD, HD, V3_DKDV)

#define PRM_V3_KERNELS_SPLIT(HD)                                                                                      \
    PRM_V3_COMMON(HD)                                                                                                  \
    PRM_V3_DKDV(prm_attention_bwd_dv_tc3_hd##HD, HD, V3_DV)                                                            \
    PRM_V3_DKDV(prm_attention_bwd_dk_tc3_hd##HD, HD, V3_DK)

PRM_V3_KERNELS(72)
PRM_V3_KERNELS(80)
PRM_V3_KERNELS(88)
PRM_V3_KERNELS(96)
PRM_V3_KERNELS_SPLIT(104)
PRM_V3_KERNELS_SPLIT(112)
PRM_V3_KERNELS_SPLIT(120)
PRM_V3_KERNELS_SPLIT(128)

// One line per head dim (build/sim.rs reads every PRM_REGISTER_KERNEL on such a line).
PRM_REGISTER_KERNEL(prm_attention_forward_tc3_hd72); PRM_REGISTER_KERNEL(prm_attention_delta_tc3_hd72); PRM_REGISTER_KERNEL(prm_attention_delta_bf16_tc3_hd72); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc3_hd72); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_delta_tc3_hd72); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_tc3_hd72);
PRM_REGISTER_KERNEL(prm_attention_forward_tc3_hd80); PRM_REGISTER_KERNEL(prm_attention_delta_tc3_hd80); PRM_REGISTER_KERNEL(prm_attention_delta_bf16_tc3_hd80); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc3_hd80); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_delta_tc3_hd80); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_tc3_hd80);
PRM_REGISTER_KERNEL(prm_attention_forward_tc3_hd88); PRM_REGISTER_KERNEL(prm_attention_delta_tc3_hd88); PRM_REGISTER_KERNEL(prm_attention_delta_bf16_tc3_hd88); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc3_hd88); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_delta_tc3_hd88); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_tc3_hd88);
PRM_REGISTER_KERNEL(prm_attention_forward_tc3_hd96); PRM_REGISTER_KERNEL(prm_attention_delta_tc3_hd96); PRM_REGISTER_KERNEL(prm_attention_delta_bf16_tc3_hd96); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc3_hd96); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_delta_tc3_hd96); PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_tc3_hd96);
PRM_REGISTER_KERNEL(prm_attention_forward_tc3_hd104); PRM_REGISTER_KERNEL(prm_attention_delta_tc3_hd104); PRM_REGISTER_KERNEL(prm_attention_delta_bf16_tc3_hd104); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc3_hd104); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_delta_tc3_hd104); PRM_REGISTER_KERNEL(prm_attention_bwd_dv_tc3_hd104); PRM_REGISTER_KERNEL(prm_attention_bwd_dk_tc3_hd104);
PRM_REGISTER_KERNEL(prm_attention_forward_tc3_hd112); PRM_REGISTER_KERNEL(prm_attention_delta_tc3_hd112); PRM_REGISTER_KERNEL(prm_attention_delta_bf16_tc3_hd112); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc3_hd112); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_delta_tc3_hd112); PRM_REGISTER_KERNEL(prm_attention_bwd_dv_tc3_hd112); PRM_REGISTER_KERNEL(prm_attention_bwd_dk_tc3_hd112);
PRM_REGISTER_KERNEL(prm_attention_forward_tc3_hd120); PRM_REGISTER_KERNEL(prm_attention_delta_tc3_hd120); PRM_REGISTER_KERNEL(prm_attention_delta_bf16_tc3_hd120); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc3_hd120); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_delta_tc3_hd120); PRM_REGISTER_KERNEL(prm_attention_bwd_dv_tc3_hd120); PRM_REGISTER_KERNEL(prm_attention_bwd_dk_tc3_hd120);
PRM_REGISTER_KERNEL(prm_attention_forward_tc3_hd128); PRM_REGISTER_KERNEL(prm_attention_delta_tc3_hd128); PRM_REGISTER_KERNEL(prm_attention_delta_bf16_tc3_hd128); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc3_hd128); PRM_REGISTER_KERNEL(prm_attention_bwd_dq_delta_tc3_hd128); PRM_REGISTER_KERNEL(prm_attention_bwd_dv_tc3_hd128); PRM_REGISTER_KERNEL(prm_attention_bwd_dk_tc3_hd128);
