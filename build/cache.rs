//! A content-addressed cache of compiled kernels, shared by the builds of one profile.
//!
//! `cargo test --release` and `cargo clippy --release` run this build script in different
//! `OUT_DIR`s (clippy compiles the script itself, so its fingerprint differs), and each run used
//! to compile every kernel again: over two minutes on two cores, twice in every CI run. Here an
//! entry is a directory `target/<profile>/prm-kernel-cache/<key>/` holding one compile's outputs;
//! its key hashes everything that compile reads:
//!
//! - the file it compiles (its bytes: [`KeyParts::contents`]);
//! - every other file under `kernels/` but the other `.cu` files (each `.cu` is its own
//!   translation unit and none includes another) and the notes (`.md`): the headers and the
//!   simulator's runtime, so a header change misses every entry and a kernel change its own;
//! - the compiler's identity (path, size and modification time of its binaries, and of every
//!   header under the CUDA toolkit's `include/`);
//! - the job's full argument list.
//!
//! An entry is written to a temporary directory and renamed into place, so a build that dies
//! half way leaves no entry that looks complete. At the end of a build every entry it did not
//! use is removed, so the cache holds one build's worth (about 50 MB) rather than one per edit.
//! `PRM_KERNEL_CACHE=0` turns it off.
//!
//! The hash is std's `DefaultHasher` (SipHash with fixed keys) run twice with different
//! prefixes, 128 bits: stable for a given toolchain, which is all a cache needs (a new rustc at
//! worst misses once).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct KernelCache {
    /// `None` when the cache is off or `OUT_DIR` is not where cargo normally puts it.
    dir: Option<PathBuf>,
    /// The hash of the files under `kernels/` that every compile may read (all but `.cu` and
    /// `.md`: their relative paths and bytes, in sorted order), taken once.
    shared: u128,
    used: Mutex<BTreeSet<String>>,
}

/// What goes into a key besides the shared files: the file compiled, the compiler's identity
/// and its arguments.
#[derive(Default, Clone)]
pub struct KeyParts(Vec<Vec<u8>>);

impl KeyParts {
    pub fn text(mut self, s: impl AsRef<OsStr>) -> Self {
        self.0.push(s.as_ref().as_encoded_bytes().to_vec());
        self
    }

    /// A file's bytes, under a name that is the same in every build (a file generated into
    /// `OUT_DIR` has another path in each). An unreadable file counts as empty; its compile
    /// fails anyway.
    pub fn contents(self, name: impl AsRef<OsStr>, path: &Path) -> Self {
        let mut parts = self.text(name);
        parts.0.push(std::fs::read(path).unwrap_or_default());
        parts
    }

    /// A binary's identity without reading it: path, size and modification time (a compiler
    /// upgrade changes at least one). A missing file counts as its path alone.
    pub fn binary(self, path: &Path) -> Self {
        let stamp = std::fs::metadata(path)
            .map(|m| format!("{} bytes, modified {}", m.len(), modified_ns(&m)))
            .unwrap_or_else(|_| "absent".into());
        self.text(path).text(stamp)
    }

    /// The identity of every file under a directory (a toolkit's `include/`, several thousand
    /// headers), as [`KeyParts::binary`] takes one: relative paths, sizes and modification
    /// times, in sorted order, folded into one part. Symbolic links are followed (to 16 levels
    /// down, so a link to a parent ends); a missing directory counts as its path alone.
    pub fn tree(self, dir: &Path) -> Self {
        let mut files: Vec<(PathBuf, u64, u128)> = files_under(dir)
            .into_iter()
            .filter_map(|path| {
                let meta = std::fs::metadata(&path).ok()?;
                let relative = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
                Some((relative, meta.len(), modified_ns(&meta)))
            })
            .collect();
        files.sort();
        let mut hasher = DefaultHasher::new();
        files.hash(&mut hasher);
        self.text(dir).text(format!(
            "{} files, identity {:016x}",
            files.len(),
            hasher.finish()
        ))
    }
}

