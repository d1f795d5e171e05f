//! Built-in architectures (to be implemented).
pub fn builtin_architectures() -> &'static [&'static str] {
    &[]
}
pub fn random_model(arch: &str, _seed: u64) -> Result<super::Model, super::ModelError> {
    Err(super::ModelError::Other(format!(
        "random:{arch} not implemented yet"
    )))
}
