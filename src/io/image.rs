//! Decoding image files into [`RgbImage`], the planar `[3, H, W]` f32 layout in [0, 1] that every
//! engine consumes.
//!
//! Any colour form is accepted and turned into RGB: grayscale is replicated, alpha is dropped (not
//! composited), palettes are expanded, 16-bit samples are divided by 65535 and 8-bit ones by 255.
//! The EXIF orientation is applied, so the attack sees the picture the way a viewer shows it.
//! The header is checked against a pixel budget *before* anything is decoded, so a hostile or
//! mistaken 100k×100k file fails fast instead of exhausting memory.

use std::io::{BufRead, BufReader, Cursor, Seek};
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageError, ImageReader, Limits};

use super::inputs::InputItem;
use super::IoError;

/// Default pixel budget of [`read_image`]: 40 million pixels (e.g. 8000×5000).
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

/// An RGB image, planar `[3, H, W]` row-major (all of R, then G, then B), values in [0, 1].
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl RgbImage {
    /// A black image.
    pub fn zeros(width: usize, height: usize) -> Self {
        RgbImage {
            width,
            height,
            data: vec![0.0; 3 * width * height],
        }
    }

    /// Number of pixels, `width * height`.
    pub fn pixels(&self) -> usize {
        self.width * self.height
    }

    /// Builds an image from interleaved 8-bit RGB (`[H, W, 3]`), values divided by 255.
    ///
    /// # Panics
    /// If `rgb.len() != 3 * width * height`.
    pub fn from_u8_interleaved(width: usize, height: usize, rgb: &[u8]) -> Self {
        assert_eq!(rgb.len(), 3 * width * height, "buffer size mismatch");
        let n = width * height;
        let mut data = vec![0.0f32; 3 * n];
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                data[c * n + i] = px[c] as f32 / 255.0;
            }
        }
        RgbImage {
            width,
            height,
            data,
        }
    }

    /// Interleaved 8-bit RGB (`[H, W, 3]`), each value rounded to the nearest level after clamping
    /// to [0, 1]. For saving an adversarial image use
    /// [`quantize_within_eps`](super::output::quantize_within_eps) instead, which also keeps the
    /// result inside the ε-ball.
    pub fn to_u8_interleaved(&self) -> Vec<u8> {
        let planar: Vec<u8> = self.data.iter().map(|&v| to_level(v)).collect();
        super::output::planar_to_interleaved(&planar, self.width, self.height)
    }

    /// Interleaved f32 RGB (`[H, W, 3]`).
    pub fn to_f32_interleaved(&self) -> Vec<f32> {
        let n = self.pixels();
        let mut out = Vec::with_capacity(3 * n);
        for i in 0..n {
            for c in 0..3 {
                out.push(self.data[c * n + i]);
            }
        }
        out
    }
}

