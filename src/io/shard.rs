//! `--shard K/N`: a deterministic partition of the inputs by a hash of their relative path.
//!
//! Shard membership depends only on the relative path, so N runs (on N machines) cover the
//! input exactly once between them, whatever order or machine they run on.
//!
//! Without `--shard`, [`shard_from_env`] takes K/N from the scheduler's environment: Slurm job
//! arrays, Slurm tasks, or Kubernetes Indexed Jobs (with `--shards N`).

use crate::rng::stable_path_hash;

/// Shard `index` of `count` (0-based: `0/4` … `3/4`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

/// Why no shard (or no consistent one) could be taken from `--shard`, `--shards` or the
/// scheduler's environment. Each message names the flag or variable at fault and the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    /// `--shard` text that is not `K/N` with `0 <= K < N`.
    #[error("'{text}' is not a shard: use K/N with 0 <= K < N, e.g. --shard 0/4")]
    NotAShard { text: String },

    /// `--shards 0`.
    #[error("--shards must be at least 1")]
    NoShards,

    /// A scheduler variable that is set but not a non-negative integer.
    #[error("{name}='{value}' is not a non-negative integer, so the shard cannot be derived")]
    NotAnInteger { name: &'static str, value: String },

    /// An index from `source` that is not below its count.
    #[error("inconsistent shard from {source_vars}: index {index} is not below count {count}")]
    IndexNotBelowCount {
        source_vars: &'static str,
        index: u64,
        count: u64,
    },

    /// `--shards N` against a scheduler (or `--shard`) that says another count.
    #[error("--shards {shards} disagrees with {source_vars}, which says {count} shard(s)")]
    CountsDisagree {
        shards: u64,
        source_vars: &'static str,
        count: u64,
    },

    /// `SLURM_ARRAY_TASK_ID` without `SLURM_ARRAY_TASK_COUNT`.
    #[error(
        "SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not: cannot tell how many \
         shards there are (give --shard K/N)"
    )]
    ArrayCountMissing,

    /// `SLURM_ARRAY_TASK_ID` below `SLURM_ARRAY_TASK_MIN`.
    #[error(
        "inconsistent Slurm array: SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}"
    )]
    ArrayIdBelowMin { id: u64, min: u64 },

    /// A Slurm array with a step other than 1, whose ids do not map onto `0..count`.
    #[error(
        "SLURM_ARRAY_TASK_STEP is {step}, but the shard is taken from a contiguous array: \
         submit with a step of 1 (e.g. --array=0-7), or give --shard K/N"
    )]
    ArrayStep { step: u64 },

    /// A Slurm array element that runs several tasks, which would all take the same shard.
    #[error(
        "both a Slurm job array (SLURM_ARRAY_TASK_ID) and SLURM_NTASKS={ntasks} are set, so \
         the {ntasks} tasks of this array element would attack the same shard: run one task \
         per array element (--ntasks=1), or give each task its own --shard K/N (e.g. K = \
         (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) * SLURM_NTASKS + SLURM_PROCID, N = \
         SLURM_ARRAY_TASK_COUNT * SLURM_NTASKS)"
    )]
    ArrayWithSeveralTasks { ntasks: u64 },

    /// `SLURM_NTASKS` > 1 without `SLURM_PROCID`.
    #[error("SLURM_NTASKS > 1 but SLURM_PROCID is not set: cannot tell which shard this task is")]
    ProcidMissing,

    /// A Kubernetes Indexed Job without `--shards N`.
    #[error(
        "JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but --shards N is not: pass \
         --shards with the Job's completions count"
    )]
    KubernetesWithoutShards,

    /// `--shards N` with no index from anywhere: each of the N workers would attack everything.
    #[error(
        "--shards {shards} was given but no shard index was found (no --shard, \
         SLURM_ARRAY_TASK_ID, SLURM_PROCID with SLURM_NTASKS > 1, or JOB_COMPLETION_INDEX)"
    )]
    NoIndex { shards: u64 },
}

