//! Matrix products for the reference engine, on the `gemm` crate.
//!
//! Layouts are row-major throughout. The two shapes a ViT needs are `y = x · Wᵀ` (PyTorch's
//! linear, `W` stored `[out, in]`) and `dx = dy · W` (its input gradient). Both are thin,
//! checked wrappers over one strided product so that every call site states its layout.

use gemm::Parallelism;

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

fn parallelism(m: usize, n: usize, k: usize, threaded: bool) -> Parallelism {
    if threaded && m * n * k >= PARALLEL_THRESHOLD && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    }
}

/// `out[m, n] (+)= op(a) · op(b)`: `op(a) = aᵀ` if `a_transposed` (a is `[k, m]`) else `a`
/// (`[m, k]`); `op(b) = bᵀ` if `b_transposed` (b is `[n, k]`) else `b` (`[k, n]`). `out` is dense
/// row-major `[m, n]`. With `accumulate`, the product is added to `out`.
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
    // gemm takes (column stride, row stride) of the m×k left and k×n right matrices.
    let (a_cs, a_rs) = if a_transposed {
        (a.stride as isize, 1)
    } else {
        (1, a.stride as isize)
    };
    let (b_cs, b_rs) = if b_transposed {
        (b.stride as isize, 1)
    } else {
        (1, b.stride as isize)
    };
    // SAFETY: the views were bounds-checked in `MatRef::strided` and `out` has exactly m·n
    // elements; gemm reads a and b only inside those extents and writes only `out`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(m, n, k, threaded),
        );
    }
}

/// `out = x · wᵀ`, the linear layer: `x [m, k]`, `w [n, k]`.
pub fn matmul_nt(x: MatRef, w: MatRef, out: &mut [f32], accumulate: bool) {
    product(x, false, w, true, out, accumulate, true);
}

/// `out = a · b`: `a [m, k]`, `b [k, n]`; the input gradient of a linear layer (`dx = dy · W`).
pub fn matmul_nn(a: MatRef, b: MatRef, out: &mut [f32], accumulate: bool) {
    product(a, false, b, false, out, accumulate, true);
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

    fn transpose(b: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0.0; b.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = b[r * cols + c];
            }
        }
        t
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
