//! Property tests (proptest): `--shard K/N` partitions any set of inputs (union = input, no
//! overlap, deterministic), tar shards stay whole, brace expansion, and quantise-then-project
//! always saves an image inside the ε-ball and in [0, 1].

use std::collections::HashSet;

use prm::io::quantize_within_eps;
use prm::io::shard::Shard;
use prm::io::webdataset::expand_braces;
use proptest::prelude::*;

/// Relative paths as they appear in manifests: a few `/`-separated segments of printable text.
fn rel_path() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-zA-Z0-9_ .ü-]{1,12}", 1..4).prop_map(|parts| parts.join("/"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn shards_partition_any_input(
        rels in prop::collection::hash_set(rel_path(), 0..200),
        n in 1u64..17,
    ) {
        let shards: Vec<Shard> = (0..n).map(|k| Shard::parse(&format!("{k}/{n}")).unwrap()).collect();
        let mut union = HashSet::new();
        for rel in &rels {
            // Exactly one shard holds each input (disjoint, and the union covers it).
            let owners: Vec<u64> = shards.iter().filter(|s| s.contains(rel)).map(|s| s.index).collect();
            prop_assert_eq!(owners.len(), 1, "{} is in shards {:?}", rel, owners);
            union.insert(rel.clone());
            // Deterministic: the same answer for an equal string built anew.
            let again = rel.chars().collect::<String>();
            prop_assert!(shards[owners[0] as usize].contains(&again));
        }
        prop_assert_eq!(union, rels);
    }

    #[test]
    fn shard_parse_accepts_exactly_k_below_n(k in 0u64..40, n in 0u64..40) {
        let parsed = Shard::parse(&format!("{k}/{n}"));
        prop_assert_eq!(parsed.is_ok(), n > 0 && k < n);
    }

    #[test]
    fn numeric_brace_ranges_expand_in_order(lo in 0u32..500, len in 0u32..50, width in 1usize..5) {
        let hi = lo + len;
        let spec = format!("s/t-{{{lo:0width$}..{hi:0width$}}}.tar");
        let names = expand_braces(&spec).unwrap();
        prop_assert_eq!(names.len() as u32, len + 1);
        // As bash: zero-padded to the wider end when either end is written with a leading zero.
        let (a, b) = (format!("{lo:0width$}"), format!("{hi:0width$}"));
        let padded = (a.len() > 1 && a.starts_with('0')) || (b.len() > 1 && b.starts_with('0'));
        let w = if padded { a.len().max(b.len()) } else { 0 };
        for (i, name) in names.iter().enumerate() {
            let v = lo + i as u32;
            prop_assert_eq!(name, &format!("s/t-{v:0w$}.tar"));
        }
    }

    #[test]
    fn quantise_then_project_stays_in_the_ball_and_in_range(
        pairs in prop::collection::vec((-0.5f32..1.5, 0.0f32..=1.0), 1..300),
        eps_255 in 0.5f32..64.0,
        on_grid in any::<bool>(),
        specials in prop::collection::vec(0usize..300, 0..4),
    ) {
        let eps = eps_255 / 255.0;
        let mut adv: Vec<f32> = pairs.iter().map(|p| p.0).collect();
        let clean: Vec<f32> = pairs
            .iter()
            .map(|p| if on_grid { (p.1 * 255.0).round() / 255.0 } else { p.1 })
            .collect();
        for &i in &specials {
            if let Some(a) = adv.get_mut(i) {
                *a = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][i % 3];
            }
        }
        let q = quantize_within_eps(&adv, &clean, eps);
        prop_assert_eq!(q.len(), adv.len());
        for ((&qv, &c), &a) in q.iter().zip(&clean).zip(&adv) {
            let saved = qv as f64 / 255.0;
            prop_assert!((0.0..=1.0).contains(&saved));
            prop_assert!(
                (saved - c as f64).abs() <= eps as f64 + 1e-6,
                "saved {} clean {} eps {} (adv {})", saved, c, eps, a
            );
            // Where plain rounding already lands inside the ball, nothing else changes.
            if a.is_finite() {
                let r = (a as f64 * 255.0).round().clamp(0.0, 255.0);
                if (r / 255.0 - c as f64).abs() + 1e-6 < eps as f64 {
                    prop_assert_eq!(qv as f64, r);
                }
            }
        }
    }

    #[test]
    fn quantise_of_the_clean_image_is_the_clean_image_on_the_grid(
        levels in prop::collection::vec(0u8..=255, 1..200),
        eps_255 in 0.0f32..16.0,
    ) {
        let clean: Vec<f32> = levels.iter().map(|&l| l as f32 / 255.0).collect();
        let q = quantize_within_eps(&clean, &clean, eps_255 / 255.0);
        prop_assert_eq!(q, levels);
    }
}
