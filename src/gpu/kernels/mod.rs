//! Typed launchers, one module per kernel file in `kernels/`. Each launcher owns its grid,
//! block and shared-memory sizing, asserts shapes, and checks the launch.

pub mod activation;
pub mod attention;
pub mod class_logits;
pub mod convert;
pub mod drift;
pub mod embed;
pub mod layernorm;
pub mod layernorm_loss;
pub mod loss;
pub mod resize;
pub mod save;
pub mod update;
