// class_logits.cu: the cosine logits of `prm eval`'s class-embedding targets (the MaskCLIP family's
// patch logits, zeroshot's image logits) on the device, so that a pass brings back [rows, C]
// logits instead of [rows, E] embeddings and the host forms none of them.
//
// Layouts (row-major, fp32):
//   x        [n, dim]   rows normalised in place by prm_normalize_rows_f32 (the projected tokens)
//   classes  [c, dim]   the class embeddings, L2-normalised on the host
//   logits   [n, c]     logits[r, k] = ⟨x_r, classes_k⟩
// Precision: the twins' f64 arithmetic, each operation rounded once in their order (rounded.cuh),
// so the results are theirs bit for bit and a report does not depend on the engine:
//   prm_normalize_rows_f32 = prm::eval::ops::normalize_rows: s = Σ x² (f64, index order, from −0),
//     n = √s; when n > 0, x ← f32(x · (1 / n)) with the quotient and product in f64.
//   prm_class_logits_f32   = prm::eval::ops::dot_logits: one f64 sum over dim in index order from
//     −0 of the widened products, rounded to f32 once. A product of two widened floats is exact in
//     f64 (24 + 24 significant bits), so the GPU's fused multiply-add gives the bits of a rounded
//     product then a rounded sum; the simulator (a CPU build without FMA instructions) does the
//     latter.
// Shapes: one thread a row for the normalisation (a few thousand rows of a few hundred elements:
// small against the forward); 16×16 threads a 16-row × 16-class tile of logits (row tiles in a
// grid-stride loop past 65,535 of them), the rows' and classes' elements staged through shared
// memory 32 at a time, each thread's sum advancing in index order.
//
// Launcher: src/gpu/kernels/class_logits.rs (normalize_rows_f32, class_logits_f32).
#include "common.cuh"
#include "rounded.cuh"

#define LOGITS_TILE 16
#define LOGITS_K 32

#ifdef __CUDACC__
#define PRM_ADD_EXACT_PRODUCT(s, x, y) __fma_rn((x), (y), (s))
#else
#define PRM_ADD_EXACT_PRODUCT(s, x, y) PRM_DADD_RN((s), PRM_DMUL_RN((x), (y)))
#endif

extern "C" __global__ void prm_normalize_rows_f32(float* __restrict__ x, int n, int dim) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) {
        return;  // no barrier below
    }
    float* row = x + (size_t)r * dim;
    double s = -0.0;
    for (int k = 0; k < dim; ++k) {
        const double v = (double)row[k];
        s = PRM_DADD_RN(s, PRM_DMUL_RN(v, v));
    }
    const double norm = PRM_DSQRT_RN(s);
    if (norm > 0.0) {
        const double inv = PRM_DDIV_RN(1.0, norm);
        for (int k = 0; k < dim; ++k) {
            row[k] = (float)PRM_DMUL_RN((double)row[k], inv);
        }
    }
}
PRM_REGISTER_KERNEL(prm_normalize_rows_f32);

extern "C" __global__ void __launch_bounds__(LOGITS_TILE * LOGITS_TILE)
    prm_class_logits_f32(const float* __restrict__ x, const float* __restrict__ classes,
                         float* __restrict__ logits, int n, int c, int dim) {
    PRM_SHARED_ARRAY(float, sx, LOGITS_TILE * (LOGITS_K + 1));
    PRM_SHARED_ARRAY(float, sc, LOGITS_TILE * (LOGITS_K + 1));
    const int tx = threadIdx.x;  // the class within the tile
    const int ty = threadIdx.y;  // the row within the tile
    const int tid = ty * LOGITS_TILE + tx;
    const int class0 = blockIdx.x * LOGITS_TILE;
    // Row tiles in a grid-stride loop (the grid's y extent is at most 65,535): the same
    // iterations for every thread of the block, so every barrier is reached by all.
    for (long long row0 = (long long)blockIdx.y * LOGITS_TILE; row0 < n;
         row0 += (long long)gridDim.y * LOGITS_TILE) {
        double s = -0.0;
        for (int k0 = 0; k0 < dim; k0 += LOGITS_K) {
            const int width = min(LOGITS_K, dim - k0);
            // 256 threads stage 16 × 32 elements of each operand: two apiece, a row's 32
            // together.
            for (int i = tid; i < LOGITS_TILE * LOGITS_K; i += LOGITS_TILE * LOGITS_TILE) {
                const int t = i / LOGITS_K, k = i % LOGITS_K;
                const long long r = row0 + t;
                const int cl = class0 + t;
                sx[t * (LOGITS_K + 1) + k] =
                    (r < n && k < width) ? x[(size_t)r * dim + k0 + k] : 0.0f;
                sc[t * (LOGITS_K + 1) + k] =
                    (cl < c && k < width) ? classes[(size_t)cl * dim + k0 + k] : 0.0f;
            }
            __syncthreads();
            for (int k = 0; k < width; ++k) {
                s = PRM_ADD_EXACT_PRODUCT(s, (double)sx[ty * (LOGITS_K + 1) + k],
                                          (double)sc[tx * (LOGITS_K + 1) + k]);
            }
            __syncthreads();
        }
        const long long r = row0 + ty;
        const int cl = class0 + tx;
        if (r < n && cl < c) {
            logits[(size_t)r * c + cl] = (float)s;
        }
    }
}
PRM_REGISTER_KERNEL(prm_class_logits_f32);
