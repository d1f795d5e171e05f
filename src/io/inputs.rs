//! Turning `--input DIR|LIST|SHARDS` into the list of images to attack, and each image's output
//! name.
//!
//! Every input carries a *relative path* (`rel`, always with `/` separators). It names the output
//! (`<output>/<rel with its extension replaced by .png>`), seeds the per-image random draws, and
//! keys the manifest, so it must be stable: directories are walked in sorted order, list files
//! keep the paths as written (lexically normalised), and tar shards are read in the order the
//! brace pattern expands to, members in tar order (`rel` = `<shard>.tar/<member>`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use globset::{Glob, GlobSet, GlobSetBuilder};

use super::webdataset::{expand_braces, is_tar_spec, list_tar, TarShard};
use super::IoError;

/// Image file extensions picked up when scanning a directory (compared case-insensitively).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"];

/// One image to process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputItem {
    /// Where to read it: the scanned path, or for list files the line resolved against the list
    /// file's directory; for a tar member, the tar file.
    pub path: PathBuf,
    /// Relative path with `/` separators; the output is `output_rel_path(rel)`. For a tar
    /// member: `<shard rel>/<member name>`, e.g. `train-000.tar/0001.jpg`.
    pub rel: String,
    /// For an image inside a tar shard: which member.
    pub member: Option<TarMember>,
}

/// An image stored inside a tar shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarMember {
    /// The shard's listing (shared by all its items).
    pub shard: Arc<TarShard>,
    /// Index of the image member in `shard.entries`.
    pub entry: usize,
}

impl TarMember {
    /// The member's name inside the tar.
    pub fn name(&self) -> &str {
        &self.shard.entries[self.entry].name
    }
}

impl InputItem {
    /// An image file on disk.
    pub fn file(path: impl Into<PathBuf>, rel: impl Into<String>) -> Self {
        InputItem {
            path: path.into(),
            rel: rel.into(),
            member: None,
        }
    }

    /// What `--shard K/N` hashes: the relative path, or for a tar member its shard's name, so
    /// that one tar shard is always processed (and its output tar written) by one worker.
    pub fn shard_key(&self) -> &str {
        match &self.member {
            Some(m) => &m.shard.rel,
            None => &self.rel,
        }
    }

    /// A name for messages: the file, or `<tar path>/<member>`.
    pub fn display_path(&self) -> PathBuf {
        match &self.member {
            Some(m) => self.path.join(m.name()),
            None => self.path.clone(),
        }
    }
}

/// How outputs are laid out under `--output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OutputLayout {
    /// `<output>/<rel with .png>`; for tar inputs `<output>/<shard without .tar>/<member>.png`.
    #[default]
    Tree,
    /// Tar inputs only: `<output>/<shard>.tar` holding `<member>.png` and the sample's other
    /// members, assembled when the shard is done (images are staged in
    /// `<output>/.<shard>.tar.parts/` until then).
    Tar,
}

impl OutputLayout {
    /// The output of `item` as recorded in the manifest: a path relative to the output
    /// directory, or for the tar layout `<shard>.tar/<member>.png`.
    pub fn output_rel(&self, item: &InputItem) -> String {
        match (&item.member, self) {
            (None, _) => output_rel_path(&item.rel),
            (Some(m), OutputLayout::Tree) => {
                output_rel_path(&format!("{}/{}", m.shard.tree_dir(), m.name()))
            }
            (Some(m), OutputLayout::Tar) => {
                format!("{}/{}", m.shard.rel, output_rel_path(m.name()))
            }
        }
    }

    /// Where the image of `item` is written on disk, relative to the output directory: the
    /// output itself, or for the tar layout its staging file
    /// `.<shard>.tar.parts/<member>.png`.
    pub fn file_rel(&self, item: &InputItem) -> String {
        match (&item.member, self) {
            (Some(m), OutputLayout::Tar) => {
                format!(
                    "{}/{}",
                    staging_dir_name(&m.shard.rel),
                    output_rel_path(m.name())
                )
            }
            _ => self.output_rel(item),
        }
    }
}

