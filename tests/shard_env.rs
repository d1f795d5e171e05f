//! Sharding: K/N from the scheduler's environment (faked), the partition property, and three
//! real shard runs into one shared output directory merged with `prm manifest merge`, compared
//! with an unsharded run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use prm::io::shard::{shard_from_env, Shard, ShardSource};

/// The scheduler variables `shard_from_env` reads; removed from child processes.
const SCHED_VARS: &[&str] = &[
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_STEP",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "JOB_COMPLETION_INDEX",
];

fn from(
    flag: Option<&str>,
    shards: Option<u64>,
    vars: &[(&str, &str)],
) -> Result<Option<(Shard, ShardSource)>, String> {
    let env: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let flag = flag.map(|f| Shard::parse(f).unwrap());
    // The messages are what a user reads, so the tests check their text.
    shard_from_env(flag, shards, &|k| env.get(k).cloned()).map_err(|e| e.to_string())
}

fn sh(index: u64, count: u64) -> Shard {
    Shard { index, count }
}

#[test]
fn no_flag_no_env_means_everything() {
    assert_eq!(from(None, None, &[]), Ok(None));
    // A single Slurm task is not a sharded run.
    assert_eq!(
        from(None, None, &[("SLURM_NTASKS", "1"), ("SLURM_PROCID", "0")]),
        Ok(None)
    );
}

#[test]
fn every_source() {
    assert_eq!(
        from(Some("1/4"), None, &[]),
        Ok(Some((sh(1, 4), ShardSource::Flag)))
    );
    assert_eq!(
        from(
            None,
            None,
            &[
                ("SLURM_ARRAY_TASK_ID", "2"),
                ("SLURM_ARRAY_TASK_COUNT", "8")
            ]
        ),
        Ok(Some((sh(2, 8), ShardSource::SlurmArray)))
    );
    assert_eq!(
        from(None, None, &[("SLURM_PROCID", "3"), ("SLURM_NTASKS", "4")]),
        Ok(Some((sh(3, 4), ShardSource::SlurmTasks)))
    );
    assert_eq!(
        from(None, Some(5), &[("JOB_COMPLETION_INDEX", "4")]),
        Ok(Some((sh(4, 5), ShardSource::KubernetesIndexedJob)))
    );
    assert_eq!(ShardSource::SlurmArray.describe(), "SLURM_ARRAY_TASK_ID");
    assert_eq!(ShardSource::Flag.describe(), "--shard");
}

