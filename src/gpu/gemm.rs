//! Matrix products of the GPU engine: cuBLASLt on CUDA, the CPU `gemm` crate under the simulator.
//!
//! Row-major semantics throughout: `d[m, n] = (c or 0) + a[m, k] · op(b) + bias[n]`, with
//! `op(b) = bᵀ` for a PyTorch linear weight `b [n, k]` (`b_transposed`) and `op(b) = b` for
//! `b [k, n]` (the input gradient `dx = dy · W`). Only input gradients are ever formed.
//!
//! | function | a, b | bias | c (added) | d (written) |
//! |---|---|---|---|---|
//! | [`matmul_f32`] | f32 | f32 | `d` itself when `accumulate` | f32 |
//! | [`matmul_f32_residual`] | f32 | f32 | a separate f32 buffer, or none | f32 |
//! | [`matmul_bf16`] | bf16 | f32 | `d` itself when `accumulate` | f32 |
//! | [`matmul_bf16_residual`] | bf16 | f32 | a separate f32 buffer, or none | f32 |
//! | [`matmul_bf16_bf16out`] | bf16 | bf16 | none | bf16 |
//!
//! Every product accumulates in fp32. The `_residual` forms are the residual adds of a
//! transformer block (`out = x + W·h`): cuBLASLt reads C from one buffer and writes D to
//! another, so the stream needs no copy of `x` first. [`matmul_bf16_bf16out`] rounds the fp32
//! result (bias included, through cuBLASLt's bias epilogue) to bf16 once, at the store: the
//! activations that only ever feed another bf16 consumer never exist in fp32 in memory.

use half::bf16;

use super::device::{Backend, Buffer, Device, GpuError};
use super::graph::{SimOp, SimPtr};
use super::timeline::OpKind;

/// The shape of one product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatmulShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// `b` is `[n, k]` and used transposed (a linear layer's forward).
    pub b_transposed: bool,
}

impl MatmulShape {
    /// Floating-point operations of the product: 2·m·n·k.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// How the CUDA backend chooses cuBLASLt's algorithm for a product
/// ([`Device::set_product_algorithms`]). Under the simulator products are formed on the CPU
/// with the same sums for a row whatever the row count (small products are padded, see
/// `sim_min_rows`), so a row never depends on the others whichever is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProductAlgorithms {
    /// cuBLASLt's heuristic for the product's size, asked at its rows rounded up to a power of
    /// two: the fastest. An algorithm fixes the order in which each element's inner sums are
    /// added, and another size may get another algorithm (another tiling, or the inner
    /// dimension split across blocks), so an image's last bits may depend on the size of the
    /// batch it ran in.
    #[default]
    BySize,
    /// One algorithm per kind of product whatever its number of rows: cuBLASLt's heuristic at
    /// [`INVARIANT_ROWS`] rows and 16-byte operand alignment, among the algorithms that do not
    /// split the inner dimension (`PRM_BATCH_INVARIANT=1`). A row of the result is then formed
    /// by the same sums whatever the other rows are, which makes an attack's results
    /// independent of its batches, as on the CPU and the simulator, unless the algorithm itself
    /// divides the work by the number of rows (not known for cuBLASLt; gpu-check measures it).
    BatchInvariant,
}

impl ProductAlgorithms {
    /// The name reports give it: `by-size` or `batch-invariant`.
    pub fn name(self) -> &'static str {
        match self {
            ProductAlgorithms::BySize => "by-size",
            ProductAlgorithms::BatchInvariant => "batch-invariant",
        }
    }
}

/// The row count at which [`ProductAlgorithms::BatchInvariant`] asks for its algorithms: the
/// size of `--batch-size auto`'s largest batches, where the time goes.
pub const INVARIANT_ROWS: usize = 16384;

impl ProductAlgorithms {
    /// [`Self::BatchInvariant`] when `PRM_BATCH_INVARIANT=1`, else [`Self::BySize`].
    pub fn from_env() -> Self {
        match std::env::var("PRM_BATCH_INVARIANT") {
            Ok(v) if v.trim() == "1" => ProductAlgorithms::BatchInvariant,
            _ => ProductAlgorithms::BySize,
        }
    }
}

