// attention_tc4.cu: fused multi-head attention v4 on tensor cores for short sequences (a
// vision tower's 50–512 tokens: ViT-B/16's 197, ViT-L/14's 257): one CTA holds a whole head's
// keys and values (forward, dQ) or queries and output gradients (dK/dV) in shared memory, and
// each warp walks over 16-row blocks of the other side with no barrier after the load. Same arithmetic as v3 in the same order:
// the outputs are bit-identical to attention_tc3.cu's, which tests/kernel_attention.rs checks.
//
// Launchers: src/gpu/kernels/attention/tc4.rs (attention_forward_tc4, attention_backward_tc4*);
// they run v3 instead when a sequence is longer than TC4_MAX_TOKENS = 512, or when the kernels
// would ask for more shared memory than the device allows a block (the forward's and dQ's
// resident tiles are 53,248 bytes at 197 tokens, four CTAs an SM; 69,632 at 257, three on an
// H100; 131,072 at 512, one). At --precision bf16 the engine's PRM_ATTENTION=auto (the CUDA
// default) times v4 against v3 per shape; PRM_ATTENTION=v4 pins it.
//
// Why: at 197 tokens v3 runs one CTA per 64-query tile. Each CTA streams the head's 4 key/value
// tiles through a two-stage pipeline with two barriers per tile; its 4th query tile holds 5 rows,
// so 3 of its 4 warps idle while the CTA still loads every tile; and each K/V tile is read from
// L2 once per query tile. The kernel ran at 75 TFLOP/s on an H200 (tensor pipe 15% active). v4
// loads K/V once per head, has no idle warps (a warp takes 16-row blocks w, w + 4·split, ...),
// and after the one load each warp runs its blocks back to back.
//
// The register-level steps are attention_tc_common.cuh's, shared with v3, and so are the
// straight tiles (attention_tc3.cu) in dK/dV. The forward and dQ, which hold Q's (and dO's)
// fragments in registers, spill with them and keep the masked form (their `straight` is unused).
// Layouts: as v3 (attention_tc3.cu): qkv [N, 3D] bf16, cu_seqlens [B+1] int, out [N, D] bf16,
// lse and delta [heads, N] fp32 at h·N + row (natural log, scores scaled by 1/8), d_out [N, D]
// bf16, d_qkv [N, 3D] bf16 with every element written. Modes: the forward takes mode 0 (q·kᵀ),
// 1 (q·qᵀ) and 2 (k·kᵀ), causal or not; the backward mode 0, causal or not. The backward's
// delta kernel is v3's (prm_attention_delta_bf16_tc3).
// Precision: as v3: bf16 operands, P and dS rounded to bf16 where they enter a product, fp32
// accumulators and softmax statistics.
//
// Resident matrices: R = 16·⌈T/16⌉ rows × 64 bf16 columns, 128-byte rows without padding,
// 16-byte chunk c of row r stored at chunk c ^ (r mod 8) (an XOR swizzle: the 8 row addresses
// of one ldmatrix 8×8 matrix fall in 8 different bank groups, so fragment loads are
// conflict-free, and 2·208 rows take 53,248 bytes: four CTAs fit an SM). Rows T .. R are
// zero-filled by cp.async. The warp's own operand (Q in the forward, Q and dO in dQ) is read
// from global memory straight into mma A fragments (rows past T as zeros).
//   forward  prm_attention_forward_tc4: grid (split, heads, sequences), 128 threads; Y (k, or q
//            in mode 1) and V resident: 2·R·128 bytes.
//   dQ       prm_attention_bwd_dq_tc4: K and V resident: 2·R·128 bytes.
//   dK/dV    prm_attention_bwd_dkdv_tc4: Q and dO resident, with each query's lse (log2 units)
//            and delta for 64-query tiles, and each warp's own K and V block (its A operands,
//            through ldmatrix as in v3; held in registers they took 191):
//            2·R·128 + 2·RS·4 + 4·4096 bytes, RS = 64·⌈T/64⌉; three CTAs fit an SM at 197
//            tokens.
//   paired   prm_attention_forward_tc4_pairs, prm_attention_bwd_dq_tc4_pairs,
//            prm_attention_bwd_dkdv_tc4_pairs (TcOptions::paired_rows): each warp runs two
//            16-row blocks at once (pairs of blocks dealt out as single blocks are above), so
//            each fragment read from the resident tiles feeds both blocks' products (four
//            m16n8k16 instead of two), and a warp has two independent chains of work. Each
//            row's arithmetic and order are unchanged: the same bits. Forward 251 registers
//            (with v3's straight-line whole tiles, TcOptions::straight_tiles), dQ 236 and
//            dK/dV 242 (masked tiles only: their straight forms spill; dK/dV's per-warp K and
//            V blocks take 8 KiB a warp), all (128, 2): two CTAs an SM (at three they spill).
// A warp's first block's own operand (Q / Q and dO fragments; the K and V tile in dK/dV) is
// requested together with the resident tiles, so its latency hides behind theirs.
// ptxas (nvcc 13.0, sm_90, no spills; 2026-12-05): forward 122 registers and dQ 125
// (__launch_bounds__(128, 4): four CTAs an SM at 197 tokens), dK/dV 168 ((128, 3); its 71,680
// bytes of shared memory allow three CTAs an SM).
// A CTA whose first block lies past its sequence's end exits before its only barrier. No
// atomics; fixed reduction order; deterministic.
#include "common.cuh"
#include "mma.cuh"
#include "tile_io.cuh"
#include "attention_tc_common.cuh"

#define V4_HD 64
#define V4_TILE 64   // key / query tile of the online softmax and of v3's accumulation order
#define V4_WARPS 4

typedef __nv_bfloat16 bf16;

// Element offset of (row, col) in a swizzled resident matrix; col a multiple of 8 names a
// whole 16-byte chunk.
__device__ __forceinline__ int v4_at(int row, int col) {
    return row * V4_HD + ((((col >> 3) ^ row) & 7) << 3) + (col & 7);
}