impl Shard {
    /// Parses `K/N` with `0 <= K < N`.
    pub fn parse(s: &str) -> Result<Self, ShardError> {
        let err = || ShardError::NotAShard {
            text: s.to_string(),
        };
        let (k, n) = s.split_once('/').ok_or_else(err)?;
        let index: u64 = k.trim().parse().map_err(|_| err())?;
        let count: u64 = n.trim().parse().map_err(|_| err())?;
        if count == 0 || index >= count {
            return Err(err());
        }
        Ok(Shard { index, count })
    }

    /// Whether the input with relative path `rel` belongs to this shard.
    pub fn contains(&self, rel: &str) -> bool {
        stable_path_hash(rel) % self.count == self.index
    }
}

/// Where a run's shard came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardSource {
    /// `--shard K/N`.
    Flag,
    /// A Slurm job array: `SLURM_ARRAY_TASK_ID` (minus `SLURM_ARRAY_TASK_MIN`) of
    /// `SLURM_ARRAY_TASK_COUNT`.
    SlurmArray,
    /// The tasks of one Slurm job step: `SLURM_PROCID` of `SLURM_NTASKS` (when more than one).
    SlurmTasks,
    /// A Kubernetes Indexed Job: `JOB_COMPLETION_INDEX` of `--shards N`.
    KubernetesIndexedJob,
}

impl ShardSource {
    /// What the log names as the source: the flag or the index variable.
    pub fn describe(&self) -> &'static str {
        match self {
            ShardSource::Flag => "--shard",
            ShardSource::SlurmArray => "SLURM_ARRAY_TASK_ID",
            ShardSource::SlurmTasks => "SLURM_PROCID",
            ShardSource::KubernetesIndexedJob => "JOB_COMPLETION_INDEX",
        }
    }
}

/// Reads a non-negative integer variable; unset or empty is `None`, anything else that is not a
/// number is an error naming the variable.
fn env_u64(
    env: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<u64>, ShardError> {
    match env(name) {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| ShardError::NotAnInteger { name, value: v }),
    }
}

/// Checks `index < count` (and `count > 0`) for a shard derived from `source_vars`.
fn checked(index: u64, count: u64, source_vars: &'static str) -> Result<Shard, ShardError> {
    if count == 0 || index >= count {
        return Err(ShardError::IndexNotBelowCount {
            source_vars,
            index,
            count,
        });
    }
    Ok(Shard { index, count })
}

/// Checks that `--shards N`, when given, agrees with a count from `source_vars`.
fn agree(
    shard: Shard,
    shards_flag: Option<u64>,
    source_vars: &'static str,
) -> Result<Shard, ShardError> {
    match shards_flag {
        Some(shards) if shards != shard.count => Err(ShardError::CountsDisagree {
            shards,
            source_vars,
            count: shard.count,
        }),
        _ => Ok(shard),
    }
}