fn to_level(v: f32) -> u8 {
    if v.is_nan() {
        return 0;
    }
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Reads an image file as RGB in [0, 1], with EXIF orientation applied and the default pixel
/// budget ([`DEFAULT_MAX_PIXELS`]).
pub fn read_image(path: &Path) -> Result<RgbImage, IoError> {
    read_image_limited(path, DEFAULT_MAX_PIXELS)
}

/// Like [`read_image`] with an explicit pixel budget; the header's dimensions are checked before
/// anything is decoded.
pub fn read_image_limited(path: &Path, max_pixels: u64) -> Result<RgbImage, IoError> {
    let img = decode_dynamic(path, max_pixels)?;
    Ok(dynamic_to_rgb(&img))
}

/// Reads an input image: a file, or a member of a tar shard read in place. `max_pixels` is
/// the `--max-pixels` budget, checked against the header before anything is decoded.
pub fn read_item(item: &InputItem, max_pixels: u64) -> Result<RgbImage, IoError> {
    Ok(dynamic_to_rgb(&decode_item(item, max_pixels)?))
}

/// [`read_item`] keeping the native sample type.
pub(crate) fn decode_item(item: &InputItem, max_pixels: u64) -> Result<DynamicImage, IoError> {
    match &item.member {
        None => decode_dynamic(&item.path, max_pixels),
        Some(m) => {
            let e = &m.shard.entries[m.entry];
            let shown = item.display_path();
            let sub = super::webdataset::open_member(&m.shard.path, e.offset, e.size)
                .map_err(|err| open_error(&m.shard.path, err))?;
            decode_reader(BufReader::new(sub), &shown, max_pixels)
        }
    }
}

/// Decodes an image held in memory (`name` is only used in messages), with the same guards as
/// [`read_image_limited`].
pub fn read_image_bytes(bytes: &[u8], name: &Path, max_pixels: u64) -> Result<RgbImage, IoError> {
    let img = decode_reader(Cursor::new(bytes), name, max_pixels)?;
    Ok(dynamic_to_rgb(&img))
}

/// Decodes a file to a [`DynamicImage`] (orientation applied), keeping its native sample type.
/// `verify` uses it to read 8-bit outputs back exactly.
pub(crate) fn decode_dynamic(path: &Path, max_pixels: u64) -> Result<DynamicImage, IoError> {
    let file = std::fs::File::open(path).map_err(|e| open_error(path, e))?;
    decode_reader(BufReader::new(file), path, max_pixels)
}

/// Decodes from any reader; `path` names the source in messages.
pub(crate) fn decode_reader<R: BufRead + Seek>(
    mut reader: R,
    path: &Path,
    max_pixels: u64,
) -> Result<DynamicImage, IoError> {
    let read_err = |source| IoError::Read {
        path: path.to_path_buf(),
        source,
    };
    // JPEG decoders fill a truncated scan with grey and report success; a truncated JPEG must be
    // a broken image, so its structure is checked first (see `jpeg_is_complete`).
    if reader
        .fill_buf()
        .map_err(read_err)?
        .starts_with(&[0xFF, 0xD8, 0xFF])
    {
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).map_err(read_err)?;
        if !jpeg_is_complete(&bytes) {
            return Err(IoError::Decode {
                path: path.to_path_buf(),
                message: "JPEG data ends before its end-of-image marker (the file is truncated)"
                    .into(),
            });
        }
        return decode_unchecked(Cursor::new(bytes), path, max_pixels);
    }
    decode_unchecked(reader, path, max_pixels)
}

/// Whether a JPEG's marker structure reaches its end-of-image marker: marker segments are
/// skipped by their lengths, entropy-coded data after each start-of-scan is scanned for the next
/// marker (`FF 00` stuffing and `RSTn` are data). Data after the end-of-image marker (as in
/// motion photos) is allowed; an embedded EXIF thumbnail's markers are inside an APP segment and
/// do not count.
pub(crate) fn jpeg_is_complete(b: &[u8]) -> bool {
    let mut i = 2; // past SOI
    loop {
        // Find the next marker (fill bytes 0xFF may precede it).
        if b.get(i) != Some(&0xFF) {
            return false;
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1;
        }
        let Some(&m) = b.get(i) else { return false };
        i += 1;
        match m {
            0xD9 => return true,
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let Some(len) = b
            .get(i..i + 2)
            .map(|l| u16::from_be_bytes([l[0], l[1]]) as usize)
        else {
            return false;
        };
        if len < 2 {
            return false;
        }
        i += len;
        if i > b.len() {
            return false;
        }
        if m == 0xDA {
            // Entropy-coded data up to the next real marker.
            loop {
                let Some(p) = b[i..].iter().position(|&x| x == 0xFF) else {
                    return false;
                };
                i += p;
                match b.get(i + 1) {
                    None => return false,
                    Some(0x00) | Some(0xD0..=0xD7) | Some(0xFF) => i += 1,
                    Some(_) => break,
                }
            }
        }
    }
}

/// [`decode_with`] under a guard: the decoders are other crates' code, and zune-jpeg 0.5.15
/// panics (an `unwrap` in its AVX2 IDCT) on some malformed JPEGs the fuzzer found
/// (tests/data/jpeg_decoder_panic.jpg). A panic anywhere in a decoder, from the header to the
/// pixels, makes the file a corrupt image to every caller, not a crash of the run.
fn decode_unchecked<R: BufRead + Seek>(
    reader: R,
    path: &Path,
    max_pixels: u64,
) -> Result<DynamicImage, IoError> {
    let decoded = {
        let _inside = InsideDecoder::enter();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decode_with(reader, path, max_pixels)
        }))
    };
    decoded.unwrap_or_else(|panic| {
        Err(IoError::Decode {
            path: path.to_path_buf(),
            message: format!(
                "the image decoder failed on it ({})",
                crate::panic_message(&*panic)
            ),
        })
    })
}