/// `<dir>/.<name>.parts` for shard rel `<dir>/<name>`: where a tar output's images wait until
/// the shard is complete.
pub fn staging_dir_name(shard_rel: &str) -> String {
    match shard_rel.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/.{name}.parts"),
        None => format!(".{shard_rel}.parts"),
    }
}

/// Options of [`list_inputs_with`].
#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    /// The caller's output directories, where `<dir>/<output_rel_path(rel)>` is written (for tar
    /// shards, `<dir>/<shard>.tar`): never descended into when they lie inside the input, never
    /// the input directory itself, and none of their outputs may be an input file.
    pub exclude_dirs: Vec<PathBuf>,
    /// `--exclude` globs, matched against relative paths (`*` also matches `/`).
    pub exclude: Vec<String>,
}

/// Where the inputs came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputSource {
    /// A directory, scanned recursively.
    Directory,
    /// A text file with one path per line.
    ListFile,
    /// WebDataset-style tar shards (`shards/train-{000..099}.tar`).
    TarShards,
}

/// The result of [`list_inputs`].
#[derive(Clone, Debug)]
pub struct InputList {
    pub source: InputSource,
    /// Sorted by `rel` for directories; in file order for list files; shard by shard, in tar
    /// order, for tar shards.
    pub items: Vec<InputItem>,
    /// Files skipped while scanning a directory for their extension (hidden files and
    /// directories are skipped without being counted, as the README says), and tar members
    /// that are neither a sample's image nor carried along with one.
    pub ignored: usize,
    /// Images left out by `--exclude`, including those inside an excluded directory.
    pub excluded: usize,
    /// The tar shards, for [`InputSource::TarShards`].
    pub shards: Vec<Arc<TarShard>>,
    /// Non-fatal problems met while listing (e.g. a tar shard with a corrupt tail).
    pub warnings: Vec<String>,
}

/// Compiled `--exclude` globs.
struct Excludes(Option<GlobSet>);

impl Excludes {
    fn new(globs: &[String]) -> Result<Self, IoError> {
        if globs.is_empty() {
            return Ok(Excludes(None));
        }
        let mut b = GlobSetBuilder::new();
        for g in globs {
            b.add(Glob::new(g).map_err(|e| IoError::BadPattern {
                pattern: g.clone(),
                message: e.to_string(),
            })?);
        }
        let set = b.build().map_err(|e| IoError::BadPattern {
            pattern: globs.join(" "),
            message: e.to_string(),
        })?;
        Ok(Excludes(Some(set)))
    }

    fn matches(&self, rel: &str) -> bool {
        self.0.as_ref().is_some_and(|s| s.is_match(rel))
    }
}

/// Lists the inputs of `input`.
///
/// - A **directory** is scanned recursively; files whose extension is one of
///   [`IMAGE_EXTENSIONS`] are kept, sorted by relative path; other files are counted in
///   `ignored`. Hidden entries (names starting with `.`) are skipped uncounted, and
///   `exclude_dir` (typically the output directory, when it lies inside the input) is not
///   descended into; an `exclude_dir` that *is* the input is an [`IoError::OutputIsInput`].
///   Symlinks are followed, cycles are not.
/// - A **regular file** is a list: one path per line (a UTF-8 byte-order mark is dropped),
///   blank lines and lines starting with `#` skipped, relative paths resolved against the list
///   file's directory. `rel` is the path as written, lexically normalised (`./a/../b.jpg` →
///   `b.jpg`; an absolute path loses its root: `/data/x.jpg` → `data/x.jpg`). A path that
///   climbs out with `..` is rejected, since its output would land outside the output
///   directory. A file listed again is kept once, with a warning. Listed files are not checked
///   for existence here: a missing one becomes a per-image failure. A file with an image
///   extension is an [`IoError::SingleImage`], not a list.
///
/// An output under `exclude_dir` that is one of the inputs (the same file, through symlinks
/// too) is an [`IoError::OutputOverwritesInput`]. No images at all is an
/// [`IoError::EmptyInput`].
pub fn list_inputs(input: &Path, exclude_dir: Option<&Path>) -> Result<InputList, IoError> {
    list_inputs_with(
        input,
        &ListOptions {
            exclude_dirs: exclude_dir.into_iter().map(Path::to_path_buf).collect(),
            exclude: Vec::new(),
        },
    )
}