/// Element types of one product (fp32 compute and scale in every case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ProductTypes {
    /// Everything f32.
    F32,
    /// bf16 `a` and `b`; f32 bias, `c` and `d`.
    Bf16In,
    /// bf16 `a`, `b`, bias and `d`; no `c` (β = 0).
    Bf16Out,
}

impl ProductTypes {
    pub(crate) fn bf16_inputs(self) -> bool {
        self != ProductTypes::F32
    }
    pub(crate) fn bf16_output(self) -> bool {
        self == ProductTypes::Bf16Out
    }
}

/// Operand addresses of one product: `d = (c or 0) + a · op(b) + bias`. `c` is either `d`
/// itself (accumulate in place) or a buffer that does not overlap `d`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProductPtrs {
    pub a: u64,
    pub b: u64,
    pub bias: Option<u64>,
    pub c: Option<u64>,
    pub d: u64,
}

/// `c = (accumulate ? c : 0) + a · op(b) + bias`, all f32.
pub fn matmul_f32(
    dev: &Device,
    shape: MatmulShape,
    a: &Buffer<f32>,
    b: &Buffer<f32>,
    bias: Option<&Buffer<f32>>,
    c: &mut Buffer<f32>,
    accumulate: bool,
) -> Result<(), GpuError> {
    check_extents(shape, a.len(), b.len(), bias.map(|x| x.len()), c.len());
    let ptrs = in_place(a.address(), b.address(), bias, c, accumulate);
    product(dev, shape, ProductTypes::F32, ptrs)
}

/// `d = (c or 0) + a · op(b) + bias`, all f32, with `c` and `d` distinct buffers: a residual add
/// that needs no copy of `c` into `d` first. Same arithmetic as copying `c` into `d` and calling
/// [`matmul_f32`] with `accumulate` (`None`: [`matmul_f32`] without).
pub fn matmul_f32_residual(
    dev: &Device,
    shape: MatmulShape,
    a: &Buffer<f32>,
    b: &Buffer<f32>,
    bias: Option<&Buffer<f32>>,
    c: Option<&Buffer<f32>>,
    d: &mut Buffer<f32>,
) -> Result<(), GpuError> {
    check_extents(shape, a.len(), b.len(), bias.map(|x| x.len()), d.len());
    let ptrs = residual(shape, a.address(), b.address(), bias, c, d);
    product(dev, shape, ProductTypes::F32, ptrs)
}

/// `c = (accumulate ? c : 0) + a · op(b) + bias` with bf16 `a` and `b`, fp32 accumulation and
/// fp32 `bias` and `c` (the mixed-precision products of `--precision bf16`). Same row-major
/// semantics as [`matmul_f32`]. The result is the product of the bf16 values in fp32: under
/// the simulator the operands are widened exactly to f32 on the host and go through the f32
/// product; on CUDA, cuBLASLt with `CUDA_R_16BF` inputs and `CUBLAS_COMPUTE_32F`.
pub fn matmul_bf16(
    dev: &Device,
    shape: MatmulShape,
    a: &Buffer<bf16>,
    b: &Buffer<bf16>,
    bias: Option<&Buffer<f32>>,
    c: &mut Buffer<f32>,
    accumulate: bool,
) -> Result<(), GpuError> {
    check_extents(shape, a.len(), b.len(), bias.map(|x| x.len()), c.len());
    let ptrs = in_place(a.address(), b.address(), bias, c, accumulate);
    product(dev, shape, ProductTypes::Bf16In, ptrs)
}

/// [`matmul_f32_residual`] with bf16 `a` and `b` (fp32 accumulation, bias, `c` and `d`): the
/// same arithmetic as copying `c` into `d` and calling [`matmul_bf16`] with `accumulate`.
pub fn matmul_bf16_residual(
    dev: &Device,
    shape: MatmulShape,
    a: &Buffer<bf16>,
    b: &Buffer<bf16>,
    bias: Option<&Buffer<f32>>,
    c: Option<&Buffer<f32>>,
    d: &mut Buffer<f32>,
) -> Result<(), GpuError> {
    check_extents(shape, a.len(), b.len(), bias.map(|x| x.len()), d.len());
    let ptrs = residual(shape, a.address(), b.address(), bias, c, d);
    product(dev, shape, ProductTypes::Bf16In, ptrs)
}

