//! Which tensor-core attention kernels a bf16 engine runs (`PRM_ATTENTION`), and under `auto`
//! (the default on CUDA) picking them per shape by timing them on the device.
//!
//! v3 and v4, with any [`TcOptions`], compute the same bits (tests/kernel_attention.rs
//! `v4_is_v3_bit_for_bit`, tests/schedules.rs). Which runs fastest depends on the GPU and on
//! the sequence lengths: v4 keeps a whole head in shared memory, which pays or not with the
//! SM count, the shared memory per SM and the number of heads a batch has. So under `auto`,
//! the first time the engine meets a [`ShapeBucket`] outside a graph capture, it runs every
//! candidate on that call's own inputs and outputs:
//! 1. v3 with the default options first: the reference;
//! 2. each other candidate once, its outputs compared bit for bit with the reference's (a
//!    candidate that differs is dropped with a warning asking for a report: a bug; one that
//!    cannot launch on this GPU is dropped with a plain warning). The outputs are poisoned
//!    (NaN) before the reference's run and each candidate's, so an element a candidate does
//!    not write is a difference;
//! 3. [`TUNING_ROUNDS`] rounds of [`TUNING_REPEATS`] timed calls of each (behind as many
//!    untimed ones, so the device is busy when the clock starts), keeping its fastest round's
//!    mean;
//! 4. the fastest, if it beats v3 by [`REFERENCE_MARGIN`] (else v3), run once more, so the
//!    call's outputs are its own.
//!
//! The forward and the backward are tuned separately (they share only their layouts). The
//! choice holds for the engine's lifetime; [`GpuVit::attention_tuning`] reports what was
//! timed. On the simulator the timings mean nothing, so `auto` there (tests only) times one
//! call of each.

use std::fmt;

use super::{GpuVit, Precision};
use crate::gpu::kernels::attention::{
    tc4_fits, TcOptions, TensorCoreVersion, HEAD_DIM, TC4_MAX_TOKENS,
};
use crate::gpu::{Device, GpuError};

/// Timed rounds per candidate (the fastest counts: a round can catch a clock ramp or another
/// process's work).
pub const TUNING_ROUNDS: usize = 2;
/// Calls timed together per round.
pub const TUNING_REPEATS: usize = 3;
/// How much faster than v3 (a fraction of its time) a candidate must be to be chosen: a lead
/// inside the timing noise would make the choice flip between runs for nothing.
pub const REFERENCE_MARGIN: f64 = 0.02;

/// What `PRM_ATTENTION` asks of a bf16 engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionSetting {
    /// One version for every call, with the options given (`PRM_ATTENTION=v2|v3|v4`, and
    /// `PRM_ATTENTION_STRAIGHT`, `PRM_ATTENTION_DELTA_IN_DQ`, `PRM_ATTENTION_SPLIT`,
    /// `PRM_ATTENTION_PAIRS`).
    Fixed(TensorCoreVersion, TcOptions),
    /// v3 or v4 and their options, timed per shape bucket (`PRM_ATTENTION=auto`; the default
    /// on CUDA).
    Auto,
}

impl AttentionSetting {
    /// The setting the environment asks for: `PRM_ATTENTION` (`v2`, `v3`, `v4` or `auto`;
    /// unset: `auto` on CUDA, `v3` on the simulator, where timings mean nothing) and the
    /// option variables of [`TcOptions::from_env`]. An unknown value is an error that says
    /// which values are allowed.
    pub fn from_env(on_sim: bool) -> Result<Self, String> {
        let value = std::env::var("PRM_ATTENTION").ok();
        Self::parse(value.as_deref(), TcOptions::from_env(), on_sim)
    }

    /// [`Self::from_env`] for a given value of `PRM_ATTENTION` (`None`: unset).
    pub fn parse(value: Option<&str>, options: TcOptions, on_sim: bool) -> Result<Self, String> {
        let fixed = |version| Ok(AttentionSetting::Fixed(version, options));
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") if on_sim => fixed(TensorCoreVersion::V3),
            None | Some("") | Some("auto") => Ok(AttentionSetting::Auto),
            Some("v2") => fixed(TensorCoreVersion::V2),
            Some("v3") => fixed(TensorCoreVersion::V3),
            Some("v4") => fixed(TensorCoreVersion::V4),
            Some(other) => Err(format!(
                "PRM_ATTENTION={other:?} is not an attention setting; use auto (time v3 and v4 \
                 on the device and keep the faster, the default), v2, v3 or v4"
            )),
        }
    }

    /// Whether calls read bf16 q/k/v and write a bf16 context (v3 and v4, and so `auto`).
    pub fn bf16_qkv(self) -> bool {
        match self {
            AttentionSetting::Fixed(version, _) => version.bf16_qkv(),
            AttentionSetting::Auto => true,
        }
    }
}