/// [`list_inputs`] with `--exclude` globs, and WebDataset tar shards: an `input` that contains a
/// brace pattern or ends in `.tar` names tar files (see [`super::webdataset`]); each is listed
/// and every sample's image becomes an item `<shard>.tar/<member>`. Every named shard must
/// exist. Excluded images are counted in [`InputList::excluded`]; `--exclude` globs are matched
/// against `rel` (`sub/x.jpg`, `train-000.tar/0001.jpg`) and, for directories, against each
/// directory's relative path (so `--exclude raw` skips the directory `raw`).
pub fn list_inputs_with(input: &Path, options: &ListOptions) -> Result<InputList, IoError> {
    let excludes = Excludes::new(&options.exclude)?;
    let spec = input.to_string_lossy();
    // An existing path is a tar only by its extension (a list file may have braces in its
    // name); a path that does not exist may be a brace pattern.
    let tar = match std::fs::metadata(input) {
        Ok(meta) => meta.is_file() && spec.to_ascii_lowercase().ends_with(".tar"),
        Err(_) => is_tar_spec(&spec),
    };
    let exclude_dirs = &options.exclude_dirs;
    if tar {
        let list = list_shards(&spec, &excludes)?;
        check_outputs_spare_inputs(&list, exclude_dirs)?;
        return Ok(list);
    }
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
    let list = if meta.is_dir() {
        list_directory(input, exclude_dirs, &excludes)?
    } else if input
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(has_image_extension)
    {
        // Checked by name before reading: a large image would otherwise be read whole only to
        // fail as a text file, with a message about lines.
        return Err(IoError::SingleImage {
            path: input.to_path_buf(),
        });
    } else {
        list_file(input, &excludes)?
    };
    check_outputs_spare_inputs(&list, exclude_dirs)?;
    Ok(list)
}

/// Identity of the file a path resolves to (symlinks followed), for telling whether an output
/// path and an input path are one file. On Unix it is (device, inode), one `stat` per path, so
/// that a resume of a large campaign, whose outputs all exist, does not pay a `realpath` per
/// path component; a hard link therefore also counts as the same file (refused, conservatively).
#[cfg(unix)]
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(path: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(path).ok()
}

/// Refuses a listing where an output under one of `out_dirs` would be written over an input
/// file: with `--input list.txt --output .` and `a.png` in the list, the output `./a.png` *is*
/// the clean image, which would be replaced by its adversarial version (and `verify` would then
/// compare it with itself). Directory inputs meet this too, e.g. an output directory above the
/// input whose tree repeats the input's. Only outputs that already exist can be an input file,
/// so a fresh output directory costs one failed `stat` per image, and a resume one more `stat`
/// per input. Tar shards are checked against their output tar `<dir>/<shard>.tar` (the default
/// tar layout), which would replace the input shard.
fn check_outputs_spare_inputs(list: &InputList, out_dirs: &[PathBuf]) -> Result<(), IoError> {
    for dir in out_dirs {
        if !dir.is_dir() {
            continue;
        }
        // (input path, input rel, output rel), one per file that could be overwritten.
        let candidates: Vec<(&Path, &str, String)> = if list.source == InputSource::TarShards {
            list.shards
                .iter()
                .map(|s| (s.path.as_path(), s.rel.as_str(), s.rel.clone()))
                .collect()
        } else {
            list.items
                .iter()
                .map(|i| (i.path.as_path(), i.rel.as_str(), output_rel_path(&i.rel)))
                .collect()
        };
        let existing: HashMap<_, &str> = candidates
            .iter()
            .filter_map(|(_, _, out)| Some((file_id(&dir.join(out))?, out.as_str())))
            .collect();
        if existing.is_empty() {
            continue;
        }
        let pairs: Vec<(String, String)> = candidates
            .iter()
            .filter_map(|(path, rel, _)| {
                let out = existing.get(&file_id(path)?)?;
                Some((out.to_string(), rel.to_string()))
            })
            .collect();
        if !pairs.is_empty() {
            return Err(IoError::OutputOverwritesInput {
                dir: dir.clone(),
                pairs,
            });
        }
    }
    Ok(())
}

