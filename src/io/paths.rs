//! Paths as the file system will see them, for checks made before any work: whether two spellings
//! name one file (`out/../out/x.png`, a symlinked directory), and whether a file can be written
//! where a flag says.

use std::path::{Component, Path, PathBuf};

/// `path` made absolute, with its longest existing ancestor canonicalised (symlinks and `..`
/// resolved by the file system, so `link/..` is the link target's parent) and the rest, which
/// does not exist yet, appended with `.` and `..` folded. Two paths that will name the same file
/// once written compare equal.
pub fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut rest = Vec::new();
    let mut base = absolute.as_path();
    let mut out = loop {
        if let Ok(real) = base.canonicalize() {
            break real;
        }
        // The last component waits (a `..` too: applied to the real parent below, as the
        // file system would); the walk ends at the root, which always canonicalises.
        match base.parent() {
            Some(parent) => {
                rest.extend(base.components().next_back());
                base = parent;
            }
            None => break base.to_path_buf(),
        }
    };
    for c in rest.into_iter().rev() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Checks, before any work, that a file can be written at `path` at the end of a run: it is not
/// a directory, no ancestor of it is a file, and the nearest existing ancestor takes new files
/// (tried with an unnamed temporary file, which leaves nothing behind). The message says which.
pub fn check_file_writable(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        return Err(format!("{} is a directory; give a file", path.display()));
    }
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut ancestor = absolute.parent();
    while let Some(dir) = ancestor {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {
                return tempfile::tempfile_in(dir).map(drop).map_err(|e| {
                    format!(
                        "{}: cannot write in {} ({e})",
                        path.display(),
                        dir.display()
                    )
                });
            }
            Ok(_) => {
                return Err(format!(
                    "{}: {} is a file, not a directory",
                    path.display(),
                    dir.display()
                ))
            }
            Err(_) => ancestor = dir.parent(),
        }
    }
    Ok(())
}

/// Checks, before any work, that `dir` can be an output directory: it is not an existing file
/// and lies under none. Every file written into it would otherwise fail ("File exists") and the
/// run would lose every result. The message names the flag and says which.
pub fn check_output_dir(flag: &str, dir: &Path) -> Result<(), String> {
    let not_dir = |what: String| {
        Err(format!(
            "{flag} {}: {what}; give a directory (it is created if missing)",
            dir.display()
        ))
    };
    if dir.exists() && !dir.is_dir() {
        return not_dir("not a directory (a file of that name exists)".into());
    }
    let mut up = dir.parent();
    while let Some(p) = up {
        if !p.as_os_str().is_empty() && p.exists() {
            if !p.is_dir() {
                return not_dir(format!("not a directory ({} is a file)", p.display()));
            }
            break;
        }
        up = p.parent();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_file_resolve_alike() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("out");
        std::fs::create_dir(&dir).unwrap();
        let a = resolved(&dir.join("x.png"));
        assert_eq!(resolved(&dir.join("../out/./x.png")), a);
        assert_eq!(resolved(&dir.join("new/../x.png")), a);
        #[cfg(unix)]
        {
            let link = t.path().join("link");
            std::os::unix::fs::symlink(&dir, &link).unwrap();
            assert_eq!(resolved(&link.join("x.png")), a);
        }
        assert!(resolved(&dir.join("sub/y.png")).starts_with(resolved(&dir)));
    }

    #[test]
    fn unwritable_places_are_named() {
        let t = tempfile::tempdir().unwrap();
        assert!(check_file_writable(&t.path().join("new/dirs/plot.png")).is_ok());
        let err = check_file_writable(t.path()).unwrap_err();
        assert!(err.contains("is a directory"), "{err}");
        let file = t.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let err = check_file_writable(&file.join("plot.png")).unwrap_err();
        assert!(err.contains("is a file"), "{err}");
    }
}
