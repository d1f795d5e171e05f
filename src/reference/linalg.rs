//! Matrix products for the reference engine, on the `gemm` crate.
//!
//! Layouts are row-major throughout. The two shapes a ViT needs are `y = x · Wᵀ` (PyTorch's
//! linear, `W` stored `[out, in]`) and `dx = dy · W` (its input gradient). Both are thin,
//! checked wrappers over one strided product so that every call site states its layout.

use gemm::Parallelism;
use rayon::prelude::*;

/// A row-major matrix view with an explicit row stride (`stride >= cols`), so that a head's
/// slice of a packed `[T, 3D]` q/k/v matrix can be used without a copy.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
}

impl<'a> MatRef<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, stride: usize) -> Self {
        assert!(stride >= cols, "row stride {stride} < cols {cols}");
        assert!(
            rows == 0 || data.len() >= (rows - 1) * stride + cols,
            "matrix view {rows}x{cols} (stride {stride}) needs more than {} elements",
            data.len()
        );
        MatRef {
            data,
            rows,
            cols,
            stride,
        }
    }
}

/// Products below this many multiply-adds run single-threaded: threading costs more than it saves.
const PARALLEL_THRESHOLD: usize = 1 << 20;

/// Threaded products cut the output into this many column blocks per rayon thread. Every block
/// reads all of `a`, so fewer blocks is less work; two blocks per thread measured no faster at
/// the ViT's shapes.
const BLOCKS_PER_THREAD: usize = 1;

/// Column blocks are a multiple of this many columns: the gemm crate computes the transposed
/// product, so our columns are its rows, and its AVX-512 f32 micro-panel is 4 × 16 = 64 rows.
const COLUMN_BLOCK_ALIGN: usize = 64;

/// Products with at most this many rows are not cut into column blocks: for them the gemm crate
/// picks its depth blocking from the block's width (its small-matrix path), so blocks would round
/// differently from one call. They use the crate's own threading instead.
const MIN_ROWS_FOR_BLOCKS: usize = 65;

/// How a product of this size runs: `(column blocks, parallelism inside each gemm call)`.
///
/// Why column blocks rather than the gemm crate's `Parallelism::Rayon`: they are faster at the
/// ViT's shapes (197 rows). Measured on a quiet 2-core AVX-512 VM, best of 30, the four forward
/// products of one ViT-B/16 block (`[in, out]` weights): one thread 16.6 ms, `Rayon(2)` 9.5 ms,
/// two column blocks 8.4 ms; `[197, 768] · [768, 3072]` alone: 167, 324 and 336 GFLOP/s.
/// Each block packs only its own slice of `b`.
fn plan(m: usize, n: usize, k: usize, threaded: bool) -> (usize, Parallelism) {
    let threads = rayon::current_num_threads();
    if !threaded || threads < 2 || m * n * k < PARALLEL_THRESHOLD {
        return (1, Parallelism::None);
    }
    let blocks = (threads * BLOCKS_PER_THREAD).min(n / COLUMN_BLOCK_ALIGN);
    if m < MIN_ROWS_FOR_BLOCKS || blocks < 2 {
        return (1, Parallelism::Rayon(threads));
    }
    (blocks, Parallelism::None)
}

