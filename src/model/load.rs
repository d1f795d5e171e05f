//! Checkpoint loading (to be implemented).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{0}")]
    Other(String),
}
pub fn load_model(spec: &str) -> Result<super::Model, ModelError> {
    Err(ModelError::Other(format!(
        "loading {spec} is not implemented yet"
    )))
}
