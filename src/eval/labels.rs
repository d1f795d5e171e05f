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
    let file = std::fs::File::open(path).map_err(|e| EvalError::Labels {
        path: path.to_path_buf(),
        reason: format!("cannot open: {e}"),
    })?;
    decode_label_png(std::io::BufReader::new(file), path)
}

/// [`read_label_png`] of a PNG in memory; `name` is the path errors give.
pub fn read_label_png_bytes(
    bytes: &[u8],
    name: &Path,
) -> Result<(usize, usize, Vec<u32>), EvalError> {
    decode_label_png(std::io::Cursor::new(bytes), name)
}

fn decode_label_png<R: std::io::BufRead + std::io::Seek>(
    input: R,
    path: &Path,
) -> Result<(usize, usize, Vec<u32>), EvalError> {
    let bad = |reason: String| EvalError::Labels {
        path: path.to_path_buf(),
        reason,
    };
    let mut decoder = png::Decoder::new(input);
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

/// Writes text atomically (reports).
pub fn write_text_atomic(path: &Path, text: &str) -> Result<(), EvalError> {
    write_bytes_atomic(path, text.as_bytes())
}

/// Writes any bytes atomically.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<(), EvalError> {
    crate::io::output::write_atomic(path, |file| {
        file.write_all(bytes)
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
        let idx = class_index(class, names).map_err(bad)?;
        map.insert(rel.trim().replace('\\', "/"), idx);
    }
    Ok(map)
}

/// A class given as a name from the class list or as an index into it (surrounding white space
/// ignored).
pub fn class_index(class: &str, names: &[String]) -> Result<usize, String> {
    let class = class.trim();
    if let Some(k) = names.iter().position(|n| n == class) {
        return Ok(k);
    }
    match class.parse::<usize>() {
        Ok(k) if k < names.len() => Ok(k),
        _ => Err(format!(
            "`{class}` is neither a class name nor an index below {}",
            names.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `width`×`height` PNG of `values` at `depth` bits: palette indices, or grayscale.
    fn encode(
        width: u32,
        height: u32,
        depth: png::BitDepth,
        palette: bool,
        values: &[u32],
    ) -> Vec<u8> {
        let bits = depth as usize;
        let stride = (width as usize * bits).div_ceil(8);
        let mut data = vec![0u8; stride * height as usize];
        for (i, &v) in values.iter().enumerate() {
            let (y, x) = (i / width as usize, i % width as usize);
            let row = &mut data[y * stride..(y + 1) * stride];
            match bits {
                16 => row[2 * x..2 * x + 2].copy_from_slice(&(v as u16).to_be_bytes()),
                8 => row[x] = v as u8,
                b => row[x * b / 8] |= (v as u8) << (8 - b * (x % (8 / b) + 1)),
            }
        }
        let mut bytes = Vec::new();
        let mut enc = png::Encoder::new(&mut bytes, width, height);
        enc.set_depth(depth);
        if palette {
            enc.set_color(png::ColorType::Indexed);
            enc.set_palette(
                (0..3 * (1usize << bits.min(8)))
                    .map(|i| i as u8)
                    .collect::<Vec<_>>(),
            );
        } else {
            enc.set_color(png::ColorType::Grayscale);
        }
        enc.write_header().unwrap().write_image_data(&data).unwrap();
        bytes
    }

    /// Every bit depth a label map comes in gives back its class indices, on widths that do not
    /// fill a row's last byte; colour images are refused.
    #[test]
    fn palette_and_grayscale_label_maps_at_every_depth() {
        use png::BitDepth::*;
        for (depth, palette) in [
            (One, true),
            (Two, true),
            (Four, true),
            (Eight, true),
            (Eight, false),
            (Sixteen, false),
        ] {
            let (w, h) = (7u32, 3u32);
            let top = if depth == Sixteen {
                65_535
            } else {
                (1u32 << depth as u32) - 1
            };
            let values: Vec<u32> = (0..w * h).map(|i| (i * 37 + 5) % (top + 1)).collect();
            let bytes = encode(w, h, depth, palette, &values);
            let (rw, rh, got) = read_label_png_bytes(&bytes, Path::new("l.png")).unwrap();
            assert_eq!((rw, rh), (w as usize, h as usize));
            assert_eq!(got, values, "{depth:?} palette {palette}");
        }
        let mut rgb = Vec::new();
        let mut enc = png::Encoder::new(&mut rgb, 1, 1);
        enc.set_color(png::ColorType::Rgb);
        enc.write_header()
            .unwrap()
            .write_image_data(&[1, 2, 3])
            .unwrap();
        let err = read_label_png_bytes(&rgb, Path::new("rgb.png")).unwrap_err();
        assert!(err.to_string().contains("rgb.png"), "{err}");
    }
}