impl fmt::Display for AttentionSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttentionSetting::Fixed(TensorCoreVersion::V2, _) => write!(f, "v2"),
            &AttentionSetting::Fixed(version, options) => {
                write!(f, "{}", AttentionKernels::pinned(version, options))
            }
            AttentionSetting::Auto => write!(f, "auto"),
        }
    }
}

/// The bf16 q/k/v kernels one call runs: v3's or v4's (v4 runs v3's past
/// [`TC4_MAX_TOKENS`]), with their options.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttentionKernels {
    pub v4: bool,
    pub options: TcOptions,
}

impl AttentionKernels {
    /// v3 with the default options: the reference every tuned candidate must match.
    pub const REFERENCE: AttentionKernels = AttentionKernels {
        v4: false,
        options: TcOptions::DEFAULT,
    };

    /// The kernels a pinned v3 or v4 runs with `options` (v2 has none of these: its calls
    /// never ask).
    pub fn pinned(version: TensorCoreVersion, options: TcOptions) -> Self {
        AttentionKernels {
            v4: version == TensorCoreVersion::V4,
            options,
        }
    }
}

/// Names the way `PRM_ATTENTION` and the option variables would: `v3`, `v3 delta-kernel`,
/// `v4 split 2 masked-tiles`, `v4 split 1 pairs`, `v3 pairs`. Only what the version reads is
/// named (v3 has no split, v4 forms delta with the delta kernel).
impl fmt::Display for AttentionKernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.options;
        if self.v4 {
            write!(f, "v4 split {}", o.split)?;
            if o.paired_rows {
                write!(f, " pairs")?;
            }
        } else {
            write!(f, "v3")?;
            if o.paired_rows {
                write!(f, " pairs")?;
            }
            if !o.delta_in_dq {
                write!(f, " delta-kernel")?;
            }
        }
        if !o.straight_tiles {
            write!(f, " masked-tiles")?;
        }
        Ok(())
    }
}

/// The attention passes, tuned separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttentionPass {
    Forward,
    Backward,
}

impl AttentionPass {
    pub fn name(self) -> &'static str {
        match self {
            AttentionPass::Forward => "forward",
            AttentionPass::Backward => "backward",
        }
    }
}

/// Batches whose choice is shared: the number of sequences and the longest sequence, each
/// rounded up to a power of two. A fixed-shape attack has one bucket; an attack under dynamic
/// scale (a new length every step) a few, so it does not tune every step. v4's limit,
/// [`TC4_MAX_TOKENS`] = 512, is a bucket edge: a bucket is all v4-eligible or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShapeBucket {
    /// Sequences in the batch, rounded up to a power of two.
    pub sequences: usize,
    /// The longest sequence's tokens, rounded up to a power of two.
    pub tokens: usize,
}

impl ShapeBucket {
    pub fn of(seqlens: &[usize]) -> Self {
        let longest = seqlens.iter().copied().max().unwrap_or(0);
        ShapeBucket {
            sequences: seqlens.len().max(1).next_power_of_two(),
            tokens: longest.max(1).next_power_of_two(),
        }
    }
}

/// The candidates `auto` times for `pass` on a bucket, the reference first: v3 with each
/// option off in turn, then v4 with one and two CTAs a head where it applies, and four for
/// batches of at most [`FEW_SEQUENCES`] sequences (one CTA a head would leave most SMs idle);
/// then v4 with paired blocks ([`TcOptions::paired_rows`]) on one and two CTAs a head; and v3
/// with paired blocks (128-row tiles), at every length.
pub fn candidates(pass: AttentionPass, bucket: ShapeBucket) -> Vec<AttentionKernels> {
    let reference = AttentionKernels::REFERENCE;
    let with = |v4, change: fn(&mut TcOptions)| {
        let mut options = reference.options;
        change(&mut options);
        AttentionKernels { v4, options }
    };
    let mut list = vec![reference, with(false, |o| o.straight_tiles = false)];
    if pass == AttentionPass::Backward {
        list.push(with(false, |o| o.delta_in_dq = false));
    }
    list.push(with(false, |o| o.paired_rows = true));
    if bucket.tokens <= TC4_MAX_TOKENS {
        list.push(with(true, |_| {}));
        list.push(with(true, |o| o.split = 2));
        if bucket.sequences <= FEW_SEQUENCES {
            list.push(with(true, |o| o.split = 4));
        }
        list.push(with(true, |o| o.paired_rows = true));
        list.push(with(true, |o| {
            o.paired_rows = true;
            o.split = 2;
        }));
    }
    list
}

