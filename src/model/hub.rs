//! Models already in the local Hugging Face cache, named by their hub id: `--model
//! openai/clip-vit-base-patch16` (or open_clip's spelling, `hf-hub:laion/CLIP-ViT-H-14-...`)
//! finds the snapshot that `hf download` or `transformers` left in the cache, so a user need
//! not spell out `~/.cache/huggingface/hub/models--openai--.../snapshots/<commit>/`. Nothing is
//! ever downloaded: a model that is not in the cache gets an error with the command that
//! fetches it.
//!
//! The cache is found as `huggingface_hub` finds it: `$HF_HUB_CACHE`, else
//! `$HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//! `~/.cache/huggingface/hub`. In it, `models--{owner}--{name}/refs/{revision}` holds the commit
//! whose files are in `snapshots/{commit}/`.

use std::path::{Path, PathBuf};

use super::load::ModelError;

/// A hub id parsed from a model spec: owner, name and the revision asked for, if any.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct HubId<'a> {
    owner: &'a str,
    name: &'a str,
    revision: Option<&'a str>,
}

impl<'a> HubId<'a> {
    /// `owner/name[@revision]`, optionally under `hf-hub:`; `None` for anything else (a path of
    /// more or fewer components, or with characters a hub id does not have).
    pub(crate) fn parse(spec: &'a str) -> Option<Self> {
        let spec = spec.strip_prefix("hf-hub:").unwrap_or(spec);
        let (id, revision) = match spec.split_once('@') {
            Some((id, rev)) => (id, Some(rev)),
            None => (spec, None),
        };
        let (owner, name) = id.split_once('/')?;
        let part = |s: &str| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let revision_ok = revision.is_none_or(|r| part(r) || r.split('/').all(part));
        (part(owner) && part(name) && revision_ok).then_some(HubId {
            owner,
            name,
            revision,
        })
    }

    fn display(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }
}

/// The cache directory `huggingface_hub` uses, from the environment (see the module docs).
pub(crate) fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return Some(p);
    }
    let home = var("HF_HOME").or_else(|| {
        let cache = var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache")))?;
        Some(cache.join("huggingface"))
    })?;
    Some(home.join("hub"))
}