/// `d = a · op(b) + bias` with bf16 `a`, `b`, `bias` and `d`: fp32 accumulation, the bias added
/// in fp32, one round to nearest even at the store (cuBLASLt: A/B/C/D `CUDA_R_16BF`,
/// `CUBLAS_COMPUTE_32F`, fp32 scale, `CUBLASLT_EPILOGUE_BIAS` with a bf16 bias vector, the
/// combination PyTorch's bf16 `addmm` uses). For products whose only consumer reads bf16.
pub fn matmul_bf16_bf16out(
    dev: &Device,
    shape: MatmulShape,
    a: &Buffer<bf16>,
    b: &Buffer<bf16>,
    bias: Option<&Buffer<bf16>>,
    d: &mut Buffer<bf16>,
) -> Result<(), GpuError> {
    check_extents(shape, a.len(), b.len(), bias.map(|x| x.len()), d.len());
    let ptrs = ProductPtrs {
        a: a.address(),
        b: b.address(),
        bias: bias.map(|x| x.address()),
        c: None,
        d: d.address(),
    };
    product(dev, shape, ProductTypes::Bf16Out, ptrs)
}

fn in_place(
    a: u64,
    b: u64,
    bias: Option<&Buffer<f32>>,
    c: &Buffer<f32>,
    accumulate: bool,
) -> ProductPtrs {
    ProductPtrs {
        a,
        b,
        bias: bias.map(|x| x.address()),
        c: accumulate.then(|| c.address()),
        d: c.address(),
    }
}

fn residual(
    shape: MatmulShape,
    a: u64,
    b: u64,
    bias: Option<&Buffer<f32>>,
    c: Option<&Buffer<f32>>,
    d: &Buffer<f32>,
) -> ProductPtrs {
    let MatmulShape { m, n, .. } = shape;
    if let Some(c) = c {
        assert!(
            c.len() >= m * n,
            "c has {} elements, needs {m}x{n}",
            c.len()
        );
    }
    ProductPtrs {
        a,
        b,
        bias: bias.map(|x| x.address()),
        c: c.map(|c| c.address()),
        d: d.address(),
    }
}

/// Records (graph capture) or runs one product.
fn product(
    dev: &Device,
    shape: MatmulShape,
    types: ProductTypes,
    p: ProductPtrs,
) -> Result<(), GpuError> {
    let _timed = super::host_stats::timed(super::host_stats::Call::Matmul);
    let recorded = dev.record(
        || SimOp::Matmul {
            shape,
            types,
            a: SimPtr::new(p.a),
            b: SimPtr::new(p.b),
            bias: p.bias.map(SimPtr::new),
            c: p.c.map(SimPtr::new),
            d: SimPtr::new(p.d),
        },
        |o| o.products += 1,
    );
    if recorded {
        return Ok(());
    }
    dev.timed_op(
        OpKind::Product,
        || (product_label(shape, types, &p), shape.flops()),
        || match &*dev.backend {
            Backend::Sim(_) => {
                // SAFETY: simulator buffers of the extents checked by the public entry points.
                unsafe { sim_matmul_raw(shape, types, p) };
                Ok(())
            }
            Backend::Cuda(cuda) => cuda.matmul(shape, types, p, dev.is_capturing()),
        },
    )
}

/// A product's timeline label: its element types, what it adds, and its shape, e.g.
/// `product bf16→f32 +C 12608×768×768 (Wᵀ)`.
fn product_label(shape: MatmulShape, types: ProductTypes, p: &ProductPtrs) -> String {
    let t = match types {
        ProductTypes::F32 => "f32",
        ProductTypes::Bf16In => "bf16→f32",
        ProductTypes::Bf16Out => "bf16→bf16",
    };
    let c = if p.c.is_some() { " +C" } else { "" };
    let bias = if p.bias.is_some() { " +bias" } else { "" };
    let wt = if shape.b_transposed { " (Wᵀ)" } else { "" };
    format!(
        "product {t}{c}{bias} {}×{}×{}{wt}",
        shape.m, shape.n, shape.k
    )
}

fn check_extents(shape: MatmulShape, a: usize, b: usize, bias: Option<usize>, d: usize) {
    let MatmulShape { m, n, k, .. } = shape;
    assert!(a >= m * k, "a has {a} elements, needs {m}x{k}");
    assert!(b >= n * k, "b has {b} elements, needs {n}x{k}");
    assert!(d >= m * n, "d has {d} elements, needs {m}x{n}");
    if let Some(bias) = bias {
        assert!(bias >= n, "bias has {bias} elements, needs {n}");
    }
}

