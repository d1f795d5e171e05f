//! Timelines: when each operation on a device's stream ran, and how long the device sat idle
//! between operations, measured on the device itself while the real work runs.
//!
//! `prm bench --timeline [FILE.json]` records one attack this way (the file: the whole timeline
//! in the Trace Event format, for Perfetto). It answers what a per-kernel profiler
//! that serialises kernels cannot: how much of a step's wall time is kernels, and how much is
//! the device waiting for the host (launch gaps, synchronisations, uploads).
//!
//! [`Device::start_timeline`] turns recording on; from then on every kernel launch, product,
//! device copy, fill, upload, download and graph replay that runs directly on the stream is
//! bracketed by two stamps. [`Device::finish_timeline`] waits for the device and turns the
//! stamps into a [`Timeline`]: per operation, its duration and the idle gap before it.
//!
//! - **cuda:** the stamps are timing events recorded on the compute stream (`cuEventRecord`).
//!   The device takes an event's time when it reaches it, after everything before it, so
//!   `end − start` is the operation's device time and `start − previous end` is time the
//!   device had nothing queued. That holds while work is queued ahead of the host; on an idle
//!   stream the start event is taken at once, and the operation's span also holds the host's
//!   time to launch it (a launch gap counted as the operation's, not as idle: in host-bound
//!   stretches durations read high and gaps low). Two events per operation cost the device about a microsecond
//!   each; compare throughput with the timeline off (the bench's timed attacks are run
//!   without it). Events come from a pool created when recording starts (enough for every
//!   operation a recording stamps), so the host's cost per operation stays small.
//! - **sim:** the simulator runs every operation synchronously on the host, so the stamps are
//!   host clock readings: durations are simulated execution times, and gaps the host's own
//!   time between operations.
//!
//! Operations inside a graph capture are not stamped (they do not run then); a graph's replay
//! is one operation. Work on other streams (the staging lane's copies) is not recorded: it
//! overlaps the compute stream's work by design; what the staging lane queues on the compute
//! stream (a staged copy taken, a download through its pinned buffer) is.

use std::collections::HashMap;
use std::time::Instant;

use cudarc::driver::CudaEvent;
use serde_json::json;

use super::device::{Backend, Device, GpuError};

/// What kind of operation a timeline entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    Kernel,
    Product,
    Copy,
    Fill,
    Upload,
    Download,
    Graph,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Kernel => "kernel",
            OpKind::Product => "product",
            OpKind::Copy => "copy",
            OpKind::Fill => "fill",
            OpKind::Upload => "upload",
            OpKind::Download => "download",
            OpKind::Graph => "graph",
        }
    }
}

/// One stamped operation, in stream order.
#[derive(Clone, Debug)]
pub struct TimedOp {
    /// The kernel's name, the product's types and shape, "graph replay (N operations)", ...
    pub label: String,
    pub kind: OpKind,
    /// Floating-point operations (products: 2·m·n·k; 0 for everything else).
    pub flops: f64,
    /// Idle time between the end of the previous operation and the start of this one (0 for
    /// the first), in microseconds.
    pub gap_before_us: f64,
    /// Device time of the operation, in microseconds.
    pub duration_us: f64,
}

/// Every operation of one label, summed.
#[derive(Clone, Debug)]
pub struct OpTotal {
    pub label: String,
    pub kind: OpKind,
    pub calls: usize,
    pub total_us: f64,
    pub flops: f64,
}

/// A recorded timeline of one device's stream; see the module docs.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    pub ops: Vec<TimedOp>,
    /// Operations issued after [`MAX_RECORDED_OPS`] were reached, not stamped.
    pub dropped: usize,
}

/// Idle gaps shorter than this are the device's own turnaround between back-to-back
/// operations, not waiting for the host.
pub const GAP_THRESHOLD_US: f64 = 10.0;

/// Operations stamped per recording at most (two events each on CUDA): about 25 attack steps
/// of ViT-B with graphs off. Later operations run unstamped and are counted in `dropped`.
pub const MAX_RECORDED_OPS: usize = 1 << 14;

impl Timeline {
    /// Device time of all operations, µs.
    pub fn busy_us(&self) -> f64 {
        self.ops.iter().map(|o| o.duration_us).sum()
    }

