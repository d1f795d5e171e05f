//! Timing cuBLASLt's algorithms on the device (`PRM_PRODUCTS=timed`): what is timed, how the
//! choice is made, and the record of each tuning.
//!
//! cuBLASLt's heuristic ranks the algorithms it thinks fastest for a product, and the backend
//! takes its first answer ([`ProductAlgorithms`]). The heuristic is a model, not a
//! measurement: for row counts that leave the last tile of rows mostly empty (12,608 rows of a
//! ViT-B/16 batch of 64 are 98.5 tiles of 128) another tiling of the same sums may run faster.
//! Under `timed`, the first time the backend meets a product's algorithm key (its row bucket,
//! or its kind under batch-invariant products) outside a graph capture, it runs the
//! heuristic's first [`TIMED_CANDIDATES`] answers on that call's own operands:
//! 1. the heuristic's first answer, the **reference**, into a scratch output;
//! 2. each other answer once, its output compared bit for bit with the reference's. One that
//!    differs (another order of the inner sums: the inner dimension split across blocks, or
//!    another accumulation) is dropped, so the results are those of the reference whatever
//!    the timings: two runs stay bit-identical, and an attack's results do not depend on
//!    which algorithm won. One that cuBLASLt refuses at this size is dropped too;
//! 3. [`TUNING_ROUNDS`] rounds of [`TUNING_REPEATS`] timed calls of each kept answer, its
//!    fastest round's mean counting;
//! 4. the fastest, when it beats the reference by [`REFERENCE_MARGIN`] (else the reference).
//!
//! Only products with enough outputs ([`large_enough_to_tune`]) are tuned: on fewer, the bit
//! comparison could miss another order of the sums.
//!
//! The call itself then runs with the chosen algorithm. A tuning that cannot run (no memory
//! for its scratch outputs) keeps the reference and says so once. The simulator forms products
//! on the CPU and has nothing to time.

use crate::gpu::ProductAlgorithms;

/// Heuristic answers timed per product key (the reference among them).
pub const TIMED_CANDIDATES: usize = 8;
/// Timed rounds per candidate (the fastest counts: a round can catch a clock ramp).
pub const TUNING_ROUNDS: usize = 2;
/// Calls timed together per round.
pub const TUNING_REPEATS: usize = 3;
/// How much faster than the reference (a fraction of its time) a candidate must be to be
/// chosen: a lead inside the timing noise would make the choice flip between runs for nothing
/// (harmless to the bits, since only identical ones compete, but not to the timings).
pub const REFERENCE_MARGIN: f64 = 0.02;

/// The fewest bf16 output elements a product needs for its tuning. A candidate is kept only
/// if its output has the reference's bits; bf16 rounding hides most last-bit differences of
/// the fp32 sums (one in tens of thousands shows), so on a few thousand elements an algorithm
/// that sums in another order could match by chance, then win, and change the results at
/// other sizes of its key. 2^20 elements whose sums differ in the last bit for a third of them
/// show about ten differences.
pub const TUNED_MIN_BF16_OUTPUTS: usize = 1 << 20;

/// The same for fp32 outputs, where another order of the sums shows in a large share of the
/// elements.
pub const TUNED_MIN_F32_OUTPUTS: usize = 1 << 14;

/// Whether a product of `m` × `n` outputs (bf16 or fp32) is large enough for its bit
/// comparison to be trusted ([`TUNED_MIN_BF16_OUTPUTS`], [`TUNED_MIN_F32_OUTPUTS`]). Smaller
/// products keep cuBLASLt's first answer (they are also those with the least time to gain)
/// and are not recorded as tunings; a larger product of the same key tunes it when it comes.
pub fn large_enough_to_tune(m: usize, n: usize, bf16_output: bool) -> bool {
    let least = if bf16_output {
        TUNED_MIN_BF16_OUTPUTS
    } else {
        TUNED_MIN_F32_OUTPUTS
    };
    m.saturating_mul(n) >= least
}

/// What `PRM_PRODUCTS` asks: `heuristic` (the default: cuBLASLt's first answer) or `timed`.
/// Anything else is an error that names the allowed values.
pub fn timed_from_env() -> Result<bool, String> {
    parse_timed(std::env::var("PRM_PRODUCTS").ok().as_deref())
}

