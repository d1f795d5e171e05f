//! Writing adversarial images: 8-bit quantisation that stays inside the ε-ball, and atomic
//! writers for PNG and float safetensors outputs.
//!
//! Rounding an adversarial image to 8 bits can push a pixel just outside ‖x_adv − x‖∞ ≤ ε (e.g.
//! clean 0.5 + ε 8/255 rounds up past the ball when the clean value is not on the 8-bit grid). So
//! [`quantize_within_eps`] rounds, then re-projects every value onto the 8-bit levels that lie
//! inside the ball, which makes the *saved* file satisfy the constraint that `prm verify` checks.
//!
//! Writers go through a temporary file in the destination directory, flushed and synced, then
//! renamed over the destination: a crash or a full disk never leaves a half-written output
//! under its final name.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use super::{IoError, RgbImage};

/// Slack, in 1/255 units, allowed when computing the admissible 8-bit interval. It absorbs the
/// f32 representation error of `clean` and `eps` (at most ~1.6e-5 in these units) so that clean
/// = k/255, ε = 8/255 gives exactly [k−8, k+8], while keeping the saved image within
/// ε + 1e-6 (in [0, 1] units) and within the 1e-4 (1/255 units) tolerance of `prm verify`.
const BOUND_SLACK_255: f64 = 5e-5;

/// Quantises `adv` to 8-bit levels that lie within `eps` of `clean` (both in [0, 1]).
///
/// Element-wise: the output has the *same layout* as the inputs (planar `[3, H, W]` for
/// [`RgbImage::data`]); use [`planar_to_interleaved`] before [`write_png_atomic`].
///
/// Each value is rounded to the nearest level `q = round(adv·255)`, then clamped into
/// `[ceil((clean−eps)·255), floor((clean+eps)·255)] ∩ [0, 255]` (computed in f64 with a tiny
/// slack). If that interval is empty (only possible for a negative `eps` or a clean value off the
/// 8-bit grid with `eps` < 1/510) the level nearest `clean` is used. A non-finite `adv` value is
/// treated as `clean`. The result always satisfies `|q/255 − clean| ≤ eps + 1e-6` whenever the
/// interval is non-empty, and equals plain rounding when the rounded value is already inside.
///
/// # Panics
/// If `adv` and `clean` differ in length.
pub fn quantize_within_eps(adv: &[f32], clean: &[f32], eps: f32) -> Vec<u8> {
    assert_eq!(adv.len(), clean.len(), "adv and clean differ in length");
    let eps255 = eps as f64 * 255.0;
    adv.iter()
        .zip(clean)
        .map(|(&a, &c)| quantize_one(a, c, eps255))
        .collect()
}

/// `c·255` in f64, snapped to the nearest integer when within 1e-4 of it. An 8-bit value k/255
/// stored as f32 comes back as k ± 1.6e-5 otherwise; the snap is far below the spacing of
/// 16-bit levels (255/65535 ≈ 0.0039), so it never moves a genuinely off-grid value.
#[inline(always)]
pub(crate) fn clean_255(c: f32) -> f64 {
    let c255 = c as f64 * 255.0;
    let r = c255.round();
    if (c255 - r).abs() < 1e-4 {
        r
    } else {
        c255
    }
}

/// An adversarial image as it will be saved: [`quantize_within_eps`]'s levels, the same levels
/// as floats in [0, 1] (`level / 255`, what the evaluation of the saved image reads), and their
/// L∞ distance to the clean image in 1/255 units ([`linf_255`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SavedImage {
    pub levels: Vec<u8>,
    pub values: Vec<f32>,
    pub linf_255: f64,
}

/// [`quantize_within_eps`], the levels as floats and [`linf_255`] in one pass over the image
/// (each clean value converted once): the same results as the three separate calls.
///
/// # Panics
/// If `adv` and `clean` differ in length.
pub fn quantize_for_saving(adv: &[f32], clean: &[f32], eps: f32) -> SavedImage {
    assert_eq!(adv.len(), clean.len(), "adv and clean differ in length");
    // Without SSE4.1 (the x86-64 baseline) every f64 round / ceil / floor is a libm call, about
    // five per value: most of the time here. With it they are single instructions; both give
    // the same bits (the operations are exact).
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.1") {
        // SAFETY: the CPU has SSE4.1, checked just above.
        return unsafe { quantize_for_saving_sse41(adv, clean, eps) };
    }
    quantize_for_saving_portable(adv, clean, eps)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.1")]
