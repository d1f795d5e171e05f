//! Launchers for `kernels/resize.cu`: bicubic resize of a batch of planar images with
//! per-image sizes (torch `F.interpolate(mode="bicubic", align_corners=False)` semantics,
//! bit-matching [`crate::reference::resize::bicubic_resize`]) and its exact transpose in
//! deterministic gather form (twin: [`crate::reference::resize::bicubic_resize_backward`]).
//!
//! # Tables
//! A [`ResizePlan`] uploads, for a batch of `images`:
//! - `table [9 · images]` (`i32`), per image: in offset, in h, in w, out offset, out h, out w,
//!   scratch offset (the backward's `[C, out h, in w]` intermediate), x-axis CSR pointer offset,
//!   y-axis CSR pointer offset;
//! - the transposed taps of each image's two axes in CSR form: `csr_ptr` (`i32`, `in + 1`
//!   entries per axis, absolute positions in `csr_idx`/`csr_w`), `csr_idx` (`i32`, output
//!   index) and `csr_w` (`f32`, weight). Input index `i` of an axis receives from the pairs
//!   `csr_ptr[p + i] .. csr_ptr[p + i + 1]`, ordered by output index then tap (the reference's
//!   order). An image whose size does not change lists `(i, 1)` only (it is copied).
//!
//! Offsets are in elements; images are planar `[C, h, w]`. [`ResizePlan::packed`] packs inputs
//! and outputs back to back in batch order; [`ResizePlan::new`] takes explicit offsets.
//!
//! ```no_run
//! use prm::gpu::Device;
//! use prm::gpu::kernels::resize::{resize_forward_f32, ResizePlan};
//! # fn main() -> Result<(), prm::gpu::GpuError> {
//! let dev = Device::sim();
//! let plan = ResizePlan::packed(&dev, 3, &[((43, 61), (30, 41)), ((224, 224), (112, 112))])?;
//! let input = dev.upload(&vec![0.5f32; plan.input_len()])?;
//! let mut out = dev.alloc::<f32>(plan.output_len())?;
//! resize_forward_f32(&dev, &plan, &input, &mut out)?;
//! # Ok(()) }
//! ```

use crate::gpu::{Buffer, Device, GpuError, KernelArgs, LaunchConfig};

/// Entries per image in the plan's table.
pub const RESIZE_TABLE_STRIDE: usize = 9;
const BLOCK: u32 = 256;

/// One image of a resize batch: where its planar input and output live and their sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResizeImage {
    pub in_offset: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_offset: usize,
    pub out_h: usize,
    pub out_w: usize,
}

/// `((in_h, in_w), (out_h, out_w))` of one image.
pub type ResizeSizes = ((usize, usize), (usize, usize));

/// Packs `sizes = [((in_h, in_w), (out_h, out_w))]` back to back (inputs in one buffer,
/// outputs in another) for `channels`-channel planar images.
pub fn pack_resize_images(channels: usize, sizes: &[ResizeSizes]) -> Vec<ResizeImage> {
    let (mut io, mut oo) = (0, 0);
    sizes
        .iter()
        .map(|&((ih, iw), (oh, ow))| {
            let e = ResizeImage {
                in_offset: io,
                in_h: ih,
                in_w: iw,
                out_offset: oo,
                out_h: oh,
                out_w: ow,
            };
            io += channels * ih * iw;
            oo += channels * oh * ow;
            e
        })
        .collect()
}

/// Taps of one output index: clamped input indices and f32 weights, computed exactly as
/// `reference::resize` (ATen's `compute_indices_weights` for cubic, A = −0.75).
pub fn bicubic_axis_taps(in_size: usize, out_size: usize) -> Vec<([usize; 4], [f32; 4])> {
    const A: f32 = -0.75;
    let cc1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cc2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = in_size as f32 / out_size as f32;
    let last = in_size as i64 - 1;
    (0..out_size)
        .map(|dst| {
            let src = scale * (dst as f32 + 0.5) - 0.5;
            let i0 = (src.floor() as i64).min(last);
            let t = (src - i0 as f32).clamp(0.0, 1.0);
            let w = [cc2(t + 1.0), cc1(t), cc1(1.0 - t), cc2(1.0 - t + 1.0)];
            let mut idx = [0usize; 4];
            for (j, slot) in idx.iter_mut().enumerate() {
                *slot = (i0 - 1 + j as i64).clamp(0, last) as usize;
            }
            (idx, w)
        })
        .collect()
}

