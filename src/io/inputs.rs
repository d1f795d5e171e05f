//! Turning `--input DIR|LIST` into the list of images to attack, and each image's output name.
//!
//! Every input carries a *relative path* (`rel`, always with `/` separators). It names the output
//! (`<output>/<rel with its extension replaced by .png>`), seeds the per-image random draws, and
//! keys the manifest, so it must be stable: directories are walked in sorted order, and list
//! files keep the paths as written (lexically normalised).

use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path, PathBuf};

use super::IoError;

/// Image file extensions picked up when scanning a directory (compared case-insensitively).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"];

/// One image to process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputItem {
    /// Where to read it: the scanned path, or for list files the line resolved against the list
    /// file's directory.
    pub path: PathBuf,
    /// Relative path with `/` separators; the output is `output_rel_path(rel)`.
    pub rel: String,
}

/// Where the inputs came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputSource {
    /// A directory, scanned recursively.
    Directory,
    /// A text file with one path per line.
    ListFile,
}

/// The result of [`list_inputs`].
#[derive(Clone, Debug)]
pub struct InputList {
    pub source: InputSource,
    /// Sorted by `rel` for directories; in file order for list files.
    pub items: Vec<InputItem>,
    /// Files skipped while scanning a directory (non-image extensions, hidden files).
    pub ignored: usize,
}

/// Lists the inputs of `input`.
///
/// - A **directory** is scanned recursively; files whose extension is one of
///   [`IMAGE_EXTENSIONS`] are kept, sorted by relative path; other files are counted in
///   `ignored`. Hidden entries (names starting with `.`) and `exclude_dir` (typically the output
///   directory, when it lies inside the input) are skipped. Symlinks are followed, cycles are not.
/// - A **regular file** is a list: one path per line, blank lines and lines starting with `#`
///   skipped, relative paths resolved against the list file's directory. `rel` is the path as
///   written, lexically normalised (`./a/../b.jpg` → `b.jpg`; an absolute path loses its root:
///   `/data/x.jpg` → `data/x.jpg`). A path that climbs out with `..` is rejected, since its
///   output would land outside the output directory. Listed files are not checked for existence
///   here: a missing one becomes a per-image failure.
///
/// No images at all is an [`IoError::EmptyInput`].
pub fn list_inputs(input: &Path, exclude_dir: Option<&Path>) -> Result<InputList, IoError> {
    let meta = std::fs::metadata(input).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            IoError::NotFound {
                path: input.to_path_buf(),
            }
        } else {
            IoError::Read {
                path: input.to_path_buf(),
                source: e,
            }
        }
    })?;
    if meta.is_dir() {
        list_directory(input, exclude_dir)
    } else {
        list_file(input)
    }
}

fn list_directory(root: &Path, exclude_dir: Option<&Path>) -> Result<InputList, IoError> {
    let exclude = exclude_dir.and_then(|d| std::fs::canonicalize(d).ok());
    let mut visited = HashSet::new();
    let mut items = Vec::new();
    let mut ignored = 0usize;
    walk(
        root,
        "",
        exclude.as_deref(),
        &mut visited,
        &mut items,
        &mut ignored,
    )?;
    items.sort_by(|a: &InputItem, b: &InputItem| a.rel.cmp(&b.rel));
    if items.is_empty() {
        return Err(IoError::EmptyInput {
            path: root.to_path_buf(),
            detail: format!(
                "the directory holds no files with extension {} ({ignored} other file(s) ignored)",
                IMAGE_EXTENSIONS.join(", ")
            ),
        });
    }
    Ok(InputList {
        source: InputSource::Directory,
        items,
        ignored,
    })
}

