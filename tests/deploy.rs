//! The shipped cluster examples: the Slurm array script (`bash -n` and a dry run with a stub prm
//! and faked Slurm variables) and the Kubernetes Indexed Job (parsed and checked field by field).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const SBATCH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/slurm/prm-array.sbatch");
const JOB_YAML: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/k8s/prm-indexed-job.yaml"
);

#[test]
fn sbatch_script_parses() {
    let o = Command::new("bash").arg("-n").arg(SBATCH).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn sbatch_directives() {
    let text = std::fs::read_to_string(SBATCH).unwrap();
    let directives: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("#SBATCH "))
        .map(str::trim)
        .collect();
    for want in ["--array=0-7", "--gres=gpu:1", "--ntasks=1"] {
        assert!(directives.contains(&want), "missing #SBATCH {want}");
    }
    assert!(text.contains("${PRM:-prm}"));
    assert!(text.contains("--device cuda"));
    assert!(
        !text.contains("--shard "),
        "the shard comes from the environment"
    );
}

/// Writes a stub `prm` that prints its arguments and the Slurm shard variables.
fn stub(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("prm-stub");
    std::fs::write(
        &path,
        "#!/bin/sh\necho \"ARGS: $*\"\necho \"SHARD: ${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT} min ${SLURM_ARRAY_TASK_MIN}\"\n",
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    path
}

fn dry_run(env: &[(&str, &str)], extra: &[&str]) -> std::process::Output {
    let tmp = tempfile::tempdir().unwrap();
    let prm = stub(tmp.path());
    let mut cmd = Command::new("bash");
    cmd.arg(SBATCH).args(extra).env("PRM", &prm);
    for v in ["MODEL", "INPUT", "OUT"] {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().copied()).output().unwrap()
}

#[test]
fn sbatch_dry_run_reaches_prm_with_the_slurm_environment() {
    let o = dry_run(
        &[
            ("MODEL", "random:tiny"),
            ("INPUT", "/data/in"),
            ("OUT", "/data/out dir"),
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
        ],
        &["--preset", "pgd", "--steps", "2"],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains(
            "ARGS: attack --model random:tiny --input /data/in --output /data/out dir \
             --device cuda --preset pgd --steps 2"
        ),
        "{out}"
    );
    assert!(out.contains("SHARD: 3/8 min 0"), "{out}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("array task 3 of 8"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn sbatch_dry_run_refuses_missing_settings() {
    let o = dry_run(&[("MODEL", "random:tiny"), ("INPUT", "/data/in")], &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("OUT"));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("ARGS"));
}

/// A parse of the block-style YAML subset the example uses: every `key: value` by its dotted path
/// (list items share their list's path), and every scalar list item under its list's path.
#[derive(Default, Debug)]
struct Yaml {
    values: BTreeMap<String, Vec<String>>,
    items: BTreeMap<String, Vec<String>>,
}

fn unquote(s: &str) -> String {
    s.trim().trim_matches('"').trim_matches('\'').to_string()
}

fn parse_yaml(text: &str) -> Yaml {
    let mut y = Yaml::default();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let path = |stack: &[(usize, String)]| {
        stack
            .iter()
            .map(|(_, k)| k.as_str())
            .collect::<Vec<_>>()
            .join(".")
    };
    for raw in text.lines() {
        assert!(!raw.contains('\t'), "tab in YAML: {raw:?}");
        let line = raw.split(" #").next().unwrap().trim_end();
        let content = line.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let mut indent = line.len() - content.len();
        let mut content = content;
        if let Some(rest) = content.strip_prefix("- ") {
            while stack.last().is_some_and(|(i, _)| *i > indent) {
                stack.pop();
            }
            if !rest.contains(": ") && !rest.ends_with(':') {
                y.items.entry(path(&stack)).or_default().push(unquote(rest));
                continue;
            }
            indent += 2;
            content = rest;
        }
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        let (key, value) = match content.split_once(": ") {
            Some((k, v)) => (k.trim().to_string(), v.trim()),
            None => (content.trim_end_matches(':').to_string(), ""),
        };
        if value.is_empty() {
            stack.push((indent, key));
        } else {
            let mut p = path(&stack);
            if !p.is_empty() {
                p.push('.');
            }
            p.push_str(&key);
            y.values.entry(p).or_default().push(unquote(value));
        }
    }
    y
}

impl Yaml {
    fn one(&self, path: &str) -> &str {
        match self.values.get(path).map(Vec::as_slice) {
            Some([v]) => v,
            other => panic!("{path}: expected one value, got {other:?}"),
        }
    }
}

#[test]
fn yaml_parser_reads_the_subset() {
    let y = parse_yaml(
        "a:\n  b: 1\n  c:\n    - x\n    - \"y\"\n  d:\n  - name: n\n    v: 2\ne: f # note\n",
    );
    assert_eq!(y.one("a.b"), "1");
    assert_eq!(y.items["a.c"], vec!["x", "y"]);
    assert_eq!(y.one("a.d.name"), "n");
    assert_eq!(y.one("a.d.v"), "2");
    assert_eq!(y.one("e"), "f");
}

#[test]
fn k8s_indexed_job_is_valid() {
    let y = parse_yaml(&std::fs::read_to_string(JOB_YAML).unwrap());
    assert_eq!(y.one("apiVersion"), "batch/v1");
    assert_eq!(y.one("kind"), "Job");
    assert!(!y.one("metadata.name").is_empty());
    assert_eq!(y.one("spec.completionMode"), "Indexed");
    let completions: u64 = y.one("spec.completions").parse().unwrap();
    let parallelism: u64 = y.one("spec.parallelism").parse().unwrap();
    assert!(completions >= 1 && (1..=completions).contains(&parallelism));
    // Job pods must not restart in place (Always is invalid for a Job).
    assert!(["Never", "OnFailure"].contains(&y.one("spec.template.spec.restartPolicy")));

    let c = "spec.template.spec.containers";
    assert!(!y.one(&format!("{c}.image")).is_empty());
    assert_eq!(y.one(&format!("{c}.resources.limits.nvidia.com/gpu")), "1");
    let args = &y.items[&format!("{c}.args")];
    assert_eq!(args[0], "attack");
    let flag = |name: &str| {
        let i = args
            .iter()
            .position(|a| a == name)
            .unwrap_or_else(|| panic!("args lack {name}: {args:?}"));
        args[i + 1].as_str()
    };
    assert_eq!(
        flag("--shards").parse::<u64>().unwrap(),
        completions,
        "--shards must equal spec.completions"
    );
    assert!(!args.iter().any(|a| a == "--shard"));
    assert_eq!(flag("--device"), "cuda");

    // One shared PVC, mounted where --input and --output point.
    let vol = y.one("spec.template.spec.volumes.name");
    assert!(!y
        .one("spec.template.spec.volumes.persistentVolumeClaim.claimName")
        .is_empty());
    assert_eq!(y.one(&format!("{c}.volumeMounts.name")), vol);
    let mount = y.one(&format!("{c}.volumeMounts.mountPath"));
    for f in ["--input", "--output", "--model"] {
        assert!(
            flag(f).starts_with(&format!("{mount}/")),
            "{f} {} is not on the shared volume {mount}",
            flag(f)
        );
    }
}