/// The simulator's product on host addresses: `a` and `b` hold f32, or bf16 values widened
/// exactly to f32 first; the f32 product is then added to `c`, bias added, and (bf16 output)
/// rounded to nearest even once. `c` distinct from `d` is copied into `d` and accumulated there,
/// the same arithmetic as an in-place accumulation after a device copy.
///
/// # Safety
/// Every address is a live simulator allocation of the extents of `shape` in the element
/// types of `types` (as `check_extents` asserts), `c` is `d` or does not overlap it, and
/// nothing else accesses `d` meanwhile.
pub(crate) unsafe fn sim_matmul_raw(shape: MatmulShape, types: ProductTypes, p: ProductPtrs) {
    let MatmulShape { m, n, k, .. } = shape;
    let widen = |ptr: u64, len: usize| -> Vec<f32> {
        // SAFETY: the caller guarantees `len` bf16 elements at `ptr`.
        let src = unsafe { std::slice::from_raw_parts(ptr as *const bf16, len) };
        src.iter().map(|v| v.to_f32()).collect()
    };
    let (wa, wb);
    let (pa, pb) = if types.bf16_inputs() {
        wa = widen(p.a, m * k);
        wb = widen(p.b, n * k);
        (wa.as_ptr(), wb.as_ptr())
    } else {
        (p.a as *const f32, p.b as *const f32)
    };
    if types.bf16_output() {
        let mut acc = vec![0.0f32; m * n];
        // SAFETY: `acc` holds m·n elements; a and b as guaranteed by the caller.
        unsafe { sim_gemm(shape, pa, pb, acc.as_mut_ptr(), false) };
        if let Some(bias) = p.bias {
            let bias = widen(bias, n);
            for row in acc.chunks_mut(n.max(1)) {
                row.iter_mut().zip(&bias).for_each(|(v, b)| *v += b);
            }
        }
        // SAFETY: d holds m·n bf16 elements (caller).
        let d = unsafe { std::slice::from_raw_parts_mut(p.d as *mut bf16, m * n) };
        d.iter_mut()
            .zip(&acc)
            .for_each(|(d, &v)| *d = bf16::from_f32(v));
        return;
    }
    let pd = p.d as *mut f32;
    if let Some(c) = p.c.filter(|&c| c != p.d) {
        // SAFETY: c and d hold m·n f32 each and do not overlap (caller).
        unsafe { std::ptr::copy_nonoverlapping(c as *const f32, pd, m * n) };
    }
    // SAFETY: extents guaranteed by the caller.
    unsafe { sim_gemm(shape, pa, pb, pd, p.c.is_some()) };
    if let Some(bias) = p.bias {
        let pbias = bias as *const f32;
        for i in 0..m {
            for j in 0..n {
                // SAFETY: in bounds as guaranteed by the caller.
                unsafe { *pd.add(i * n + j) += *pbias.add(j) };
            }
        }
    }
}

/// The fewest rows with which the `gemm` crate (0.19) forms a product `[m, k]·[k, n]` of our
/// row-major layout by the same sums for every row count. It computes the transposed problem
/// (our rows are its columns) and takes other kernels, which add in another order, for
/// small ones: a matrix-vector kernel for one row, a horizontal-sum kernel when
/// `m·n ≤ 256`, and below 65 rows of at most 64 columns, its inner dimension cut at 512
/// instead of its cache-sized blocks. A product with fewer rows is padded with zero rows, so
/// that a row's bits never depend on how many rows came with it (an image's on its batch).
/// `sim_rows_do_not_depend_on_the_row_count` checks it, for a later version of the crate too.
fn sim_min_rows(n: usize, k: usize) -> usize {
    let small_block = if n <= 64 && k > 512 { 65 } else { 0 };
    (256 / n.max(1) + 1).max(2).max(small_block)
}