#[test]
fn array_ids_are_offset_by_min() {
    // `#SBATCH --array=1-8`: ids 1..=8, count 8.
    let vars = |id: &'static str| {
        [
            ("SLURM_ARRAY_TASK_ID", id),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
        ]
    };
    assert_eq!(
        from(None, None, &vars("1")),
        Ok(Some((sh(0, 8), ShardSource::SlurmArray)))
    );
    assert_eq!(
        from(None, None, &vars("8")),
        Ok(Some((sh(7, 8), ShardSource::SlurmArray)))
    );
    // Without MIN, id 8 of 8 is out of range.
    let err = from(
        None,
        None,
        &[
            ("SLURM_ARRAY_TASK_ID", "8"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
        ],
    )
    .unwrap_err();
    assert!(err.contains("not below"), "{err}");
    // An id below MIN.
    let err = from(
        None,
        None,
        &[
            ("SLURM_ARRAY_TASK_ID", "0"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
        ],
    )
    .unwrap_err();
    assert!(err.contains("SLURM_ARRAY_TASK_MIN"), "{err}");
}

#[test]
fn precedence() {
    let all = [
        ("SLURM_ARRAY_TASK_ID", "1"),
        ("SLURM_ARRAY_TASK_COUNT", "2"),
        ("SLURM_PROCID", "2"),
        ("SLURM_NTASKS", "3"),
        ("JOB_COMPLETION_INDEX", "3"),
    ];
    assert_eq!(
        from(Some("0/7"), None, &all),
        Ok(Some((sh(0, 7), ShardSource::Flag)))
    );
    // The array wins over a Kubernetes index (SLURM_NTASKS > 1 alongside an array is an
    // error: see `array_with_several_tasks_or_a_step_is_refused`).
    let array_and_k8s = [all[0], all[1], all[4]];
    assert_eq!(
        from(None, None, &array_and_k8s),
        Ok(Some((sh(1, 2), ShardSource::SlurmArray)))
    );
    // One task alongside the array is not a conflict.
    let one_task = [all[0], all[1], ("SLURM_NTASKS", "1"), ("SLURM_PROCID", "0")];
    assert_eq!(
        from(None, None, &one_task),
        Ok(Some((sh(1, 2), ShardSource::SlurmArray)))
    );
    assert_eq!(
        from(None, None, &all[2..]),
        Ok(Some((sh(2, 3), ShardSource::SlurmTasks)))
    );
    assert_eq!(
        from(None, Some(4), &all[4..]),
        Ok(Some((sh(3, 4), ShardSource::KubernetesIndexedJob)))
    );
}

#[test]
fn array_with_several_tasks_or_a_step_is_refused() {
    let array = [
        ("SLURM_ARRAY_TASK_ID", "0"),
        ("SLURM_ARRAY_TASK_COUNT", "2"),
    ];
    // `srun -n 2` inside an array element: both tasks would take shard 0/2.
    for procid in ["0", "1"] {
        let vars = [
            array[0],
            array[1],
            ("SLURM_NTASKS", "2"),
            ("SLURM_PROCID", procid),
        ];
        let err = from(None, None, &vars).unwrap_err();
        assert!(
            err.contains("SLURM_NTASKS=2") && err.contains("--ntasks=1") && err.contains("--shard"),
            "{err}"
        );
    }
    // `--array=0-6:2`: ids 0, 2, 4, 6, count 4.
    let err = from(
        None,
        None,
        &[
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ],
    )
    .unwrap_err();
    assert!(
        err.contains("SLURM_ARRAY_TASK_STEP is 2") && err.contains("--array=0-7"),
        "{err}"
    );
    let err = from(
        None,
        None,
        &[array[0], array[1], ("SLURM_ARRAY_TASK_STEP", "x")],
    )
    .unwrap_err();
    assert!(err.contains("SLURM_ARRAY_TASK_STEP='x'"), "{err}");
    // A step of 1 (what Slurm sets for `--array=0-7`) is fine.
    assert_eq!(
        from(
            None,
            None,
            &[array[0], array[1], ("SLURM_ARRAY_TASK_STEP", "1")]
        ),
        Ok(Some((sh(0, 2), ShardSource::SlurmArray)))
    );
    // An explicit --shard overrides the environment, so the hint in the message works.
    let vars = [
        array[0],
        array[1],
        ("SLURM_NTASKS", "2"),
        ("SLURM_PROCID", "1"),
    ];
    assert_eq!(
        from(Some("1/4"), None, &vars),
        Ok(Some((sh(1, 4), ShardSource::Flag)))
    );
}

/// `--shard`, `--shards`, the environment, and a fragment of the expected message.
type ErrorCase<'a> = (
    Option<&'a str>,
    Option<u64>,
    &'a [(&'a str, &'a str)],
    &'a str,
);

