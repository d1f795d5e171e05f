//! Losses, optimisers, presets and the attack loop.

pub mod image;
pub mod loss;
pub mod optim;
pub mod settings;

pub use image::{AttackOutcome, Evaluation, ImageAttack, Planar};
pub use loss::Objective;
pub use settings::{
    AttackSettings, Init, LayerSelection, LossKind, OptimizerKind, Preset, Resolution,
    TokenSelection,
};
pub mod campaign;
