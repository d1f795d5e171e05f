//! `<output>/run.json`: what a run records of itself, so that a resume with other settings is
//! refused and `prm eval` can say which attack made the images.

use prm::attack::{AttackSettings, Init, OptimizerKind, Resolution};
use prm::gpu::engine::Precision;

use super::value_name;

/// What `<output>/run.json` says of this run ([`prm::io::run_record`]): the model (a path made
/// absolute, and the fingerprint of its weights), the products' precision, and the settings the
/// optimiser reads.
pub(super) fn run_record(
    model: &str,
    weights: &str,
    precision: Precision,
    settings: &AttackSettings,
    layers: &[usize],
) -> serde_json::Value {
    let absolute = |p: &std::path::Path| {
        std::fs::canonicalize(p)
            .map_or_else(|_| p.display().to_string(), |c| c.display().to_string())
    };
    // A hub id is recorded as the cache snapshot it loaded.
    let model = if model.starts_with("random:") {
        model.to_string()
    } else {
        prm::model::locate(model).map_or_else(|_| model.to_string(), |p| absolute(&p))
    };
    let mut s = serde_json::json!({
        "loss": value_name(settings.loss),
        "layers": layers,
        "tokens": value_name(settings.tokens),
        "optimizer": value_name(settings.optimizer),
        "steps": settings.steps,
        "eps": settings.eps,
        "init": match &settings.init {
            Init::Zero => "zero".to_string(),
            Init::Random => "random".to_string(),
            Init::From(dir) => format!("from:{}", absolute(dir)),
        },
        "seed": settings.seed,
        "resolution": match settings.resolution {
            Resolution::Native => serde_json::json!("native"),
            Resolution::Fixed(n) => serde_json::json!(n),
        },
        "dynamic_scale": settings.dynamic_scale.map(|(lo, hi)| [lo, hi]),
    });
    match settings.optimizer {
        OptimizerKind::Adamw => {
            s["lr"] = serde_json::json!(settings.lr);
            s["weight_decay"] = serde_json::json!(settings.weight_decay);
        }
        OptimizerKind::Pgd => s["step_size"] = serde_json::json!(settings.step_size),
        OptimizerKind::Mifgsm => {
            s["step_size"] = serde_json::json!(settings.step_size);
            s["momentum"] = serde_json::json!(settings.momentum);
        }
    }
    serde_json::json!({
        "prm_version": env!("CARGO_PKG_VERSION"),
        "model": model,
        "weights": weights,
        "precision": match precision {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        },
        "settings": s,
    })
}