/// Appends the CSR transpose of an axis `in_size -> out_size` (identity when `copy`); returns
/// the offset of its row pointers in `ptr`.
fn push_axis_csr(
    in_size: usize,
    out_size: usize,
    copy: bool,
    ptr: &mut Vec<i32>,
    idx: &mut Vec<i32>,
    wts: &mut Vec<f32>,
) -> usize {
    let start = ptr.len();
    if copy {
        for i in 0..in_size {
            ptr.push(idx.len() as i32);
            idx.push(i as i32);
            wts.push(1.0);
        }
        ptr.push(idx.len() as i32);
        return start;
    }
    let mut lists: Vec<Vec<(usize, f32)>> = vec![Vec::new(); in_size];
    for (o, (ti, tw)) in bicubic_axis_taps(in_size, out_size).iter().enumerate() {
        for j in 0..4 {
            lists[ti[j]].push((o, tw[j]));
        }
    }
    for list in lists {
        ptr.push(idx.len() as i32);
        for (o, w) in list {
            idx.push(o as i32);
            wts.push(w);
        }
    }
    ptr.push(idx.len() as i32);
    start
}

/// The device tables of one resize batch (see the module docs). Build once per batch shape.
pub struct ResizePlan {
    pub table: Buffer<i32>,
    pub csr_ptr: Buffer<i32>,
    pub csr_idx: Buffer<i32>,
    pub csr_w: Buffer<f32>,
    pub images: Vec<ResizeImage>,
    pub channels: usize,
    input_len: usize,
    output_len: usize,
    scratch_len: usize,
    max_in: usize,
    max_out: usize,
    max_scratch: usize,
}

impl ResizePlan {
    /// A plan for images at explicit offsets.
    pub fn new(dev: &Device, channels: usize, images: &[ResizeImage]) -> Result<Self, GpuError> {
        assert!(!images.is_empty(), "ResizePlan: no images");
        let mut table = Vec::with_capacity(images.len() * RESIZE_TABLE_STRIDE);
        let (mut ptr, mut idx, mut wts) = (Vec::new(), Vec::new(), Vec::new());
        let (mut input_len, mut output_len, mut scratch_len) = (0, 0, 0);
        let (mut max_in, mut max_out, mut max_scratch) = (0, 0, 0);
        for e in images {
            assert!(
                e.in_h > 0 && e.in_w > 0 && e.out_h > 0 && e.out_w > 0,
                "ResizePlan: empty image {e:?}"
            );
            let copy = e.in_h == e.out_h && e.in_w == e.out_w;
            let xp = push_axis_csr(e.in_w, e.out_w, copy, &mut ptr, &mut idx, &mut wts);
            let yp = push_axis_csr(e.in_h, e.out_h, copy, &mut ptr, &mut idx, &mut wts);
            let (n_in, n_out, n_tmp) = (
                channels * e.in_h * e.in_w,
                channels * e.out_h * e.out_w,
                channels * e.out_h * e.in_w,
            );
            for v in [
                e.in_offset,
                e.in_h,
                e.in_w,
                e.out_offset,
                e.out_h,
                e.out_w,
                scratch_len,
                xp,
                yp,
            ] {
                table.push(i32::try_from(v).expect("resize table entry exceeds i32"));
            }
            scratch_len += n_tmp;
            input_len = input_len.max(e.in_offset + n_in);
            output_len = output_len.max(e.out_offset + n_out);
            max_in = max_in.max(n_in);
            max_out = max_out.max(n_out);
            max_scratch = max_scratch.max(n_tmp);
        }
        i32::try_from(idx.len().max(scratch_len).max(input_len).max(output_len))
            .expect("resize batch exceeds i32 elements");
        Ok(ResizePlan {
            table: dev.upload(&table)?,
            csr_ptr: dev.upload(&ptr)?,
            csr_idx: dev.upload(&idx)?,
            csr_w: dev.upload(&wts)?,
            images: images.to_vec(),
            channels,
            input_len,
            output_len,
            scratch_len,
            max_in,
            max_out,
            max_scratch,
        })
    }

