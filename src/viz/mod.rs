//! Pictures people look at: the per-image grids of `prm eval --pictures` (clean, adversarial,
//! amplified perturbation, clean and adversarial segmentation, with a class legend) and the loss
//! curve of `prm attack --plot`.
//!
//! Text is drawn with a font bundled in the binary (DejaVu Sans, `assets/fonts/`) through
//! plotters' `ab_glyph` backend, so nothing depends on system fonts or fontconfig. Every file is
//! written atomically (a temporary file renamed into place).

pub mod font;
pub mod palette;
pub mod pictures;
pub mod plot;

/// A picture or plot that could not be drawn or written.
#[derive(Debug, thiserror::Error)]
pub enum VizError {
    #[error(transparent)]
    Io(#[from] crate::io::IoError),
    #[error("cannot draw {what}: {message}")]
    Draw { what: String, message: String },
}

impl VizError {
    pub(crate) fn draw(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Self {
        VizError::Draw {
            what: what.to_string(),
            message: e.to_string(),
        }
    }
}
