//! `--shard K/N`: a deterministic partition of the inputs by a hash of their relative path.
//!
//! Shard membership depends only on the relative path, so N runs (on N machines) cover the
//! input exactly once between them, whatever order or machine they run on.

use crate::rng::stable_path_hash;

/// Shard `index` of `count` (0-based: `0/4` … `3/4`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl Shard {
    /// Parses `K/N` with `0 <= K < N`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let err = || format!("'{s}' is not a shard: use K/N with 0 <= K < N, e.g. --shard 0/4");
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