/// Batches of at most this many sequences also try v4 with four CTAs a head: ViT-B's 12 heads
/// times 16 sequences is 192 CTAs, about 1.5 an SM of an H100 or H200.
pub const FEW_SEQUENCES: usize = 16;

/// What `auto` timed for one pass and bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionTuning {
    pub pass: AttentionPass,
    pub bucket: ShapeBucket,
    /// The batch that was timed: its sequences and longest sequence.
    pub timed_on: (usize, usize),
    /// Each candidate and its time per call in microseconds (`None`: dropped, see `dropped`).
    pub candidates: Vec<(AttentionKernels, Option<f64>)>,
    /// Why candidates were dropped (different bits, or a failed launch).
    pub dropped: Vec<String>,
    pub chosen: AttentionKernels,
    /// Host wall time of the whole tuning, in seconds: every candidate's check (a download of
    /// the outputs each), the timed rounds and the final run of the choice. This is what
    /// `auto` adds to the first call of a bucket.
    pub seconds: f64,
}

impl AttentionTuning {
    /// One line: the pass, the batch timed, the choice, and how long the reference (v3) and
    /// the choice took a call.
    pub fn summary_line(&self) -> String {
        let us = |k: AttentionKernels| {
            self.candidates
                .iter()
                .find(|(c, _)| *c == k)
                .and_then(|(_, us)| *us)
                .map_or_else(|| "-".into(), |us| format!("{us:.1}"))
        };
        let mut line = format!(
            "attention {} on {} sequence(s) of up to {} tokens: {} ({} µs a call; v3 {} µs; \
             tuned in {:.1} ms)",
            self.pass.name(),
            self.timed_on.0,
            self.timed_on.1,
            self.chosen,
            us(self.chosen),
            us(AttentionKernels::REFERENCE),
            self.seconds * 1e3,
        );
        if !self.dropped.is_empty() {
            line += &format!("; dropped: {}", self.dropped.join("; "));
        }
        line
    }

    /// One JSON object: pass, bucket, the timed batch, every candidate's microseconds per call
    /// (null when dropped), the reasons for dropping, and the choice.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "pass": self.pass.name(),
            "bucket": {"sequences": self.bucket.sequences, "tokens": self.bucket.tokens},
            "timed_on": {"sequences": self.timed_on.0, "longest": self.timed_on.1},
            "candidates": self.candidates.iter().map(|(k, us)| serde_json::json!({
                "kernels": k.to_string(),
                "us_per_call": us,
            })).collect::<Vec<_>>(),
            "dropped": self.dropped,
            "chosen": self.chosen.to_string(),
            "tuning_seconds": self.seconds,
        })
    }
}

/// Prints a dropped candidate's reason on stderr, once per process and reason; the run goes
/// on with the other kernels. Kernels that disagree with v3 on this device are a bug
/// (`is_bug`), and the user should hear of it; kernels that cannot launch here (a GPU with
/// less shared memory than v4 asks for) are not.
fn warn_dropped(reason: &str, is_bug: bool) {
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
    if !said.iter().any(|r| r == reason) {
        let note = if is_bug {
            " (a bug in prm: please report this line)"
        } else {
            ""
        };
        eprintln!(
            "prm: attention tuning dropped {reason}; the run continues with the other \
             kernels{note}"
        );
        said.push(reason.to_string());
    }
}

/// What the tuner asks of one attention call (one closure does both, as both need the call's
/// outputs).
#[derive(Clone, Copy, Debug)]
pub enum CallStep {
    /// Issue the call with these kernels into its outputs (answer with no bytes).
    Run(AttentionKernels),
    /// Download the call's outputs, as bytes.
    ReadOutputs,
    /// Fill the call's outputs with 0xFF bytes (NaN) before a run whose results are checked:
    /// an element a candidate does not write then differs from the reference's, instead of
    /// passing with the value the run before left there (answer with no bytes).
    PoisonOutputs,
}