fn decode_with<R: BufRead + Seek>(
    reader: R,
    path: &Path,
    max_pixels: u64,
) -> Result<DynamicImage, IoError> {
    let reader = ImageReader::new(reader);
    let mut reader = reader.with_guessed_format().map_err(|e| IoError::Read {
        path: path.to_path_buf(),
        source: e,
    })?;
    // The decoder's own allocation guard must not be tighter than our pixel budget
    // (16-bit RGBA is 8 bytes per pixel).
    let mut limits = Limits::default();
    let needed = max_pixels.saturating_mul(8).saturating_add(64 << 20);
    limits.max_alloc = Some(limits.max_alloc.unwrap_or(0).max(needed));
    reader.limits(limits);
    if reader.format().is_none() {
        return Err(IoError::UnsupportedFormat {
            path: path.to_path_buf(),
            message: "the file's signature matches no known image format".into(),
        });
    }
    let mut decoder = reader.into_decoder().map_err(|e| image_error(path, e))?;
    let (w, h) = decoder.dimensions();
    if (w as u64) * (h as u64) > max_pixels {
        return Err(IoError::TooLarge {
            path: path.to_path_buf(),
            width: w,
            height: h,
            max_pixels,
        });
    }
    if w == 0 || h == 0 {
        return Err(IoError::Decode {
            path: path.to_path_buf(),
            message: format!("image has zero size ({w}x{h})"),
        });
    }
    // A broken EXIF block should not make an otherwise good image unreadable.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| image_error(path, e))?;
    img.apply_orientation(orientation);
    Ok(img)
}

thread_local! {
    static DECODING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread as inside an image decoder until dropped.
struct InsideDecoder(bool);

impl InsideDecoder {
    fn enter() -> Self {
        InsideDecoder(DECODING.with(|d| d.replace(true)))
    }
}

impl Drop for InsideDecoder {
    fn drop(&mut self) {
        DECODING.with(|d| d.set(self.0));
    }
}

/// Whether this thread is inside an image decoder, whose panics become corrupt-image errors
/// ([`IoError::Decode`]). A program's panic hook may stay quiet for them: the error reports
/// the file already.
pub fn inside_image_decoder() -> bool {
    DECODING.with(|d| d.get())
}

/// Converts any colour form to planar RGB in [0, 1] (alpha dropped, gray replicated).
pub(crate) fn dynamic_to_rgb(img: &DynamicImage) -> RgbImage {
    let width = img.width() as usize;
    let height = img.height() as usize;
    let n = width * height;
    let mut data = vec![0.0f32; 3 * n];
    match img {
        // Exact k/255 for 8-bit data, without going through an intermediate buffer.
        DynamicImage::ImageRgb8(buf) => {
            for (i, p) in buf.pixels().enumerate() {
                for c in 0..3 {
                    data[c * n + i] = p.0[c] as f32 / 255.0;
                }
            }
        }
        _ => {
            let buf = img.to_rgb32f();
            for (i, p) in buf.pixels().enumerate() {
                for c in 0..3 {
                    data[c * n + i] = p.0[c].clamp(0.0, 1.0);
                }
            }
        }
    }
    RgbImage {
        width,
        height,
        data,
    }
}

fn open_error(path: &Path, e: std::io::Error) -> IoError {
    if e.kind() == std::io::ErrorKind::NotFound {
        IoError::NotFound {
            path: path.to_path_buf(),
        }
    } else {
        IoError::Read {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

fn image_error(path: &Path, e: ImageError) -> IoError {
    let path = path.to_path_buf();
    match e {
        ImageError::IoError(source) => {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                IoError::Decode {
                    path,
                    message: format!("file ends early ({source})"),
                }
            } else {
                IoError::Read { path, source }
            }
        }
        ImageError::Unsupported(u) => IoError::UnsupportedFormat {
            path,
            message: u.to_string(),
        },
        other => IoError::Decode {
            path,
            message: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::jpeg_is_complete;

    #[test]
    fn jpeg_structure_check() {
        let mut buf = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_fn(40, 24, |x, y| image::Rgb([x as u8 * 6, y as u8 * 9, 77]))
            .write_to(&mut buf, image::ImageFormat::Jpeg)
            .unwrap();
        let jpg = buf.into_inner();
        assert!(jpeg_is_complete(&jpg));
        let mut trailing = jpg.clone();
        trailing.extend_from_slice(b"....appended video....");
        assert!(jpeg_is_complete(&trailing));
        for cut in [3, 10, jpg.len() / 2, jpg.len() - 2, jpg.len() - 1] {
            assert!(!jpeg_is_complete(&jpg[..cut]), "cut at {cut}");
        }
        assert!(!jpeg_is_complete(&[0xFF, 0xD8, 0xFF]));
        assert!(!jpeg_is_complete(&[0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x01]));
    }
}
