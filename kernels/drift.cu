// drift.cu: per-token sums of the feature drift between a clean and an adversarial image, for
// `prm eval --target features`, so that a pass's 13 layers need not come back to the host.
//
// Layouts:
//   feats  [rows, dim]   fp32: one layer of a packed pass (every image's tokens, back to back)
//   pairs  [n, 2]        int: for output row r, the row of the clean token and the row of the
//                        adversarial token it is compared with
//   out    [.., 4]       f64: output row out_row0 + r holds, summed over the row's dim elements in
//                        index order, a·c, a·a, c·c and (a − c)·(a − c) (a adversarial, c clean,
//                        each element widened to f64 first)
// Precision: every product and sum rounded once, in f64, in the twin's order (rounded.cuh), so
// the sums equal `prm::eval::ops::token_sums` bit for bit: the report's drift is the host's.
// One thread a row (a row is at most a few thousand elements; the pass is small against the
// forward that made it).
//
// Launcher: src/gpu/kernels/drift.rs (token_sums_f32).
#include "common.cuh"
#include "rounded.cuh"

extern "C" __global__ void prm_drift_token_sums_f32(const float* __restrict__ feats,
                                                    const int* __restrict__ pairs,
                                                    double* __restrict__ out, int n, int dim,
                                                    unsigned long long out_row0) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) {
        return;  // no barrier below
    }
    const float* c = feats + (size_t)pairs[2 * r] * dim;
    const float* a = feats + (size_t)pairs[2 * r + 1] * dim;
    double ac = 0.0, aa = 0.0, cc = 0.0, dd = 0.0;
    for (int k = 0; k < dim; ++k) {
        const double x = (double)a[k];
        const double y = (double)c[k];
        ac = PRM_DADD_RN(ac, PRM_DMUL_RN(x, y));
        aa = PRM_DADD_RN(aa, PRM_DMUL_RN(x, x));
        cc = PRM_DADD_RN(cc, PRM_DMUL_RN(y, y));
        const double d = PRM_DSUB_RN(x, y);
        dd = PRM_DADD_RN(dd, PRM_DMUL_RN(d, d));
    }
    double* o = out + (size_t)(out_row0 + (unsigned long long)r) * 4;
    o[0] = ac;
    o[1] = aa;
    o[2] = cc;
    o[3] = dd;
}
PRM_REGISTER_KERNEL(prm_drift_token_sums_f32);
