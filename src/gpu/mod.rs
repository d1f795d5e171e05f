//! The GPU engine's device layer: one code path over two devices.
//!
//! - `cuda`: the kernels of `kernels/*.cu` compiled by nvcc into an embedded fatbin, launched
//!   through cudarc; matrix products through cuBLASLt.
//! - `sim`: the *same* `.cu` sources compiled as C++ and run on CPU threads by a small simulator
//!   of the CUDA execution model (`kernels/sim/`); matrix products on the CPU.
//!
//! Launchers (one per kernel, in [`kernels`]) pack their arguments into [`KernelArgs`] exactly
//! as `cuLaunchKernel` expects them, so the engine above never knows which device it runs on.

pub mod cuda;
pub mod device;
pub mod engine;
pub mod gemm;
pub mod graph;
pub mod host_stats;
pub mod kernels;
pub mod pool;
pub mod product_timing;
pub mod sim;
pub mod sim_memory;
pub mod staging;
pub mod timeline;

pub use device::{Buffer, Device, Element, GpuError, KernelArgs, LaunchConfig};
pub use gemm::ProductAlgorithms;
pub use graph::{Graph, GraphOps};
pub use timeline::{OpKind, Timeline};