impl KernelCache {
    pub fn open(out_dir: &Path, kernels_dir: &Path) -> Self {
        println!("cargo:rerun-if-env-changed=PRM_KERNEL_CACHE");
        let off = std::env::var("PRM_KERNEL_CACHE").is_ok_and(|v| v == "0");
        // OUT_DIR is <target>/<profile>/build/<package>-<hash>/out.
        let profile_dir = out_dir
            .parent()
            .and_then(Path::parent)
            .filter(|build| build.file_name() == Some(OsStr::new("build")))
            .and_then(Path::parent);
        let dir = (!off)
            .then_some(profile_dir)
            .flatten()
            .map(|p| p.join("prm-kernel-cache"));
        // Every file under kernels/ but the `.cu` files (each its own translation unit, keyed
        // by itself) and the notes (`.md`): (path relative to kernels/, bytes).
        let mut files: Vec<(String, Vec<u8>)> = files_under(kernels_dir)
            .into_iter()
            .filter(|p| !p.extension().is_some_and(|x| x == "cu" || x == "md"))
            .filter_map(|path| {
                let bytes = std::fs::read(&path).ok()?;
                let rel = path.strip_prefix(kernels_dir).unwrap_or(&path);
                Some((rel.to_string_lossy().into_owned(), bytes))
            })
            .collect();
        files.sort();
        KernelCache {
            dir,
            shared: hash128(&files),
            used: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn key(&self, parts: &KeyParts) -> String {
        format!("{:032x}", hash128(&(self.shared, &parts.0)))
    }

    /// The entry's directory when it is complete; marks it used either way, so a fresh entry
    /// stored under this key survives the prune.
    pub fn get(&self, key: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?.join(key);
        self.used.lock().unwrap().insert(key.to_string());
        dir.is_dir().then_some(dir)
    }

    /// Stores `files` (name in the entry, file to copy) under `key`. A failure only costs the
    /// next build a compile, so it is a warning.
    pub fn put(&self, key: &str, files: &[(&str, &Path)]) {
        let Some(root) = &self.dir else { return };
        let done = root.join(key);
        let tmp = root.join(format!("{key}.tmp-{}", std::process::id()));
        let stored = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(&tmp)?;
            for (name, from) in files {
                std::fs::copy(from, tmp.join(name))?;
            }
            std::fs::remove_dir_all(&done).ok();
            std::fs::rename(&tmp, &done)
        })();
        if let Err(e) = stored {
            std::fs::remove_dir_all(&tmp).ok();
            println!("cargo:warning=kernel cache: could not store {key}: {e}");
        }
    }

    /// Removes every entry this build did not ask for (older kernel versions, other flags).
    pub fn prune(&self) {
        let Some(root) = &self.dir else { return };
        let used = self.used.lock().unwrap();
        let Ok(entries) = std::fs::read_dir(root) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            if !used.contains(entry.file_name().to_string_lossy().as_ref()) {
                std::fs::remove_dir_all(entry.path()).ok();
            }
        }
    }
}

/// 128 bits: std's hasher twice, with different prefixes.
fn hash128(value: &impl Hash) -> u128 {
    let half = |salt: &str| {
        let mut h = DefaultHasher::new();
        salt.hash(&mut h);
        value.hash(&mut h);
        h.finish()
    };
    (u128::from(half("prm-kernel-cache/a")) << 64) | u128::from(half("prm-kernel-cache/b"))
}

/// Every file under `dir`, as paths. Symbolic links are followed, to 16 levels down (so a link
/// to a parent ends); what cannot be read is left out.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) {
        if depth > 16 {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, depth + 1, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, 0, &mut out);
    out
}

/// A file's modification time in nanoseconds since the epoch (0 where the system has none).
fn modified_ns(meta: &std::fs::Metadata) -> u128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}
