//! Per-image picture grids: a header line, a row of titled panels of one size (photos, an
//! amplified perturbation, label maps in the fixed [`class_colour`] palette) and a legend of
//! the classes shown, wrapped over as many rows as it needs.
//!
//! Panel scale: images whose longer side is under [`MIN_SIDE`] are enlarged by a whole factor
//! (nearest neighbour, so single pixels of a perturbation stay visible); over [`MAX_SIDE`] they
//! are reduced to it (triangle filter for photos, nearest for label maps); in between they are
//! shown pixel for pixel. Each panel gets a column at least [`MIN_COLUMN`] wide; titles and
//! the header are shortened with "…" to fit, so where the panels go depends only on the image
//! size and the number of panels. [`layout`] says where everything goes, so tests and callers
//! can find a panel's pixels in the written PNG.

use std::path::Path;

use image::imageops::{resize, FilterType};
use image::{ImageBuffer, Rgb};
use plotters::prelude::*;

use super::font;
use super::palette::class_colour;
use super::VizError;

/// Panels whose image's longer side is shorter are enlarged by a whole factor.
pub const MIN_SIDE: usize = 192;
/// Panels whose image's longer side is longer are reduced to this.
pub const MAX_SIDE: usize = 512;
/// The narrowest column a panel gets (room for its title).
pub const MIN_COLUMN: usize = 160;
/// Outer margin, and the gap between panels and before the legend.
pub const MARGIN: usize = 10;
pub const GAP: usize = 10;
const HEADER_SIZE: u32 = 16;
const TITLE_SIZE: u32 = 14;
const LEGEND_SIZE: u32 = 13;
const HEADER_H: usize = 26;
const TITLE_H: usize = 22;
const SWATCH: usize = 14;
const LEGEND_ROW_H: usize = 20;
const WHITE: [u8; 3] = [255, 255, 255];

/// How a panel is resampled when it is reduced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PanelKind {
    /// A photo-like image: triangle filter when reduced.
    Photo,
    /// A label map (already coloured): nearest neighbour always, so no new colours appear.
    Labels,
}

/// One titled image of the grid. `rgb` is interleaved `[height, width, 3]`.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
    pub kind: PanelKind,
}

/// A whole picture: every panel must have the same size.
#[derive(Clone, Debug, Default)]
pub struct Picture {
    /// One line above the panels (empty: none).
    pub header: String,
    pub panels: Vec<Panel>,
    /// Class names with their colours, in order.
    pub legend: Vec<(String, [u8; 3])>,
}

/// Where everything of a [`Picture`] goes, in pixels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub width: usize,
    pub height: usize,
    /// The size every panel's image is drawn at.
    pub panel_width: usize,
    pub panel_height: usize,
    /// Top-left corner of each panel's image.
    pub panels: Vec<(usize, usize)>,
    /// Top-left corner of each legend entry's colour swatch (`SWATCH` pixels square).
    pub legend: Vec<(usize, usize)>,
}

/// The size a `width`×`height` image is drawn at (see the module notes).
pub fn panel_size(width: usize, height: usize) -> (usize, usize) {
    let long = width.max(height).max(1);
    if long < MIN_SIDE {
        let k = MIN_SIDE.div_ceil(long);
        (width * k, height * k)
    } else if long > MAX_SIDE {
        let scale = |v: usize| ((v * MAX_SIDE + long / 2) / long).max(1);
        (scale(width), scale(height))
    } else {
        (width, height)
    }
}

/// The side of a legend swatch, in pixels.
pub const fn swatch_side() -> usize {
    SWATCH
}

/// Lays out `picture`.
///
/// # Panics
/// When the panels differ in size, or there are none.
pub fn layout(picture: &Picture) -> Layout {
    let first = picture.panels.first().expect("a picture has panels");
    assert!(
        picture
            .panels
            .iter()
            .all(|p| (p.width, p.height) == (first.width, first.height)),
        "every panel has the same size"
    );
    let (pw, ph) = panel_size(first.width, first.height);
    let col_w = column_width(pw);
    let n = picture.panels.len();
    let width = 2 * MARGIN + n * col_w + (n - 1) * GAP;
    let top = MARGIN
        + if picture.header.is_empty() {
            0
        } else {
            HEADER_H
        };
    let image_y = top + TITLE_H;
    let panels = (0..n)
        .map(|i| (MARGIN + i * (col_w + GAP) + (col_w - pw) / 2, image_y))
        .collect();
    // Legend entries flow left to right and wrap at the right margin.
    let legend_top = image_y + ph + GAP;
    let (mut x, mut row) = (MARGIN, 0usize);
    let mut legend = Vec::with_capacity(picture.legend.len());
    for (name, _) in &picture.legend {
        let w = SWATCH + 6 + font::text_size(name, LEGEND_SIZE).0 as usize + 14;
        if x > MARGIN && x + w > width - MARGIN {
            x = MARGIN;
            row += 1;
        }
        legend.push((x, legend_top + row * LEGEND_ROW_H));
        x += w;
    }
    let rows = if picture.legend.is_empty() {
        0
    } else {
        row + 1
    };
    let height = if rows == 0 {
        image_y + ph + MARGIN
    } else {
        legend_top + rows * LEGEND_ROW_H + MARGIN - (LEGEND_ROW_H - SWATCH)
    };
    Layout {
        width,
        height,
        panel_width: pw,
        panel_height: ph,
        panels,
        legend,
    }
}