    /// Idle time between the first operation's start and the last one's end, µs.
    pub fn idle_us(&self) -> f64 {
        self.ops.iter().map(|o| o.gap_before_us).sum()
    }

    /// From the first operation's start to the last one's end, µs.
    pub fn span_us(&self) -> f64 {
        self.busy_us() + self.idle_us()
    }

    /// Gaps of at least [`GAP_THRESHOLD_US`]: their count and total, µs.
    pub fn long_gaps(&self) -> (usize, f64) {
        self.ops
            .iter()
            .filter(|o| o.gap_before_us >= GAP_THRESHOLD_US)
            .fold((0, 0.0), |(n, s), o| (n + 1, s + o.gap_before_us))
    }

    /// Operations summed by label (and kind), the largest total first.
    pub fn totals(&self) -> Vec<OpTotal> {
        let mut index: HashMap<(&str, OpKind), usize> = HashMap::new();
        let mut totals: Vec<OpTotal> = Vec::new();
        for op in &self.ops {
            let i = *index.entry((&op.label, op.kind)).or_insert_with(|| {
                totals.push(OpTotal {
                    label: op.label.clone(),
                    kind: op.kind,
                    calls: 0,
                    total_us: 0.0,
                    flops: 0.0,
                });
                totals.len() - 1
            });
            let t = &mut totals[i];
            t.calls += 1;
            t.total_us += op.duration_us;
            t.flops += op.flops;
        }
        totals.sort_by(|a, b| b.total_us.total_cmp(&a.total_us));
        totals
    }

    /// The `n` longest idle gaps, longest first: (gap µs, the operation before, the operation
    /// the device waited for).
    pub fn largest_gaps(&self, n: usize) -> Vec<(f64, &str, &str)> {
        let mut gaps: Vec<(f64, &str, &str)> = self
            .ops
            .windows(2)
            .map(|w| (w[1].gap_before_us, w[0].label.as_str(), w[1].label.as_str()))
            .collect();
        gaps.sort_by(|a, b| b.0.total_cmp(&a.0));
        gaps.truncate(n);
        gaps
    }

    /// A summary for `prm bench --json`: totals, the `top` largest labels and the 5 longest
    /// gaps. Times in ms (totals) and µs (per call, gaps).
    pub fn summary_json(&self, top: usize) -> serde_json::Value {
        let busy = self.busy_us();
        let (long_gaps, long_gap_us) = self.long_gaps();
        let operations: Vec<serde_json::Value> = self
            .totals()
            .iter()
            .take(top)
            .map(|t| {
                json!({
                    "label": t.label,
                    "kind": t.kind.name(),
                    "calls": t.calls,
                    "total_ms": t.total_us / 1e3,
                    "mean_us": t.total_us / t.calls as f64,
                    "share_of_busy": if busy > 0.0 { t.total_us / busy } else { 0.0 },
                    "tflops": (t.flops > 0.0 && t.total_us > 0.0).then(|| t.flops / t.total_us / 1e6),
                })
            })
            .collect();
        let gaps: Vec<serde_json::Value> = self
            .largest_gaps(5)
            .iter()
            .map(|(us, before, after)| json!({"gap_us": us, "after": before, "before": after}))
            .collect();
        json!({
            "operations_recorded": self.ops.len(),
            "operations_dropped": self.dropped,
            "span_ms": self.span_us() / 1e3,
            "busy_ms": busy / 1e3,
            "idle_ms": self.idle_us() / 1e3,
            "gaps_over_10us": long_gaps,
            "gaps_over_10us_ms": long_gap_us / 1e3,
            "largest_gaps": gaps,
            "operations": operations,
        })
    }
}

impl Timeline {
    /// The timeline in the Trace Event format (`{"traceEvents": [...]}`) that Perfetto
    /// (ui.perfetto.dev) and chrome://tracing open: one complete event per operation on one
    /// track, times in µs from the first operation's start, idle gaps as empty space.
    pub fn trace_event_json(&self, device: &str) -> serde_json::Value {
        let mut at = 0.0;
        let mut events = vec![json!({
            "name": "thread_name", "ph": "M", "pid": 0, "tid": 0,
            "args": {"name": format!("{device}: stream")},
        })];
        for op in &self.ops {
            at += op.gap_before_us;
            let mut args = json!({"gap_before_us": op.gap_before_us});
            if op.flops > 0.0 {
                args["flops"] = json!(op.flops);
                if op.duration_us > 0.0 {
                    args["tflops"] = json!(op.flops / op.duration_us / 1e6);
                }
            }
            events.push(json!({
                "name": op.label,
                "cat": op.kind.name(),
                "ph": "X",
                "ts": at,
                "dur": op.duration_us,
                "pid": 0,
                "tid": 0,
                "args": args,
            }));
            at += op.duration_us;
        }
        json!({"traceEvents": events, "displayTimeUnit": "ms"})
    }
}

