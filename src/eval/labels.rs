//! Label maps: ground-truth PNGs in (`--labels DIR`), prediction PNGs out
//! (`--save-predictions DIR`), and classification labels (`--labels FILE` for zeroshot and CLS
//! probes).
//!
//! A label PNG holds one class index per pixel: 8-bit or 16-bit grayscale, or a palette image
//! whose *indices* are the classes (PASCAL VOC style; the palette colours are ignored, which is
//! why this reads PNGs with the `png` crate instead of decoding to RGB).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::EvalError;
use crate::io::InputItem;

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

/// A UTF-8 byte-order mark: some editors (Notepad, Excel's "CSV UTF-8") start text files with
/// it, and `str::trim` keeps it, so the first name or path would silently carry it.
const BOM: char = '\u{feff}';

/// `text` without a leading byte-order mark.
pub fn strip_bom(text: &str) -> &str {
    text.strip_prefix(BOM).unwrap_or(text)
}

/// What separates a label line's path from its class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Separator {
    Tab,
    Comma,
    Space,
}

/// One line of a classification `--labels FILE`, as written.
#[derive(Clone, Debug)]
pub struct LabelLine {
    /// 1-based line number.
    pub number: usize,
    /// The image's path relative to `--clean`, `/`-separated.
    pub rel: String,
    /// The class: a name from the class list or an index into it.
    pub class: String,
    separator: Separator,
}

/// The lines of a classification `--labels FILE`: `<relative path><separator><class>`, where
/// the separator is the line's first TAB; else, when it holds none, its first comma; else its
/// first run of spaces. So a path holding spaces or commas needs a TAB, and a class name may
/// hold anything ("tench, Tinca tinca" after a TAB or a comma). A leading `./` and `\`
/// separators are taken as written by other tools; blank lines and `#` comments are skipped; a
/// byte-order mark is ignored.
pub fn read_label_lines(path: &Path) -> Result<Vec<LabelLine>, EvalError> {
    let bad = |reason: String| EvalError::Labels {
        path: path.to_path_buf(),
        reason,
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read as text: {e}")))?;
    let mut lines = Vec::new();
    for (i, line) in strip_bom(&text).lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (rel, class, separator) = if let Some((r, c)) = line.split_once('\t') {
            (r, c, Separator::Tab)
        } else if let Some((r, c)) = line.split_once(',') {
            (r, c, Separator::Comma)
        } else if let Some((r, c)) = line.split_once(char::is_whitespace) {
            (r, c, Separator::Space)
        } else {
            return Err(bad(format!(
                "line {}: `{line}` has no class: expected `<relative path><TAB><class>` (a \
                 comma or a space also separates them when the path holds none)",
                i + 1
            )));
        };
        let rel = rel.trim().replace('\\', "/");
        let rel = rel.strip_prefix("./").unwrap_or(&rel).to_string();
        lines.push(LabelLine {
            number: i + 1,
            rel,
            class: class.trim().to_string(),
            separator,
        });
    }
    if lines.is_empty() {
        return Err(bad(
            "no label lines (expected `<relative path><TAB><class>` per line)".into(),
        ));
    }
    Ok(lines)
}

/// Refuses a label file none of whose lines names an image of the run: its paths are almost
/// surely written another way (relative to the working directory instead of `--clean`, say),
/// and every image would go unlabelled.
pub fn check_lines_name_images(
    path: &Path,
    lines: &[LabelLine],
    images: &[InputItem],
) -> Result<(), EvalError> {
    let rels: HashSet<&str> = images.iter().map(|i| i.rel.as_str()).collect();
    if lines.iter().any(|l| rels.contains(l.rel.as_str())) {
        return Ok(());
    }
    let (first, image) = (&lines[0], images.first().map_or("", |i| i.rel.as_str()));
    let split = match first.separator {
        Separator::Tab => "",
        Separator::Comma => {
            " (split at its first comma: put a TAB between a path holding a comma and its class)"
        }
        Separator::Space => {
            " (split at its first space: put a TAB between a path holding spaces and its class)"
        }
    };
    Err(EvalError::Labels {
        path: path.to_path_buf(),
        reason: format!(
            "none of its {} label line(s) names an image of this run: line {} names `{}`{split}, \
             but an image is named by its path relative to --clean, such as `{image}` (the \
             report's per_image names)",
            lines.len(),
            first.number,
            first.rel
        ),
    })
}

