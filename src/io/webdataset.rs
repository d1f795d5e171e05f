//! WebDataset-style `.tar` shards as input and output.
//!
//! `--input 'shards/train-{000..099}.tar'` names a set of tar files by brace expansion
//! ([`expand_braces`]: numeric ranges `{000..099}`, zero-padded as written, and lists `{a,b}`).
//! Inside a shard, members are grouped into samples by *key*: the member's path up to the first
//! `.` of its file name (`abc/0001.seg.png` has key `abc/0001` and extension `seg.png`). A
//! member whose whole extension is an image extension (`jpg`, `png`, ...) is a sample's image and
//! becomes one input; every other member (`cls`, `json`, `txt`, `seg.png`, ...) is carried through
//! unchanged into the output shard, next to the adversarial image.
//!
//! Members are never extracted: [`TarShard`] records each member's data offset and size, and
//! [`open_member`] reads it in place through a bounded [`SubFile`], so listing a shard costs one
//! pass over its headers and reading a sample costs one seek.
//!
//! Output shards are written by [`write_tar_atomic`] to a temporary file in the output directory
//! and renamed into place: a tar under its final name is always complete.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::inputs::IMAGE_EXTENSIONS;
use super::output::write_atomic;
use super::IoError;

/// At most this many names come out of one brace pattern (a typo such as `{0..99999999}` is an
/// error, not an allocation).
pub const MAX_EXPANSION: usize = 1_000_000;

/// Whether an `--input` value names tar shards: it contains a brace pattern, or it ends in
/// `.tar` (case-insensitive).
pub fn is_tar_spec(spec: &str) -> bool {
    spec.to_ascii_lowercase().ends_with(".tar") || has_braces(spec)
}

fn has_braces(spec: &str) -> bool {
    spec.find('{')
        .is_some_and(|i| spec[i..].find('}').is_some_and(|j| j > 1))
}

/// Expands every `{A..B}` (integers; zero-padded to the width written when either end has a
/// leading zero, as bash does; descending when A > B) and `{x,y,z}` group, left to right, as a
/// cartesian product. A string without braces expands to itself.
pub fn expand_braces(spec: &str) -> Result<Vec<String>, String> {
    let Some(open) = spec.find('{') else {
        return Ok(vec![spec.to_string()]);
    };
    let close = spec[open..]
        .find('}')
        .map(|j| open + j)
        .ok_or_else(|| format!("`{spec}`: unbalanced `{{` (no closing `}}`)"))?;
    let body = &spec[open + 1..close];
    let alternatives: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        numeric_range(a, b).map_err(|e| format!("`{spec}`: {e}"))?
    } else if body.contains(',') {
        body.split(',').map(str::to_string).collect()
    } else {
        return Err(format!(
            "`{spec}`: `{{{body}}}` is not a range `{{000..099}}` or a list `{{a,b}}`"
        ));
    };
    let rest = expand_braces(&spec[close + 1..])?;
    let prefix = &spec[..open];
    if alternatives.len().saturating_mul(rest.len()) > MAX_EXPANSION {
        return Err(format!(
            "`{spec}` expands to more than {MAX_EXPANSION} names"
        ));
    }
    let mut out = Vec::with_capacity(alternatives.len() * rest.len());
    for a in &alternatives {
        for r in &rest {
            out.push(format!("{prefix}{a}{r}"));
        }
    }
    Ok(out)
}

fn numeric_range(a: &str, b: &str) -> Result<Vec<String>, String> {
    let parse = |s: &str| {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(format!(
                "`{s}` in a range must be a non-negative integer, as in {{000..099}}"
            ));
        }
        s.parse::<u64>()
            .map_err(|_| format!("`{s}` is too large for a range"))
    };
    let (lo, hi) = (parse(a)?, parse(b)?);
    let padded = (a.len() > 1 && a.starts_with('0')) || (b.len() > 1 && b.starts_with('0'));
    let width = if padded { a.len().max(b.len()) } else { 0 };
    let count = lo.abs_diff(hi).saturating_add(1);
    if count > MAX_EXPANSION as u64 {
        return Err(format!(
            "the range {{{a}..{b}}} has more than {MAX_EXPANSION} values"
        ));
    }
    let values: Box<dyn Iterator<Item = u64>> = if lo <= hi {
        Box::new(lo..=hi)
    } else {
        Box::new((hi..=lo).rev())
    };
    Ok(values.map(|v| format!("{v:0width$}")).collect())
}

/// One regular-file member of a tar shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarEntry {
    /// The member's path inside the tar (`/`-separated, as stored).
    pub name: String,
    /// Byte offset of its data in the tar file.
    pub offset: u64,
    /// Size of its data in bytes.
    pub size: u64,
    /// Sample key: `name` up to the first `.` of its file name.
    pub key: String,
    /// Whether this member is a sample's image (its whole extension is an image extension).
    pub image: bool,
}

