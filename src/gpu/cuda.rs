//! The CUDA backend (placeholder interface; implemented on the `cuda` branch).

use std::ffi::c_void;

use super::device::{GpuError, LaunchConfig};

/// Number of CUDA devices, 0 when there is no driver. Never panics.
pub fn device_count() -> usize {
    0
}

pub struct CudaBackend;

impl CudaBackend {
    pub fn new(_ordinal: usize) -> Result<Self, GpuError> {
        Err(GpuError::NoDriver)
    }
    pub fn name(&self) -> String {
        unreachable!()
    }
    pub fn alloc_zeroed(&self, _bytes: usize) -> Result<CudaMemory, GpuError> {
        unreachable!()
    }
    pub fn launch(
        &self,
        _kernel: &str,
        _cfg: LaunchConfig,
        _args: &mut [*mut c_void],
    ) -> Result<(), GpuError> {
        unreachable!()
    }
    pub fn synchronize(&self) -> Result<(), GpuError> {
        unreachable!()
    }
    pub fn matmul_f32(
        &self,
        _shape: super::gemm::MatmulShape,
        _a: &super::Buffer<f32>,
        _b: &super::Buffer<f32>,
        _bias: Option<&super::Buffer<f32>>,
        _c: &mut super::Buffer<f32>,
        _accumulate: bool,
    ) -> Result<(), GpuError> {
        unreachable!()
    }
}

pub struct CudaMemory;

impl CudaMemory {
    pub fn address(&self) -> u64 {
        unreachable!()
    }
    pub fn write(&mut self, _bytes: &[u8]) -> Result<(), GpuError> {
        unreachable!()
    }
    pub fn read(&self, _bytes: &mut [u8]) -> Result<(), GpuError> {
        unreachable!()
    }
}