#[test]
fn errors() {
    let cases: &[ErrorCase] = &[
        // Kubernetes without --shards.
        (None, None, &[("JOB_COMPLETION_INDEX", "0")], "--shards"),
        // Index not below count.
        (None, Some(2), &[("JOB_COMPLETION_INDEX", "2")], "not below"),
        (
            None,
            None,
            &[("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4")],
            "not below",
        ),
        // Not numbers.
        (
            None,
            None,
            &[
                ("SLURM_ARRAY_TASK_ID", "x"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
            "SLURM_ARRAY_TASK_ID='x'",
        ),
        (
            None,
            None,
            &[
                ("SLURM_ARRAY_TASK_ID", "1"),
                ("SLURM_ARRAY_TASK_COUNT", "-4"),
            ],
            "SLURM_ARRAY_TASK_COUNT",
        ),
        (
            None,
            Some(3),
            &[("JOB_COMPLETION_INDEX", "1.5")],
            "JOB_COMPLETION_INDEX",
        ),
        (None, None, &[("SLURM_NTASKS", "many")], "SLURM_NTASKS"),
        // Missing halves.
        (
            None,
            None,
            &[("SLURM_ARRAY_TASK_ID", "1")],
            "SLURM_ARRAY_TASK_COUNT",
        ),
        (None, None, &[("SLURM_NTASKS", "4")], "SLURM_PROCID"),
        // --shards with no index anywhere, zero, or disagreeing with the scheduler.
        (None, Some(4), &[], "no shard index"),
        (
            None,
            Some(0),
            &[("JOB_COMPLETION_INDEX", "0")],
            "at least 1",
        ),
        (Some("1/4"), Some(3), &[], "disagrees"),
        (
            None,
            Some(3),
            &[
                ("SLURM_ARRAY_TASK_ID", "1"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
            "disagrees",
        ),
    ];
    for (flag, shards, vars, needle) in cases {
        let err = from(*flag, *shards, vars).expect_err(&format!("{vars:?} {shards:?}"));
        assert!(err.contains(needle), "{vars:?}: '{err}' lacks '{needle}'");
    }
    // A matching --shards alongside a scheduler count is fine.
    assert_eq!(
        from(
            None,
            Some(4),
            &[
                ("SLURM_ARRAY_TASK_ID", "1"),
                ("SLURM_ARRAY_TASK_COUNT", "4")
            ]
        ),
        Ok(Some((sh(1, 4), ShardSource::SlurmArray)))
    );
}

#[test]
fn three_shards_partition_300_paths() {
    let rels: BTreeSet<String> = (0..300)
        .map(|i| format!("d{}/sub{}/img_{i:03}.png", i % 5, i % 3))
        .collect();
    assert_eq!(rels.len(), 300);
    let mut union = BTreeSet::new();
    for k in 0..3 {
        let (shard, _) = from(None, Some(3), &[("JOB_COMPLETION_INDEX", &k.to_string())])
            .unwrap()
            .unwrap();
        let part: BTreeSet<String> = rels.iter().filter(|r| shard.contains(r)).cloned().collect();
        assert!(!part.is_empty(), "shard {k} is empty");
        assert!(union.is_disjoint(&part), "shard {k} overlaps another");
        union.extend(part);
    }
    assert_eq!(union, rels);
}

// ---- the real binary ----

fn prm(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prm"));
    for v in SCHED_VARS {
        cmd.env_remove(v);
    }
    cmd.args(args).envs(env.iter().copied());
    cmd.output().expect("prm runs")
}

fn write_image(path: &Path, w: u32, h: u32, seed: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = |k: u32| ((x * (3 + k + seed) + y * (5 + 2 * k) + seed * 17) % 251) as u8;
        image::Rgb([v(0), v(1), v(2)])
    });
    img.save(path).unwrap();
}

fn attack(input: &Path, output: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut args = vec![
        "attack",
        "--model",
        "random:tiny",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--preset",
        "pgd",
        "--steps",
        "1",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    prm(&args, env)
}

fn pngs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "png") {
            out.insert(
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            );
        }
    }
    out
}

fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    for i in 0..6u32 {
        write_image(&input.join(format!("img{i}.png")), 24 + 4 * i, 28, i + 1);
    }
    (tmp, input)
}

