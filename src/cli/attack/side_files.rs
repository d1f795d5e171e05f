//! The files `prm attack` writes beside its images (`--plot`, `--profile`,
//! `--device-timeline`), checked before any work.

use std::path::PathBuf;

use anyhow::bail;
use prm::attack::{AttackSettings, Init};
use prm::io::OutputLayout;

use super::AttackArgs;

/// The files written beside the images (`--plot` and the JSON of its numbers, `--profile`,
/// `--device-timeline`), checked before any work: each must be writable (they are written at
/// the end, when a campaign of days would learn it too late), none may replace the run's record,
/// its manifest, one of its images or another of them; and `--init from:` must not be the
/// output directory, whose images the run would overwrite while starting from them (and a
/// resume would take as done).
pub(super) fn check_side_files(
    args: &AttackArgs,
    settings: &AttackSettings,
    items: &[prm::io::inputs::InputItem],
    layout: OutputLayout,
) -> anyhow::Result<()> {
    use prm::io::paths::{check_file_writable, resolved};
    if let Init::From(dir) = &settings.init {
        if resolved(dir) == resolved(&args.output) {
            bail!(
                "--init from:{} is the --output directory: the attack would overwrite the images \
                 it starts from; give another --output",
                dir.display()
            );
        }
    }
    let mut side: Vec<(String, PathBuf)> = Vec::new();
    if let Some(p) = &args.plot {
        side.push(("--plot".into(), p.clone()));
        side.push(("--plot's numbers".into(), p.with_extension("json")));
    }
    if let Some(Some(p)) = args.profile_file() {
        side.push(("--profile".into(), p.clone()));
    }
    if let Some(p) = &args.device_timeline {
        side.push(("--device-timeline".into(), p.clone()));
    }
    if side.is_empty() {
        return Ok(());
    }
    let out = &args.output;
    let mut taken: std::collections::HashMap<PathBuf, String> = [
        ("the run record", prm::io::run_record::RUN_RECORD_FILE),
        ("the manifest", prm::io::manifest::MANIFEST_FILE),
    ]
    .iter()
    .map(|(what, f)| {
        let place = format!("{what} {f} in {}", out.display());
        (resolved(&out.join(f)), place)
    })
    .collect();
    let resolved_out = resolved(out);
    if side
        .iter()
        .any(|(_, p)| resolved(p).starts_with(&resolved_out))
    {
        for item in items {
            for rel in [layout.output_rel(item), layout.file_rel(item)] {
                let png = resolved(&out.join(&rel));
                let place = format!("the output of {} in {}", item.rel, out.display());
                taken.insert(png.with_extension("safetensors"), place.clone());
                taken.insert(png, place);
            }
        }
    }
    // The clean inputs: only those with a side file's name are resolved, so that a campaign of
    // a million images pays nothing for this.
    let names: std::collections::HashSet<&std::ffi::OsStr> =
        side.iter().filter_map(|(_, p)| p.file_name()).collect();
    for item in items {
        if item.path.file_name().is_some_and(|n| names.contains(n)) {
            taken.insert(
                resolved(&item.path),
                format!("the clean input {}", item.rel),
            );
        }
    }
    let input_dir = args.input.is_dir().then(|| resolved(&args.input));
    for (flag, path) in &side {
        check_file_writable(path).map_err(|e| anyhow::anyhow!("{flag} {e}"))?;
        let r = resolved(path);
        if let Some(what) = taken.get(&r) {
            bail!(
                "{flag} {} would replace {what}; give another path",
                path.display()
            );
        }
        // A plot inside the input directory is an image the next run would attack.
        let image = r.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            prm::io::inputs::IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
        });
        if let Some(dir) = &input_dir {
            if image && r.starts_with(dir) && !r.starts_with(&resolved_out) {
                bail!(
                    "{flag} {} lies in the input directory {}, where the next run would take \
                     it for an input image; give a path outside it",
                    path.display(),
                    args.input.display()
                );
            }
        }
        taken.insert(r, flag.clone());
    }
    // The plot's numbers are a file the user did not name: they may replace an earlier plot's,
    // never another file.
    if let Some(p) = &args.plot {
        let numbers = p.with_extension("json");
        if numbers.is_file() {
            let earlier: Option<serde_json::Value> = std::fs::read(&numbers)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let is_plot =
                earlier.is_some_and(|v| v.get("points").is_some() && v.get("shown").is_some());
            if !is_plot {
                bail!(
                    "--plot {} writes its numbers to {}, which holds another file; give the plot \
                     another name",
                    p.display(),
                    numbers.display()
                );
            }
        }
    }
    Ok(())
}
