//! The pure-Rust reference engine: the oracle for every other engine and the `--device cpu` path.

pub mod resize;