#[test]
fn three_shards_into_one_directory_equal_an_unsharded_run() {
    let (tmp, input) = setup();
    let whole = tmp.path().join("whole");
    let o = attack(&input, &whole, &["--quiet"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let shared = tmp.path().join("shared");
    for k in 0..3 {
        let flag = format!("{k}/3");
        let o = attack(&input, &shared, &["--shard", &flag], &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(
            err.contains(&format!("shard {k}/3 (from --shard)")),
            "{err}"
        );
    }
    let merged = tmp.path().join("merged.jsonl");
    let o = prm(
        &[
            "manifest",
            "merge",
            "--output",
            merged.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            shared.join("manifest.jsonl").to_str().unwrap(),
        ],
        &[],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("6 ok, 0 failed, 0 missing"), "{out}");

    let recs = records(&merged);
    let inputs: Vec<&str> = recs.iter().map(|r| r["input"].as_str().unwrap()).collect();
    let expect: Vec<String> = (0..6).map(|i| format!("img{i}.png")).collect();
    assert_eq!(inputs, expect, "every image exactly once");
    assert!(recs.iter().all(|r| r["status"] == "ok"));
    // The shared manifest itself has each image exactly once too.
    assert_eq!(records(&shared.join("manifest.jsonl")).len(), 6);

    let (a, b) = (pngs(&whole), pngs(&shared));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "sharded PNGs are byte-identical to the unsharded run");
}

#[test]
fn attack_takes_the_shard_from_the_environment() {
    let (tmp, input) = setup();
    let out = tmp.path().join("out");
    let o = attack(
        &input,
        &out,
        &[],
        &[
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("shard 2/3 (from SLURM_ARRAY_TASK_ID)"),
        "{err}"
    );
    let shard = Shard { index: 2, count: 3 };
    let want: BTreeSet<String> = (0..6)
        .map(|i| format!("img{i}.png"))
        .filter(|r| shard.contains(r))
        .collect();
    let got: BTreeSet<String> = records(&out.join("manifest.jsonl"))
        .iter()
        .map(|r| r["input"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, want);

    // Kubernetes index with --shards; --quiet prints nothing about it.
    let out = tmp.path().join("k8s");
    let o = attack(
        &input,
        &out,
        &["--shards", "3", "--quiet"],
        &[("JOB_COMPLETION_INDEX", "2")],
    );
    assert!(o.status.success());
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(records(&out.join("manifest.jsonl")).len(), want.len());
}

#[test]
fn bad_shard_environment_exits_2_before_any_work() {
    let (tmp, input) = setup();
    let out = tmp.path().join("out");
    for env in [
        &[("JOB_COMPLETION_INDEX", "0")][..],
        &[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ][..],
        &[("SLURM_PROCID", "one"), ("SLURM_NTASKS", "2")][..],
        &[
            ("SLURM_ARRAY_TASK_ID", "0"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_PROCID", "1"),
        ][..],
        &[
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ][..],
    ] {
        let o = attack(&input, &out, &[], env);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{env:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!out.exists(), "nothing written for {env:?}");
    }
}

#[test]
fn merge_reports_failed_and_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    for n in ["a.png", "b.png", "c.png"] {
        write_image(&input.join(n), 8, 8, 1);
    }
    let rec = |input: &str, status: &str| {
        format!(
            r#"{{"input":"{input}","output":null,"status":"{status}","width":8,"height":8,"loss_initial":null,"loss_final":null,"linf":null,"steps":1,"seconds":0.1}}"#
        )
    };
    let m1 = tmp.path().join("m1.jsonl");
    let m2 = tmp.path().join("m2.jsonl");
    // a: ok then a later error (ok wins); b: error then ok (latest wins); c: no record.
    std::fs::write(
        &m1,
        format!("{}\n{}\n", rec("a.png", "ok"), rec("b.png", "error")),
    )
    .unwrap();
    std::fs::write(
        &m2,
        format!("{}\n{}\n", rec("b.png", "ok"), rec("a.png", "error")),
    )
    .unwrap();
    let merged = tmp.path().join("sub/merged.jsonl");
    let args = |extra: &[&str]| {
        let mut v = vec!["manifest", "merge", "--output", merged.to_str().unwrap()];
        v.extend_from_slice(extra);
        v.push(m1.to_str().unwrap());
        v.push(m2.to_str().unwrap());
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |a: Vec<String>| prm(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);

    let o = run(args(&["--input", input.to_str().unwrap()]));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("2 ok, 0 failed, 1 missing"), "{out}");
    assert!(out.contains("MISSING c.png"), "{out}");
    assert!(records(&merged).iter().all(|r| r["status"] == "ok"));

    // A failure that is never retried.
    std::fs::write(&m2, format!("{}\n", rec("c.png", "error"))).unwrap();
    let o = run(args(&["--input", input.to_str().unwrap()]));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("1 ok, 2 failed, 0 missing"), "{out}");
    assert!(out.contains("FAILED c.png"), "{out}");

    // Everything ok, no --input.
    std::fs::write(&m1, format!("{}\n", rec("a.png", "ok"))).unwrap();
    std::fs::write(&m2, format!("{}\n", rec("b.png", "ok"))).unwrap();
    let o = run(args(&[]));
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(records(&merged).len(), 2);

    // An unreadable manifest is a usage error.
    let o = prm(
        &[
            "manifest",
            "merge",
            "--output",
            merged.to_str().unwrap(),
            tmp.path().join("nope.jsonl").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
}

/// One manifest line for `input` with `status` (`ok` or `error`).
fn manifest_line(input: &str, status: &str) -> String {
    format!(
        r#"{{"input":"{input}","output":null,"status":"{status}","width":8,"height":8,"loss_initial":null,"loss_final":null,"linf":null,"steps":1,"seconds":0.1}}"#
    )
}

fn merge_cmd(output: &Path, extra: &[&str], manifests: &[&Path]) -> Output {
    let mut args = vec!["manifest", "merge", "--output", output.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend(manifests.iter().map(|m| m.to_str().unwrap()));
    prm(&args, &[])
}

#[test]
fn merge_output_must_be_jsonl_and_not_an_input() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    write_image(&input.join("a.png"), 8, 8, 1);
    let m1 = tmp.path().join("m1.jsonl");
    std::fs::write(&m1, format!("{}\n", manifest_line("a.png", "ok"))).unwrap();
    let run_json = tmp.path().join("run.json");
    std::fs::write(&run_json, "{}").unwrap();
    let image = input.join("a.png");
    let image_bytes = std::fs::read(&image).unwrap();

    // An image (even one --input lists) and run.json: refused by extension, left untouched.
    for (out, extra) in [
        (&image, vec!["--input", input.to_str().unwrap()]),
        (&run_json, vec![]),
    ] {
        let o = merge_cmd(out, &extra, &[&m1]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{}: {err}", out.display());
        assert!(
            err.contains("--output") && err.contains("FILE.jsonl"),
            "{err}"
        );
        assert!(
            o.stdout.is_empty(),
            "no work done: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    assert_eq!(std::fs::read(&image).unwrap(), image_bytes);
    assert_eq!(std::fs::read_to_string(&run_json).unwrap(), "{}");

    // The --input list file itself, even spelled through `..`.
    let list = tmp.path().join("inputs.jsonl");
    std::fs::write(&list, format!("{}\n", image.display())).unwrap();
    let spelled = tmp.path().join("in/../inputs.jsonl");
    let o = merge_cmd(&spelled, &["--input", list.to_str().unwrap()], &[&m1]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("is one of the inputs"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&list).unwrap(),
        format!("{}\n", image.display())
    );

    // A directory named like a manifest.
    let dir = tmp.path().join("d.jsonl");
    std::fs::create_dir(&dir).unwrap();
    let o = merge_cmd(&dir, &[], &[&m1]);
    assert_eq!(o.status.code(), Some(2));

    // Merging in place into one of the manifests merged stays allowed.
    let m2 = tmp.path().join("m2.jsonl");
    std::fs::write(&m2, format!("{}\n", manifest_line("b.png", "ok"))).unwrap();
    let o = merge_cmd(&m1, &[], &[&m1, &m2]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(records(&m1).len(), 2);
}

#[test]
fn merge_counts_follow_the_listed_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    write_image(&input.join("a.png"), 8, 8, 1);
    std::fs::write(input.join("bad.png"), "junk").unwrap();
    // bad.png failed in an earlier run and was then excluded; other.png is another data set's.
    let m = tmp.path().join("manifest.jsonl");
    std::fs::write(
        &m,
        [
            manifest_line("a.png", "ok"),
            manifest_line("bad.png", "error"),
            manifest_line("other.png", "ok"),
            manifest_line("gone.png", "error"),
        ]
        .join("\n")
            + "\n",
    )
    .unwrap();
    let merged = tmp.path().join("merged.jsonl");
    let input_s = input.to_str().unwrap();

    let o = merge_cmd(
        &merged,
        &["--input", input_s, "--exclude", "bad.png"],
        &[&m],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        out.contains("1 ok, 0 failed, 0 missing; 3 record(s) name no input"),
        "{out}"
    );
    assert!(
        out.contains("kept in the merged manifest, not counted"),
        "{out}"
    );
    assert!(!out.contains("FAILED"), "{out}");
    // Kept: merge never drops records.
    assert_eq!(records(&merged).len(), 4);

    // Without --exclude bad.png counts (and fails the merge); the other two still do not.
    let o = merge_cmd(&merged, &["--input", input_s], &[&m]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("FAILED bad.png") && !out.contains("FAILED gone.png"),
        "{out}"
    );
    assert!(
        out.contains("1 ok, 1 failed, 0 missing; 2 record(s) name no input"),
        "{out}"
    );

    // Without --input every record counts, as before.
    let o = merge_cmd(&merged, &[], &[&m]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("2 ok, 2 failed, 0 missing (no --input"),
        "{out}"
    );
}