fn column_width(panel_width: usize) -> usize {
    panel_width.max(MIN_COLUMN)
}

/// `text`, shortened with "…" until it is at most `max_w` pixels wide at `size`.
fn fit(text: &str, size: u32, max_w: usize) -> String {
    if font::text_size(text, size).0 as usize <= max_w {
        return text.to_string();
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let t: String = chars.iter().collect::<String>() + "…";
        if font::text_size(&t, size).0 as usize <= max_w {
            return t;
        }
    }
    String::new()
}

/// `panel`'s pixels at `w`×`h`.
fn resample(panel: &Panel, w: usize, h: usize) -> Vec<u8> {
    if (w, h) == (panel.width, panel.height) {
        return panel.rgb.clone();
    }
    let reduce = w < panel.width || h < panel.height;
    if reduce && panel.kind == PanelKind::Photo {
        let src: ImageBuffer<Rgb<u8>, Vec<u8>> =
            ImageBuffer::from_raw(panel.width as u32, panel.height as u32, panel.rgb.clone())
                .expect("panel size matches its pixels");
        return resize(&src, w as u32, h as u32, FilterType::Triangle).into_raw();
    }
    let mut out = vec![0u8; w * h * 3];
    for y in 0..h {
        let sy = y * panel.height / h;
        for x in 0..w {
            let sx = x * panel.width / w;
            let s = 3 * (sy * panel.width + sx);
            out[3 * (y * w + x)..3 * (y * w + x) + 3].copy_from_slice(&panel.rgb[s..s + 3]);
        }
    }
    out
}

fn fill(
    buf: &mut [u8],
    width: usize,
    (x0, y0): (usize, usize),
    (w, h): (usize, usize),
    c: [u8; 3],
) {
    for y in y0..y0 + h {
        for x in x0..x0 + w {
            buf[3 * (y * width + x)..3 * (y * width + x) + 3].copy_from_slice(&c);
        }
    }
}