/// Classification labels matched with the images of a run.
#[derive(Clone, Debug)]
pub struct ClassLabels {
    /// The label file, for messages.
    pub path: PathBuf,
    by_rel: HashMap<String, usize>,
    /// Lines that name no image of the run (`--exclude`d images, or typos): (line, path).
    pub unmatched: Vec<(usize, String)>,
}

impl ClassLabels {
    /// The class of `rel`; an image without a line is that image's error, as a missing label
    /// map is.
    pub fn of(&self, rel: &str) -> Result<usize, EvalError> {
        self.by_rel
            .get(rel)
            .copied()
            .ok_or_else(|| EvalError::Labels {
                path: self.path.clone(),
                reason: format!(
                "no line labels `{rel}` (each image needs a `<relative path><TAB><class>` line)"
            ),
            })
    }
}

/// Reads a classification `--labels FILE` ([`read_label_lines`]) for `images`, each class a
/// name from `names` or an index into it. A path labelled twice with different classes is an
/// error, as is a file that labels no image ([`check_lines_name_images`]).
pub fn read_class_labels(
    path: &Path,
    names: &[String],
    images: &[InputItem],
) -> Result<ClassLabels, EvalError> {
    let lines = read_label_lines(path)?;
    check_lines_name_images(path, &lines, images)?;
    let rels: HashSet<&str> = images.iter().map(|i| i.rel.as_str()).collect();
    let mut by_rel: HashMap<String, (usize, usize)> = HashMap::new();
    let mut unmatched = Vec::new();
    for l in &lines {
        let bad = |reason: String| EvalError::Labels {
            path: path.to_path_buf(),
            reason: format!("line {}: {reason}", l.number),
        };
        let k = class_index(&l.class, names).map_err(|e| {
            bad(match l.separator {
                Separator::Tab => e,
                Separator::Comma => format!(
                    "{e} (the line was split at its first comma into the path `{}` and that \
                     class; put a TAB after a path that holds a comma)",
                    l.rel
                ),
                Separator::Space => format!(
                    "{e} (the line was split at its first space into the path `{}` and that \
                     class; put a TAB after a path that holds spaces)",
                    l.rel
                ),
            })
        })?;
        match by_rel.get(&l.rel) {
            Some(&(line, other)) if other != k => {
                return Err(bad(format!(
                    "`{}` is labelled {} here and {} on line {line}",
                    l.rel, names[k], names[other]
                )))
            }
            Some(_) => {}
            None => {
                by_rel.insert(l.rel.clone(), (l.number, k));
            }
        }
        if !rels.contains(l.rel.as_str()) {
            unmatched.push((l.number, l.rel.clone()));
        }
    }
    Ok(ClassLabels {
        path: path.to_path_buf(),
        by_rel: by_rel.into_iter().map(|(r, (_, k))| (r, k)).collect(),
        unmatched,
    })
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

    /// The separator is the first TAB, else the first comma, else the first space; a
    /// byte-order mark, CRLF, `./` and `\\` are read as meant; a line with no class is refused.
    #[test]
    fn label_lines_split_at_a_tab_then_a_comma_then_a_space() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("l.txt");
        std::fs::write(
            &p,
            "\u{feff}my a,b.png\ttench, Tinca tinca\r\n# note\n\n./x.jpg,tench, Tinca \
             tinca\nsub\\y.jpg tree frog\n",
        )
        .unwrap();
        let lines: Vec<(usize, String, String)> = read_label_lines(&p)
            .unwrap()
            .into_iter()
            .map(|l| (l.number, l.rel, l.class))
            .collect();
        let want = [
            (1, "my a,b.png", "tench, Tinca tinca"),
            (4, "x.jpg", "tench, Tinca tinca"),
            (5, "sub/y.jpg", "tree frog"),
        ];
        assert_eq!(lines.len(), want.len());
        for (got, want) in lines.iter().zip(want) {
            assert_eq!((got.0, got.1.as_str(), got.2.as_str()), want);
        }
        std::fs::write(&p, "a.png\n").unwrap();
        let e = read_label_lines(&p).unwrap_err().to_string();
        assert!(e.contains("line 1: `a.png` has no class"), "{e}");
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
