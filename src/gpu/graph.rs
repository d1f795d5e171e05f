//! Graphs: a sequence of device work recorded once and replayed with one call, so the host
//! pays for hundreds of launches once instead of at every attack step.
//!
//! [`Device::capture`] runs a closure that issues device work (kernel launches, matrix
//! products, device-to-device copies, fills) and returns a [`Graph`] that repeats exactly that
//! work, with exactly the same arguments, each time [`Graph::launch`] is called. Nothing is
//! executed while capturing. One code path for both devices:
//!
//! - **cuda:** stream capture of the backend's one stream (`cuStreamBeginCapture`,
//!   thread-local mode), `cuGraphInstantiate`, `cuGraphLaunch` (cudarc's `CudaStream::
//!   begin_capture` / `end_capture` / `CudaGraph::launch`). cuBLASLt products are capturable:
//!   they run on a fixed workspace and allocate nothing.
//! - **sim:** a recorded list of operations (kernel name, grid, and a copy of the packed
//!   argument slots; product shapes and operand addresses; copies and fills) replayed in order.
//!   Every address a recorded operation uses is checked at replay against the simulator's
//!   registry of live allocations, so a buffer freed (or freed and re-allocated) under a graph
//!   fails the replay with [`GpuError::Graph`] instead of reading garbage.
//!
//! What a graph cannot contain, under both backends, is an error ([`GpuError::Capture`]):
//! allocations, uploads, downloads and synchronisations inside a capture. Scalars passed to a
//! kernel are baked in at capture; anything that changes between replays (a step counter, a
//! bias correction) must be read by the kernel from device memory.
//!
//! A graph reads and writes the buffers it was captured with, at their addresses: the caller
//! keeps them alive and unshared for the graph's lifetime. [`Device::pin_to_capture`] and
//! [`Graph::keep_alive`] tie resources (cached tables, the buffer pool's arena) to the graph so
//! they are dropped only after it.
//!
//! ```
//! use prm::gpu::{Device, KernelArgs, LaunchConfig};
//! # fn main() -> Result<(), prm::gpu::GpuError> {
//! let dev = Device::sim();
//! let src = dev.upload(&[1.0f32, 2.0, 3.0])?;
//! let mut dst = dev.alloc::<f32>(3)?;
//! let graph = dev.capture(|| dev.copy(&src, &mut dst))?;
//! assert_eq!(dev.download(&dst)?, vec![0.0; 3]); // nothing ran while capturing
//! graph.launch()?;
//! assert_eq!(dev.download(&dst)?, vec![1.0, 2.0, 3.0]);
//! # Ok(()) }
//! ```

use std::any::Any;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::device::{Backend, Device, GpuError, LaunchConfig};
use super::gemm::{MatmulShape, ProductPtrs, ProductTypes};

/// How many operations of each kind a graph replays per launch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphOps {
    pub launches: usize,
    pub products: usize,
    pub copies: usize,
    pub fills: usize,
}

impl GraphOps {
    pub fn total(&self) -> usize {
        self.launches + self.products + self.copies + self.fills
    }
}

/// An address used by a recorded simulator operation, with the identity of the allocation it
/// belonged to at capture (0: not a registered allocation, unchecked).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SimPtr {
    addr: u64,
    id: u64,
}

impl SimPtr {
    pub(crate) fn new(addr: u64) -> SimPtr {
        SimPtr {
            addr,
            id: live_id(addr).unwrap_or(0),
        }
    }

    fn check(&self, what: &str) -> Result<u64, GpuError> {
        if self.id != 0 && live_id(self.addr) != Some(self.id) {
            return Err(GpuError::Graph(format!(
                "{what} uses a buffer (address {:#x}) that was freed after the graph was \
                 captured; keep every buffer a graph uses alive until the graph is dropped",
                self.addr
            )));
        }
        Ok(self.addr)
    }
}

/// One recorded simulator operation.
pub(crate) enum SimOp {
    Launch {
        kernel: String,
        cfg: LaunchConfig,
        slots: Vec<u64>,
        /// Argument slots that hold buffer addresses.
        pointers: Vec<(usize, SimPtr)>,
        /// The bytes after each output buffer, checked at every replay as at a direct launch.
        output_tails: Vec<super::device::OutputTail>,
    },
    Matmul {
        shape: MatmulShape,
        types: ProductTypes,
        a: SimPtr,
        b: SimPtr,
        bias: Option<SimPtr>,
        /// The matrix added (`d` itself, a separate buffer, or none).
        c: Option<SimPtr>,
        d: SimPtr,
    },
    Copy {
        src: SimPtr,
        /// Byte offsets into the two allocations (the pointers are their bases, so that a
        /// replay still checks that both are live).
        src_offset: usize,
        dst: SimPtr,
        dst_offset: usize,
        bytes: usize,
    },
    Fill {
        dst: SimPtr,
        value: u8,
        bytes: usize,
    },
}

