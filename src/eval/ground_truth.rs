//! Where `--labels` takes the ground truth from: files beside the images, or members of the
//! clean tar shards (how WebDataset stores it: `0001.jpg` next to `0001.seg.png` or `0001.cls`).
//!
//! A member label belongs to the image of the same *sample key* in the same shard
//! ([`crate::io::webdataset::split_key`]), wherever it lies in the tar. It is read by the loader
//! threads with the image, one seek each, so a dataset's labels cost nothing before the first
//! image.

use std::collections::HashMap;
use std::path::PathBuf;

use super::labels::{class_index, read_label_png_bytes};
use super::EvalError;
use crate::io::inputs::IMAGE_EXTENSIONS;
use crate::io::webdataset::{read_member, split_key, TarEntry};
use crate::io::InputItem;

/// The prefix of `--labels member:EXT`.
pub const MEMBER_PREFIX: &str = "member:";

/// A class-label member holds a name or an index: anything longer is not one.
const MAX_CLASS_MEMBER_BYTES: u64 = 4096;

/// A label-map member is read whole before it is decoded: a larger one is refused unread (the
/// decoded map is bounded the same way).
const MAX_MAP_MEMBER_BYTES: u64 = 1 << 30;

/// What `--labels` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelSource {
    /// A directory of label PNGs at the images' relative paths (dense targets), or a file of
    /// `<relative path> <class>` lines (classification).
    Path(PathBuf),
    /// `member:EXT`: the member `<key>.EXT` of each image's own sample in its clean tar shard:
    /// a label PNG for dense targets (`seg.png`), a class name or index as text for
    /// classification (`cls`).
    Member(String),
}

impl LabelSource {
    /// Parses a `--labels` value: `member:EXT`, or else a path.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let Some(ext) = spec.strip_prefix(MEMBER_PREFIX) else {
            return Ok(LabelSource::Path(PathBuf::from(spec)));
        };
        let ext = ext.trim_start_matches('.');
        if ext.is_empty() || ext.contains(['/', '\\']) {
            return Err(format!(
                "`{spec}`: give the members' extension after `member:`, e.g. member:seg.png \
                 (label maps) or member:cls (class indices)"
            ));
        }
        if IMAGE_EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext)) {
            return Err(format!(
                "`{spec}`: members with extension {ext} are the shards' images (inputs), not \
                 labels; WebDataset label maps usually have a two-part extension such as seg.png"
            ));
        }
        Ok(LabelSource::Member(ext.to_string()))
    }

    /// How the report names it.
    pub fn describe(&self) -> String {
        match self {
            LabelSource::Path(p) => p.display().to_string(),
            LabelSource::Member(ext) => format!("{MEMBER_PREFIX}{ext}"),
        }
    }
}

/// The label members of the clean shards: for each shard, the entry of each sample key whose
/// extension is the one asked for (compared without case, as image extensions are).
pub struct MemberLabels {
    ext: String,
    /// shard `rel` → sample key → index into the shard's entries.
    by_shard: HashMap<String, HashMap<String, usize>>,
}

impl MemberLabels {
    /// Indexes the shards of `items`. A usage error when `items` are not tar members, or when
    /// no shard holds a single member with the extension (a typo would otherwise fail every
    /// image one by one).
    pub fn index(ext: &str, items: &[InputItem]) -> Result<Self, EvalError> {
        let mut by_shard: HashMap<String, HashMap<String, usize>> = HashMap::new();
        let mut seen_exts: Vec<String> = Vec::new();
        for item in items {
            let Some(member) = &item.member else {
                return Err(EvalError::Usage(format!(
                    "--labels {MEMBER_PREFIX}{ext} reads label members of tar shards, but {} \
                     is a plain file: give --clean as tar shards, or --labels as a directory \
                     or list file",
                    item.path.display()
                )));
            };
            let shard = &member.shard;
            if by_shard.contains_key(&shard.rel) {
                continue;
            }
            let mut keys = HashMap::new();
            for (i, e) in shard.entries.iter().enumerate() {
                let Some((_, e_ext)) = split_key(&e.name) else {
                    continue;
                };
                if e_ext.eq_ignore_ascii_case(ext) {
                    // A name stored twice in a tar: the later copy wins, as on extraction.
                    keys.insert(e.key.clone(), i);
                } else {
                    let e_ext = e_ext.to_ascii_lowercase();
                    if seen_exts.len() < 12 && !seen_exts.contains(&e_ext) {
                        seen_exts.push(e_ext);
                    }
                }
            }
            by_shard.insert(shard.rel.clone(), keys);
        }
        if !by_shard.is_empty() && by_shard.values().all(|k| k.is_empty()) {
            seen_exts.sort();
            return Err(EvalError::Usage(format!(
                "--labels {MEMBER_PREFIX}{ext}: none of the {} clean shard(s) holds a member \
                 with extension {ext} (extensions there: {})",
                by_shard.len(),
                seen_exts.join(", ")
            )));
        }
        Ok(MemberLabels {
            ext: ext.to_string(),
            by_shard,
        })
    }