fn walk(
    dir: &Path,
    prefix: &str,
    exclude: Option<&Path>,
    visited: &mut HashSet<PathBuf>,
    items: &mut Vec<InputItem>,
    ignored: &mut usize,
) -> Result<(), IoError> {
    let canon = std::fs::canonicalize(dir).map_err(|source| IoError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    if exclude == Some(canon.as_path()) || !visited.insert(canon) {
        return Ok(());
    }
    let rd = std::fs::read_dir(dir).map_err(|source| IoError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut entries = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|source| IoError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        entries.push(entry.file_name());
    }
    entries.sort();
    for name in entries {
        let path = dir.join(&name);
        let Some(name) = name.to_str() else {
            // Non-UTF-8 names cannot be carried in the manifest or in '/'-separated rel paths.
            *ignored += 1;
            continue;
        };
        let hidden = name.starts_with('.');
        // Follow symlinks; a dangling link counts as an ignored file.
        let Ok(meta) = std::fs::metadata(&path) else {
            *ignored += 1;
            continue;
        };
        let rel = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}/{name}")
        };
        if meta.is_dir() {
            if !hidden {
                walk(&path, &rel, exclude, visited, items, ignored)?;
            }
        } else if !hidden && has_image_extension(name) {
            items.push(InputItem { path, rel });
        } else {
            *ignored += 1;
        }
    }
    Ok(())
}

fn has_image_extension(name: &str) -> bool {
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => {
            IMAGE_EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext))
        }
        _ => false,
    }
}

fn list_file(list: &Path) -> Result<InputList, IoError> {
    let text = std::fs::read_to_string(list).map_err(|source| {
        if source.kind() == std::io::ErrorKind::InvalidData {
            IoError::ListFile {
                path: list.to_path_buf(),
                line: 0,
                message: "not a UTF-8 text file; --input takes a directory or a text file with one image path per line".into(),
            }
        } else {
            IoError::Read {
                path: list.to_path_buf(),
                source,
            }
        }
    })?;
    let base = list.parent().unwrap_or(Path::new(""));
    let mut items = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let written = Path::new(line);
        let rel = normalise_rel(written).map_err(|message| IoError::ListFile {
            path: list.to_path_buf(),
            line: i + 1,
            message,
        })?;
        let path = if written.is_absolute() {
            written.to_path_buf()
        } else {
            base.join(written)
        };
        items.push(InputItem { path, rel });
    }
    if items.is_empty() {
        return Err(IoError::EmptyInput {
            path: list.to_path_buf(),
            detail: "the list file has no paths (only blank lines or # comments)".into(),
        });
    }
    Ok(InputList {
        source: InputSource::ListFile,
        items,
        ignored: 0,
    })
}

/// Lexically normalises a path as written in a list file into a `/`-separated relative path.
fn normalise_rel(p: &Path) -> Result<String, String> {
    let mut parts: Vec<String> = Vec::new();
    for comp in p.components() {
        match comp {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err(format!(
                        "`{}` climbs above the list file's directory with `..`, so its output would land outside the output directory; write it as an absolute path or move the list file up",
                        p.display()
                    ));
                }
            }
            Component::Normal(s) => match s.to_str() {
                Some(s) => parts.push(s.to_string()),
                None => return Err(format!("`{}` is not valid UTF-8", p.display())),
            },
        }
    }
    if parts.is_empty() {
        return Err(format!("`{}` does not name a file", p.display()));
    }
    Ok(parts.join("/"))
}

/// The output path (relative, `/`-separated) for an input: its extension replaced by `.png`
/// (added when there is none). `a/b.jpg` → `a/b.png`, `a.d/c` → `a.d/c.png`.
pub fn output_rel_path(rel: &str) -> String {
    let (dir, file) = match rel.rfind('/') {
        Some(i) => (&rel[..=i], &rel[i + 1..]),
        None => ("", rel),
    };
    let stem = match file.rfind('.') {
        Some(i) if i > 0 => &file[..i],
        _ => file,
    };
    format!("{dir}{stem}.png")
}

/// Fails if two inputs map to the same output file (e.g. `x.jpg` and `x.png`, or the same path
/// listed twice), listing every clash as (first input, other input, output).
pub fn check_output_collisions(items: &[InputItem]) -> Result<(), IoError> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    let mut pairs = Vec::new();
    for item in items {
        let out = output_rel_path(&item.rel);
        if let Some(first) = seen.get(&out) {
            pairs.push((first.to_string(), item.rel.clone(), out));
        } else {
            seen.insert(out, &item.rel);
        }
    }
    if pairs.is_empty() {
        Ok(())
    } else {
        Err(IoError::OutputCollision { pairs })
    }
}