/// [`timed_from_env`] for a given value (`None`: unset).
pub fn parse_timed(value: Option<&str>) -> Result<bool, String> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("heuristic") => Ok(false),
        Some("timed") => Ok(true),
        Some(other) => Err(format!(
            "PRM_PRODUCTS={other:?} is not a way to choose cuBLASLt's algorithms; use heuristic \
             (its first answer, the default) or timed (its first {TIMED_CANDIDATES} answers \
             timed on the device, among those that give the reference's bits)"
        )),
    }
}

/// What became of one of the heuristic's answers in a tuning.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CandidateOutcome {
    /// Gave the reference's bits; its fastest round's mean time per call, in microseconds.
    Timed(f64),
    /// Gave other bits than the reference (dropped).
    OtherBits,
    /// cuBLASLt refused it for this size, or it failed (dropped).
    Refused,
}

/// One product key's tuning, as reports show it.
#[derive(Clone, Debug, PartialEq)]
pub struct ProductTuning {
    /// The call it was timed on: rows, columns, inner dimension.
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Element types (`f32`, `bf16 in`, `bf16 out`), β = 1, bias epilogue.
    pub types: &'static str,
    pub accumulate: bool,
    pub bias: bool,
    pub algorithms: ProductAlgorithms,
    /// The heuristic's answers in its order; the first is the reference.
    pub candidates: Vec<CandidateOutcome>,
    /// Index into `candidates` of the algorithm kept.
    pub chosen: usize,
    /// Wall time of the tuning (scratch memory, comparisons, timings), in seconds.
    pub seconds: f64,
}

impl ProductTuning {
    /// The reference's time and the chosen one's, in microseconds per call.
    pub fn times_us(&self) -> Option<(f64, f64)> {
        let time = |i: usize| match self.candidates.get(i) {
            Some(CandidateOutcome::Timed(us)) => Some(*us),
            _ => None,
        };
        Some((time(0)?, time(self.chosen)?))
    }

    pub fn to_json(&self) -> serde_json::Value {
        let candidates: Vec<serde_json::Value> = self
            .candidates
            .iter()
            .map(|c| match c {
                CandidateOutcome::Timed(us) => serde_json::json!(us),
                CandidateOutcome::OtherBits => serde_json::json!("other bits"),
                CandidateOutcome::Refused => serde_json::json!("refused"),
            })
            .collect();
        serde_json::json!({
            "m": self.m, "n": self.n, "k": self.k, "types": self.types,
            "accumulate": self.accumulate, "bias": self.bias,
            "algorithms": self.algorithms.name(),
            "candidates_us": candidates,
            "chosen": self.chosen,
            "seconds": self.seconds,
        })
    }
}

/// The candidate to keep: the fastest of those timed, if it beats the reference (index 0) by
/// [`REFERENCE_MARGIN`]; else the reference. Ties go to the earlier answer.
pub fn choose(candidates: &[CandidateOutcome]) -> usize {
    let time = |c: &CandidateOutcome| match c {
        CandidateOutcome::Timed(us) if us.is_finite() => Some(*us),
        _ => None,
    };
    let Some(reference) = candidates.first().and_then(time) else {
        return 0;
    };
    let (fastest, best) = candidates
        .iter()
        .enumerate()
        .filter_map(|(i, c)| time(c).map(|us| (i, us)))
        .fold(
            (0, reference),
            |(bi, bu), (i, us)| {
                if us < bu {
                    (i, us)
                } else {
                    (bi, bu)
                }
            },
        );
    if best < reference * (1.0 - REFERENCE_MARGIN) {
        fastest
    } else {
        0
    }
}

