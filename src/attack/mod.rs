//! Losses, optimisers, presets and the attack loop.

pub mod engine;
pub mod image;
pub mod loss;
pub mod optim;
mod pipeline;
pub mod profile;
pub mod settings;

pub use engine::{Engine, EngineError, LossAndGradient};
pub use image::{check_image_size, Attack, AttackOutcome, Evaluation, Planar, SavedOutcome};
pub use loss::Objective;
pub use settings::{
    AttackSettings, Init, LayerSelection, LossKind, OptimizerKind, Preset, Resolution,
    TokenSelection,
};
pub mod campaign;
