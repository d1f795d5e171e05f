//! `prm`: Patch Representation Misalignment (PRM) transfer attacks on CLIP vision encoders.
//!
//! The crate is organised the way the attack is:
//! - [`model`]: CLIP vision-tower configurations, checkpoint loading (HF and OpenAI/open_clip
//!   safetensors) and built-in architectures with seeded random weights;
//! - [`reference`](mod@reference): the pure-Rust reference engine (forward, input-gradient backward, bicubic
//!   resize), which is the oracle for every other engine and the `--device cpu` path;
//! - [`attack`]: losses, optimisers, presets and the per-image attack loop;
//! - [`eval`]: downstream targets (MaskCLIP family, zero-shot, probes, feature drift), class
//!   embeddings from the CLIP text tower, and transfer metrics;
//! - [`io`]: images, manifests, input listing and output writing;
//! - [`rng`]: the counter-based random numbers that make every run reproducible per image;
//! - [`viz`]: per-image picture grids of an evaluation and the loss plot of an attack.

pub mod attack;
pub mod bench;
pub mod eval;
pub mod gpu;
pub mod io;
pub mod model;
pub mod reference;
pub mod rng;
pub mod viz;

/// The text of a caught panic's payload (`catch_unwind`'s `Err`): its message when it has one.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}