/// A point in a stream: a host clock reading (simulator) or a recorded timing event (CUDA).
enum Stamp {
    Host(Instant),
    Event(CudaEvent),
}

struct Pending {
    label: String,
    kind: OpKind,
    flops: f64,
    start: Stamp,
    end: Stamp,
}

/// The recording in progress on a device.
pub(crate) struct Recorder {
    pending: Vec<Pending>,
    dropped: usize,
    /// Created timing events not used yet (CUDA).
    spare: Vec<CudaEvent>,
}

/// Events created up front when a CUDA recording starts: two per operation it can stamp, so
/// that no `cuEventCreate` runs between operations (its host time would show as idle gaps in
/// a host-bound timeline). About 30,000 small driver objects, created in tens of milliseconds.
const EVENTS_UP_FRONT: usize = 2 * MAX_RECORDED_OPS;

pub(crate) type TimelineSlot = std::sync::Arc<std::sync::Mutex<Option<Recorder>>>;

impl Device {
    /// Starts recording a [`Timeline`] of this device's stream (see the module docs). Fails
    /// when a recording is already in progress on the device or a capture is.
    pub fn start_timeline(&self) -> Result<(), GpuError> {
        self.refuse_in_capture("starting a timeline")?;
        let mut slot = self.timeline.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return Err(GpuError::Timeline(
                "a timeline is already being recorded on this device; finish it first".into(),
            ));
        }
        let spare = match &*self.backend {
            Backend::Sim(_) => Vec::new(),
            Backend::Cuda(c) => (0..EVENTS_UP_FRONT)
                .map(|_| c.timing_event())
                .collect::<Result<_, _>>()?,
        };
        *slot = Some(Recorder {
            pending: Vec::new(),
            dropped: 0,
            spare,
        });
        Ok(())
    }

    /// Stops recording, waits for the device and returns the timeline. Fails when no
    /// recording was started.
    pub fn finish_timeline(&self) -> Result<Timeline, GpuError> {
        let recorder = self
            .timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| {
                GpuError::Timeline("no timeline is being recorded: call start_timeline".into())
            })?;
        self.synchronize()?;
        let mut ops = Vec::with_capacity(recorder.pending.len());
        let mut previous_end: Option<&Stamp> = None;
        for p in &recorder.pending {
            let gap_before_us = match previous_end {
                Some(e) => elapsed_us(e, &p.start)?.max(0.0),
                None => 0.0,
            };
            ops.push(TimedOp {
                label: p.label.clone(),
                kind: p.kind,
                flops: p.flops,
                gap_before_us,
                duration_us: elapsed_us(&p.start, &p.end)?.max(0.0),
            });
            previous_end = Some(&p.end);
        }
        Ok(Timeline {
            ops,
            dropped: recorder.dropped,
        })
    }

    /// Runs `op` and, while a timeline is recorded (and this thread is not capturing),
    /// stamps it with `describe()`'s label and FLOP count.
    pub(crate) fn timed_op<R>(
        &self,
        kind: OpKind,
        describe: impl FnOnce() -> (String, f64),
        op: impl FnOnce() -> Result<R, GpuError>,
    ) -> Result<R, GpuError> {
        if !self.timeline_wants_stamps() {
            return op();
        }
        let start = self.stamp()?;
        let result = op()?;
        let end = self.stamp()?;
        let (label, flops) = describe();
        if let Some(r) = self
            .timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            r.pending.push(Pending {
                label,
                kind,
                flops,
                start,
                end,
            });
        }
        Ok(result)
    }

    /// Device time of the work `op` issues, in microseconds: two timing events around it on
    /// CUDA (this waits for the device), the host's clock on the simulator (which runs work
    /// as it is issued). Not during a capture: nothing runs then.
    pub(crate) fn time_device_work(
        &self,
        op: impl FnOnce() -> Result<(), GpuError>,
    ) -> Result<f64, GpuError> {
        if self.is_capturing() {
            return Err(GpuError::Config(
                "timing device work during a graph capture (nothing runs then)".into(),
            ));
        }
        let (start, end) = match &*self.backend {
            Backend::Sim(_) => {
                let start = Stamp::Host(Instant::now());
                op()?;
                (start, Stamp::Host(Instant::now()))
            }
            Backend::Cuda(c) => {
                let (start, end) = (c.timing_event()?, c.timing_event()?);
                c.record_event(&start)?;
                op()?;
                c.record_event(&end)?;
                c.synchronize()?;
                (Stamp::Event(start), Stamp::Event(end))
            }
        };
        elapsed_us(&start, &end)
    }

    fn timeline_wants_stamps(&self) -> bool {
        let mut slot = self.timeline.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = slot.as_mut() else {
            return false;
        };
        if r.pending.len() >= MAX_RECORDED_OPS {
            r.dropped += 1;
            return false;
        }
        drop(slot);
        !self.is_capturing()
    }

    fn stamp(&self) -> Result<Stamp, GpuError> {
        match &*self.backend {
            Backend::Sim(_) => Ok(Stamp::Host(Instant::now())),
            Backend::Cuda(c) => {
                let spare = self
                    .timeline
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_mut()
                    .and_then(|r| r.spare.pop());
                let event = match spare {
                    Some(e) => e,
                    None => c.timing_event()?,
                };
                c.record_event(&event)?;
                Ok(Stamp::Event(event))
            }
        }
    }
}