// Rows 0 .. rows of the 64-wide bf16 column block g (row stride ld) into the resident matrix s
// by cp.async; rows at or past `valid` are zero-filled. The caller commits and waits.
__device__ __forceinline__ void v4_load_resident(bf16* s, const bf16* g, size_t ld, int rows, int valid) {
    for (int e = threadIdx.x; e < rows * 8; e += blockDim.x) {
        const int r = e >> 3, c = e & 7;
        const bool ok = r < valid;
        prm_cp_async_16(s + v4_at(r, c * 8), ok ? g + (size_t)r * ld + c * 8 : g, ok);
    }
}

// The A fragments (k-steps 0..3) of the 16×64 block at rows r0 .. r0+16 of the bf16 matrix g
// (row stride ld), read from global memory; rows at or past `valid` are zeros.
__device__ __forceinline__ void v4_load_a(uint32_t a[4][4], const bf16* g, size_t ld, int r0, int valid) {
    const int lane = threadIdx.x & 31, t = (lane & 3) * 2;
    const int ra = r0 + (lane >> 2), rb = ra + 8;
    const bf16* pa = g + (size_t)ra * ld + t;
    const bf16* pb = g + (size_t)rb * ld + t;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
        a[ks][0] = ra < valid ? prm_ld_bf16x2(pa + ks * 16) : 0u;
        a[ks][1] = rb < valid ? prm_ld_bf16x2(pb + ks * 16) : 0u;
        a[ks][2] = ra < valid ? prm_ld_bf16x2(pa + ks * 16 + 8) : 0u;
        a[ks][3] = rb < valid ? prm_ld_bf16x2(pb + ks * 16 + 8) : 0u;
    }
}

// The A fragment of the 16×16 block at (row0, col0) of the swizzled matrix s.
__device__ __forceinline__ void v4_frag_a(uint32_t a[4], const bf16* s, int row0, int col0) {
    const int lane = threadIdx.x & 31;
    prm_ldmatrix_x4(a, s + v4_at(row0 + (lane & 7) + ((lane >> 3) & 1) * 8, col0 + (lane >> 4) * 8));
}

// Rows r0 .. r0+16 of the 64-wide bf16 column block g (row stride ld) into the warp's swizzled
// 16-row tile s by cp.async, one warp (rows past `valid` zero-filled). The warp commits and
// waits.
__device__ __forceinline__ void v4_load_warp_tile(bf16* s, const bf16* g, size_t ld, int r0, int valid) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int e = lane + 32 * i, r = e >> 3, c = e & 7;
        const bool ok = r0 + r < valid;
        prm_cp_async_16(s + v4_at(r, c * 8), ok ? g + (size_t)(r0 + r) * ld + c * 8 : g, ok);
    }
}

// B fragments of two n-tiles (n0, n0+8) at k-step k0 for B = Mᵀ, M the resident matrix s
// (M[n][k]): b[0..1] for n-tile n0, b[2..3] for n0+8.
__device__ __forceinline__ void v4_frag_bt(uint32_t b[4], const bf16* s, int n0, int k0) {
    const int lane = threadIdx.x & 31;
    prm_ldmatrix_x4(b, s + v4_at(n0 + (lane & 7) + ((lane >> 4) & 1) * 8, k0 + ((lane >> 3) & 1) * 8));
}

// B fragments of two n-tiles (n0, n0+8) at k-step k0 for B = M, M the resident matrix s
// (M[k][n]), through ldmatrix.trans.
__device__ __forceinline__ void v4_frag_b(uint32_t b[4], const bf16* s, int k0, int n0) {
    const int lane = threadIdx.x & 31;
    prm_ldmatrix_x4_trans(b, s + v4_at(k0 + (lane & 7) + ((lane >> 3) & 1) * 8, n0 + (lane >> 4) * 8));
}

// acc (16 × 32) = A · Mᵀ restricted to M rows m0 + half·32 .. +32, with A's fragments read from
// the warp's swizzled 16-row tile sa. v3_mma_abt_half's order (FULL: every n-tile pair).
template <bool FULL = false>
__device__ __forceinline__ void v4_mma_abt_half_s(float acc[4][4], const bf16* sa, const bf16* sm, int m0, int half,
                                                  int ncols) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
        uint32_t a[4];
        v4_frag_a(a, sa, 0, ks * 16);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int np = half * 2 + j;
            if (!FULL && np * 16 >= ncols) continue;
            uint32_t b[4];
            v4_frag_bt(b, sm, m0 + np * 16, ks * 16);
            prm_mma_bf16_16816(acc[2 * j], a, b);
            prm_mma_bf16_16816(acc[2 * j + 1], a, b + 2);
        }
    }
}

// acc (16 × 64) = A · Mᵀ for the 64 rows m0 .. m0+64 of the resident M; n-tile pairs at or past
// `ncols` are not formed (they stay zero; FULL: all are). v3_mma_abt's order.
template <bool FULL = false>
__device__ __forceinline__ void v4_mma_abt(float acc[8][4], const uint32_t a[4][4], const bf16* sm, int m0, int ncols) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            if (!FULL && np * 16 >= ncols) continue;
            uint32_t b[4];
            v4_frag_bt(b, sm, m0 + np * 16, ks * 16);
            prm_mma_bf16_16816(acc[2 * np], a[ks], b);
            prm_mma_bf16_16816(acc[2 * np + 1], a[ks], b + 2);
        }
}

// The same restricted to M rows m0 + half·32 .. +32 (acc 16 × 32). v3_mma_abt_half's order.
template <bool FULL = false>
__device__ __forceinline__ void v4_mma_abt_half(float acc[4][4], const uint32_t a[4][4], const bf16* sm, int m0,
                                                int half, int ncols) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int np = half * 2 + j;
            if (!FULL && np * 16 >= ncols) continue;
            uint32_t b[4];
            v4_frag_bt(b, sm, m0 + np * 16, ks * 16);
            prm_mma_bf16_16816(acc[2 * j], a[ks], b);
            prm_mma_bf16_16816(acc[2 * j + 1], a[ks], b + 2);
        }
}