/// One line for a tuning: the product, the reference's and the chosen time, what was dropped.
pub fn describe(t: &ProductTuning) -> String {
    let dropped = |want: CandidateOutcome| t.candidates.iter().filter(|&&c| c == want).count();
    let timing = match t.times_us() {
        Some((reference, chosen)) if t.chosen != 0 => format!(
            "answer {} of {}: {chosen:.1} µs against the first's {reference:.1}",
            t.chosen + 1,
            t.candidates.len()
        ),
        Some((reference, _)) => format!(
            "the first of {} answers ({reference:.1} µs)",
            t.candidates.len()
        ),
        None => "the first answer (untimed)".into(),
    };
    format!(
        "m={} n={} k={} {}{}{}: {timing}; {} with other bits, {} refused; {:.3} s",
        t.m,
        t.n,
        t.k,
        t.types,
        if t.accumulate { ", +C" } else { "" },
        if t.bias { ", bias" } else { "" },
        dropped(CandidateOutcome::OtherBits),
        dropped(CandidateOutcome::Refused),
        t.seconds
    )
}

#[cfg(test)]
mod tests {
    use super::CandidateOutcome::{OtherBits, Refused, Timed};
    use super::*;

    #[test]
    fn the_reference_is_kept_unless_another_answer_beats_it_by_the_margin() {
        assert_eq!(choose(&[Timed(100.0)]), 0);
        assert_eq!(choose(&[Timed(100.0), Timed(99.0)]), 0, "inside the margin");
        assert_eq!(choose(&[Timed(100.0), Timed(97.0), Timed(90.0)]), 2);
        assert_eq!(
            choose(&[Timed(100.0), Timed(90.0), Timed(90.0)]),
            1,
            "ties: earlier"
        );
        // Dropped answers never win, however they would have timed.
        assert_eq!(choose(&[Timed(100.0), OtherBits, Refused, Timed(120.0)]), 0);
        assert_eq!(choose(&[Timed(100.0), OtherBits, Timed(50.0)]), 2);
        // No time for the reference: keep it (nothing to compare against).
        assert_eq!(choose(&[Refused, Timed(1.0)]), 0);
        assert_eq!(choose(&[Timed(f64::NAN), Timed(1.0)]), 0);
        assert_eq!(choose(&[Timed(100.0), Timed(f64::NAN)]), 0);
        assert_eq!(choose(&[]), 0);
    }

    #[test]
    fn only_products_whose_bits_can_show_another_order_are_tuned() {
        // ViT-B/16 at batch 64 (12,608 rows): every product.
        for n in [768, 2304, 3072] {
            assert!(large_enough_to_tune(12_608, n, true));
            assert!(large_enough_to_tune(12_608, n, false));
        }
        // One 1201-token image: fp32 outputs, and bf16 ones of 3072 columns.
        assert!(large_enough_to_tune(1201, 768, false));
        assert!(!large_enough_to_tune(1201, 768, true));
        assert!(large_enough_to_tune(1201, 3072, true));
        assert!(!large_enough_to_tune(197, 37, false));
        assert!(!large_enough_to_tune(usize::MAX, 0, false));
        assert!(large_enough_to_tune(usize::MAX, 2, true));
    }

    #[test]
    fn the_setting_reads_heuristic_or_timed_and_refuses_the_rest() {
        assert_eq!(parse_timed(None), Ok(false));
        assert_eq!(parse_timed(Some("")), Ok(false));
        assert_eq!(parse_timed(Some("heuristic")), Ok(false));
        assert_eq!(parse_timed(Some(" Timed ")), Ok(true));
        let e = parse_timed(Some("fastest")).unwrap_err();
        assert!(e.contains("heuristic") && e.contains("timed"), "{e}");
    }

    #[test]
    fn a_tuning_describes_itself_and_its_json_names_every_answer() {
        let t = ProductTuning {
            m: 12_608,
            n: 768,
            k: 768,
            types: "bf16 in",
            accumulate: true,
            bias: true,
            algorithms: ProductAlgorithms::BySize,
            candidates: vec![Timed(40.0), OtherBits, Timed(35.0), Refused],
            chosen: 2,
            seconds: 0.05,
        };
        assert_eq!(t.times_us(), Some((40.0, 35.0)));
        let line = describe(&t);
        assert!(
            line.contains("answer 3 of 4: 35.0 µs against the first's 40.0"),
            "{line}"
        );
        assert!(line.contains("1 with other bits, 1 refused"), "{line}");
        let json = t.to_json();
        assert_eq!(json["candidates_us"][1], "other bits");
        assert_eq!(json["candidates_us"][3], "refused");
        assert_eq!(json["chosen"], 2);
        assert_eq!(json["algorithms"], "by-size");
    }
}