unsafe fn quantize_for_saving_sse41(adv: &[f32], clean: &[f32], eps: f32) -> SavedImage {
    quantize_for_saving_portable(adv, clean, eps)
}

/// [`quantize_for_saving`]'s loop, inlined into each target-feature variant.
#[inline(always)]
fn quantize_for_saving_portable(adv: &[f32], clean: &[f32], eps: f32) -> SavedImage {
    let eps255 = eps as f64 * 255.0;
    let mut levels = Vec::with_capacity(adv.len());
    let mut values = Vec::with_capacity(adv.len());
    let mut linf = 0.0f64;
    for (&a, &c) in adv.iter().zip(clean) {
        let c255 = clean_255(c);
        let q = quantize_level(a, c255, eps255);
        levels.push(q);
        values.push(q as f32 / 255.0);
        linf = linf.max((q as f64 - c255).abs());
    }
    SavedImage {
        levels,
        values,
        linf_255: linf,
    }
}

fn quantize_one(a: f32, c: f32, eps255: f64) -> u8 {
    quantize_level(a, clean_255(c), eps255)
}

/// [`quantize_one`] given the clean value already in 1/255 units ([`clean_255`]).
#[inline(always)]
fn quantize_level(a: f32, c255: f64, eps255: f64) -> u8 {
    let nearest_clean = c255.round().clamp(0.0, 255.0);
    let lo = (c255 - eps255 - BOUND_SLACK_255).ceil().max(0.0);
    let hi = (c255 + eps255 + BOUND_SLACK_255).floor().min(255.0);
    let a255 = if a.is_finite() {
        a as f64 * 255.0
    } else {
        c255
    };
    let q = a255.round().clamp(0.0, 255.0);
    let q = if lo <= hi {
        q.clamp(lo, hi)
    } else if c255.is_finite() {
        nearest_clean
    } else {
        q
    };
    q as u8
}

/// The L∞ distance between saved 8-bit values and a clean image in [0, 1], in 1/255 units:
/// `max |q − clean·255|`, computed in f64, with `clean·255` snapped to the 8-bit level when it is
/// within 1e-4 of one (so 8-bit inputs give exact integers). Same layout for both slices
/// (element-wise).
///
/// # Panics
/// If the slices differ in length.
pub fn linf_255(saved: &[u8], clean: &[f32]) -> f64 {
    assert_eq!(saved.len(), clean.len(), "saved and clean differ in length");
    saved
        .iter()
        .zip(clean)
        .map(|(&q, &c)| (q as f64 - clean_255(c)).abs())
        .fold(0.0, f64::max)
}

/// Planar `[3, H, W]` → interleaved `[H, W, 3]`.
///
/// # Panics
/// If `planar.len() != 3 * width * height`.
pub fn planar_to_interleaved<T: Copy + Default>(
    planar: &[T],
    width: usize,
    height: usize,
) -> Vec<T> {
    let n = width * height;
    assert_eq!(planar.len(), 3 * n, "buffer size mismatch");
    let mut out = vec![T::default(); 3 * n];
    for c in 0..3 {
        for (i, &v) in planar[c * n..(c + 1) * n].iter().enumerate() {
            out[3 * i + c] = v;
        }
    }
    out
}

/// Interleaved `[H, W, 3]` → planar `[3, H, W]`.
///
/// # Panics
/// If `interleaved.len() != 3 * width * height`.
pub fn interleaved_to_planar<T: Copy + Default>(
    interleaved: &[T],
    width: usize,
    height: usize,
) -> Vec<T> {
    let n = width * height;
    assert_eq!(interleaved.len(), 3 * n, "buffer size mismatch");
    let mut out = vec![T::default(); 3 * n];
    for (i, px) in interleaved.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * n + i] = px[c];
        }
    }
    out
}