// acc (16 × 64) += A · M[k0 .. k0+16, :] for one k-step, M the resident matrix (M[k][n]).
__device__ __forceinline__ void v4_mma_ab_step(float acc[8][4], const uint32_t a[4], const bf16* sm, int k0) {
#pragma unroll
    for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        v4_frag_b(b, sm, k0, np * 16);
        prm_mma_bf16_16816(acc[2 * np], a, b);
        prm_mma_bf16_16816(acc[2 * np + 1], a, b + 2);
    }
}

// acc (16 × 64) += A · M[m0 + half·32 .. +32, :] with A the bf16 packing of p[4][4] (16 × 32);
// k-steps at or past `kvalid` (relative to m0) are skipped (FULL: none). v3_mma_pb_half's order.
template <bool FULL = false>
__device__ __forceinline__ void v4_mma_pb_half(float acc[8][4], const float p[4][4], const bf16* sm, int m0, int half,
                                               int kvalid) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int ks = half * 2 + j;
        if (!FULL && ks * 16 >= kvalid) continue;
        uint32_t a[4];
        prm_att_pack_a(a, p[2 * j], p[2 * j + 1]);
        v4_mma_ab_step(acc, a, sm, m0 + ks * 16);
    }
}

// This warp's first 16-row block and the stride between a warp's blocks: CTA x of `split` takes
// blocks x·4 + warp, then + 4·split. The paired kernels deal out pairs of blocks the same way
// (the same macros count pairs there).
#define V4_FIRST_BLOCK (blockIdx.x * V4_WARPS + (threadIdx.x >> 5))
#define V4_BLOCK_STRIDE (V4_WARPS * gridDim.x)

extern "C" __global__ void __launch_bounds__(128, 4)
    prm_attention_forward_tc4(const bf16* __restrict__ qkv, const int* __restrict__ cu_seqlens, bf16* __restrict__ out,
                              float* __restrict__ lse, int width, int total, int mode, int causal,
                              int /*straight: no straight-line tile here, see below*/) {
    PRM_DYNAMIC_SHARED(bf16, smem);
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int nblocks = (T + 15) / 16, R = nblocks * 16;
    if ((int)blockIdx.x * V4_WARPS >= nblocks) return;  // whole CTA, before the barrier
    bf16* sY = smem;
    bf16* sV = smem + R * V4_HD;
    const int lane = threadIdx.x & 31;
    const size_t ld = 3 * (size_t)width;
    const bf16* base = qkv + (size_t)row0 * ld;
    const bf16* gx = base + (mode == 2 ? width : 0) + h * V4_HD;
    v4_load_resident(sY, base + (mode == 1 ? 0 : width) + h * V4_HD, ld, R, T);
    v4_load_resident(sV, base + 2 * width + h * V4_HD, ld, R, T);
    prm_cp_async_commit();
    // The first block's Q fragments load while the resident tiles land.
    uint32_t qa[4][4];
    if (V4_FIRST_BLOCK < nblocks) v4_load_a(qa, gx, ld, V4_FIRST_BLOCK * 16, T);
    prm_cp_async_wait<0>();
    __syncthreads();

    for (int b = V4_FIRST_BLOCK; b < nblocks; b += V4_BLOCK_STRIDE) {
        const int wq0 = b * 16;
        const int rows[2] = {wq0 + (lane >> 2), wq0 + (lane >> 2) + 8};
        if (b != V4_FIRST_BLOCK) v4_load_a(qa, gx, ld, wq0, T);
        // Keys this block needs: below the end, and (causal) up to its last row. v3 walks the
        // tiles of its 64-query tile; the tiles past this block's last row change nothing there.
        const int kend = causal ? min(T, wq0 + 16) : T;
        const int ntiles = (kend + V4_TILE - 1) / V4_TILE;
        float o[8][4];
        prm_att_zero<8>(o);
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // m in log2 units
        for (int kt = 0; kt < ntiles; ++kt) {
            const int k0 = kt * V4_TILE;
            const int kvalid = min(V4_TILE, kend - k0);
            // (No straight-line FULL form here, unlike v3's forward: with Q's fragments held in
            // registers it spills at 128.)
            float s[8][4];
            prm_att_zero<8>(s);
            v4_mma_abt(s, qa, sY, k0, kvalid);
            prm_att_online_softmax(s, m, l, o, kvalid, causal, k0, rows);
            // o += P·V, k-steps of 16 keys below kvalid (v3_mma_pb's order).
#pragma unroll
            for (int ks = 0; ks < 4; ++ks) {
                if (ks * 16 >= kvalid) continue;
                uint32_t a[4];
                prm_att_pack_a(a, s[2 * ks], s[2 * ks + 1]);
                v4_mma_ab_step(o, a, sV, k0 + ks * 16);
            }
        }
        prm_att_finish(out, lse, o, m, l, rows, T, row0, h, width, total);
    }
}
PRM_REGISTER_KERNEL(prm_attention_forward_tc4);

// Two A blocks sharing each B fragment: acc[k] (16 × 64) = A_k · Mᵀ for k = 0, 1, each formed
// in v4_mma_abt's order (n-tile pairs at or past `ncols` not formed).
template <bool FULL = false>
__device__ __forceinline__ void v4_mma_abt_pair(float acc[2][8][4], const uint32_t a[2][4][4], const bf16* sm, int m0,
                                                int ncols) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            if (!FULL && np * 16 >= ncols) continue;
            uint32_t b[4];
            v4_frag_bt(b, sm, m0 + np * 16, ks * 16);
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                prm_mma_bf16_16816(acc[k][2 * np], a[k][ks], b);
                prm_mma_bf16_16816(acc[k][2 * np + 1], a[k][ks], b + 2);
            }
        }
}

// acc[k] (16 × 64) += A_k · M[k0 .. k0+16, :] for k = 0, 1, sharing each B fragment
// (v4_mma_ab_step's order for each).
__device__ __forceinline__ void v4_mma_ab_step_pair(float acc[2][8][4], const uint32_t a[2][4], const bf16* sm,
                                                    int k0) {
#pragma unroll
    for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        v4_frag_b(b, sm, k0, np * 16);
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            prm_mma_bf16_16816(acc[k][2 * np], a[k], b);
            prm_mma_bf16_16816(acc[k][2 * np + 1], a[k], b + 2);
        }
    }
}