/// `d = (accumulate ? d : 0) + a · op(b)` in f32 through the `gemm` crate, each row formed by
/// the same sums whatever the row count ([`sim_min_rows`]).
///
/// # Safety
/// `a`, `b` and `d` hold the extents of `shape`; nothing else accesses `d` meanwhile.
unsafe fn sim_gemm(shape: MatmulShape, a: *const f32, b: *const f32, d: *mut f32, acc: bool) {
    let MatmulShape { m, n, k, .. } = shape;
    let rows = sim_min_rows(n, k);
    if m == 0 || m >= rows || n == 0 || k == 0 {
        // SAFETY: as guaranteed by the caller.
        return unsafe { gemm_crate(shape, a, b, d, acc) };
    }
    let mut padded_a = vec![0.0f32; rows * k];
    // SAFETY: `a` holds m·k elements and `d` m·n (caller).
    let (a, d) = unsafe {
        (
            std::slice::from_raw_parts(a, m * k),
            std::slice::from_raw_parts_mut(d, m * n),
        )
    };
    padded_a[..m * k].copy_from_slice(a);
    let mut padded_d = vec![0.0f32; rows * n];
    if acc {
        padded_d[..m * n].copy_from_slice(d);
    }
    let padded = MatmulShape { m: rows, ..shape };
    // SAFETY: the padded operands hold the padded extents; `b` as guaranteed by the caller.
    unsafe { gemm_crate(padded, padded_a.as_ptr(), b, padded_d.as_mut_ptr(), acc) };
    d.copy_from_slice(&padded_d[..m * n]);
}

/// `d = (accumulate ? d : 0) + a · op(b)` in f32 through the `gemm` crate, as it is.
///
/// # Safety
/// `a`, `b` and `d` hold the extents of `shape`; nothing else accesses `d` meanwhile.
unsafe fn gemm_crate(shape: MatmulShape, a: *const f32, b: *const f32, d: *mut f32, acc: bool) {
    let MatmulShape {
        m,
        n,
        k,
        b_transposed,
    } = shape;
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            // SAFETY: d holds at least m·n elements (caller).
            unsafe { std::ptr::write_bytes(d, 0, m * n) };
        }
        return;
    }
    // gemm takes (column stride, row stride) of each operand.
    let (b_cs, b_rs) = if b_transposed {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    // SAFETY: extents guaranteed by the caller; simulator buffers are host memory.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            d,
            1,
            n as isize,
            acc,
            a,
            1,
            k as isize,
            b,
            b_cs,
            b_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(shape: MatmulShape, a: &[f32], b: &[f32], d: &[f32], acc: bool) -> Vec<f32> {
        let mut d = d[..shape.m * shape.n].to_vec();
        // SAFETY: the slices hold the extents of `shape`.
        unsafe { sim_gemm(shape, a.as_ptr(), b.as_ptr(), d.as_mut_ptr(), acc) };
        d
    }

    /// The simulator's promise behind "an image's bits do not depend on its batch": the first
    /// m rows of a product are the same bits whatever m is. The shapes are the towers' (ViT-B
    /// and the tiny test model: widths, QKV, MLP, projections, the patch embedding's 768 and
    /// 3072 inner lengths, input-gradient products) and small, odd ones around the crate's
    /// kernel boundaries.
    #[test]
    fn sim_rows_do_not_depend_on_the_row_count() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let shapes = [
            (128, 768),
            (384, 128),
            (128, 128),
            (512, 128),
            (128, 512),
            (64, 128),
            (64, 768),
            (768, 768),
            (2304, 768),
            (768, 3072),
            (3072, 768),
            (512, 768),
            (17, 64),
            (33, 600),
            (5, 100),
            (2, 3),
            (40, 2),
            (64, 197),
        ];
        let most = 140;
        for (n, k) in shapes {
            let a: Vec<f32> = (0..most * k).map(|_| next()).collect();
            let b: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let d: Vec<f32> = (0..most * n).map(|_| next()).collect();
            for b_transposed in [true, false] {
                for acc in [false, true] {
                    let shape = |m| MatmulShape {
                        m,
                        n,
                        k,
                        b_transposed,
                    };
                    let all = product(shape(most), &a, &b, &d, acc);
                    for m in (1..most).filter(|&m| m < 12 || m % 7 == 0 || m == 64 || m == 65) {
                        let some = product(shape(m), &a, &b, &d, acc);
                        assert!(
                            some.iter()
                                .zip(&all)
                                .all(|(x, y)| x.to_bits() == y.to_bits()),
                            "n {n}, k {k}, b transposed {b_transposed}, accumulate {acc}: \
                             {m} rows differ from {most}"
                        );
                    }
                }
            }
        }
    }
}