impl SimOp {
    fn replay(&self, schedule: Option<super::sim::Schedule>) -> Result<(), GpuError> {
        match self {
            SimOp::Launch {
                kernel,
                cfg,
                slots,
                pointers,
                output_tails,
            } => {
                for (_, p) in pointers {
                    p.check(&format!("kernel {kernel}"))?;
                }
                let mut slots = slots.clone();
                let mut ptrs: Vec<*mut c_void> = slots
                    .iter_mut()
                    .map(|s| s as *mut u64 as *mut c_void)
                    .collect();
                // SAFETY: every output's allocation is live (its pointer was checked above) and
                // its tail lies inside it; the graph's buffers are kept unshared while it lives.
                unsafe {
                    super::device::sim_launch_checking_tails(
                        kernel,
                        *cfg,
                        schedule,
                        &mut ptrs,
                        output_tails,
                    )
                }
            }
            SimOp::Matmul {
                shape,
                types,
                a,
                b,
                bias,
                c,
                d,
            } => {
                let what = "a matrix product";
                let ptrs = ProductPtrs {
                    a: a.check(what)?,
                    b: b.check(what)?,
                    bias: bias.map(|p| p.check(what)).transpose()?,
                    c: c.map(|p| p.check(what)).transpose()?,
                    d: d.check(what)?,
                };
                // SAFETY: the addresses are live simulator allocations (checked above) of the
                // extents asserted when the product was recorded.
                unsafe { super::gemm::sim_matmul_raw(*shape, *types, ptrs) };
                Ok(())
            }
            SimOp::Copy {
                src,
                src_offset,
                dst,
                dst_offset,
                bytes,
            } => {
                let (s, d) = (src.check("a copy")?, dst.check("a copy")?);
                let (s, d) = (s as usize + src_offset, d as usize + dst_offset);
                // SAFETY: live allocations (checked) holding both ranges (checked when
                // recorded); distinct buffers.
                unsafe { std::ptr::copy_nonoverlapping(s as *const u8, d as *mut u8, *bytes) };
                Ok(())
            }
            SimOp::Fill { dst, value, bytes } => {
                let d = dst.check("a fill")?;
                // SAFETY: a live allocation (checked) of at least `bytes` bytes.
                unsafe { std::ptr::write_bytes(d as *mut u8, *value, *bytes) };
                Ok(())
            }
        }
    }
}

/// The state of a capture in progress on a device, by the thread that started it. Other
/// threads' calls are neither refused nor recorded (CUDA's thread-local capture mode).
pub(crate) struct Capturing {
    thread: std::thread::ThreadId,
    sim_ops: Vec<SimOp>,
    ops: GraphOps,
    pins: Vec<Arc<dyn Any + Send + Sync>>,
}

impl Capturing {
    fn new() -> Self {
        Capturing {
            thread: std::thread::current().id(),
            sim_ops: Vec::new(),
            ops: GraphOps::default(),
            pins: Vec::new(),
        }
    }

    fn mine(&self) -> bool {
        self.thread == std::thread::current().id()
    }
}

/// Ends a capture whose body unwound, so the device does not stay in capture mode.
struct EndOnUnwind<'a> {
    dev: &'a Device,
    armed: bool,
}

impl Drop for EndOnUnwind<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.dev
                .capture
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Backend::Cuda(c) = &*self.dev.backend {
                let _ = c.end_capture();
            }
        }
    }
}

pub(crate) type CaptureSlot = Arc<Mutex<Option<Capturing>>>;

enum Body {
    Sim(Vec<SimOp>),
    Cuda(cudarc::driver::CudaGraph),
}

/// A captured sequence of device work; see the module docs.
pub struct Graph {
    // Field order is drop order: the executable graph goes before what it uses.
    body: Body,
    dev: Device,
    ops: GraphOps,
    /// Resources the captured work uses, held (never read) for the graph's lifetime.
    _pins: Vec<Arc<dyn Any + Send + Sync>>,
    kept: Vec<Box<dyn Any>>,
}

