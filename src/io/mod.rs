//! Images, manifests, input listing and output writing.
//!
//! Everything that touches the file system on behalf of an attack run lives here, so that the
//! engines only ever see planar `[3, H, W]` f32 images in [0, 1]:
//! - [`mod@image`]: decoding any supported file to [`RgbImage`] (colour forms, 16-bit, EXIF
//!   orientation, a pixel-count guard);
//! - [`output`]: quantising an adversarial image to 8 bits *inside* the ε-ball, and atomic PNG /
//!   safetensors writers;
//! - [`inputs`]: turning `--input DIR|LIST` into a stable, sorted list of relative paths, and the
//!   output-name mapping (`a/b.jpg` → `a/b.png`);
//! - [`manifest`]: the `manifest.jsonl` record, writer and tolerant reader;
//! - [`run_record`]: `run.json`, the settings of the attack that writes an output directory;
//! - [`mod@verify`]: the checks behind `prm verify`;
//! - [`webdataset`]: WebDataset-style tar shards (brace expansion, samples, in-place member
//!   reads, atomic tar writer);
//! - [`units`]: parsing `8/255`-style fractions for `--eps`, `--step-size` and `--lr`.
//!
//! All fallible functions return [`IoError`], whose messages name the file and say what to do.

pub mod image;
pub mod inputs;
pub mod manifest;
pub mod output;
pub mod paths;
pub mod run_record;
pub mod shard;
pub mod units;
pub mod verify;
pub mod webdataset;

use std::path::PathBuf;

pub use self::image::{
    inside_image_decoder, read_image, read_image_bytes, read_image_limited, read_item, RgbImage,
    DEFAULT_MAX_PIXELS,
};
pub use self::inputs::{
    check_output_collisions, check_output_collisions_in, list_inputs, list_inputs_with,
    output_rel_path, InputItem, InputList, InputSource, ListOptions, OutputLayout, TarMember,
};
pub use self::manifest::{
    read_manifest, read_manifest_detailed, ManifestContents, ManifestRecord, ManifestWriter,
    Status, MANIFEST_FILE,
};
pub use self::output::{
    interleaved_to_planar, linf_255, planar_to_interleaved, quantize_for_saving,
    quantize_within_eps, write_float_safetensors_atomic, write_png_atomic, SavedImage,
};
pub use self::units::parse_fraction;
pub use self::verify::{
    verify, verify_with, VerifyOptions, VerifyReport, Violation, ViolationKind,
};

/// Every error the I/O layer can report. Each message names the file involved and, where there
/// is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A path that must exist does not.
    #[error("{}: no such file or directory (check the path)", path.display())]
    NotFound { path: PathBuf },

    /// The OS refused a read or a directory listing (permissions, I/O error, ...).
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The OS refused a write, a rename or a directory creation.
    #[error("{}: cannot write: {source} (check that the output directory is writable and the disk is not full)", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file's contents are not a recognised image format.
    #[error("{}: not an image in a supported format (png, jpeg, webp, bmp, tiff): {message}", path.display())]
    UnsupportedFormat { path: PathBuf, message: String },

    /// The file looks like an image but could not be decoded (corrupt or truncated).
    #[error("{}: corrupt or truncated image: {message} (re-export or remove the file)", path.display())]
    Decode { path: PathBuf, message: String },

    /// The image header announces more pixels than allowed; nothing was decoded.
    #[error("{}: image is {width}x{height} = {pixels} pixels, more than the limit of {max_pixels} (downscale it first, or raise the limit)", path.display(), pixels = (*width as u64) * (*height as u64))]
    TooLarge {
        path: PathBuf,
        width: u32,
        height: u32,
        max_pixels: u64,
    },

    /// Encoding an output (PNG or safetensors) failed, or the buffer given has the wrong size.
    #[error("{}: cannot encode output: {message}", path.display())]
    Encode { path: PathBuf, message: String },

    /// The input directory or list file yields no images.
    #[error("{}: no input images found ({detail})", path.display())]
    EmptyInput { path: PathBuf, detail: String },

    /// The input is a single image: inputs are a directory or a list file, so that every
    /// image has a relative path to name its output by.
    #[error("{}: a single image is not accepted as input: give the directory that holds it, or a text file with one image path per line (e.g. `echo {} > list.txt`, then give list.txt)", path.display(), path.display())]
    SingleImage { path: PathBuf },

    /// The input is a file that is neither a directory nor a UTF-8 text list.
    #[error("{}: not a directory and not a UTF-8 text file: give a directory of images, or a text file with one image path per line", path.display())]
    NotAListFile { path: PathBuf },

    /// The input directory is the output directory itself.
    #[error("{}: the output directory is the input directory itself: outputs (`<output>/<relative path>.png`) would overwrite and mix with the clean images; give an output directory outside the input, or a new subdirectory of it (which is left out of the input)", path.display())]
    OutputIsInput { path: PathBuf },

    /// Some outputs would be written over input files (e.g. a list file naming `a.png`, with
    /// the output directory set to the list's directory): the clean images would be lost.
    #[error("{} output(s) in {} would overwrite an input file: {}; give an output directory that holds none of the inputs", pairs.len(), dir.display(), pairs.iter().take(5).map(|(o, i)| format!("`{o}` is the input `{i}`")).chain((pairs.len() > 5).then(|| format!("and {} more", pairs.len() - 5))).collect::<Vec<_>>().join(", "))]
    OutputOverwritesInput {
        /// The output directory.
        dir: PathBuf,
        /// (output, relative to `dir`; the input it would overwrite, as listed).
        pairs: Vec<(String, String)>,
    },

    /// A line of an input list file is unusable.
    #[error("{}:{line}: {message}", path.display())]
    ListFile {
        path: PathBuf,
        line: usize,
        message: String,
    },

    /// A tar shard holds members of one name more than once (as `tar rf` appends them): which
    /// copy is the image is not clear (tar readers take the last).
    #[error("{} member name(s) appear more than once in their tar shard: {}; rewrite the shard with one member of each name (tar readers take the last copy)", names.len(), names.iter().take(5).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "))]
    RepeatedTarMember { names: Vec<String> },

    /// Two or more inputs would be written to the same output file.
    #[error("{} input(s) map to an output name already used by another input: {}; rename the inputs or split the run", pairs.len(), pairs.iter().map(|(a, b, o)| format!("`{a}` and `{b}` -> `{o}`")).collect::<Vec<_>>().join(", "))]
    OutputCollision {
        /// (first input, second input, shared output) for each clash.
        pairs: Vec<(String, String, String)>,
    },

    /// A bad `--exclude` glob or `--input` brace pattern.
    #[error("bad pattern `{pattern}`: {message}")]
    BadPattern { pattern: String, message: String },

    /// A complete (newline-terminated) line of a manifest is not a valid record.
    #[error("{}:{line}: invalid manifest record: {message} (the manifest was edited or written by another tool)", path.display())]
    Manifest {
        path: PathBuf,
        line: usize,
        message: String,
    },
}