/// Runs the tuning of one call (see the module docs) through `call`: [`candidates`], less the
/// v4 ones whose shared memory this device does not allow a block ([`tc4_fits`]), and for heads
/// that are not 64 wide (`heads_of_64` false) less v4 and the paired kernels, which exist for
/// heads of 64 only. Returns the record; the call's outputs hold the chosen kernels' results.
pub fn tune(
    dev: &Device,
    pass: AttentionPass,
    seqlens: &[usize],
    heads_of_64: bool,
    mut call: impl FnMut(CallStep) -> Result<Vec<u8>, GpuError>,
) -> Result<AttentionTuning, GpuError> {
    let started = std::time::Instant::now();
    let bucket = ShapeBucket::of(seqlens);
    // v4 where its shared memory fits this device (elsewhere its launchers would run v3's
    // kernels under v4's name, as they do for other heads, where v3 runs single blocks too).
    let backward = pass == AttentionPass::Backward;
    let list: Vec<AttentionKernels> = candidates(pass, bucket)
        .into_iter()
        .filter(|k| heads_of_64 || !(k.v4 || k.options.paired_rows))
        .filter(|k| !k.v4 || tc4_fits(dev, seqlens, k.options, backward))
        .collect();
    let (rounds, repeats) = if dev.is_sim() {
        (1, 1)
    } else {
        (TUNING_ROUNDS, TUNING_REPEATS)
    };
    call(CallStep::PoisonOutputs)?;
    call(CallStep::Run(AttentionKernels::REFERENCE))?;
    let reference = call(CallStep::ReadOutputs)?;
    let mut alive = vec![true; list.len()];
    let mut dropped = Vec::new();
    for (i, &kernels) in list.iter().enumerate().skip(1) {
        call(CallStep::PoisonOutputs)?;
        let why = match call(CallStep::Run(kernels)) {
            // A fault is not a kernel that cannot launch here: the context is gone.
            Err(e) if e.ends_the_context() => return Err(in_tuning(e, pass, kernels)),
            Err(e) => Some((format!("{} kernels {kernels}: {e}", pass.name()), false)),
            Ok(_)
                if call(CallStep::ReadOutputs).map_err(|e| in_tuning(e, pass, kernels))?
                    != reference =>
            {
                Some((
                    format!(
                        "{} kernels {kernels}: their results differ from v3's on {}",
                        pass.name(),
                        dev.name()
                    ),
                    true,
                ))
            }
            Ok(_) => None,
        };
        if let Some((why, is_bug)) = why {
            warn_dropped(&why, is_bug);
            dropped.push(why);
            alive[i] = false;
        }
    }
    let mut best = vec![f64::INFINITY; list.len()];
    for _ in 0..rounds {
        for (i, &kernels) in list.iter().enumerate() {
            if !alive[i] {
                continue;
            }
            // The same calls queued untimed first, so the device is busy when the start event
            // is recorded: the timed calls then queue behind work instead of each waiting for
            // its launch, and the host's launch latency (which graphs remove later) is not
            // counted.
            (0..repeats)
                .try_for_each(|_| call(CallStep::Run(kernels)).map(drop))
                .map_err(|e| in_tuning(e, pass, kernels))?;
            let us = dev
                .time_device_work(|| {
                    (0..repeats).try_for_each(|_| call(CallStep::Run(kernels)).map(drop))
                })
                .map_err(|e| in_tuning(e, pass, kernels))?;
            best[i] = best[i].min(us / repeats as f64);
        }
    }
    // The reference is always alive; ties keep the earlier.
    let fastest =
        (0..list.len())
            .filter(|&i| alive[i])
            .fold(0, |b, i| if best[i] < best[b] { i } else { b });
    let chosen = if best[fastest] < best[0] * (1.0 - REFERENCE_MARGIN) {
        list[fastest]
    } else {
        AttentionKernels::REFERENCE
    };
    call(CallStep::Run(chosen))?;
    Ok(AttentionTuning {
        pass,
        bucket,
        timed_on: (seqlens.len(), seqlens.iter().copied().max().unwrap_or(0)),
        candidates: list
            .iter()
            .zip(alive.iter().zip(&best))
            .map(|(&k, (&a, &us))| (k, a.then_some(us)))
            .collect(),
        dropped,
        chosen,
        // The final run is queued, not finished: wait for it, so the time is the tuning's.
        seconds: {
            dev.synchronize()?;
            started.elapsed().as_secs_f64()
        },
    })
}

