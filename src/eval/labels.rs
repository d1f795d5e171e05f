//! Label maps: ground-truth PNGs in (`--labels DIR`), prediction PNGs out
//! (`--save-predictions DIR`), and classification labels (`--labels FILE` for zeroshot).
//!
//! A label PNG holds one class index per pixel: 8-bit or 16-bit grayscale, or a palette image
//! whose *indices* are the classes (PASCAL VOC style; the palette colours are ignored, which is
//! why this reads PNGs with the `png` crate instead of decoding to RGB).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use super::EvalError;

/// Reads a class-index PNG: `(width, height, labels)`.
pub fn read_label_png(path: &Path) -> Result<(usize, usize, Vec<u32>), EvalError> {
    let bad = |reason: String| EvalError::Labels {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder
        .read_info()
        .map_err(|e| bad(format!("not a readable PNG: {e}")))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| bad("PNG too large".into()))?;
    if size > 1 << 30 {
        return Err(bad("PNG too large".into()));
    }
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| bad(format!("corrupt PNG: {e}")))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let bits = info.bit_depth as usize;
    let stride = info.line_size;
    use png::ColorType::*;
    if !matches!(info.color_type, Grayscale | Indexed) {
        return Err(bad(format!(
            "colour type {:?}: a label map must be a grayscale or palette PNG holding one class \
             index per pixel",
            info.color_type
        )));
    }
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        let row = &buf[y * stride..(y + 1) * stride];
        for x in 0..w {
            let v = match bits {
                16 => u16::from_be_bytes([row[2 * x], row[2 * x + 1]]) as u32,
                8 => row[x] as u32,
                b @ (1 | 2 | 4) => {
                    let per = 8 / b;
                    let byte = row[x / per];
                    let shift = 8 - b * (x % per + 1);
                    ((byte >> shift) & ((1u8 << b) - 1)) as u32
                }
                _ => return Err(bad(format!("unsupported bit depth {bits}"))),
            };
            out.push(v);
        }
    }
    Ok((w, h, out))
}

/// Writes an 8-bit grayscale label map atomically (classes must be < 256).
pub fn write_label_png(
    path: &Path,
    width: usize,
    height: usize,
    labels: &[u16],
) -> Result<(), EvalError> {
    let bytes: Vec<u8> = labels
        .iter()
        .map(|&v| u8::try_from(v).unwrap_or(u8::MAX))
        .collect();
    crate::io::output::write_atomic(path, |file| {
        let werr = |e: String| crate::io::IoError::Encode {
            path: path.to_path_buf(),
            message: e,
        };
        let mut bw = std::io::BufWriter::new(file);
        {
            let mut enc = png::Encoder::new(&mut bw, width as u32, height as u32);
            enc.set_color(png::ColorType::Grayscale);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().map_err(|e| werr(e.to_string()))?;
            w.write_image_data(&bytes)
                .map_err(|e| werr(e.to_string()))?;
        }
        bw.flush().map_err(|source| crate::io::IoError::Write {
            path: path.to_path_buf(),
            source,
        })
    })?;
    Ok(())
}

/// Writes any bytes atomically (reports).
pub fn write_text_atomic(path: &Path, text: &str) -> Result<(), EvalError> {
    crate::io::output::write_atomic(path, |file| {
        file.write_all(text.as_bytes())
            .map_err(|source| crate::io::IoError::Write {
                path: path.to_path_buf(),
                source,
            })
    })?;
    Ok(())
}

/// Classification labels: lines `<relative path><TAB, comma or spaces><class>`, the class a
/// name from the class list or an index. Blank lines and `#` comments are skipped.
pub fn read_class_labels(
    path: &Path,
    names: &[String],
) -> Result<HashMap<String, usize>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::Labels {
        path: path.to_path_buf(),
        reason: format!("cannot read as text: {e}"),
    })?;
    let mut map = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: String| EvalError::Labels {
            path: path.to_path_buf(),
            reason: format!("line {}: {reason}", i + 1),
        };
        let (rel, class) = line
            .split_once(['\t', ','])
            .or_else(|| line.split_once(' '))
            .ok_or_else(|| bad("expected `<relative path> <class>`".into()))?;
        let class = class.trim();
        let idx = match names.iter().position(|n| n == class) {
            Some(k) => k,
            None => match class.parse::<usize>() {
                Ok(k) if k < names.len() => k,
                _ => {
                    return Err(bad(format!(
                        "`{class}` is neither a class name nor an index below {}",
                        names.len()
                    )))
                }
            },
        };
        map.insert(rel.trim().replace('\\', "/"), idx);
    }
    Ok(map)
}