/// The listing of one input shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarShard {
    /// Where the tar file is.
    pub path: PathBuf,
    /// Its relative name (`train-000.tar`, or `sub/train-000.tar` when the expanded names live
    /// in different directories): the prefix of every member's relative path and the name of
    /// the matching output shard.
    pub rel: String,
    /// Regular-file members in tar order.
    pub entries: Vec<TarEntry>,
}

impl TarShard {
    /// The name of the output directory for `--output-layout tree`: `rel` without `.tar`.
    pub fn tree_dir(&self) -> &str {
        strip_tar_ext(&self.rel)
    }
}

/// `x.tar` → `x` (case-insensitive); anything else unchanged.
pub fn strip_tar_ext(name: &str) -> &str {
    if name.len() > 4 && name[name.len() - 4..].eq_ignore_ascii_case(".tar") {
        &name[..name.len() - 4]
    } else {
        name
    }
}

/// Splits a member name into (key, extension): the extension starts at the first `.` of the
/// file name (`a/b.c.jpg` → (`a/b`, `c.jpg`)). `None` when the file name has no `.` or starts
/// with one (hidden files).
pub fn split_key(name: &str) -> Option<(&str, &str)> {
    let file_start = name.rfind('/').map_or(0, |i| i + 1);
    let dot = name[file_start..].find('.')?;
    if dot == 0 {
        return None;
    }
    let at = file_start + dot;
    Some((&name[..at], &name[at + 1..]))
}

/// A member path made safe to use under the output directory: `.` components, empty components
/// and a leading `/` are dropped; a path with a `..` component, or nothing left, is `None` (its
/// output could otherwise land outside the output directory).
pub fn sanitize_member(name: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in name.split(['/', '\\']) {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Lists a tar file's regular members. Problems past the first readable members (a truncated or
/// corrupt tail) do not fail the listing: the members read so far are kept and the problem comes
/// back as a warning. A file that is not a tar at all is an error.
pub fn list_tar(path: &Path, rel: &str) -> Result<(TarShard, Vec<String>), IoError> {
    let file = File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            IoError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            IoError::Read {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
    let mut archive = tar::Archive::new(BufReader::new(file));
    let mut warnings = Vec::new();
    let mut entries = Vec::new();
    let not_tar = |message: String| IoError::Decode {
        path: path.to_path_buf(),
        message: format!("not a readable tar file: {message}"),
    };
    let iter = archive
        .entries_with_seek()
        .map_err(|e| not_tar(e.to_string()))?;
    let mut seen_any = false;
    for entry in iter {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                if !seen_any {
                    return Err(not_tar(e.to_string()));
                }
                warnings.push(format!(
                    "{}: cannot read past member {} ({e}); the members before it are used",
                    path.display(),
                    entries.len()
                ));
                break;
            }
        };
        seen_any = true;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            continue;
        }
        let name = match entry.path() {
            Ok(p) => match p.to_str() {
                Some(s) => match sanitize_member(s) {
                    Some(n) => n,
                    None => {
                        warnings.push(format!(
                            "{}: skipped member `{s}`: its path leaves the shard (`..`) or is empty",
                            path.display()
                        ));
                        continue;
                    }
                },
                None => {
                    warnings.push(format!(
                        "{}: skipped a member whose name is not UTF-8",
                        path.display()
                    ));
                    continue;
                }
            },
            Err(e) => {
                warnings.push(format!("{}: skipped a member: {e}", path.display()));
                continue;
            }
        };
        let offset = entry.raw_file_position();
        let size = entry.size();
        if offset.saturating_add(size) > file_len {
            warnings.push(format!(
                "{}: member {name} is cut short by the end of the file",
                path.display()
            ));
        }
        let (key, image) = match split_key(&name) {
            Some((key, ext)) => (
                key.to_string(),
                IMAGE_EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext)),
            ),
            None => (name.clone(), false),
        };
        entries.push(TarEntry {
            name,
            offset,
            size,
            key,
            image,
        });
    }
    Ok((
        TarShard {
            path: path.to_path_buf(),
            rel: rel.to_string(),
            entries,
        },
        warnings,
    ))
}

/// A window `[start, start + len)` of a file, readable and seekable as if it were the whole file.
pub struct SubFile<R> {
    inner: R,
    start: u64,
    len: u64,
    pos: u64,
}

impl<R: Read + Seek> SubFile<R> {
    /// The window of `inner` at `start`, `len` bytes long.
    pub fn new(mut inner: R, start: u64, len: u64) -> std::io::Result<Self> {
        inner.seek(SeekFrom::Start(start))?;
        Ok(SubFile {
            inner,
            start,
            len,
            pos: 0,
        })
    }
}