// The forward with paired blocks (TcOptions::paired_rows): each warp runs two 16-row blocks,
// 2p and 2p + 1, at once (pairs p = x·4 + warp, then + 4·split), so every key and value
// fragment read from shared memory feeds both blocks' products, and the warp has two
// independent chains (one block's softmax while the other's products run). Each row's
// arithmetic is prm_attention_forward_tc4's, in its order: the same bits. Under a causal mask
// both blocks walk the key tiles up to the pair's last row; for the first block the extra keys
// lie after its rows, so they are masked (P = 0) and change nothing, as the keys past a v4
// block's last row do in v3's 64-query tiles. A pair whose second block lies past the sequence
// runs it on zero rows and stores nothing for it. Whole tiles with nothing masked run as
// straight-line code (`straight`, as in v3's forward: fragment loads run ahead of the
// products; the single-block v4 forward spills with it). More registers (two blocks' scores
// and accumulators): two CTAs an SM.
extern "C" __global__ void __launch_bounds__(128, 2)
    prm_attention_forward_tc4_pairs(const bf16* __restrict__ qkv, const int* __restrict__ cu_seqlens,
                                    bf16* __restrict__ out, float* __restrict__ lse, int width, int total, int mode,
                                    int causal, int straight) {
    PRM_DYNAMIC_SHARED(bf16, smem);
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int nblocks = (T + 15) / 16, R = nblocks * 16;
    const int npairs = (nblocks + 1) / 2;
    if ((int)blockIdx.x * V4_WARPS >= npairs) return;  // whole CTA, before the barrier
    bf16* sY = smem;
    bf16* sV = smem + R * V4_HD;
    const int lane = threadIdx.x & 31;
    const size_t ld = 3 * (size_t)width;
    const bf16* base = qkv + (size_t)row0 * ld;
    const bf16* gx = base + (mode == 2 ? width : 0) + h * V4_HD;
    v4_load_resident(sY, base + (mode == 1 ? 0 : width) + h * V4_HD, ld, R, T);
    v4_load_resident(sV, base + 2 * width + h * V4_HD, ld, R, T);
    prm_cp_async_commit();
    // The first pair's Q fragments load while the resident tiles land.
    uint32_t qa[2][4][4];
    if (V4_FIRST_BLOCK < npairs) {
        v4_load_a(qa[0], gx, ld, V4_FIRST_BLOCK * 32, T);
        v4_load_a(qa[1], gx, ld, V4_FIRST_BLOCK * 32 + 16, T);
    }
    prm_cp_async_wait<0>();
    __syncthreads();

    for (int p = V4_FIRST_BLOCK; p < npairs; p += V4_BLOCK_STRIDE) {
        const int wq0 = p * 32;
        const int rows[2][2] = {{wq0 + (lane >> 2), wq0 + (lane >> 2) + 8},
                                {wq0 + 16 + (lane >> 2), wq0 + 24 + (lane >> 2)}};
        if (p != V4_FIRST_BLOCK) {
            v4_load_a(qa[0], gx, ld, wq0, T);
            v4_load_a(qa[1], gx, ld, wq0 + 16, T);
        }
        const int kend = causal ? min(T, wq0 + 32) : T;
        const int ntiles = (kend + V4_TILE - 1) / V4_TILE;
        float o[2][8][4];
        prm_att_zero<8>(o[0]);
        prm_att_zero<8>(o[1]);
        float m[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};  // log2 units
        float l[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
        for (int kt = 0; kt < ntiles; ++kt) {
            const int k0 = kt * V4_TILE;
            const int kvalid = min(V4_TILE, kend - k0);
            // FULL: a whole tile with nothing masked, as straight-line code (v3's form: no
            // per-n-tile skips or masks, so fragment loads can run ahead of the products).
            auto tile = [&](auto full) {
                constexpr bool FULL = decltype(full)::value;
                float s[2][8][4];
                prm_att_zero<8>(s[0]);
                prm_att_zero<8>(s[1]);
                v4_mma_abt_pair<FULL>(s, qa, sY, k0, kvalid);
                prm_att_online_softmax<FULL>(s[0], m[0], l[0], o[0], kvalid, causal, k0, rows[0]);
                prm_att_online_softmax<FULL>(s[1], m[1], l[1], o[1], kvalid, causal, k0, rows[1]);
#pragma unroll
                for (int ks = 0; ks < 4; ++ks) {
                    if (!FULL && ks * 16 >= kvalid) continue;
                    uint32_t a[2][4];
                    prm_att_pack_a(a[0], s[0][2 * ks], s[0][2 * ks + 1]);
                    prm_att_pack_a(a[1], s[1][2 * ks], s[1][2 * ks + 1]);
                    v4_mma_ab_step_pair(o, a, sV, k0 + ks * 16);
                }
            };
            if (straight && kvalid == V4_TILE && !causal) {
                tile(prm_flag<true>{});
            } else {
                tile(prm_flag<false>{});
            }
        }
        prm_att_finish(out, lse, o[0], m[0], l[0], rows[0], T, row0, h, width, total);
        prm_att_finish(out, lse, o[1], m[1], l[1], rows[1], T, row0, h, width, total);
    }
}
PRM_REGISTER_KERNEL(prm_attention_forward_tc4_pairs);

extern "C" __global__ void __launch_bounds__(128, 4)
    prm_attention_bwd_dq_tc4(const bf16* __restrict__ qkv, const bf16* __restrict__ d_out, const float* __restrict__ lse,
                             const float* __restrict__ delta, const int* __restrict__ cu_seqlens,
                             bf16* __restrict__ d_qkv, int width, int total, int causal,
                             int /*straight: no straight-line tile here, see below*/) {
    PRM_DYNAMIC_SHARED(bf16, smem);
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int nblocks = (T + 15) / 16, R = nblocks * 16;
    if ((int)blockIdx.x * V4_WARPS >= nblocks) return;
    bf16* sK = smem;
    bf16* sV = smem + R * V4_HD;
    const int lane = threadIdx.x & 31;
    const size_t ld = 3 * (size_t)width;
    const bf16* base = qkv + (size_t)row0 * ld;
    const bf16* gq = base + h * V4_HD;
    const bf16* gd = d_out + (size_t)row0 * width + h * V4_HD;
    v4_load_resident(sK, base + width + h * V4_HD, ld, R, T);
    v4_load_resident(sV, base + 2 * width + h * V4_HD, ld, R, T);
    prm_cp_async_commit();
    // The first block's Q and dO fragments load while the resident tiles land.
    uint32_t qa[4][4], da[4][4];
    if (V4_FIRST_BLOCK < nblocks) {
        v4_load_a(qa, gq, ld, V4_FIRST_BLOCK * 16, T);
        v4_load_a(da, gd, width, V4_FIRST_BLOCK * 16, T);
    }
    prm_cp_async_wait<0>();
    __syncthreads();

    for (int b = V4_FIRST_BLOCK; b < nblocks; b += V4_BLOCK_STRIDE) {
        const int wq0 = b * 16;
        const int rows[2] = {wq0 + (lane >> 2), wq0 + (lane >> 2) + 8};
        if (b != V4_FIRST_BLOCK) {
            v4_load_a(qa, gq, ld, wq0, T);
            v4_load_a(da, gd, width, wq0, T);
        }
        float lse2[2], row_delta[2];  // lse in log2 units
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const bool ok = rows[r] < T;
            lse2[r] = ok ? lse[(size_t)h * total + row0 + rows[r]] * PRM_ATT_LOG2E : 0.0f;
            row_delta[r] = ok ? delta[(size_t)h * total + row0 + rows[r]] : 0.0f;
        }
        const int kend = causal ? min(T, wq0 + 16) : T;
        const int ntiles = (kend + V4_TILE - 1) / V4_TILE;
        float dq[8][4];
        prm_att_zero<8>(dq);
        for (int kt = 0; kt < ntiles; ++kt) {
            const int k0 = kt * V4_TILE;
            const int kvalid = min(V4_TILE, kend - k0);
            // 32 keys at a time: half the score registers live at once. (No straight-line FULL
            // form here, unlike v3's dQ: with Q's and dO's fragments held in registers it spills.)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                if (half * 32 >= kvalid) continue;
                float s[4][4], dp[4][4];
                prm_att_zero<4>(s);
                prm_att_zero<4>(dp);
                v4_mma_abt_half(s, qa, sK, k0, half, kvalid);   // S = Q·Kᵀ
                v4_mma_abt_half(dp, da, sV, k0, half, kvalid);  // dP = dO·Vᵀ
                prm_att_dq_ds(s, dp, half, kvalid, causal, k0, rows, T, lse2, row_delta);
                v4_mma_pb_half(dq, s, sK, k0, half, kvalid);  // dQ += dS·K
            }
        }
        const float one[2] = {1.0f, 1.0f};
        prm_att_store_bf16(d_qkv + (size_t)row0 * ld, ld, h * V4_HD, rows, T, dq, one);
    }
}
PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc4);

