//! The engine's matrix products: cuBLASLt through `gemm.rs`, in fp32 or with bf16 operands
//! (rounded from fp32 where a tensor is stored in fp32), and the linear layers built on them.

use super::weights::{DeviceLinear, Weight};
use super::{bf16_weight, GpuVit};
use crate::gpu::gemm::{matmul_bf16_residual, matmul_f32_residual, MatmulShape};
use crate::gpu::kernels::convert::to_bf16;
use crate::gpu::{Buffer, GpuError};
use std::sync::{Arc, Mutex};

impl<'m> GpuVit<'m> {
    /// `out = (residual or 0) + x · op(W) + bias` in the engine's precision: in bf16, `x` is
    /// rounded to bf16 first (W already is) and the product accumulates in fp32. The residual
    /// is read by the product itself (cuBLASLt's C), so it needs no copy into `out` first.
    pub(super) fn product(
        &self,
        shape: MatmulShape,
        x: &Buffer<f32>,
        w: &Weight,
        bias: Option<&Buffer<f32>>,
        residual: Option<&Buffer<f32>>,
        out: &mut Buffer<f32>,
    ) -> Result<(), GpuError> {
        match w {
            Weight::F32(w) => matmul_f32_residual(&self.dev, shape, x, w, bias, residual, out),
            Weight::Bf16(_) => self.product_from_bf16(shape, w, bias, residual, out, |xb| {
                to_bf16(&self.dev, x, xb, shape.m * shape.k)
            }),
        }
    }

    /// [`Self::product`] in bf16 precision, with the bf16 left operand written by `fill` into the
    /// engine's operand scratch (a kernel that produces its output in bf16 directly saves the
    /// conversion pass).
    pub(super) fn product_from_bf16(
        &self,
        shape: MatmulShape,
        w: &Weight,
        bias: Option<&Buffer<f32>>,
        residual: Option<&Buffer<f32>>,
        out: &mut Buffer<f32>,
        fill: impl FnOnce(&mut Buffer<half::bf16>) -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        self.with_bf16_operand(shape.m * shape.k, fill, |xb| {
            self.product_of_bf16(shape, xb, w, bias, residual, out)
        })
    }

    /// Runs `fill` then `product` on the engine's bf16 operand scratch of at least `len`
    /// elements. One scratch is enough: products run one at a time, in stream order, and each
    /// reads its operand before the next kernel overwrites it.
    pub(super) fn with_bf16_operand(
        &self,
        len: usize,
        fill: impl FnOnce(&mut Buffer<half::bf16>) -> Result<(), GpuError>,
        product: impl FnOnce(&Buffer<half::bf16>) -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        let scratch = {
            let mut guard = self.bf16_scratch.lock().unwrap_or_else(|p| p.into_inner());
            let bytes = len * std::mem::size_of::<half::bf16>();
            let small = match guard.as_ref() {
                None => true,
                Some(b) => b.lock().unwrap_or_else(|p| p.into_inner()).capacity_bytes() < bytes,
            };
            if small {
                // A capture can neither allocate the larger one nor free the smaller one (on a
                // GPU, freeing memory that is not the graph's own breaks the capture): refuse
                // before touching either.
                self.dev
                    .refuse_in_capture("growing the bf16 operand scratch")?;
                // Free the smaller one first, unless a graph still holds it.
                *guard = None;
                *guard = Some(Arc::new(Mutex::new(self.dev.alloc::<half::bf16>(len)?)));
            }
            guard.clone().expect("allocated above")
        };
        // A graph captured now reads this scratch at its address: it must outlive the graph.
        self.dev.pin_to_capture(scratch.clone());
        let mut xb = scratch.lock().unwrap_or_else(|p| p.into_inner());
        // Lent at exactly `len` elements, so kernels that check their output's extent see it.
        xb.set_len(len);
        fill(&mut xb)?;
        product(&xb)
    }

    /// `out = (residual or 0) + xb · op(W) + bias` with a bf16 operand `xb` that a kernel
    /// already wrote (bf16 precision only).
    pub(super) fn product_of_bf16(
        &self,
        shape: MatmulShape,
        xb: &Buffer<half::bf16>,
        w: &Weight,
        bias: Option<&Buffer<f32>>,
        residual: Option<&Buffer<f32>>,
        out: &mut Buffer<f32>,
    ) -> Result<(), GpuError> {
        let w = bf16_weight(w);
        matmul_bf16_residual(&self.dev, shape, xb, w, bias, residual, out)
    }

    /// `out = (residual or 0) + x · Wᵀ + b`, x `[rows, in]`.
    pub(super) fn linear(
        &self,
        x: &Buffer<f32>,
        rows: usize,
        l: &DeviceLinear,
        residual: Option<&Buffer<f32>>,
        out: &mut Buffer<f32>,
    ) -> Result<(), GpuError> {
        let bias = l.bias.as_ref();
        self.product(l.forward_shape(rows), x, &l.weight, bias, residual, out)
    }

    /// `dx = dy · W`, dy `[rows, out]`.
    pub(super) fn linear_backward(
        &self,
        dy: &Buffer<f32>,
        rows: usize,
        l: &DeviceLinear,
        dx: &mut Buffer<f32>,
    ) -> Result<(), GpuError> {
        self.product(l.backward_shape(rows), dy, &l.weight, None, None, dx)
    }
}