/// Lists the tar shards that `spec` expands to.
fn list_shards(spec: &str, excludes: &Excludes) -> Result<InputList, IoError> {
    let names = expand_braces(spec).map_err(|message| IoError::BadPattern {
        pattern: spec.to_string(),
        message,
    })?;
    let paths: Vec<PathBuf> = names.iter().map(PathBuf::from).collect();
    let missing: Vec<&PathBuf> = paths.iter().filter(|p| !p.is_file()).collect();
    if let Some(first) = missing.first() {
        return Err(IoError::NotFound {
            path: if missing.len() == 1 {
                first.to_path_buf()
            } else {
                PathBuf::from(format!(
                    "{} (and {} more of the {} shards named by {spec})",
                    first.display(),
                    missing.len() - 1,
                    paths.len()
                ))
            },
        });
    }
    let rels = shard_rels(&paths);
    let mut seen = HashSet::new();
    let mut shards = Vec::new();
    let mut items = Vec::new();
    let mut warnings = Vec::new();
    let (mut ignored, mut excluded) = (0usize, 0usize);
    for (path, rel) in paths.iter().zip(rels) {
        if !seen.insert(rel.clone()) {
            continue;
        }
        let (shard, w) = list_tar(path, &rel)?;
        warnings.extend(w);
        let shard = Arc::new(shard);
        let image_keys: HashSet<&str> = shard
            .entries
            .iter()
            .filter(|e| e.image)
            .map(|e| e.key.as_str())
            .collect();
        for (i, e) in shard.entries.iter().enumerate() {
            if !e.image {
                if !image_keys.contains(e.key.as_str()) {
                    ignored += 1;
                }
                continue;
            }
            let item_rel = format!("{rel}/{}", e.name);
            if excludes.matches(&item_rel) {
                excluded += 1;
                continue;
            }
            items.push(InputItem {
                path: path.clone(),
                rel: item_rel,
                member: Some(TarMember {
                    shard: shard.clone(),
                    entry: i,
                }),
            });
        }
        shards.push(shard);
    }
    if items.is_empty() {
        return Err(IoError::EmptyInput {
            path: PathBuf::from(spec),
            detail: format!(
                "the {} tar shard(s) hold no members with extension {} ({ignored} other member(s) ignored, {excluded} excluded)",
                shards.len(),
                IMAGE_EXTENSIONS.join(", ")
            ),
        });
    }
    Ok(InputList {
        source: InputSource::TarShards,
        items,
        ignored,
        excluded,
        shards,
        warnings,
    })
}