/// Writes an 8-bit RGB PNG atomically. `rgb_interleaved` is `[H, W, 3]`. Parent directories are
/// created; the data goes to a temporary file in the same directory which is flushed, synced and
/// renamed over `path`.
pub fn write_png_atomic(
    path: &Path,
    width: usize,
    height: usize,
    rgb_interleaved: &[u8],
) -> Result<(), IoError> {
    if rgb_interleaved.len() != 3 * width * height || width == 0 || height == 0 {
        return Err(IoError::Encode {
            path: path.to_path_buf(),
            message: format!(
                "expected a non-empty {width}x{height}x3 buffer, got {} bytes",
                rgb_interleaved.len()
            ),
        });
    }
    let (w, h) = match (u32::try_from(width), u32::try_from(height)) {
        (Ok(w), Ok(h)) => (w, h),
        _ => {
            return Err(IoError::Encode {
                path: path.to_path_buf(),
                message: format!("{width}x{height} is too large for PNG"),
            })
        }
    };
    write_atomic(path, |file| {
        let mut bw = std::io::BufWriter::new(file);
        // The fast level, spelled out rather than left to the crate's default: on a perturbed
        // photo it is 19x faster than the balanced level for 15% more bytes (benches/saving.rs,
        // docs/PERFORMANCE.md), and the writer must keep up with the GPU.
        let encoder = image::codecs::png::PngEncoder::new_with_quality(
            &mut bw,
            image::codecs::png::CompressionType::Fast,
            image::codecs::png::FilterType::Adaptive,
        );
        image::ImageEncoder::write_image(
            encoder,
            rgb_interleaved,
            w,
            h,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| match e {
            image::ImageError::IoError(source) => IoError::Write {
                path: path.to_path_buf(),
                source,
            },
            other => IoError::Encode {
                path: path.to_path_buf(),
                message: other.to_string(),
            },
        })?;
        bw.flush().map_err(|source| IoError::Write {
            path: path.to_path_buf(),
            source,
        })
    })
}

/// Writes the unquantised image as safetensors, atomically: one tensor `image`, F32, shape
/// `[3, H, W]`, values in [0, 1], with metadata `width`, `height` and `layout = "planar_chw"`.
pub fn write_float_safetensors_atomic(path: &Path, image: &RgbImage) -> Result<(), IoError> {
    let encode_err = |message: String| IoError::Encode {
        path: path.to_path_buf(),
        message,
    };
    if image.data.len() != 3 * image.width * image.height {
        return Err(encode_err(format!(
            "image data has {} values, expected 3x{}x{}",
            image.data.len(),
            image.height,
            image.width
        )));
    }
    let bytes: &[u8] = bytemuck::cast_slice(&image.data);
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![3, image.height, image.width],
        bytes,
    )
    .map_err(|e| encode_err(e.to_string()))?;
    let mut meta = HashMap::new();
    meta.insert("width".to_string(), image.width.to_string());
    meta.insert("height".to_string(), image.height.to_string());
    meta.insert("layout".to_string(), "planar_chw".to_string());
    let mut buf = safetensors::serialize([("image", view)], Some(meta))
        .map_err(|e| encode_err(e.to_string()))?;
    sort_safetensors_header(&mut buf).map_err(encode_err)?;
    write_atomic(path, |file| {
        file.write_all(&buf).map_err(|source| IoError::Write {
            path: path.to_path_buf(),
            source,
        })
    })
}

/// Rewrites a serialized safetensors file's JSON header with its keys sorted, in place.
///
/// `safetensors::serialize` takes the metadata as a `HashMap`, whose iteration order changes
/// from process to process, so two identical runs would write different bytes. The sorted
/// header (serde_json's maps are ordered) has the same entries and the same length, so the
/// 8-byte length prefix and the data offsets stay valid.
pub(crate) fn sort_safetensors_header(buf: &mut [u8]) -> Result<(), String> {
    let len_bytes: [u8; 8] = buf
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or("safetensors output shorter than its header length")?;
    let len = u64::from_le_bytes(len_bytes) as usize;
    let header = buf
        .get(8..8 + len)
        .ok_or("safetensors header length past the end of the output")?;
    let value: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("safetensors header: {e}"))?;
    let sorted = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    if sorted.len() > len {
        return Err("sorted safetensors header is longer than the original".into());
    }
    // safetensors pads the header with spaces to its alignment; keep the length.
    buf[8..8 + sorted.len()].copy_from_slice(&sorted);
    buf[8 + sorted.len()..8 + len].fill(b' ');
    Ok(())
}