// acc[k] (16 × 32) = A_k · Mᵀ restricted to M rows m0 + half·32 .. +32, for k = 0, 1, sharing
// each B fragment (v4_mma_abt_half's order for each).
__device__ __forceinline__ void v4_mma_abt_half_pair(float acc[2][4][4], const uint32_t a[2][4][4], const bf16* sm,
                                                     int m0, int half, int ncols) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int np = half * 2 + j;
            if (np * 16 >= ncols) continue;
            uint32_t b[4];
            v4_frag_bt(b, sm, m0 + np * 16, ks * 16);
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                prm_mma_bf16_16816(acc[k][2 * j], a[k][ks], b);
                prm_mma_bf16_16816(acc[k][2 * j + 1], a[k][ks], b + 2);
            }
        }
}

// acc[k] (16 × 64) += A_k · M[m0 + half·32 .. +32, :], A_k the bf16 packing of p[k] (16 × 32),
// for k = 0, 1, sharing each B fragment; k-steps at or past `kvalid` skipped (v4_mma_pb_half's
// order for each).
__device__ __forceinline__ void v4_mma_pb_half_pair(float acc[2][8][4], const float p[2][4][4], const bf16* sm, int m0,
                                                    int half, int kvalid) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int ks = half * 2 + j;
        if (ks * 16 >= kvalid) continue;
        uint32_t a[2][4];
        prm_att_pack_a(a[0], p[0][2 * j], p[0][2 * j + 1]);
        prm_att_pack_a(a[1], p[1][2 * j], p[1][2 * j + 1]);
        v4_mma_ab_step_pair(acc, a, sm, m0 + ks * 16);
    }
}