    /// The label member of `item`'s sample, with the path that names it in messages
    /// (`<shard>/<member>`).
    fn find<'a>(&self, item: &'a InputItem) -> Result<(&'a TarEntry, PathBuf), EvalError> {
        let member = item.member.as_ref().expect("indexed items are tar members");
        let shard = &member.shard;
        let key = &shard.entries[member.entry].key;
        let found = self
            .by_shard
            .get(&shard.rel)
            .and_then(|keys| keys.get(key))
            .map(|&i| &shard.entries[i]);
        match found {
            Some(e) => Ok((e, shard.path.join(&e.name))),
            None => Err(EvalError::Labels {
                path: shard.path.join(format!("{key}.{}", self.ext)),
                reason: format!("no such member: the sample has no {} label", self.ext),
            }),
        }
    }

    /// Reads the label map of `item`'s sample: `(path, width, height, labels)`.
    pub fn read_map(
        &self,
        item: &InputItem,
    ) -> Result<(PathBuf, usize, usize, Vec<u32>), EvalError> {
        let (entry, path) = self.find(item)?;
        if entry.size > MAX_MAP_MEMBER_BYTES {
            return Err(EvalError::Labels {
                path,
                reason: format!("{} bytes: too large for a label map", entry.size),
            });
        }
        let bytes = read_bytes(item, entry, &path)?;
        let (w, h, labels) = read_label_png_bytes(&bytes, &path)?;
        Ok((path, w, h, labels))
    }

    /// Reads the class of `item`'s sample: a name from `names` or an index into it, as text.
    pub fn read_class(&self, item: &InputItem, names: &[String]) -> Result<usize, EvalError> {
        let (entry, path) = self.find(item)?;
        let bad = |reason: String| EvalError::Labels {
            path: path.clone(),
            reason,
        };
        if entry.size > MAX_CLASS_MEMBER_BYTES {
            return Err(bad(format!(
                "{} bytes: a class label member holds one class name or index",
                entry.size
            )));
        }
        let bytes = read_bytes(item, entry, &path)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| bad("not UTF-8 text".into()))?;
        class_index(text, names).map_err(bad)
    }
}

fn read_bytes(
    item: &InputItem,
    entry: &TarEntry,
    path: &std::path::Path,
) -> Result<Vec<u8>, EvalError> {
    let shard = &item.member.as_ref().expect("a tar member").shard;
    read_member(&shard.path, entry.offset, entry.size).map_err(|e| EvalError::Labels {
        path: path.to_path_buf(),
        reason: format!("cannot read: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_member_specs_and_paths() {
        assert_eq!(
            LabelSource::parse("member:seg.png"),
            Ok(LabelSource::Member("seg.png".into()))
        );
        assert_eq!(
            LabelSource::parse("member:.cls"),
            Ok(LabelSource::Member("cls".into()))
        );
        assert_eq!(
            LabelSource::parse("ade/annotations"),
            Ok(LabelSource::Path("ade/annotations".into()))
        );
        for bad in [
            "member:",
            "member:.",
            "member:a/b",
            "member:PNG",
            "member:jpg",
        ] {
            assert!(LabelSource::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            LabelSource::Member("cls".into()).describe(),
            "member:cls".to_string()
        );
    }
}
