//! The pure-Rust reference engine: the oracle for every other engine and the `--device cpu` path.
//!
//! Plain, readable f32 code with f64 reductions, parallel with rayon, matrix products on the
//! `gemm` crate.

pub mod embedding;
pub mod exp;
pub mod linalg;
pub mod ops;
pub mod pooling;
pub mod resize;
pub mod vit;

pub use vit::{Forward, ReferenceVit};
