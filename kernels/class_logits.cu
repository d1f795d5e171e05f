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
// small against the forward); 16×16 threads a 64-row × 64-class tile of logits (row tiles in a
// grid-stride loop past 65,535 of them), each thread 4 rows × 4 classes (rows ty + 16i, classes
// tx + 16j: shared reads conflict-free, stores in runs of 16), its 16 sums each advancing in
// index order. The rows' and classes' elements are staged through shared memory 16 at a time,
// widened to f64 as they are staged: 17 KB, row stride 17 doubles. (Until 2026-12-06 a thread
// summed one logit, from floats it widened itself: two conversions and two shared loads a
// multiply-add, where now it is a quarter of a shared load and no conversion.)
//
// Launcher: src/gpu/kernels/class_logits.rs (normalize_rows_f32, class_logits_f32).
#include "common.cuh"
#include "rounded.cuh"

#define LOGITS_THREADS 16     // a block is 16 × 16 threads
#define LOGITS_PER_THREAD 4   // each thread sums 4 rows × 4 classes
#define LOGITS_TILE 64        // so a block's tile is 64 rows × 64 classes
#define LOGITS_K 16           // elements of dim staged at a time

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

extern "C" __global__ void __launch_bounds__(LOGITS_THREADS * LOGITS_THREADS)
    prm_class_logits_f32(const float* __restrict__ x, const float* __restrict__ classes,
                         float* __restrict__ logits, int n, int c, int dim) {
    PRM_SHARED_ARRAY(double, sx, LOGITS_TILE * (LOGITS_K + 1));
    PRM_SHARED_ARRAY(double, sc, LOGITS_TILE * (LOGITS_K + 1));
    const int tx = threadIdx.x;  // classes tx + 16·j of the tile
    const int ty = threadIdx.y;  // rows ty + 16·i of the tile
    const int tid = ty * LOGITS_THREADS + tx;
    const int class0 = blockIdx.x * LOGITS_TILE;
    // Row tiles in a grid-stride loop (the grid's y extent is at most 65,535): the same
    // iterations for every thread of the block, so every barrier is reached by all.
    for (long long row0 = (long long)blockIdx.y * LOGITS_TILE; row0 < n;
         row0 += (long long)gridDim.y * LOGITS_TILE) {
        double s[LOGITS_PER_THREAD][LOGITS_PER_THREAD];
#pragma unroll
        for (int i = 0; i < LOGITS_PER_THREAD; ++i) {
#pragma unroll
            for (int j = 0; j < LOGITS_PER_THREAD; ++j) s[i][j] = -0.0;
        }
        for (int k0 = 0; k0 < dim; k0 += LOGITS_K) {
            const int width = min(LOGITS_K, dim - k0);
            // 256 threads stage 64 × 16 elements of each operand, widened once here rather than
            // by each of the 16 threads that read them: four apiece, a row's 16 together.
            for (int e = tid; e < LOGITS_TILE * LOGITS_K; e += LOGITS_THREADS * LOGITS_THREADS) {
                const int t = e / LOGITS_K, k = e % LOGITS_K;
                const long long r = row0 + t;
                const int cl = class0 + t;
                sx[t * (LOGITS_K + 1) + k] =
                    (r < n && k < width) ? (double)x[(size_t)r * dim + k0 + k] : 0.0;
                sc[t * (LOGITS_K + 1) + k] =
                    (cl < c && k < width) ? (double)classes[(size_t)cl * dim + k0 + k] : 0.0;
            }
            __syncthreads();
            for (int k = 0; k < width; ++k) {
                double a[LOGITS_PER_THREAD], b[LOGITS_PER_THREAD];
#pragma unroll
                for (int i = 0; i < LOGITS_PER_THREAD; ++i) {
                    a[i] = sx[(ty + LOGITS_THREADS * i) * (LOGITS_K + 1) + k];
                    b[i] = sc[(tx + LOGITS_THREADS * i) * (LOGITS_K + 1) + k];
                }
#pragma unroll
                for (int i = 0; i < LOGITS_PER_THREAD; ++i) {
#pragma unroll
                    for (int j = 0; j < LOGITS_PER_THREAD; ++j) {
                        s[i][j] = PRM_ADD_EXACT_PRODUCT(s[i][j], a[i], b[j]);
                    }
                }
            }
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < LOGITS_PER_THREAD; ++i) {
            const long long r = row0 + ty + LOGITS_THREADS * i;
#pragma unroll
            for (int j = 0; j < LOGITS_PER_THREAD; ++j) {
                const int cl = class0 + tx + LOGITS_THREADS * j;
                if (r < n && cl < c) {
                    logits[(size_t)r * c + cl] = (float)s[i][j];
                }
            }
        }
    }
}
PRM_REGISTER_KERNEL(prm_class_logits_f32);