    /// A plan for `sizes = [((in_h, in_w), (out_h, out_w))]` packed back to back.
    pub fn packed(dev: &Device, channels: usize, sizes: &[ResizeSizes]) -> Result<Self, GpuError> {
        Self::new(dev, channels, &pack_resize_images(channels, sizes))
    }

    /// Elements the input (and input-gradient) buffer must hold.
    pub fn input_len(&self) -> usize {
        self.input_len
    }
    /// Elements the output (and output-gradient) buffer must hold.
    pub fn output_len(&self) -> usize {
        self.output_len
    }
    /// Elements of the backward's scratch buffer.
    pub fn scratch_len(&self) -> usize {
        self.scratch_len
    }

    fn cfg(&self, max_elems: usize) -> LaunchConfig {
        LaunchConfig {
            grid: (
                max_elems.div_ceil(BLOCK as usize).max(1) as u32,
                self.images.len() as u32,
                1,
            ),
            block: (BLOCK, 1, 1),
            shared_bytes: 0,
        }
    }
}

/// Forward resize of every image of the plan: `output ← resize(input)`.
pub fn resize_forward_f32(
    dev: &Device,
    plan: &ResizePlan,
    input: &Buffer<f32>,
    output: &mut Buffer<f32>,
) -> Result<(), GpuError> {
    assert!(input.len() >= plan.input_len, "resize: input too small");
    assert!(output.len() >= plan.output_len, "resize: output too small");
    let mut args = KernelArgs::new();
    args.input(input)
        .output(output)
        .input(&plan.table)
        .i32(plan.channels as i32);
    dev.launch(
        "prm_resize_bicubic_forward_f32",
        plan.cfg(plan.max_out),
        &mut args,
    )
}

/// Backward (exact transpose) of [`resize_forward_f32`]: `grad_in ← resizeᵀ(grad_out)`, or
/// `grad_in += resizeᵀ(grad_out)` when `accumulate`. `scratch` holds
/// [`ResizePlan::scratch_len`] elements.
pub fn resize_backward_f32(
    dev: &Device,
    plan: &ResizePlan,
    grad_out: &Buffer<f32>,
    grad_in: &mut Buffer<f32>,
    scratch: &mut Buffer<f32>,
    accumulate: bool,
) -> Result<(), GpuError> {
    assert!(
        grad_out.len() >= plan.output_len,
        "resize backward: grad_out too small"
    );
    assert!(
        grad_in.len() >= plan.input_len,
        "resize backward: grad_in too small"
    );
    assert!(
        scratch.len() >= plan.scratch_len,
        "resize backward: scratch too small"
    );
    let mut args = KernelArgs::new();
    args.input(grad_out)
        .output(scratch)
        .input(&plan.table)
        .input(&plan.csr_ptr)
        .input(&plan.csr_idx)
        .input(&plan.csr_w)
        .i32(plan.channels as i32);
    dev.launch(
        "prm_resize_bicubic_backward_x_f32",
        plan.cfg(plan.max_scratch),
        &mut args,
    )?;
    let mut args = KernelArgs::new();
    args.input(scratch)
        .output(grad_in)
        .input(&plan.table)
        .input(&plan.csr_ptr)
        .input(&plan.csr_idx)
        .input(&plan.csr_w)
        .i32(plan.channels as i32)
        .i32(accumulate as i32);
    dev.launch(
        "prm_resize_bicubic_backward_y_f32",
        plan.cfg(plan.max_in),
        &mut args,
    )
}