/// A raw output pointer that column blocks on different threads write through, each to its own
/// disjoint set of columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every block writes a disjoint column range of the output (see `product`), and the
// scope that shares the pointer ends before `out` is used again.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// One gemm call on columns `cols` of the product: `out` points at the output's
/// first element, its rows `n_total` apart.
///
/// # Safety
/// `a` and `b` must have been bounds-checked as the full product's operands (`product`), `cols`
/// must lie inside `0..n_total`, and `out` must be valid for the full `[m, n_total]` output.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_columns(
    a: MatRef,
    a_transposed: bool,
    b: MatRef,
    b_transposed: bool,
    (m, k): (usize, usize),
    cols: std::ops::Range<usize>,
    out: OutPtr,
    n_total: usize,
    accumulate: bool,
    parallelism: Parallelism,
) {
    // gemm takes (column stride, row stride) of the m×k left and k×n right matrices.
    let (a_cs, a_rs) = if a_transposed {
        (a.stride as isize, 1)
    } else {
        (1, a.stride as isize)
    };
    // Column j of op(b) starts at row j of b when b is transposed, else at element j of row 0.
    let (b_cs, b_rs, b_first) = if b_transposed {
        (b.stride as isize, 1, cols.start * b.stride)
    } else {
        (1, b.stride as isize, cols.start)
    };
    gemm::gemm(
        m,
        cols.len(),
        k,
        out.0.add(cols.start),
        1,
        n_total as isize,
        accumulate,
        a.data.as_ptr(),
        a_cs,
        a_rs,
        b.data.as_ptr().add(b_first),
        b_cs,
        b_rs,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}

/// `out[m, n] (+)= op(a) · op(b)`: `op(a) = aᵀ` if `a_transposed` (a is `[k, m]`) else `a`
/// (`[m, k]`); `op(b) = bᵀ` if `b_transposed` (b is `[n, k]`) else `b` (`[k, n]`). `out` is dense
/// row-major `[m, n]`. With `accumulate`, the product is added to `out`. With `threaded`, large
/// products run as independent column blocks on the rayon pool; each output element is still
/// reduced over k by one serial call, in the same order (tested bit for bit against a single
/// call in `threaded_products_equal_one_serial_call`).
fn product(
    a: MatRef,
    a_transposed: bool,
    b: MatRef,
    b_transposed: bool,
    out: &mut [f32],
    accumulate: bool,
    threaded: bool,
) {
    let (m, k) = if a_transposed {
        (a.cols, a.rows)
    } else {
        (a.rows, a.cols)
    };
    let (n, kb) = if b_transposed {
        (b.rows, b.cols)
    } else {
        (b.cols, b.rows)
    };
    assert_eq!(k, kb, "inner dimensions differ: {m}x{k} times {kb}x{n}");
    assert_eq!(
        out.len(),
        m * n,
        "output has {} elements, expected {m}x{n}",
        out.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    let (blocks, parallelism) = plan(m, n, k, threaded);
    let out_ptr = OutPtr(out.as_mut_ptr());
    // SAFETY: the views were bounds-checked in `MatRef::strided` and `out` has exactly m·n
    // elements; gemm reads a and b only inside those extents, and each call writes only the
    // columns it is given, which are disjoint across blocks.
    if blocks == 1 {
        unsafe {
            gemm_columns(
                a,
                a_transposed,
                b,
                b_transposed,
                (m, k),
                0..n,
                out_ptr,
                n,
                accumulate,
                parallelism,
            )
        };
        return;
    }
    let width = n.div_ceil(blocks).next_multiple_of(COLUMN_BLOCK_ALIGN);
    rayon::scope(|scope| {
        for start in (0..n).step_by(width) {
            let cols = start..(start + width).min(n);
            scope.spawn(move |_| unsafe {
                gemm_columns(
                    a,
                    a_transposed,
                    b,
                    b_transposed,
                    (m, k),
                    cols,
                    out_ptr,
                    n,
                    accumulate,
                    Parallelism::None,
                )
            });
        }
    });
}

/// `Σ a_i b_i`, each product and the sum in f64, in index order: the losses' and pooling
/// heads' dot products, whose values the golden tests compare at 1e-10.
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Tiles of this many rows and columns keep both sides of a transpose in L1.
const TRANSPOSE_TILE: usize = 32;

/// The transpose of a dense row-major `[rows, cols]` matrix, as a dense `[cols, rows]` one.
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(src.len(), rows * cols, "matrix is not {rows}x{cols}");
    let mut out = vec![0.0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return out;
    }
    // Each task writes TRANSPOSE_TILE whole output rows (source columns c0..c1).
    out.par_chunks_mut(TRANSPOSE_TILE * rows)
        .enumerate()
        .for_each(|(tile, dst)| {
            let c0 = tile * TRANSPOSE_TILE;
            let c1 = (c0 + TRANSPOSE_TILE).min(cols);
            for r0 in (0..rows).step_by(TRANSPOSE_TILE) {
                for r in r0..(r0 + TRANSPOSE_TILE).min(rows) {
                    for c in c0..c1 {
                        dst[(c - c0) * rows + r] = src[r * cols + c];
                    }
                }
            }
        });
    out
}

/// `out = x · wᵀ`, the linear layer: `x [m, k]`, `w [n, k]`.
pub fn matmul_nt(x: MatRef, w: MatRef, out: &mut [f32], accumulate: bool) {
    product(x, false, w, true, out, accumulate, true);
}

/// `out = a · b`: `a [m, k]`, `b [k, n]`; the input gradient of a linear layer (`dx = dy · W`).
pub fn matmul_nn(a: MatRef, b: MatRef, out: &mut [f32], accumulate: bool) {
    product(a, false, b, false, out, accumulate, true);
}

/// `out (+)= x · Wᵀ + b`, the linear layer with its bias: `x [rows, in]`, `out [rows, out]`.
pub fn linear(x: &[f32], rows: usize, l: &crate::model::Linear, out: &mut [f32], accumulate: bool) {
    matmul_nt(
        MatRef::new(x, rows, l.in_features),
        MatRef::new(&l.weight, l.out_features, l.in_features),
        out,
        accumulate,
    );
    if let Some(b) = &l.bias {
        out.chunks_mut(l.out_features)
            .for_each(|row| row.iter_mut().zip(b).for_each(|(o, b)| *o += b));
    }
}

/// Single-threaded variants, for use inside an outer rayon loop (per attention head).
pub fn matmul_nt_serial(x: MatRef, w: MatRef, out: &mut [f32], accumulate: bool) {
    product(x, false, w, true, out, accumulate, false);
}
pub fn matmul_nn_serial(a: MatRef, b: MatRef, out: &mut [f32], accumulate: bool) {
    product(a, false, b, false, out, accumulate, false);
}

/// `out = aᵀ · b`: `a [k, m]`, `b [k, n]` (used for `dV = Pᵀ · dO` and `dK = dSᵀ · Q`).
pub fn matmul_tn_serial(a: MatRef, b: MatRef, out: &mut [f32], accumulate: bool) {
    product(a, true, b, false, out, accumulate, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threaded_products_equal_one_serial_call() {
        // Shapes of the ViT-B/16 linears (197 tokens) and a ragged one with a narrow last block.
        for (m, n, k, b_transposed) in [
            (197, 768, 3072, false),
            (197, 2304, 768, true),
            (97, 150, 700, true),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0)
                .collect();
            let b_view = if b_transposed {
                MatRef::new(&b, n, k)
            } else {
                MatRef::new(&b, k, n)
            };
            let mut serial = vec![0.5f32; m * n];
            let mut threaded = serial.clone();
            let a_view = MatRef::new(&a, m, k);
            product(
                a_view,
                false,
                b_view,
                b_transposed,
                &mut serial,
                true,
                false,
            );
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap();
            pool.install(|| {
                assert!(plan(m, n, k, true).0 > 1, "{m}x{n}x{k} is not split");
                product(
                    a_view,
                    false,
                    b_view,
                    b_transposed,
                    &mut threaded,
                    true,
                    true,
                )
            });
            assert!(
                serial
                    .iter()
                    .zip(&threaded)
                    .all(|(s, t)| s.to_bits() == t.to_bits()),
                "{m}x{n}x{k}: threaded product differs from one call"
            );
        }
    }

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn transpose_of_ragged_matrices() {
        for (rows, cols) in [(0, 3), (1, 1), (37, 70), (64, 33)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = transpose(&src, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], src[r * cols + c]);
                }
            }
        }
    }

    #[test]
    fn products_match_naive_for_odd_shapes() {
        let (m, n, k) = (37, 29, 53);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0)
            .collect();
        let want = naive(&a, &b, m, n, k);
        let close = |got: &[f32]| got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-4);

        let mut out = vec![f32::NAN; m * n];
        matmul_nn(
            MatRef::new(&a, m, k),
            MatRef::new(&b, k, n),
            &mut out,
            false,
        );
        assert!(close(&out));

        let bt = transpose(&b, k, n);
        let mut out = vec![f32::NAN; m * n];
        matmul_nt(
            MatRef::new(&a, m, k),
            MatRef::new(&bt, n, k),
            &mut out,
            false,
        );
        assert!(close(&out));

        let at = transpose(&a, m, k);
        let mut out = vec![f32::NAN; m * n];
        matmul_tn_serial(
            MatRef::new(&at, k, m),
            MatRef::new(&b, k, n),
            &mut out,
            false,
        );
        assert!(close(&out));

        let mut out = vec![1.0; m * n];
        matmul_nn_serial(MatRef::new(&a, m, k), MatRef::new(&b, k, n), &mut out, true);
        assert!(out
            .iter()
            .zip(&want)
            .all(|(g, w)| (g - 1.0 - w).abs() < 1e-4));
    }
}