/// The snapshot directory of `id` in the cache at `cache`.
pub(crate) fn snapshot(id: &HubId<'_>, cache: &Path) -> Result<PathBuf, ModelError> {
    let repo = cache.join(format!("models--{}--{}", id.owner, id.name));
    let missing = |reason: String| ModelError::NotInHubCache {
        id: id.display(),
        cache: cache.to_path_buf(),
        reason,
    };
    if !repo.is_dir() {
        return Err(missing(format!("no {}", repo.display())));
    }
    let snapshots = repo.join("snapshots");
    let mut commits: Vec<String> = std::fs::read_dir(&snapshots)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    commits.sort();
    let read_ref = |r: &str| {
        std::fs::read_to_string(repo.join("refs").join(r))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let commit = match id.revision {
        // A branch or tag the cache recorded, else a commit hash or a prefix of one.
        Some(rev) => match read_ref(rev) {
            Some(c) => c,
            None => {
                let found: Vec<&String> = commits.iter().filter(|c| c.starts_with(rev)).collect();
                match found.as_slice() {
                    [one] => (*one).clone(),
                    [] => {
                        return Err(missing(format!(
                            "no ref `{rev}` and no snapshot whose commit starts with it (snapshots: {})",
                            list(&commits)
                        )))
                    }
                    several => {
                        return Err(missing(format!(
                            "`{rev}` starts several snapshots' commits ({}); give more of it",
                            several.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                        )))
                    }
                }
            }
        },
        // The default branch, or the only snapshot when the cache has no ref for it.
        None => match (read_ref("main"), commits.as_slice()) {
            (Some(c), _) => c,
            (None, [one]) => one.clone(),
            (None, []) => return Err(missing(format!("no snapshot in {}", snapshots.display()))),
            (None, _) => {
                return Err(missing(format!(
                    "no refs/main and several snapshots ({}); name one as {}@COMMIT",
                    list(&commits),
                    id.display()
                )))
            }
        },
    };
    let dir = snapshots.join(&commit);
    if !dir.is_dir() {
        return Err(missing(format!(
            "the ref names commit {commit}, whose snapshot {} is not there",
            dir.display()
        )));
    }
    Ok(dir)
}

fn list(commits: &[String]) -> String {
    if commits.is_empty() {
        "none".to_string()
    } else {
        commits.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_parse_and_paths_do_not() {
        let id = |o, n, r| {
            Some(HubId {
                owner: o,
                name: n,
                revision: r,
            })
        };
        assert_eq!(
            HubId::parse("openai/clip-vit-base-patch16"),
            id("openai", "clip-vit-base-patch16", None)
        );
        assert_eq!(
            HubId::parse("hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
            id("laion", "CLIP-ViT-H-14-laion2B-s32B-b79K", None)
        );
        assert_eq!(
            HubId::parse("openai/clip-vit-large-patch14@3d74acf"),
            id("openai", "clip-vit-large-patch14", Some("3d74acf"))
        );
        for path in [
            "model.safetensors",
            "./a/b",
            "../a/b",
            "/abs/path",
            "a/b/c",
            "a/",
            "/b",
            "a b/c",
            "a/b@",
            "C:\\models\\x",
        ] {
            assert_eq!(HubId::parse(path), None, "{path}");
        }
    }

    fn fake_repo(cache: &Path, repo: &str, commits: &[&str], main: Option<&str>) -> PathBuf {
        let dir = cache.join(repo);
        for c in commits {
            std::fs::create_dir_all(dir.join("snapshots").join(c)).unwrap();
        }
        if let Some(m) = main {
            std::fs::create_dir_all(dir.join("refs")).unwrap();
            std::fs::write(dir.join("refs/main"), format!("{m}\n")).unwrap();
        }
        dir
    }

    #[test]
    fn snapshots_follow_refs_commits_and_prefixes() {
        let cache = tempfile::tempdir().unwrap();
        let c = cache.path();
        let repo = fake_repo(
            c,
            "models--o--n",
            &["aaaa1111", "bbbb2222"],
            Some("bbbb2222"),
        );
        let id = HubId::parse("o/n").unwrap();
        assert_eq!(snapshot(&id, c).unwrap(), repo.join("snapshots/bbbb2222"));
        let at = |r| snapshot(&HubId::parse(r).unwrap(), c);
        assert_eq!(at("o/n@aaaa").unwrap(), repo.join("snapshots/aaaa1111"));
        assert_eq!(at("o/n@main").unwrap(), repo.join("snapshots/bbbb2222"));
        let e = at("o/n@cccc").unwrap_err().to_string();
        assert!(
            e.contains("no ref `cccc`") && e.contains("aaaa1111, bbbb2222"),
            "{e}"
        );
        fake_repo(c, "models--o--n", &["aaaa3333"], None);
        let e = at("o/n@aaaa").unwrap_err().to_string();
        assert!(e.contains("several"), "{e}");

        // Without refs/main: the only snapshot, or an error naming them.
        let repo = fake_repo(c, "models--o--one", &["cafe"], None);
        assert_eq!(at("o/one").unwrap(), repo.join("snapshots/cafe"));
        fake_repo(c, "models--o--two", &["cafe", "f00d"], None);
        let e = at("o/two").unwrap_err().to_string();
        assert!(
            e.contains("no refs/main") && e.contains("o/two@COMMIT"),
            "{e}"
        );
        // A ref to a snapshot that is not there, and a model not in the cache.
        fake_repo(c, "models--o--gone", &[], Some("dead"));
        let e = at("o/gone").unwrap_err().to_string();
        assert!(e.contains("commit dead"), "{e}");
        let e = at("o/absent").unwrap_err().to_string();
        assert!(
            e.contains("models--o--absent") && e.contains("hf download o/absent"),
            "{e}"
        );
    }
}
