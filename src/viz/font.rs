//! The bundled font (DejaVu Sans, licence in `assets/fonts/LICENSE-DejaVu.txt`), registered
//! once with plotters under [`FAMILY`], and text measurement with it.

use std::sync::Once;

use plotters::style::{FontStyle, IntoFont, TextStyle};

/// The family name every picture and plot uses.
pub const FAMILY: &str = "prm-sans";

static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Registers the bundled font with plotters (idempotent; cheap after the first call).
pub fn ensure_registered() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FAMILY, FontStyle::Normal, DEJAVU_SANS).is_err() {
            // The bytes are compiled in and parse: this is a build defect, not a user error.
            panic!("the bundled font does not parse");
        }
    });
}

/// A text style of the bundled font at `size` pixels.
pub fn style(size: u32) -> TextStyle<'static> {
    ensure_registered();
    (FAMILY, size as f64).into_font().into()
}

/// Width and height in pixels of `text` at `size`.
pub fn text_size(text: &str, size: u32) -> (u32, u32) {
    ensure_registered();
    (FAMILY, size as f64)
        .into_font()
        .box_size(text)
        .unwrap_or((0, 0))
}