/// The shard this run should process, and where it came from; `None` means the whole input.
///
/// In order of precedence:
/// 1. `flag` (`--shard K/N`); `--shards N`, when also given, must equal N;
/// 2. a Slurm job array: `SLURM_ARRAY_TASK_ID` − `SLURM_ARRAY_TASK_MIN` (when set) of
///    `SLURM_ARRAY_TASK_COUNT` (the array must be contiguous, e.g. `--array=0-7` or `1-8`:
///    a `SLURM_ARRAY_TASK_STEP` other than 1 is an error, and so is `SLURM_NTASKS` > 1, where
///    every task of the array element would take the same shard);
/// 3. Slurm tasks: `SLURM_PROCID` of `SLURM_NTASKS`, only when `SLURM_NTASKS` > 1;
/// 4. a Kubernetes Indexed Job: `JOB_COMPLETION_INDEX` of `shards_flag` (`--shards N`, required).
///
/// `--shards N` with no index from any of these is an error (each of the N workers would
/// otherwise attack everything), as are non-numbers and an index not below its count.
/// `env` looks a variable up (`|k| std::env::var(k).ok()` in the binary; a fake in tests).
pub fn shard_from_env(
    flag: Option<Shard>,
    shards_flag: Option<u64>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(Shard, ShardSource)>, ShardError> {
    if shards_flag == Some(0) {
        return Err(ShardError::NoShards);
    }
    if let Some(shard) = flag {
        let shard = agree(shard, shards_flag, "--shard")?;
        return Ok(Some((shard, ShardSource::Flag)));
    }
    if let Some(id) = env_u64(env, "SLURM_ARRAY_TASK_ID")? {
        let count = env_u64(env, "SLURM_ARRAY_TASK_COUNT")?.ok_or(ShardError::ArrayCountMissing)?;
        let min = env_u64(env, "SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let index = id
            .checked_sub(min)
            .ok_or(ShardError::ArrayIdBelowMin { id, min })?;
        // `--array=0-6:2` has ids 0, 2, 4, 6 but a count of 4: id − min would give shards 0, 2,
        // 4 (out of range) and 6, and shards 1 and 3 would never run. Only a step of 1 maps ids
        // onto 0..count.
        if let Some(step) = env_u64(env, "SLURM_ARRAY_TASK_STEP")?.filter(|&s| s != 1) {
            return Err(ShardError::ArrayStep { step });
        }
        // Every task of one array element sees the same array id, so with `srun -n 2` inside
        // the element two tasks would attack the same shard into the same files. Combining the
        // two (array index × ntasks + procid) is not safe to guess: a batch step that runs prm
        // directly, without srun, also sees SLURM_NTASKS > 1 but runs one task, and that
        // combination would leave the other tasks' shards unrun. So the user says.
        if let Some(ntasks) = env_u64(env, "SLURM_NTASKS")?.filter(|&n| n > 1) {
            return Err(ShardError::ArrayWithSeveralTasks { ntasks });
        }
        let source_vars = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT";
        let shard = agree(
            checked(index, count, source_vars)?,
            shards_flag,
            source_vars,
        )?;
        return Ok(Some((shard, ShardSource::SlurmArray)));
    }
    let ntasks = env_u64(env, "SLURM_NTASKS")?;
    if let Some(ntasks) = ntasks.filter(|&n| n > 1) {
        let procid = env_u64(env, "SLURM_PROCID")?.ok_or(ShardError::ProcidMissing)?;
        let source_vars = "SLURM_PROCID/SLURM_NTASKS";
        let shard = agree(
            checked(procid, ntasks, source_vars)?,
            shards_flag,
            source_vars,
        )?;
        return Ok(Some((shard, ShardSource::SlurmTasks)));
    }
    if let Some(index) = env_u64(env, "JOB_COMPLETION_INDEX")? {
        let count = shards_flag.ok_or(ShardError::KubernetesWithoutShards)?;
        let shard = checked(index, count, "JOB_COMPLETION_INDEX/--shards")?;
        return Ok(Some((shard, ShardSource::KubernetesIndexedJob)));
    }
    match shards_flag {
        Some(shards) => Err(ShardError::NoIndex { shards }),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_inputs() {
        let rels: Vec<String> = (0..500)
            .map(|i| format!("dir{}/img{i}.jpg", i % 7))
            .collect();
        let shards: Vec<Shard> = (0..3).map(|k| Shard { index: k, count: 3 }).collect();
        for r in &rels {
            assert_eq!(shards.iter().filter(|s| s.contains(r)).count(), 1);
        }
        assert!(shards
            .iter()
            .all(|s| rels.iter().filter(|r| s.contains(r)).count() > 100));
        assert!(
            Shard::parse("3/3").is_err()
                && Shard::parse("1/0").is_err()
                && Shard::parse("x").is_err()
        );
        assert_eq!(Shard::parse("2/5"), Ok(Shard { index: 2, count: 5 }));
    }
}