impl<R: Read + Seek> Read for SubFile<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        if left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(left) as usize;
        let got = self.inner.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl<R: Read + Seek> Seek for SubFile<R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        }
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the start of a tar member",
            )
        })?;
        self.inner
            .seek(SeekFrom::Start(self.start.saturating_add(target)))?;
        self.pos = target;
        Ok(target)
    }
}

/// Opens one member's data for reading in place.
pub fn open_member(
    tar_path: &Path,
    offset: u64,
    size: u64,
) -> std::io::Result<SubFile<BufReader<File>>> {
    let file = File::open(tar_path)?;
    SubFile::new(BufReader::new(file), offset, size)
}

/// Reads one member's data into memory.
pub fn read_member(tar_path: &Path, offset: u64, size: u64) -> std::io::Result<Vec<u8>> {
    let mut sub = open_member(tar_path, offset, size)?;
    let mut buf = Vec::with_capacity(size.min(1 << 30) as usize);
    sub.read_to_end(&mut buf)?;
    if (buf.len() as u64) < size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("tar member is cut short: {} of {size} bytes", buf.len()),
        ));
    }
    Ok(buf)
}

/// Member name → (data offset, size) of a tar.
pub type TarIndex = HashMap<String, (u64, u64)>;

/// The regular members of an existing (output) tar: name → (offset, size). A missing file is an
/// empty index; an unreadable one is an error.
pub fn tar_index(path: &Path) -> Result<TarIndex, IoError> {
    if !path.is_file() {
        return Ok(HashMap::new());
    }
    let (shard, _warnings) = list_tar(path, "")?;
    Ok(shard
        .entries
        .into_iter()
        .map(|e| (e.name, (e.offset, e.size)))
        .collect())
}

/// One member to write into an output shard.
pub enum MemberData {
    /// Bytes in memory.
    Bytes(Vec<u8>),
    /// `size` bytes at `offset` in the file at the path (copied without loading it whole).
    Range(PathBuf, u64, u64),
}

/// Writes a tar (ustar/GNU headers, mode 0644, mtime 0, so identical runs give identical files)
/// through [`write_atomic`]: a temporary file beside `path`, synced and renamed over it.
pub fn write_tar_atomic(
    path: &Path,
    members: impl IntoIterator<Item = (String, MemberData)>,
) -> Result<(), IoError> {
    write_atomic(path, |file| {
        let werr = |source: std::io::Error| IoError::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
        tar.mode(tar::HeaderMode::Deterministic);
        for (member, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            match data {
                MemberData::Bytes(bytes) => {
                    header.set_size(bytes.len() as u64);
                    tar.append_data(&mut header, &member, bytes.as_slice())
                        .map_err(werr)?;
                }
                MemberData::Range(src, offset, size) => {
                    let reader =
                        open_member(&src, offset, size).map_err(|source| IoError::Read {
                            path: src.clone(),
                            source,
                        })?;
                    header.set_size(size);
                    // A source cut short makes `append_data` fail rather than write a short member.
                    tar.append_data(&mut header, &member, reader)
                        .map_err(werr)?;
                }
            }
        }
        // The end-of-archive blocks, then what the buffer holds; write_atomic syncs the file.
        tar.into_inner().map_err(werr)?.flush().map_err(werr)
    })
}

/// Where an input's output was found by [`OutputLookup::find`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// A file (a tree-layout output, or a tar output's staged image).
    File(PathBuf),
    /// A member of an assembled output tar.
    Member {
        tar: PathBuf,
        offset: u64,
        size: u64,
    },
}

impl Found {
    /// Decodes the output (8-bit PNGs keep their sample type).
    pub fn decode(&self, max_pixels: u64) -> Result<image::DynamicImage, IoError> {
        match self {
            Found::File(p) => super::image::decode_dynamic(p, max_pixels),
            Found::Member { tar, offset, size } => {
                let sub = open_member(tar, *offset, *size).map_err(|source| IoError::Read {
                    path: tar.clone(),
                    source,
                })?;
                super::image::decode_reader(BufReader::new(sub), tar, max_pixels)
            }
        }
    }

    /// The output's name for messages: relative to the output directory `dir`, or
    /// `<shard>.tar/<member>` for `item`'s member of an output tar.
    pub fn name(&self, item: &super::InputItem, dir: &Path) -> String {
        match (self, &item.member) {
            (Found::Member { .. }, Some(m)) => {
                format!("{}/{}", m.shard.rel, super::output_rel_path(m.name()))
            }
            (Found::File(p), _) => p
                .strip_prefix(dir)
                .map(|r| r.to_string_lossy().replace('\\', "/"))
                .unwrap_or_else(|_| p.display().to_string()),
            (Found::Member { tar, .. }, None) => tar.display().to_string(),
        }
    }