// dQ with paired blocks (TcOptions::paired_rows): each warp runs the 16-query blocks 2p and
// 2p + 1 at once, sharing every K and V fragment, as prm_attention_forward_tc4_pairs does;
// each row's arithmetic is prm_attention_bwd_dq_tc4's, in its order. Under a causal mask the
// first block's extra keys lie after its rows: dS = 0 there, and adding those zero products
// changes nothing. Two CTAs an SM.
extern "C" __global__ void __launch_bounds__(128, 2)
    prm_attention_bwd_dq_tc4_pairs(const bf16* __restrict__ qkv, const bf16* __restrict__ d_out,
                                   const float* __restrict__ lse, const float* __restrict__ delta,
                                   const int* __restrict__ cu_seqlens, bf16* __restrict__ d_qkv, int width, int total,
                                   int causal, int /*straight: as prm_attention_bwd_dq_tc4*/) {
    PRM_DYNAMIC_SHARED(bf16, smem);
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int nblocks = (T + 15) / 16, R = nblocks * 16;
    const int npairs = (nblocks + 1) / 2;
    if ((int)blockIdx.x * V4_WARPS >= npairs) return;
    bf16* sK = smem;
    bf16* sV = smem + R * V4_HD;
    const int lane = threadIdx.x & 31;
    const size_t ld = 3 * (size_t)width;
    const bf16* base = qkv + (size_t)row0 * ld;
    const bf16* gq = base + h * V4_HD;
    const bf16* gd = d_out + (size_t)row0 * width + h * V4_HD;
    v4_load_resident(sK, base + width + h * V4_HD, ld, R, T);
    v4_load_resident(sV, base + 2 * width + h * V4_HD, ld, R, T);
    prm_cp_async_commit();
    // The first pair's Q and dO fragments load while the resident tiles land.
    uint32_t qa[2][4][4], da[2][4][4];
    if (V4_FIRST_BLOCK < npairs) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            v4_load_a(qa[k], gq, ld, V4_FIRST_BLOCK * 32 + 16 * k, T);
            v4_load_a(da[k], gd, width, V4_FIRST_BLOCK * 32 + 16 * k, T);
        }
    }
    prm_cp_async_wait<0>();
    __syncthreads();

    for (int p = V4_FIRST_BLOCK; p < npairs; p += V4_BLOCK_STRIDE) {
        const int wq0 = p * 32;
        const int rows[2][2] = {{wq0 + (lane >> 2), wq0 + (lane >> 2) + 8},
                                {wq0 + 16 + (lane >> 2), wq0 + 24 + (lane >> 2)}};
        if (p != V4_FIRST_BLOCK) {
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                v4_load_a(qa[k], gq, ld, wq0 + 16 * k, T);
                v4_load_a(da[k], gd, width, wq0 + 16 * k, T);
            }
        }
        float lse2[2][2], row_delta[2][2];  // lse in log2 units
#pragma unroll
        for (int k = 0; k < 2; ++k)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const bool ok = rows[k][r] < T;
                lse2[k][r] = ok ? lse[(size_t)h * total + row0 + rows[k][r]] * PRM_ATT_LOG2E : 0.0f;
                row_delta[k][r] = ok ? delta[(size_t)h * total + row0 + rows[k][r]] : 0.0f;
            }
        const int kend = causal ? min(T, wq0 + 32) : T;
        const int ntiles = (kend + V4_TILE - 1) / V4_TILE;
        float dq[2][8][4];
        prm_att_zero<8>(dq[0]);
        prm_att_zero<8>(dq[1]);
        for (int kt = 0; kt < ntiles; ++kt) {
            const int k0 = kt * V4_TILE;
            const int kvalid = min(V4_TILE, kend - k0);
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                if (half * 32 >= kvalid) continue;
                float s[2][4][4], dp[2][4][4];
#pragma unroll
                for (int k = 0; k < 2; ++k) {
                    prm_att_zero<4>(s[k]);
                    prm_att_zero<4>(dp[k]);
                }
                v4_mma_abt_half_pair(s, qa, sK, k0, half, kvalid);   // S = Q·Kᵀ
                v4_mma_abt_half_pair(dp, da, sV, k0, half, kvalid);  // dP = dO·Vᵀ
#pragma unroll
                for (int k = 0; k < 2; ++k)
                    prm_att_dq_ds(s[k], dp[k], half, kvalid, causal, k0, rows[k], T, lse2[k], row_delta[k]);
                v4_mma_pb_half_pair(dq, s, sK, k0, half, kvalid);  // dQ += dS·K
            }
        }
        const float one[2] = {1.0f, 1.0f};
#pragma unroll
        for (int k = 0; k < 2; ++k)
            prm_att_store_bf16(d_qkv + (size_t)row0 * ld, ld, h * V4_HD, rows[k], T, dq[k], one);
    }
}
PRM_REGISTER_KERNEL(prm_attention_bwd_dq_tc4_pairs);