impl Graph {
    /// Replays the captured work, in stream order after everything queued before it.
    pub fn launch(&self) -> Result<(), GpuError> {
        let _timed = super::host_stats::timed(super::host_stats::Call::GraphLaunch);
        if self.dev.is_capturing() {
            return Err(GpuError::Capture {
                what: "launching a graph".into(),
            });
        }
        self.dev.timed_op(
            super::timeline::OpKind::Graph,
            || {
                let o = self.ops;
                (
                    format!(
                        "graph replay ({} launches, {} products, {} copies, {} fills)",
                        o.launches, o.products, o.copies, o.fills
                    ),
                    0.0,
                )
            },
            || match (&self.body, &*self.dev.backend) {
                (Body::Sim(ops), Backend::Sim(options)) => options
                    .one_at_a_time(|| ops.iter().try_for_each(|op| op.replay(options.schedule))),
                (Body::Sim(_), Backend::Cuda(_)) => {
                    unreachable!("a simulator graph on a CUDA device")
                }
                (Body::Cuda(g), Backend::Cuda(c)) => c.launch_graph(g),
                (Body::Cuda(_), Backend::Sim(_)) => {
                    unreachable!("a CUDA graph on a simulator device")
                }
            },
        )
    }

    /// What one launch replays.
    pub fn ops(&self) -> GraphOps {
        self.ops
    }

    /// Keeps `value` alive as long as the graph (memory or tables the graph reads).
    pub fn keep_alive<T: 'static>(&mut self, value: T) {
        self.kept.push(Box::new(value));
    }
}

impl Device {
    /// Whether this thread is capturing on this device ([`Device::capture`]).
    pub fn is_capturing(&self) -> bool {
        self.capture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(Capturing::mine)
    }

    /// Records the device work `body` issues into a [`Graph`] without running it. `body`
    /// must not allocate, upload, download or synchronise (each is a [`GpuError::Capture`]).
    /// Work other threads issue meanwhile is not recorded; on CUDA it must not go to this
    /// device's stream (the driver would fail the capture). When `body` fails, the capture is
    /// discarded and its error returned.
    pub fn capture(&self, body: impl FnOnce() -> Result<(), GpuError>) -> Result<Graph, GpuError> {
        let _timed = super::host_stats::timed(super::host_stats::Call::Capture);
        {
            let mut slot = self.capture.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_some() {
                return Err(GpuError::Capture {
                    what: "starting a capture while another is in progress on the device".into(),
                });
            }
            if let Backend::Cuda(c) = &*self.backend {
                c.begin_capture()?;
            }
            *slot = Some(Capturing::new());
        }
        let mut unwind = EndOnUnwind {
            dev: self,
            armed: true,
        };
        let result = body();
        unwind.armed = false;
        let recorded = self
            .capture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .expect("capture in progress");
        // A CUDA capture must be ended whatever happened, or the stream stays in capture mode.
        let body = match &*self.backend {
            Backend::Sim(_) => Ok(Body::Sim(recorded.sim_ops)),
            Backend::Cuda(c) => c.end_capture().map(Body::Cuda),
        };
        result?;
        Ok(Graph {
            body: body?,
            dev: self.clone(),
            ops: recorded.ops,
            _pins: recorded.pins,
            kept: Vec::new(),
        })
    }

    /// Ties `resource` (a cached table, a scratch buffer) to the graph being captured, so that
    /// it lives as long as the graph; a no-op when no capture is in progress.
    pub fn pin_to_capture(&self, resource: Arc<dyn Any + Send + Sync>) {
        if let Some(c) = self
            .capture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .filter(|c| c.mine())
        {
            c.pins.push(resource);
        }
    }

    /// `Err` when a capture is in progress: `what` cannot be part of a graph.
    pub(crate) fn refuse_in_capture(&self, what: &str) -> Result<(), GpuError> {
        if self.is_capturing() {
            return Err(GpuError::Capture { what: what.into() });
        }
        Ok(())
    }

    /// Counts (and under the simulator records) one operation of a capture in progress.
    /// Returns `true` when the operation was recorded for the simulator and must not run now.
    pub(crate) fn record(&self, op: impl FnOnce() -> SimOp, kind: fn(&mut GraphOps)) -> bool {
        let mut slot = self.capture.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = slot.as_mut().filter(|c| c.mine()) else {
            return false;
        };
        kind(&mut c.ops);
        match &*self.backend {
            Backend::Sim(_) => {
                c.sim_ops.push(op());
                true
            }
            Backend::Cuda(_) => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The simulator's registry of live allocations
// ---------------------------------------------------------------------------------------------

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn live() -> &'static Mutex<HashMap<u64, u64>> {
    static LIVE: std::sync::OnceLock<Mutex<HashMap<u64, u64>>> = std::sync::OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Registers a new simulator allocation at `addr` (a fresh identity, even at a reused address).
pub(crate) fn register_allocation(addr: u64) {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    live()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(addr, id);
}

/// Forgets a simulator allocation that is being freed.
pub(crate) fn unregister_allocation(addr: u64) {
    live()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&addr);
}

fn live_id(addr: u64) -> Option<u64> {
    live()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&addr)
        .copied()
}