/// `e`, raised while tuning `pass` with `kernels`, naming them: a fault surfaces at the next
/// call that waits for the device, and the kernels to suspect are the candidate's.
fn in_tuning(e: GpuError, pass: AttentionPass, kernels: AttentionKernels) -> GpuError {
    match e {
        GpuError::Cuda { context, message } => GpuError::Cuda {
            context: format!(
                "{context}, while timing the attention {} kernels {kernels} \
                 (PRM_ATTENTION=v3 runs without them; please report this)",
                pass.name()
            ),
            message,
        },
        other => other,
    }
}

impl GpuVit<'_> {
    /// The kernels for one attention call of `pass` on `seqlens`, and whether the caller must
    /// tune them first (`auto`, a bucket not yet tuned, and not inside a capture: a capture
    /// cannot time, and runs the reference kernels).
    pub(super) fn attention_kernels(
        &self,
        pass: AttentionPass,
        seqlens: &[usize],
    ) -> (AttentionKernels, bool) {
        match self.attention {
            AttentionSetting::Fixed(version, options) => {
                (AttentionKernels::pinned(version, options), false)
            }
            AttentionSetting::Auto => {
                let key = (pass, ShapeBucket::of(seqlens));
                let plans = self
                    .attention_plans
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                match plans.get(&key) {
                    Some(&kernels) => (kernels, false),
                    None => (AttentionKernels::REFERENCE, !self.dev.is_capturing()),
                }
            }
        }
    }

    /// Runs one attention call of `pass` through `call`: with the bucket's kernels, or, when
    /// they are still to be chosen, by [`tune`] (which leaves the chosen kernels' results in
    /// the outputs).
    pub(super) fn run_attention(
        &self,
        pass: AttentionPass,
        seqlens: &[usize],
        mut call: impl FnMut(CallStep) -> Result<Vec<u8>, GpuError>,
    ) -> Result<(), GpuError> {
        let (kernels, must_tune) = self.attention_kernels(pass, seqlens);
        if !must_tune {
            return call(CallStep::Run(kernels)).map(drop);
        }
        let heads_of_64 = self.model.config.head_dim() == HEAD_DIM;
        let tuning = tune(&self.dev, pass, seqlens, heads_of_64, call)?;
        self.attention_plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((pass, tuning.bucket), tuning.chosen);
        self.attention_tuning
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tuning);
        Ok(())
    }

    /// The tensor-core attention setting (from the environment when the engine was made;
    /// [`Self::set_attention`] overrides it).
    pub fn attention_setting(&self) -> AttentionSetting {
        self.attention
    }

    /// Sets the attention kernels of bf16 precision (fp32 precision always runs the SIMT
    /// kernels), and forgets what `auto` had chosen.
    pub fn set_attention(&mut self, setting: AttentionSetting) {
        self.attention = setting;
        self.attention_plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The attention kernels the engine runs, as `prm bench` reports them: at bf16 the
    /// tensor-core setting (`auto`, `v3`, `v4 split 2`, `v2`, ...); for heads that are not 64
    /// wide what runs of it (v4 and paired blocks run as v3's single blocks there, and `auto`
    /// times only v3's options) and the head width; `v1` below 64 wide and at fp32.
    pub fn attention_in_use(&self) -> String {
        let head_dim = self.model.config.head_dim();
        if self.precision != Precision::Bf16 || !self.tensor_core_heads() {
            return format!("v1 (SIMT, fp32), heads {head_dim} wide");
        }
        if head_dim == HEAD_DIM {
            return self.attention.to_string();
        }
        let runs = match self.attention {
            AttentionSetting::Fixed(TensorCoreVersion::V2, _) => "v2".to_string(),
            AttentionSetting::Fixed(_, options) => {
                let options = TcOptions {
                    paired_rows: false,
                    ..options
                };
                AttentionKernels { v4: false, options }.to_string()
            }
            AttentionSetting::Auto => "auto (v3's options)".to_string(),
        };
        format!("{runs}, heads {head_dim} wide")
    }

    /// What `auto` timed and chose so far, in order.
    pub fn attention_tuning(&self) -> Vec<AttentionTuning> {
        self.attention_tuning
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The bytes of `len` elements of a device buffer (the tuner's comparisons).
pub(super) fn buffer_bytes<T: crate::gpu::Element>(
    dev: &Device,
    buffer: &crate::gpu::Buffer<T>,
    len: usize,
) -> Result<Vec<u8>, GpuError> {
    let values = dev.download_range(buffer, 0, len)?;
    Ok(bytemuck::cast_slice(&values).to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setting_from_its_variable() {
        let o = TcOptions::default();
        let parse = |v, sim| AttentionSetting::parse(v, o, sim);
        assert_eq!(parse(None, false), Ok(AttentionSetting::Auto));
        assert_eq!(
            parse(None, true),
            Ok(AttentionSetting::Fixed(TensorCoreVersion::V3, o))
        );
        assert_eq!(parse(Some(" Auto "), true), Ok(AttentionSetting::Auto));
        assert_eq!(
            parse(Some("v4"), false),
            Ok(AttentionSetting::Fixed(TensorCoreVersion::V4, o))
        );
        assert_eq!(
            parse(Some(" V2 "), false),
            Ok(AttentionSetting::Fixed(TensorCoreVersion::V2, o))
        );
        let e = parse(Some("v9"), false).unwrap_err();
        assert!(e.contains("PRM_ATTENTION") && e.contains("auto"), "{e}");
    }

    #[test]
    fn options_from_their_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(TcOptions::from_vars(vars(&[])), TcOptions::default());
        let o = TcOptions::from_vars(vars(&[
            ("PRM_ATTENTION_STRAIGHT", "0"),
            ("PRM_ATTENTION_DELTA_IN_DQ", " 0"),
            ("PRM_ATTENTION_SPLIT", "3"),
            ("PRM_ATTENTION_PAIRS", "1 "),
        ]));
        assert_eq!(
            o,
            TcOptions {
                straight_tiles: false,
                delta_in_dq: false,
                split: 3,
                paired_rows: true,
            }
        );
        let ignored = TcOptions::from_vars(vars(&[
            ("PRM_ATTENTION_SPLIT", "9"),
            ("PRM_ATTENTION_PAIRS", "yes"),
        ]));
        assert_eq!(ignored, TcOptions::default());
    }

    /// For heads that are not 64 wide the tuner times only v3's single-block kernels (masked
    /// tiles, the delta kernel): v4 and paired blocks exist for heads of 64 only, and their
    /// launchers would run the same kernels again under another name.
    #[test]
    fn tuning_other_heads_times_only_v3_single_blocks() {
        let dev = Device::sim();
        for pass in [AttentionPass::Forward, AttentionPass::Backward] {
            let tuning = tune(&dev, pass, &[257], false, |step| match step {
                CallStep::ReadOutputs => Ok(vec![1]),
                _ => Ok(Vec::new()),
            })
            .unwrap();
            let timed: Vec<_> = tuning.candidates.iter().map(|(k, _)| *k).collect();
            assert!(timed.len() >= 2, "{timed:?}");
            assert!(
                timed.iter().all(|k| !k.v4 && !k.options.paired_rows),
                "{timed:?}"
            );
        }
    }

    /// The tuner on a stand-in call: a candidate whose bytes differ from the reference's, one
    /// that writes nothing (its outputs would still hold the reference's results, were they
    /// not poisoned before each checked run) and one that fails are dropped (with their
    /// reasons), the rest are timed, and the last call runs the chosen kernels.
    #[test]
    fn tuning_drops_candidates_that_differ_write_nothing_or_fail() {
        let dev = Device::sim();
        let seqlens = [197, 50];
        let list = candidates(AttentionPass::Backward, ShapeBucket::of(&seqlens));
        let (differs, lazy, fails) = (list[1], list[2], list[5]);
        let mut last = None;
        let mut outputs = vec![0u8; 2];
        let tuning = tune(
            &dev,
            AttentionPass::Backward,
            &seqlens,
            true,
            |step| match step {
                CallStep::Run(k) if k == fails => Err(GpuError::Config("no such kernel".into())),
                CallStep::Run(k) => {
                    last = Some(k);
                    if k != lazy {
                        outputs = vec![u8::from(k == differs), 7];
                    }
                    Ok(Vec::new())
                }
                CallStep::ReadOutputs => Ok(outputs.clone()),
                CallStep::PoisonOutputs => {
                    outputs.fill(0xFF);
                    Ok(Vec::new())
                }
            },
        )
        .unwrap();
        assert_eq!(tuning.bucket, ShapeBucket::of(&seqlens));
        assert_eq!(tuning.timed_on, (2, 197));
        assert_eq!(tuning.dropped.len(), 3, "{:?}", tuning.dropped);
        assert!(
            tuning.dropped[0].contains("v3 masked-tiles") && tuning.dropped[0].contains("differ")
        );
        assert!(
            tuning.dropped[1].contains(&lazy.to_string()) && tuning.dropped[1].contains("differ")
        );
        assert!(
            tuning.dropped[2].contains("v4 split 2")
                && tuning.dropped[2].contains("no such kernel")
        );
        for (k, us) in &tuning.candidates {
            assert_eq!(us.is_none(), [differs, lazy, fails].contains(k), "{k}");
        }
        assert!(![differs, lazy, fails].contains(&tuning.chosen));
        assert_eq!(last, Some(tuning.chosen));
        let json = tuning.to_json();
        assert_eq!(json["pass"], "backward");
        assert_eq!(json["candidates"].as_array().unwrap().len(), list.len());
        assert!(json["candidates"][1]["us_per_call"].is_null());
        assert!(json["tuning_seconds"].as_f64().is_some_and(|s| s >= 0.0));
    }

    /// A fault (the CUDA context is gone) while a candidate runs ends the tuning with an error
    /// naming the candidate, instead of dropping it and going on against a dead context.
    #[test]
    fn a_fault_in_a_candidate_ends_the_tuning_and_names_it() {
        let dev = Device::sim();
        let seqlens = [197];
        let list = candidates(AttentionPass::Forward, ShapeBucket::of(&seqlens));
        let faulty = list[1];
        let err = tune(
            &dev,
            AttentionPass::Forward,
            &seqlens,
            true,
            |step| match step {
                CallStep::Run(k) if k == faulty => Err(GpuError::Cuda {
                    context: "launching a kernel".into(),
                    message: "CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered"
                        .into(),
                }),
                _ => Ok(vec![1]),
            },
        )
        .unwrap_err();
        assert!(err.ends_the_context());
        let text = err.to_string();
        assert!(
            text.contains(&faulty.to_string()) && text.contains("PRM_ATTENTION=v3"),
            "{text}"
        );
        assert!(!GpuError::Config("no such kernel".into()).ends_the_context());
    }

    #[test]
    fn buckets_and_candidates() {
        let b = ShapeBucket::of(&[197; 33]);
        assert_eq!(
            b,
            ShapeBucket {
                sequences: 64,
                tokens: 256
            }
        );
        assert_eq!(ShapeBucket::of(&[257, 3, 1]).tokens, 512);
        // ViT-L/14 at 224 px (257 tokens) is v4-eligible; 513 tokens are not.
        assert!(candidates(AttentionPass::Forward, ShapeBucket::of(&[257]))
            .iter()
            .any(|k| k.v4));
        assert!(
            !candidates(AttentionPass::Backward, ShapeBucket::of(&[513]))
                .iter()
                .any(|k| k.v4)
        );
        assert_eq!(ShapeBucket::of(&[]).sequences, 1);
        let names = |p, b| {
            candidates(p, b)
                .iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(AttentionPass::Backward, b),
            [
                "v3",
                "v3 masked-tiles",
                "v3 delta-kernel",
                "v3 pairs",
                "v4 split 1",
                "v4 split 2",
                "v4 split 1 pairs",
                "v4 split 2 pairs"
            ]
        );
        assert_eq!(
            names(AttentionPass::Forward, ShapeBucket::of(&[1201])),
            ["v3", "v3 masked-tiles", "v3 pairs"]
        );
        assert_eq!(
            names(AttentionPass::Backward, ShapeBucket::of(&[1201])),
            ["v3", "v3 masked-tiles", "v3 delta-kernel", "v3 pairs"]
        );
        assert_eq!(
            names(AttentionPass::Forward, ShapeBucket::of(&[197; 16])),
            [
                "v3",
                "v3 masked-tiles",
                "v3 pairs",
                "v4 split 1",
                "v4 split 2",
                "v4 split 4",
                "v4 split 1 pairs",
                "v4 split 2 pairs"
            ]
        );
        assert_eq!(
            candidates(AttentionPass::Forward, b)[0],
            AttentionKernels::REFERENCE
        );
        assert_eq!(AttentionKernels::REFERENCE.options, TcOptions::default());
    }
}