fn elapsed_us(from: &Stamp, to: &Stamp) -> Result<f64, GpuError> {
    match (from, to) {
        (Stamp::Host(a), Stamp::Host(b)) => Ok(b.saturating_duration_since(*a).as_secs_f64() * 1e6),
        (Stamp::Event(a), Stamp::Event(b)) => a
            .elapsed_ms(b)
            .map(|ms| ms as f64 * 1e3)
            .map_err(|e| super::cuda::cuda_err("reading a timeline event", e)),
        _ => unreachable!("stamps of one recording come from one backend"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(label: &str, kind: OpKind, gap: f64, dur: f64, flops: f64) -> TimedOp {
        TimedOp {
            label: label.into(),
            kind,
            flops,
            gap_before_us: gap,
            duration_us: dur,
        }
    }

    #[test]
    fn totals_sum_by_label_and_sort_by_time() {
        let t = Timeline {
            ops: vec![
                op("a", OpKind::Kernel, 0.0, 5.0, 0.0),
                op("p", OpKind::Product, 2.0, 10.0, 4e6),
                op("a", OpKind::Kernel, 30.0, 7.0, 0.0),
                op("p", OpKind::Product, 1.0, 10.0, 4e6),
            ],
            dropped: 0,
        };
        assert_eq!(t.busy_us(), 32.0);
        assert_eq!(t.idle_us(), 33.0);
        assert_eq!(t.span_us(), 65.0);
        assert_eq!(t.long_gaps(), (1, 30.0));
        let totals = t.totals();
        assert_eq!(totals.len(), 2);
        assert_eq!((totals[0].label.as_str(), totals[0].calls), ("p", 2));
        assert_eq!(totals[0].total_us, 20.0);
        assert_eq!(totals[1].total_us, 12.0);
        assert_eq!(t.largest_gaps(1), vec![(30.0, "p", "a")]);
        let j = t.summary_json(1);
        assert_eq!(j["operations"].as_array().unwrap().len(), 1);
        // 8 MFLOP in 20 µs = 0.4 TFLOP/s.
        assert!((j["operations"][0]["tflops"].as_f64().unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(j["gaps_over_10us"], 1);

        let trace = t.trace_event_json("dev");
        let events = trace["traceEvents"].as_array().unwrap();
        assert_eq!(events.len(), 5); // the track's name, then one per operation
        let starts: Vec<f64> = events[1..]
            .iter()
            .map(|e| e["ts"].as_f64().unwrap())
            .collect();
        assert_eq!(starts, [0.0, 7.0, 47.0, 55.0]);
        assert_eq!(events[2]["args"]["flops"], 4e6);
        assert_eq!(events[3]["dur"], 7.0);
    }
}
