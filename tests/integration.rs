//! The integration tests, one module per file of `tests/`, built as one test executable.
//!
//! One executable instead of one per file: each executable links the whole crate and its
//! dependencies, and the 35 of them took about 430 s of CPU to build on CI's 2 cores (most of
//! it linking and the same generic code compiled again in each); this one takes 167 s. Two
//! balanced executables, tried too, took 29 s more CPU, finished compiling no sooner after
//! the library (124 s against 119 s of CI's build, dev VM) and ran 22 s longer (each one's
//! last tests leave a core idle), though clippy checks two crates in parallel where it checks
//! this one on one core. Run one file's tests with
//! `cargo test --release --test integration kernel_attention::`.
//!
//! `tests/sim.rs` stays an executable of its own: it sets the simulator's process-wide barrier
//! timeout to 150 ms while it checks that a stuck thread is named, which would fail any other
//! test's kernel that waits longer at a barrier meanwhile, and it runs itself as a child process.

mod common;

mod cli;
mod cuda_backend;
mod deploy;
mod device_memory;
mod engine_sim;
mod eval_batch;
mod eval_cli;
mod eval_golden;
mod golden;
mod gradient;
mod graphs;
mod io;
mod kernel_attention;
mod kernel_class_logits;
mod kernel_convert;
mod kernel_drift;
mod kernel_loss;
mod kernel_resize;
mod kernel_rowwise;
mod kernel_save;
mod kernel_update;
mod model_loading;
mod oom_halving;
mod pictures_cli;
mod pipeline;
mod properties;
mod resize;
mod resume;
mod robustness;
mod saving;
mod schedules;
mod shard_env;
mod staging;
mod staging_cuda;
mod timeline;