extern "C" __global__ void __launch_bounds__(128, 3)
    prm_attention_bwd_dkdv_tc4(const bf16* __restrict__ qkv, const bf16* __restrict__ d_out,
                               const float* __restrict__ lse, const float* __restrict__ delta,
                               const int* __restrict__ cu_seqlens, bf16* __restrict__ d_qkv, int width, int total,
                               int causal, int straight) {
    PRM_DYNAMIC_SHARED(bf16, smem);
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int nblocks = (T + 15) / 16, R = nblocks * 16;
    if ((int)blockIdx.x * V4_WARPS >= nblocks) return;
    bf16* sQ = smem;
    bf16* sD = smem + R * V4_HD;
    // Per-query statistics for whole 64-query tiles (RS rows, zeros past T, as v3's tiles): the
    // dS loop reads a tile's 64 entries whether or not its queries exist.
    const int RS = (T + V4_TILE - 1) / V4_TILE * V4_TILE;
    float* sLse = reinterpret_cast<float*>(smem + 2 * R * V4_HD);  // log2 units
    float* sDelta = sLse + RS;
    // The warp's own key block, K then V (16 rows each): A fragments come from here, as in v3,
    // which keeps this kernel within three CTAs' registers (fragments held in registers took
    // 191).
    bf16* sKw = reinterpret_cast<bf16*>(sDelta + RS) + (threadIdx.x >> 5) * 2 * 16 * V4_HD;
    bf16* sVw = sKw + 16 * V4_HD;
    const int lane = threadIdx.x & 31;
    const size_t ld = 3 * (size_t)width;
    const bf16* base = qkv + (size_t)row0 * ld;
    v4_load_resident(sQ, base + h * V4_HD, ld, R, T);
    v4_load_resident(sD, d_out + (size_t)row0 * width + h * V4_HD, width, R, T);
    // The warp's first K and V block travels with the resident tiles.
    if (V4_FIRST_BLOCK < nblocks) {
        v4_load_warp_tile(sKw, base + width + h * V4_HD, ld, V4_FIRST_BLOCK * 16, T);
        v4_load_warp_tile(sVw, base + 2 * width + h * V4_HD, ld, V4_FIRST_BLOCK * 16, T);
    }
    prm_cp_async_commit();
    for (int q = threadIdx.x; q < RS; q += blockDim.x) {  // plain stores; the barrier publishes them
        const bool ok = q < T;
        sLse[q] = ok ? lse[(size_t)h * total + row0 + q] * PRM_ATT_LOG2E : 0.0f;
        sDelta[q] = ok ? delta[(size_t)h * total + row0 + q] : 0.0f;
    }
    prm_cp_async_wait<0>();
    __syncthreads();

    for (int b = V4_FIRST_BLOCK; b < nblocks; b += V4_BLOCK_STRIDE) {
        const int wk0 = b * 16;
        const int keys[2] = {wk0 + (lane >> 2), wk0 + (lane >> 2) + 8};
        if (b != V4_FIRST_BLOCK) {
            __syncwarp();  // every lane is past the previous block's reads of sKw / sVw
            v4_load_warp_tile(sKw, base + width + h * V4_HD, ld, wk0, T);
            v4_load_warp_tile(sVw, base + 2 * width + h * V4_HD, ld, wk0, T);
            prm_cp_async_commit();
            prm_cp_async_wait<0>();
            __syncwarp();  // the other lanes' copies are visible
        }
        // Causal: queries before this block's 64-key tile see none of its keys; v3 starts its
        // query tiles there, and so do we (the same tiles in the same order).
        const int qstart = causal ? (wk0 / V4_TILE) * V4_TILE : 0;
        const int ntiles = (T - qstart + V4_TILE - 1) / V4_TILE;
        float dk[8][4], dv[8][4];
        prm_att_zero<8>(dk);
        prm_att_zero<8>(dv);
        for (int it = 0; it < ntiles; ++it) {
            const int q0 = qstart + it * V4_TILE;
            const int qvalid = min(V4_TILE, T - q0);
            const float* tl = sLse + q0;
            const float* tdel = sDelta + q0;
            // FULL: a whole tile, all 16 keys below T, nothing masked: straight-line code.
            auto tile = [&](auto full) {
                constexpr bool FULL = decltype(full)::value;
                // 32 queries at a time: half the score registers live at once (a loop, not
                // unrolled, as in v3).
#pragma unroll 1
                for (int half = 0; half < 2; ++half) {
                    if (!FULL && half * 32 >= qvalid) continue;
                    // Pᵀ = exp(K·Qᵀ/8 − lse), rounded to bf16 once: it feeds dV and dS.
                    uint32_t pb[2][4];
                    {
                        float st[4][4];
                        prm_att_zero<4>(st);
                        v4_mma_abt_half_s<FULL>(st, sKw, sQ, q0, half, qvalid);  // Sᵀ = K·Qᵀ
                        prm_att_dkdv_pt<FULL>(pb, st, half, qvalid, causal, q0, keys, T, tl);
                    }
                    // dV += Pᵀ·dO
#pragma unroll
                    for (int j = 0; j < 2; ++j)
                        if (FULL || (half * 2 + j) * 16 < qvalid)
                            v4_mma_ab_step(dv, pb[j], sD, q0 + (half * 2 + j) * 16);
                    float dpt[4][4];
                    prm_att_zero<4>(dpt);
                    v4_mma_abt_half_s<FULL>(dpt, sVw, sD, q0, half, qvalid);  // dPᵀ = V·dOᵀ
                    prm_att_dkdv_dst(dpt, pb, half, tdel);
                    v4_mma_pb_half<FULL>(dk, dpt, sQ, q0, half, qvalid);  // dK += dSᵀ·Q
                }
            };
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
            constexpr bool arch_straight = false;  // as in v3: sm_80 is not tuned for
#else
            constexpr bool arch_straight = true;
#endif
            if (arch_straight && straight && qvalid == V4_TILE && !causal && wk0 + 16 <= T) {
                tile(prm_flag<true>{});
            } else {
                tile(prm_flag<false>{});
            }
        }
        const float one[2] = {1.0f, 1.0f};
        prm_att_store_bf16(d_qkv + (size_t)row0 * ld, ld, width + h * V4_HD, keys, T, dk, one);
        prm_att_store_bf16(d_qkv + (size_t)row0 * ld, ld, 2 * width + h * V4_HD, keys, T, dv, one);
    }
}
PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_tc4);

// acc[k] (16 × 32) = A_k · Mᵀ restricted to M rows m0 + half·32 .. +32, for k = 0, 1, with
// A_k's fragments read from the warp's swizzled 16-row tiles sa and sa + 16 rows, sharing
// each B fragment (v4_mma_abt_half_s's order for each).
__device__ __forceinline__ void v4_mma_abt_half_s_pair(float acc[2][4][4], const bf16* sa, const bf16* sm, int m0,
                                                       int half, int ncols) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
        uint32_t a[2][4];
        v4_frag_a(a[0], sa, 0, ks * 16);
        v4_frag_a(a[1], sa + 16 * V4_HD, 0, ks * 16);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int np = half * 2 + j;
            if (np * 16 >= ncols) continue;
            uint32_t b[4];
            v4_frag_bt(b, sm, m0 + np * 16, ks * 16);
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                prm_mma_bf16_16816(acc[k][2 * j], a[k], b);
                prm_mma_bf16_16816(acc[k][2 * j + 1], a[k], b + 2);
            }
        }
    }
}