/// Draws `picture`: returns (width, height, interleaved RGB).
pub fn render(picture: &Picture) -> Result<(usize, usize, Vec<u8>), VizError> {
    for p in &picture.panels {
        assert_eq!(p.rgb.len(), 3 * p.width * p.height, "panel '{}'", p.title);
    }
    let l = layout(picture);
    let mut buf = vec![0u8; 3 * l.width * l.height];
    fill(&mut buf, l.width, (0, 0), (l.width, l.height), WHITE);
    for (panel, &(x0, y0)) in picture.panels.iter().zip(&l.panels) {
        let px = resample(panel, l.panel_width, l.panel_height);
        for y in 0..l.panel_height {
            let row = &px[3 * y * l.panel_width..3 * (y + 1) * l.panel_width];
            let at = 3 * ((y0 + y) * l.width + x0);
            buf[at..at + row.len()].copy_from_slice(row);
        }
    }
    for ((_, colour), &(x, y)) in picture.legend.iter().zip(&l.legend) {
        fill(&mut buf, l.width, (x, y), (SWATCH, SWATCH), [80, 80, 80]);
        fill(
            &mut buf,
            l.width,
            (x + 1, y + 1),
            (SWATCH - 2, SWATCH - 2),
            *colour,
        );
    }
    {
        let backend = BitMapBackend::with_buffer(&mut buf, (l.width as u32, l.height as u32));
        let root = backend.into_drawing_area();
        let err = |e: &dyn std::fmt::Display| VizError::draw("a picture's text", e);
        let text = |s: &str, size: u32, (x, y): (usize, usize)| {
            root.draw_text(s, &font::style(size).color(&BLACK), (x as i32, y as i32))
                .map_err(|e| err(&e))
        };
        if !picture.header.is_empty() {
            let header = fit(&picture.header, HEADER_SIZE, l.width - 2 * MARGIN);
            text(&header, HEADER_SIZE, (MARGIN, MARGIN))?;
        }
        let col_w = column_width(l.panel_width);
        for (panel, &(x, y)) in picture.panels.iter().zip(&l.panels) {
            // Centred over the panel's image, within its column.
            let title = fit(&panel.title, TITLE_SIZE, col_w - 4);
            let tw = font::text_size(&title, TITLE_SIZE).0 as usize;
            let cx = (x + l.panel_width / 2).saturating_sub(tw / 2).max(MARGIN);
            text(&title, TITLE_SIZE, (cx, y - TITLE_H + 3))?;
        }
        for ((name, _), &(x, y)) in picture.legend.iter().zip(&l.legend) {
            text(name, LEGEND_SIZE, (x + SWATCH + 6, y))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok((l.width, l.height, buf))
}

/// Draws `picture` and writes it as a PNG, atomically.
pub fn write_picture(path: &Path, picture: &Picture) -> Result<(), VizError> {
    let (w, h, rgb) = render(picture)?;
    crate::io::write_png_atomic(path, w, h, &rgb)?;
    Ok(())
}

fn to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// A planar `[3, h, w]` image in [0, 1] as interleaved 8-bit RGB.
pub fn planar_rgb8(planar: &[f32], width: usize, height: usize) -> Vec<u8> {
    let n = width * height;
    let mut out = vec![0u8; 3 * n];
    for i in 0..n {
        for c in 0..3 {
            out[3 * i + c] = to_u8(planar[c * n + i]);
        }
    }
    out
}

/// The perturbation `adv − clean` (planar, [0, 1]) stretched so that its largest magnitude
/// spans the whole range: grey is no change. Returns the pixels and the amplification factor
/// (1 when the images are equal).
pub fn perturbation_rgb8(
    clean: &[f32],
    adv: &[f32],
    width: usize,
    height: usize,
) -> (Vec<u8>, f32) {
    let linf = clean
        .iter()
        .zip(adv)
        .map(|(c, a)| (a - c).abs())
        .fold(0.0f32, f32::max);
    let amp = if linf > 0.0 { 0.5 / linf } else { 1.0 };
    let stretched: Vec<f32> = clean
        .iter()
        .zip(adv)
        .map(|(c, a)| 0.5 + (a - c) * amp)
        .collect();
    (planar_rgb8(&stretched, width, height), amp)
}

/// A label map in the fixed class palette, interleaved RGB.
pub fn labels_rgb8(labels: &[u16]) -> Vec<u8> {
    labels
        .iter()
        .flat_map(|&c| class_colour(c as usize))
        .collect()
}

/// The legend of the classes present in any of `maps`, in class order, named by `names`
/// (an index without a name is shown as `#index`).
pub fn legend_of(maps: &[&[u16]], names: &[String]) -> Vec<(String, [u8; 3])> {
    let mut present = std::collections::BTreeSet::new();
    for m in maps {
        present.extend(m.iter().copied());
    }
    present
        .into_iter()
        .map(|c| {
            let name = names
                .get(c as usize)
                .cloned()
                .unwrap_or_else(|| format!("#{c}"));
            (name, class_colour(c as usize))
        })
        .collect()
}

/// The title of an amplified-perturbation panel.
pub fn perturbation_title(amp: f32) -> String {
    if amp >= 10.0 {
        format!("perturbation ×{amp:.0}")
    } else {
        format!("perturbation ×{amp:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_shortened_to_fit() {
        let long = "adversarial: a very long class name that cannot fit in one column";
        let t = fit(long, TITLE_SIZE, 156);
        assert!(t.ends_with('…') && t.len() < long.len());
        assert!(font::text_size(&t, TITLE_SIZE).0 <= 156);
        assert_eq!(fit("clean", TITLE_SIZE, 156), "clean");
    }

    #[test]
    fn panel_sizes() {
        assert_eq!(panel_size(40, 30), (200, 150));
        assert_eq!(panel_size(192, 100), (192, 100));
        assert_eq!(panel_size(512, 300), (512, 300));
        assert_eq!(panel_size(1024, 600), (512, 300));
        assert_eq!(panel_size(1, 2000), (1, 512));
    }

    #[test]
    fn perturbation_is_grey_at_zero_and_full_range_at_linf() {
        let clean = vec![0.5f32; 3 * 2];
        let mut adv = clean.clone();
        adv[0] += 8.0 / 255.0;
        adv[1] -= 4.0 / 255.0;
        let (px, amp) = perturbation_rgb8(&clean, &adv, 2, 1);
        assert!((amp - 0.5 * 255.0 / 8.0).abs() < 1e-3);
        assert_eq!(px[0], 255); // +linf, red of pixel 0
        assert_eq!(px[3], 64); // −linf/2, red of pixel 1
        assert_eq!(px[1], 128); // no change
    }
}