/// Creates `path`'s parent, runs `fill` on a temporary file beside it, syncs and renames it over
/// `path`. On any error the temporary file is removed (by `NamedTempFile`'s drop).
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> Result<(), IoError>,
) -> Result<(), IoError> {
    let werr = |source: std::io::Error| IoError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|source| IoError::Write {
        path: dir.clone(),
        source,
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // Temporary files default to 0600; outputs should get ordinary permissions (0666 & !umask).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder.tempfile_in(&dir).map_err(werr)?;
    fill(tmp.as_file_mut())?;
    tmp.as_file_mut().flush().map_err(werr)?;
    tmp.as_file().sync_all().map_err(werr)?;
    tmp.persist(path).map_err(|e| werr(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_saving_is_the_three_separate_calls() {
        // Values on and off the 8-bit grid, out of range, non-finite, and ε of 8/255, 1/255,
        // 0 and negative (the empty-interval fallback).
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let n = 4096;
        let clean: Vec<f32> = (0..n)
            .map(|i| match i % 3 {
                0 => (next() * 255.0).round() as f32 / 255.0,
                1 => next() as f32,
                _ => (next() * 1.2 - 0.1) as f32,
            })
            .collect();
        let mut adv: Vec<f32> = clean
            .iter()
            .map(|&c| c + ((next() - 0.5) * 0.2) as f32)
            .collect();
        adv[7] = f32::NAN;
        adv[8] = f32::INFINITY;
        adv[9] = -3.0;
        for eps in [8.0 / 255.0, 1.0 / 255.0, 0.0, -0.01] {
            let got = quantize_for_saving(&adv, &clean, eps);
            let levels = quantize_within_eps(&adv, &clean, eps);
            assert_eq!(got.levels, levels, "eps {eps}");
            let values: Vec<u32> = levels
                .iter()
                .map(|&q| (q as f32 / 255.0).to_bits())
                .collect();
            let got_values: Vec<u32> = got.values.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got_values, values, "eps {eps}");
            assert_eq!(
                got.linf_255.to_bits(),
                linf_255(&levels, &clean).to_bits(),
                "eps {eps}"
            );
        }
    }

    #[test]
    fn float_images_are_written_byte_identically_with_a_sorted_header() {
        let dir = tempfile::tempdir().unwrap();
        let image = RgbImage {
            width: 5,
            height: 3,
            data: (0..45).map(|i| i as f32 / 45.0).collect(),
        };
        // Each HashMap gets its own random order, so a handful of writes would differ.
        let files: Vec<Vec<u8>> = (0..8)
            .map(|i| {
                let path = dir.path().join(format!("{i}.safetensors"));
                write_float_safetensors_atomic(&path, &image).unwrap();
                std::fs::read(&path).unwrap()
            })
            .collect();
        assert!(files.iter().all(|f| f == &files[0]));
        let len = u64::from_le_bytes(files[0][..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&files[0][8..8 + len]).unwrap();
        let meta = header.find("__metadata__").unwrap();
        let (h, l, w) = (
            header.find("\"height\"").unwrap(),
            header.find("\"layout\"").unwrap(),
            header.find("\"width\"").unwrap(),
        );
        assert!(h > meta && h < l && l < w, "{header}");
        let loaded = safetensors::SafeTensors::deserialize(&files[0]).unwrap();
        let tensor = loaded.tensor("image").unwrap();
        assert_eq!(tensor.shape(), &[3, 3, 5]);
        assert_eq!(tensor.data(), bytemuck::cast_slice::<f32, u8>(&image.data));
    }
}