// dK/dV with paired blocks (TcOptions::paired_rows): each warp runs the 16-key blocks 2p and
// 2p + 1 at once (its K and V staged as two 16-row tiles each), sharing every Q and dO fragment
// read from the resident tiles; each key's arithmetic is prm_attention_bwd_dkdv_tc4's, in its
// order (a pair lies inside one 64-key tile, so under a causal mask both blocks start at the
// same query tile, as each would alone). A pair whose second block lies past the sequence runs
// it on zero rows (masked: P = 0) and stores nothing for it. Shared memory: the resident tiles
// and statistics, and 8 KiB a warp; 242 registers, two CTAs an SM.
extern "C" __global__ void __launch_bounds__(128, 2)
    prm_attention_bwd_dkdv_tc4_pairs(const bf16* __restrict__ qkv, const bf16* __restrict__ d_out,
                                     const float* __restrict__ lse, const float* __restrict__ delta,
                                     const int* __restrict__ cu_seqlens, bf16* __restrict__ d_qkv, int width,
                                     int total, int causal, int /*straight: see below*/) {
    PRM_DYNAMIC_SHARED(bf16, smem);
    const int seq = blockIdx.z, h = blockIdx.y;
    const int row0 = cu_seqlens[seq];
    const int T = cu_seqlens[seq + 1] - row0;
    const int nblocks = (T + 15) / 16, R = nblocks * 16;
    const int npairs = (nblocks + 1) / 2;
    if ((int)blockIdx.x * V4_WARPS >= npairs) return;
    bf16* sQ = smem;
    bf16* sD = smem + R * V4_HD;
    const int RS = (T + V4_TILE - 1) / V4_TILE * V4_TILE;
    float* sLse = reinterpret_cast<float*>(smem + 2 * R * V4_HD);  // log2 units
    float* sDelta = sLse + RS;
    // The warp's two key blocks: K (two 16-row tiles), then V (two).
    bf16* sKw = reinterpret_cast<bf16*>(sDelta + RS) + (threadIdx.x >> 5) * 4 * 16 * V4_HD;
    bf16* sVw = sKw + 2 * 16 * V4_HD;
    const int lane = threadIdx.x & 31;
    const size_t ld = 3 * (size_t)width;
    const bf16* base = qkv + (size_t)row0 * ld;
    v4_load_resident(sQ, base + h * V4_HD, ld, R, T);
    v4_load_resident(sD, d_out + (size_t)row0 * width + h * V4_HD, width, R, T);
    auto load_pair = [&](int wk0) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            v4_load_warp_tile(sKw + k * 16 * V4_HD, base + width + h * V4_HD, ld, wk0 + 16 * k, T);
            v4_load_warp_tile(sVw + k * 16 * V4_HD, base + 2 * width + h * V4_HD, ld, wk0 + 16 * k, T);
        }
    };
    // The warp's first pair travels with the resident tiles.
    if (V4_FIRST_BLOCK < npairs) load_pair(V4_FIRST_BLOCK * 32);
    prm_cp_async_commit();
    for (int q = threadIdx.x; q < RS; q += blockDim.x) {  // plain stores; the barrier publishes them
        const bool ok = q < T;
        sLse[q] = ok ? lse[(size_t)h * total + row0 + q] * PRM_ATT_LOG2E : 0.0f;
        sDelta[q] = ok ? delta[(size_t)h * total + row0 + q] : 0.0f;
    }
    prm_cp_async_wait<0>();
    __syncthreads();

    for (int p = V4_FIRST_BLOCK; p < npairs; p += V4_BLOCK_STRIDE) {
        const int wk0 = p * 32;
        const int keys[2][2] = {{wk0 + (lane >> 2), wk0 + (lane >> 2) + 8},
                                {wk0 + 16 + (lane >> 2), wk0 + 24 + (lane >> 2)}};
        if (p != V4_FIRST_BLOCK) {
            __syncwarp();  // every lane is past the previous pair's reads of sKw / sVw
            load_pair(wk0);
            prm_cp_async_commit();
            prm_cp_async_wait<0>();
            __syncwarp();  // the other lanes' copies are visible
        }
        const int qstart = causal ? (wk0 / V4_TILE) * V4_TILE : 0;
        const int ntiles = (T - qstart + V4_TILE - 1) / V4_TILE;
        float dk[2][8][4], dv[2][8][4];
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            prm_att_zero<8>(dk[k]);
            prm_att_zero<8>(dv[k]);
        }
        for (int it = 0; it < ntiles; ++it) {
            const int q0 = qstart + it * V4_TILE;
            const int qvalid = min(V4_TILE, T - q0);
            const float* tl = sLse + q0;
            const float* tdel = sDelta + q0;
            // Every tile through the masked code: the straight-line whole tile (v4's FULL form)
            // besides it spills at 255 registers.
#pragma unroll 1
            for (int half = 0; half < 2; ++half) {
                if (half * 32 >= qvalid) continue;
                uint32_t pb[2][2][4];
                {
                    float st[2][4][4];
                    prm_att_zero<4>(st[0]);
                    prm_att_zero<4>(st[1]);
                    v4_mma_abt_half_s_pair(st, sKw, sQ, q0, half, qvalid);  // Sᵀ = K·Qᵀ
#pragma unroll
                    for (int k = 0; k < 2; ++k)
                        prm_att_dkdv_pt(pb[k], st[k], half, qvalid, causal, q0, keys[k], T, tl);
                }
                // dV += Pᵀ·dO
#pragma unroll
                for (int j = 0; j < 2; ++j)
                    if ((half * 2 + j) * 16 < qvalid) {
                        const uint32_t a[2][4] = {{pb[0][j][0], pb[0][j][1], pb[0][j][2], pb[0][j][3]},
                                                  {pb[1][j][0], pb[1][j][1], pb[1][j][2], pb[1][j][3]}};
                        v4_mma_ab_step_pair(dv, a, sD, q0 + (half * 2 + j) * 16);
                    }
                float dpt[2][4][4];
                prm_att_zero<4>(dpt[0]);
                prm_att_zero<4>(dpt[1]);
                v4_mma_abt_half_s_pair(dpt, sVw, sD, q0, half, qvalid);  // dPᵀ = V·dOᵀ
#pragma unroll
                for (int k = 0; k < 2; ++k) prm_att_dkdv_dst(dpt[k], pb[k], half, tdel);
                v4_mma_pb_half_pair(dk, dpt, sQ, q0, half, qvalid);  // dK += dSᵀ·Q
            }
        }
        const float one[2] = {1.0f, 1.0f};
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            prm_att_store_bf16(d_qkv + (size_t)row0 * ld, ld, width + h * V4_HD, keys[k], T, dk[k], one);
            prm_att_store_bf16(d_qkv + (size_t)row0 * ld, ld, 2 * width + h * V4_HD, keys[k], T, dv[k], one);
        }
    }
}
PRM_REGISTER_KERNEL(prm_attention_bwd_dkdv_tc4_pairs);
