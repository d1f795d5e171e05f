//! Matrix products of the GPU engine: cuBLASLt on CUDA, the CPU `gemm` crate under the simulator.
//!
//! Row-major semantics throughout: `c[m, n] = (accumulate ? c : 0) + a[m, k] · op(b) + bias[n]`,
//! with `op(b) = bᵀ` for a PyTorch linear weight `b [n, k]` (`b_transposed`) and `op(b) = b` for
//! `b [k, n]` (the input gradient `dx = dy · W`). Only input gradients are ever formed.

use super::device::{Backend, Buffer, Device, GpuError, Memory};

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
    let MatmulShape { m, n, k, .. } = shape;
    assert!(
        a.len() >= m * k,
        "a has {} elements, needs {m}x{k}",
        a.len()
    );
    assert!(
        b.len() >= n * k,
        "b has {} elements, needs {n}x{k}",
        b.len()
    );
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
    match &*dev.backend {
        Backend::Sim => {
            sim_matmul(shape, a, b, bias, c, accumulate);
            Ok(())
        }
        Backend::Cuda(cuda) => cuda.matmul_f32(shape, a, b, bias, c, accumulate),
    }
}

fn host_ptr<T: super::Element>(b: &Buffer<T>) -> *mut f32 {
    match &b.mem {
        Memory::Host { ptr, .. } => *ptr as *mut f32,
        Memory::Cuda(_) => unreachable!("simulator product on a CUDA buffer"),
    }
}

fn sim_matmul(
    shape: MatmulShape,
    a: &Buffer<f32>,
    b: &Buffer<f32>,
    bias: Option<&Buffer<f32>>,
    c: &mut Buffer<f32>,
    accumulate: bool,
) {
    let MatmulShape {
        m,
        n,
        k,
        b_transposed,
    } = shape;
    let (pa, pb, pc) = (host_ptr(a), host_ptr(b), host_ptr(c));
    // gemm takes (column stride, row stride) of each operand.
    let (b_cs, b_rs) = if b_transposed {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    if m > 0 && n > 0 {
        if k == 0 {
            if !accumulate {
                // SAFETY: c holds at least m·n elements (asserted by the caller).
                unsafe { std::ptr::write_bytes(pc, 0, m * n) };
            }
        } else {
            // SAFETY: extents asserted in `matmul_f32`; simulator buffers are host memory and
            // `c` is exclusively borrowed.
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
        let pbias = host_ptr(bias);
        for i in 0..m {
            for j in 0..n {
                // SAFETY: in bounds as asserted.
                unsafe { *pc.add(i * n + j) += *pbias.add(j) };
            }
        }
    }
}