    /// Reads the output's bytes.
    pub fn bytes(&self) -> Result<Vec<u8>, IoError> {
        match self {
            Found::File(p) => std::fs::read(p).map_err(|source| IoError::Read {
                path: p.clone(),
                source,
            }),
            Found::Member { tar, offset, size } => {
                read_member(tar, *offset, *size).map_err(|source| IoError::Read {
                    path: tar.clone(),
                    source,
                })
            }
        }
    }
}

/// Finds the outputs of inputs in an output directory, in either layout, reading each output
/// tar's index once.
pub struct OutputLookup {
    dir: PathBuf,
    indexes: std::sync::Mutex<HashMap<PathBuf, std::sync::Arc<TarIndex>>>,
}

impl OutputLookup {
    pub fn new(dir: &Path) -> Self {
        OutputLookup {
            dir: dir.to_path_buf(),
            indexes: Default::default(),
        }
    }

    /// The output directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The index of the output tar at `path` (empty when there is none).
    pub fn tar_index(&self, path: &Path) -> Result<std::sync::Arc<TarIndex>, IoError> {
        if let Some(i) = self.indexes.lock().unwrap().get(path) {
            return Ok(i.clone());
        }
        let index = std::sync::Arc::new(tar_index(path)?);
        self.indexes
            .lock()
            .unwrap()
            .insert(path.to_path_buf(), index.clone());
        Ok(index)
    }

    /// Where the output of `item` is, if it exists. With `layout`, only that layout's places
    /// are looked at (for the tar layout: the assembled tar, then the staged file); without,
    /// any of them.
    pub fn find(
        &self,
        item: &super::InputItem,
        layout: Option<super::OutputLayout>,
    ) -> Result<Option<Found>, IoError> {
        use super::OutputLayout;
        if let Some(m) = &item.member {
            if layout != Some(OutputLayout::Tree) {
                let tar = self.dir.join(&m.shard.rel);
                let index = self.tar_index(&tar)?;
                if let Some(&(offset, size)) = index.get(&super::output_rel_path(m.name())) {
                    return Ok(Some(Found::Member { tar, offset, size }));
                }
                let staged = self.dir.join(OutputLayout::Tar.file_rel(item));
                if staged.is_file() {
                    return Ok(Some(Found::File(staged)));
                }
            }
            if layout == Some(OutputLayout::Tar) {
                return Ok(None);
            }
        }
        let file = self.dir.join(OutputLayout::Tree.output_rel(item));
        Ok(file.is_file().then_some(Found::File(file)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces() {
        assert_eq!(expand_braces("a.tar").unwrap(), vec!["a.tar"]);
        assert_eq!(
            expand_braces("s/t-{000..002}.tar").unwrap(),
            vec!["s/t-000.tar", "s/t-001.tar", "s/t-002.tar"]
        );
        assert_eq!(expand_braces("{8..10}").unwrap(), vec!["8", "9", "10"]);
        assert_eq!(expand_braces("{3..1}").unwrap(), vec!["3", "2", "1"]);
        assert_eq!(
            expand_braces("{a,b}-{0..1}").unwrap(),
            vec!["a-0", "a-1", "b-0", "b-1"]
        );
        assert!(expand_braces("{0..x}").is_err());
        assert!(expand_braces("{0..").is_err());
        assert!(expand_braces("{0..99999999}").is_err());
        assert!(expand_braces("{foo}").is_err());
    }

    #[test]
    fn member_paths_never_leave_the_output() {
        assert_eq!(sanitize_member("./a//b.png").as_deref(), Some("a/b.png"));
        assert_eq!(sanitize_member("/abs/x.jpg").as_deref(), Some("abs/x.jpg"));
        assert_eq!(sanitize_member("a/../../x.jpg"), None);
        assert_eq!(sanitize_member("..\\x.jpg"), None);
        assert_eq!(sanitize_member("./"), None);
    }

    #[test]
    fn keys() {
        assert_eq!(split_key("a/b.c.jpg"), Some(("a/b", "c.jpg")));
        assert_eq!(split_key("x.jpg"), Some(("x", "jpg")));
        assert_eq!(split_key("a.d/x"), None);
        assert_eq!(split_key("a/.hidden"), None);
        assert_eq!(strip_tar_ext("t-000.TAR"), "t-000");
    }

    #[test]
    fn subfile_reads_and_seeks_within_its_window() {
        let data: Vec<u8> = (0..100u8).collect();
        let mut s = SubFile::new(std::io::Cursor::new(data), 10, 20).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        assert_eq!(buf, (10..30u8).collect::<Vec<_>>());
        assert_eq!(s.seek(SeekFrom::End(-5)).unwrap(), 15);
        let mut b = [0u8; 10];
        assert_eq!(s.read(&mut b).unwrap(), 5);
        assert_eq!(&b[..5], &[25, 26, 27, 28, 29]);
        assert!(s.seek(SeekFrom::Current(-100)).is_err());
    }
}