/// Relative names of tar shards: paths relative to their longest common parent directory, so
/// `shards/train-000.tar` gives `train-000.tar`, and shards in different directories keep the
/// part that tells them apart.
fn shard_rels(paths: &[PathBuf]) -> Vec<String> {
    let parents: Vec<Vec<String>> = paths
        .iter()
        .map(|p| {
            p.parent()
                .map(|d| {
                    d.components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect();
    let mut common = parents.first().map_or(0, |p| p.len());
    for p in &parents {
        common = common.min(
            p.iter()
                .zip(&parents[0])
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    paths
        .iter()
        .zip(&parents)
        .map(|(p, dirs)| {
            let mut parts: Vec<String> = dirs[common..]
                .iter()
                .filter(|d| d.as_str() != "." && d.as_str() != "/")
                .cloned()
                .collect();
            parts.push(
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            parts.join("/")
        })
        .collect()
}

fn list_directory(
    root: &Path,
    exclude_dirs: &[PathBuf],
    excludes: &Excludes,
) -> Result<InputList, IoError> {
    // A directory that does not exist yet holds nothing to leave out.
    let exclude: Vec<PathBuf> = exclude_dirs
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .collect();
    // Skipping the output directory would leave nothing to scan, and the user would be told
    // that a directory full of images holds none.
    if let Ok(canon) = std::fs::canonicalize(root) {
        if exclude.contains(&canon) {
            return Err(IoError::OutputIsInput {
                path: root.to_path_buf(),
            });
        }
    }
    let mut visited = HashSet::new();
    let mut walker = Walker {
        exclude: &exclude,
        excludes,
        visited: &mut visited,
        items: Vec::new(),
        ignored: 0,
        hidden: 0,
        excluded: 0,
    };
    walker.walk(root, "", false)?;
    let Walker {
        mut items,
        ignored,
        hidden,
        excluded,
        ..
    } = walker;
    items.sort_by(|a: &InputItem, b: &InputItem| a.rel.cmp(&b.rel));
    if items.is_empty() {
        return Err(IoError::EmptyInput {
            path: root.to_path_buf(),
            detail: format!(
                "the directory holds no files with extension {} ({ignored} other file(s) ignored, {hidden} hidden, {excluded} excluded)",
                IMAGE_EXTENSIONS.join(", ")
            ),
        });
    }
    Ok(InputList {
        source: InputSource::Directory,
        items,
        ignored,
        excluded,
        shards: Vec::new(),
        warnings: Vec::new(),
    })
}

struct Walker<'a> {
    exclude: &'a [PathBuf],
    excludes: &'a Excludes,
    visited: &'a mut HashSet<PathBuf>,
    items: Vec<InputItem>,
    ignored: usize,
    /// Hidden files and directories, skipped; counted only for the "no images" message.
    hidden: usize,
    excluded: usize,
}

impl Walker<'_> {
    /// Walks `dir`, whose relative path is `prefix`. Inside a directory matched by `--exclude`
    /// (`excluded`), images are only counted, so that the log's "excluded N image(s)" covers
    /// them as the README promises; a directory there that cannot be read is passed over, since
    /// it may be excluded precisely because it cannot be (its images then go uncounted).
    fn walk(&mut self, dir: &Path, prefix: &str, excluded: bool) -> Result<(), IoError> {
        match self.walk_inner(dir, prefix, excluded) {
            Err(IoError::Read { .. }) if excluded => Ok(()),
            r => r,
        }
    }

    fn walk_inner(&mut self, dir: &Path, prefix: &str, excluded: bool) -> Result<(), IoError> {
        let exclude = self.exclude;
        let canon = std::fs::canonicalize(dir).map_err(|source| IoError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        if exclude.contains(&canon) || !self.visited.insert(canon) {
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
                self.ignored += usize::from(!excluded);
                continue;
            };
            // Hidden entries (`.DS_Store`, `.git`, our own `.x.png.tmp` files) are not the
            // user's images; the README says they are ignored, and the log's "non-image file(s)"
            // count would misdescribe a hidden `.x.jpg`.
            if name.starts_with('.') {
                self.hidden += usize::from(!excluded);
                continue;
            }
            // Follow symlinks; a dangling link counts as an ignored file.
            let Ok(meta) = std::fs::metadata(&path) else {
                self.ignored += usize::from(!excluded);
                continue;
            };
            let rel = if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}/{name}")
            };
            if meta.is_dir() {
                let excluded = excluded || self.excludes.matches(&rel);
                self.walk(&path, &rel, excluded)?;
            } else if has_image_extension(name) {
                if excluded || self.excludes.matches(&rel) {
                    self.excluded += 1;
                } else {
                    self.items.push(InputItem::file(path, rel));
                }
            } else if !excluded {
                self.ignored += 1;
            }
        }
        Ok(())
    }
}

fn has_image_extension(name: &str) -> bool {
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => {
            IMAGE_EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext))
        }
        _ => false,
    }
}

