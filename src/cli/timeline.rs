//! Device timelines on the command line: the table `prm bench --timeline` and `prm attack
//! --device-timeline` print, and the trace file they write (Chrome trace events, for Perfetto).

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use prm::gpu::Timeline;

/// Rows of the timeline table (the rest are summed into one line).
pub const TIMELINE_ROWS: usize = 24;

/// `writeln!` into a String (which cannot fail).
macro_rules! outln {
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

/// Writes the trace atomically (a temporary file renamed over `path`).
pub fn write_trace(path: &Path, trace: &serde_json::Value) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec(trace)?;
    bytes.push(b'\n');
    prm::io::output::write_atomic(path, |file| {
        file.write_all(&bytes)
            .map_err(|source| prm::io::IoError::Write {
                path: path.to_path_buf(),
                source,
            })
    })
    .with_context(|| format!("cannot write the timeline trace {}", path.display()))
}

/// The timeline as a table: totals, then the largest operations by device time.
pub fn timeline_table(t: &Timeline, what: &str) -> String {
    let mut out = String::new();
    let (busy, span) = (t.busy_us(), t.span_us());
    let (gaps, gap_us) = t.long_gaps();
    let pct = |x: f64| if span > 0.0 { 100.0 * x / span } else { 0.0 };
    outln!(
        out,
        "timeline          {what}: {:.2} ms from the first \
         operation to the last; device busy {:.2} ms ({:.1}%), idle {:.2} ms ({:.1}%), of it \
         {:.2} ms in {gaps} gaps of {:.0} µs or more",
        span / 1e3,
        busy / 1e3,
        pct(busy),
        t.idle_us() / 1e3,
        pct(t.idle_us()),
        gap_us / 1e3,
        prm::gpu::timeline::GAP_THRESHOLD_US
    );
    if t.dropped > 0 {
        outln!(
            out,
            "                  ({} operations after the first {} were not stamped)",
            t.dropped,
            t.ops.len()
        );
    }
    outln!(
        out,
        "  {:>6} {:>10} {:>7} {:>10} {:>8}  operation",
        "busy",
        "ms",
        "calls",
        "µs/call",
        "TFLOP/s"
    );
    let totals = t.totals();
    for row in totals.iter().take(TIMELINE_ROWS) {
        let tflops = if row.flops > 0.0 && row.total_us > 0.0 {
            let tf = row.flops / row.total_us / 1e6;
            if tf >= 1.0 {
                format!("{tf:.1}")
            } else {
                format!("{tf:.2e}")
            }
        } else {
            "-".into()
        };
        outln!(
            out,
            "  {:>5.1}% {:>10.3} {:>7} {:>10.1} {:>8}  {}",
            if busy > 0.0 {
                100.0 * row.total_us / busy
            } else {
                0.0
            },
            row.total_us / 1e3,
            row.calls,
            row.total_us / row.calls as f64,
            tflops,
            row.label
        );
    }
    if totals.len() > TIMELINE_ROWS {
        let rest = &totals[TIMELINE_ROWS..];
        let us: f64 = rest.iter().map(|r| r.total_us).sum();
        let calls: usize = rest.iter().map(|r| r.calls).sum();
        outln!(
            out,
            "  {:>5.1}% {:>10.3} {:>7} {:>10} {:>8}  ({} more operations)",
            if busy > 0.0 { 100.0 * us / busy } else { 0.0 },
            us / 1e3,
            calls,
            "",
            "",
            rest.len()
        );
    }
    for (us, before, after) in t.largest_gaps(3) {
        if us >= prm::gpu::timeline::GAP_THRESHOLD_US {
            outln!(out, "  idle {us:>9.1} µs after {before}, before {after}");
        }
    }
    out
}
