//! Matrix products of the GPU engine: cuBLASLt on CUDA, the CPU `gemm` crate under the simulator.
//!
//! Row-major semantics throughout: `c[m, n] = (accumulate ? c : 0) + a[m, k] · op(b) + bias[n]`,
//! with `op(b) = bᵀ` for a PyTorch linear weight `b [n, k]` (`b_transposed`) and `op(b) = b` for
//! `b [k, n]` (the input gradient `dx = dy · W`). Only input gradients are ever formed.
//! [`matmul_f32`] takes fp32 operands; [`matmul_bf16`] takes bf16 `a` and `b` (the engine's
//! `--precision bf16`) and accumulates in fp32 into fp32 `c`, with an fp32 bias.

use super::device::{Backend, Buffer, Device, GpuError};
use super::graph::{SimOp, SimPtr};

/// The shape of one product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatmulShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// `b` is `[n, k]` and used transposed (a linear layer's forward).
    pub b_transposed: bool,
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
    let _timed = super::host_stats::timed(super::host_stats::Call::Matmul);
    check_extents(shape, a.len(), b.len(), bias, c);
    if record(
        dev,
        shape,
        a.address(),
        b.address(),
        bias,
        c,
        accumulate,
        false,
    ) {
        return Ok(());
    }
    match &*dev.backend {
        Backend::Sim => {
            // SAFETY: simulator buffers of the extents checked above.
            unsafe {
                sim_matmul_raw(
                    shape,
                    a.address(),
                    b.address(),
                    bias.map(|b| b.address()),
                    c.address(),
                    accumulate,
                    false,
                )
            };
            Ok(())
        }
        Backend::Cuda(cuda) => {
            cuda.matmul_f32(shape, a, b, bias, c, accumulate, dev.is_capturing())
        }
    }
}

/// `c = (accumulate ? c : 0) + a · op(b) + bias` with bf16 `a` and `b`, fp32 accumulation and
/// fp32 `bias` and `c` (the mixed-precision products of `--precision bf16`). Same row-major
/// semantics as [`matmul_f32`]. The result is the product of the bf16 values in fp32: under
/// the simulator the operands are widened exactly to f32 on the host and go through the f32
/// product; on CUDA, cuBLASLt with `CUDA_R_16BF` inputs and `CUBLAS_COMPUTE_32F`.
pub fn matmul_bf16(
    dev: &Device,
    shape: MatmulShape,
    a: &Buffer<half::bf16>,
    b: &Buffer<half::bf16>,
    bias: Option<&Buffer<f32>>,
    c: &mut Buffer<f32>,
    accumulate: bool,
) -> Result<(), GpuError> {
    let _timed = super::host_stats::timed(super::host_stats::Call::Matmul);
    check_extents(shape, a.len(), b.len(), bias, c);
    if record(
        dev,
        shape,
        a.address(),
        b.address(),
        bias,
        c,
        accumulate,
        true,
    ) {
        return Ok(());
    }
    match &*dev.backend {
        Backend::Sim => {
            // SAFETY: simulator buffers of the extents checked above.
            unsafe {
                sim_matmul_raw(
                    shape,
                    a.address(),
                    b.address(),
                    bias.map(|b| b.address()),
                    c.address(),
                    accumulate,
                    true,
                )
            };
            Ok(())
        }
        Backend::Cuda(cuda) => {
            cuda.matmul_bf16(shape, a, b, bias, c, accumulate, dev.is_capturing())
        }
    }
}

fn check_extents(
    shape: MatmulShape,
    a_len: usize,
    b_len: usize,
    bias: Option<&Buffer<f32>>,
    c: &Buffer<f32>,
) {
    let MatmulShape { m, n, k, .. } = shape;
    let (a, b) = (a_len, b_len);
    assert!(a >= m * k, "a has {a} elements, needs {m}x{k}");
    assert!(b >= n * k, "b has {b} elements, needs {n}x{k}");
    assert!(
        c.len() >= m * n,
        "c has {} elements, needs {m}x{n}",
        c.len()
    );
    if let Some(bias) = bias {
        assert!(
            bias.len() >= n,
            "bias has {} elements, needs {n}",
            bias.len()
        );
    }
}

/// Counts (and under the simulator records) a product issued during a graph capture; `true`
/// when it was recorded and must not run now.
#[allow(clippy::too_many_arguments)]
fn record(
    dev: &Device,
    shape: MatmulShape,
    a: u64,
    b: u64,
    bias: Option<&Buffer<f32>>,
    c: &Buffer<f32>,
    accumulate: bool,
    bf16_inputs: bool,
) -> bool {
    dev.record(
        || SimOp::Matmul {
            shape,
            a: SimPtr::new(a),
            b: SimPtr::new(b),
            bias: bias.map(|x| SimPtr::new(x.address())),
            c: SimPtr::new(c.address()),
            accumulate,
            bf16_inputs,
        },
        |o| o.products += 1,
    )
}

/// The simulator's product on host addresses: `a` and `b` hold f32 (or, with `bf16_inputs`,
/// bf16 values widened exactly to f32 first), `bias` and `c` f32.
///
/// # Safety
/// Every address is a live simulator allocation of the extents of `shape` (as
/// `check_extents` asserts), and nothing else accesses `c` meanwhile.
pub(crate) unsafe fn sim_matmul_raw(
    shape: MatmulShape,
    a: u64,
    b: u64,
    bias: Option<u64>,
    c: u64,
    accumulate: bool,
    bf16_inputs: bool,
) {
    let MatmulShape {
        m,
        n,
        k,
        b_transposed,
    } = shape;
    let (mut wa, mut wb);
    let (pa, pb) = if bf16_inputs {
        let widen = |p: u64, len: usize| -> Vec<f32> {
            // SAFETY: the caller guarantees `len` elements at `p`.
            let src = unsafe { std::slice::from_raw_parts(p as *const half::bf16, len) };
            src.iter().map(|v| v.to_f32()).collect()
        };
        wa = widen(a, m * k);
        wb = widen(b, n * k);
        (wa.as_mut_ptr(), wb.as_mut_ptr())
    } else {
        (a as *mut f32, b as *mut f32)
    };
    let pc = c as *mut f32;
    // gemm takes (column stride, row stride) of each operand.
    let (b_cs, b_rs) = if b_transposed {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    if m > 0 && n > 0 {
        if k == 0 {
            if !accumulate {
                // SAFETY: c holds at least m·n elements (caller).
                unsafe { std::ptr::write_bytes(pc, 0, m * n) };
            }
        } else {
            // SAFETY: extents guaranteed by the caller; simulator buffers are host memory.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    pc,
                    1,
                    n as isize,
                    accumulate,
                    pa,
                    1,
                    k as isize,
                    pb,
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
    }
    if let Some(bias) = bias {
        let pbias = bias as *const f32;
        for i in 0..m {
            for j in 0..n {
                // SAFETY: in bounds as guaranteed by the caller.
                unsafe { *pc.add(i * n + j) += *pbias.add(j) };
            }
        }
    }
}