fn list_file(list: &Path, excludes: &Excludes) -> Result<InputList, IoError> {
    let text = std::fs::read_to_string(list).map_err(|source| {
        if source.kind() == std::io::ErrorKind::InvalidData {
            IoError::NotAListFile {
                path: list.to_path_buf(),
            }
        } else {
            IoError::Read {
                path: list.to_path_buf(),
                source,
            }
        }
    })?;
    // Editors on Windows start UTF-8 files with a byte-order mark; `trim` keeps it, and it
    // would become part of the first path.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let base = list.parent().unwrap_or(Path::new(""));
    let mut items: Vec<InputItem> = Vec::new();
    let mut excluded = 0;
    // rel -> (line, index in `items`) of its first listing.
    let mut first: HashMap<String, (usize, usize)> = HashMap::new();
    let mut repeats: Vec<(usize, usize, String)> = Vec::new();
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
        if excludes.matches(&rel) {
            excluded += 1;
            continue;
        }
        // The same file listed twice is one image with one output: kept once, with a warning,
        // rather than refused as a name collision ("rename the inputs" would be wrong advice,
        // and a generated list need not be edited for it). The same name for two different
        // files (`/x/a.jpg` and `x/a.jpg` from elsewhere) stays a collision.
        if let Some(&(line, index)) = first.get(&rel) {
            if same_file(&items[index].path, &path) {
                repeats.push((i + 1, line, rel));
                continue;
            }
        } else {
            first.insert(rel.clone(), (i + 1, items.len()));
        }
        items.push(InputItem::file(path, rel));
    }
    if items.is_empty() {
        return Err(IoError::EmptyInput {
            path: list.to_path_buf(),
            detail: format!(
                "the list file has no paths (only blank lines or # comments; {excluded} excluded)"
            ),
        });
    }
    let mut warnings = Vec::new();
    if !repeats.is_empty() {
        let shown: Vec<String> = repeats
            .iter()
            .take(5)
            .map(|(line, earlier, rel)| format!("`{rel}` on line {line} repeats line {earlier}"))
            .collect();
        warnings.push(format!(
            "{}: {} path(s) listed more than once ({}{}); each image is processed once",
            list.display(),
            repeats.len(),
            shown.join(", "),
            if repeats.len() > 5 { ", ..." } else { "" }
        ));
    }
    Ok(InputList {
        source: InputSource::ListFile,
        items,
        ignored: 0,
        excluded,
        shards: Vec::new(),
        warnings,
    })
}

/// Whether two listed paths with the same relative name are one file, as the file system will
/// see them (symlinks resolved where they exist, `a/../b.jpg` is `b.jpg`).
fn same_file(a: &Path, b: &Path) -> bool {
    super::paths::resolved(a) == super::paths::resolved(b)
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

/// Fails if two inputs map to the same output file (e.g. `x.jpg` and `x.png`, or two different
/// files listed under one name), listing every clash as (first input, other input, output). A
/// list file naming one file twice is de-duplicated by [`list_inputs`] before this check.
pub fn check_output_collisions(items: &[InputItem]) -> Result<(), IoError> {
    check_output_collisions_in(items, OutputLayout::Tree)
}

/// [`check_output_collisions`] for the outputs of `layout`.
pub fn check_output_collisions_in(
    items: &[InputItem],
    layout: OutputLayout,
) -> Result<(), IoError> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    let mut pairs = Vec::new();
    // The same member name twice in one shard is not two inputs to rename.
    let mut repeated = Vec::new();
    for item in items {
        let out = layout.output_rel(item);
        if let Some(first) = seen.get(&out) {
            if item.member.is_some() && *first == item.rel {
                repeated.push(item.rel.clone());
            } else {
                pairs.push((first.to_string(), item.rel.clone(), out));
            }
        } else {
            seen.insert(out, &item.rel);
        }
    }
    if !repeated.is_empty() {
        return Err(IoError::RepeatedTarMember { names: repeated });
    }
    if pairs.is_empty() {
        Ok(())
    } else {
        Err(IoError::OutputCollision { pairs })
    }
}
