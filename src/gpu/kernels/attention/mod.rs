//! Launchers for the attention kernels (`kernels/attention*.cu`): fused multi-head attention
//! over packed variable-length sequences, forward with saved log-sum-exp and input-gradient
//! backward by recomputation. This module holds the contract, the shape checks and the launch
//! steps the versions share; each version's launchers live in their own submodule, one per
//! kernel file, and are re-exported here.
//!
//! Four versions of the same contract (llm.c style), checked against each other and a
//! float64 twin in `tests/kernel_attention.rs`:
//! - v1, [`attention_forward_f32`] / [`attention_backward_f32`] (`attention.cu`, `simt.rs`):
//!   SIMT fp32, every mode; the fp32 engine's kernels and the reference;
//! - v2, [`attention_forward_tc`] / [`attention_backward_tc`] (`attention_tc.cu`,
//!   `tc2.rs`): tensor cores, fp32 buffers rounded to bf16 while loading;
//! - v3, [`attention_forward_tc3`] / [`attention_backward_tc3`] (`attention_tc3.cu`,
//!   `tc3.rs`): tensor cores with bf16 `qkv`, context and `d_qkv` buffers, `cp.async`
//!   double-buffered tiles and `ldmatrix` fragments;
//! - v4, [`attention_forward_tc4`] / [`attention_backward_tc4_bf16_dout`] (`attention_tc4.cu`,
//!   `tc4.rs`): v3's arithmetic in v3's order (bit-identical outputs) with a whole head's keys
//!   and values (or queries and output gradients) resident in shared memory, for sequences up
//!   to [`TC4_MAX_TOKENS`] tokens (v3 beyond). It has run only on the simulator so far.
//!
//! v3 and v4 take [`TcOptions`]: choices of how they run that give the same bits. Which
//! version and options the bf16 engine runs is its business (`gpu::engine::attention_plan`:
//! `PRM_ATTENTION`, by default timed on the device per shape).
//!
//! Head dims: v1 runs heads of every width [`simt_supports_head_dim`] allows (multiples of 8
//! from 32 to 128: open_clip's ViT-H/14, g/14 and bigG/14 have heads of 80, 88 and 104); v2
//! those of [`tensor_core_v2_supports_head_dim`] (multiples of 8 from 64 to 128; it sends
//! others to v1); v3 the same ones ([`tensor_core_v3_supports_head_dim`]; it panics on others,
//! whose bf16 buffers v1 cannot take). v4 and v3's paired kernels run heads of [`HEAD_DIM`]
//! (64: the OpenAI towers', ViT-L/14's and every text tower's); for other heads their launchers
//! run v3's single-block kernels, with the same bits. Every launcher takes the head count.
//!
//! Layouts (row-major; `N = Σ T_i` tokens, `D = width`, head dim `HD = D / heads`):
//! - `qkv [N, 3D]`: q | k | v along features, head `h` in columns `h·HD .. h·HD + HD` of each part;
//! - `cu_seqlens [B + 1]` (`i32`, device): sequence `i` is rows `cu_seqlens[i] .. cu_seqlens[i+1]`;
//!   `seqlens_host [B]` holds the same lengths on the host (grid sizing and shape checks);
//! - `out`, `d_out [N, D]`, head `h` in columns `h·HD ..`;
//! - `lse [heads, N]`: per (head, row) log Σ_j exp(s_ij), scores already scaled by 1/√HD; index
//!   `h·N + row`. Identity mode writes zeros there;
//! - `delta [heads, N]`: backward scratch (`rowsum(dO ⊙ O)`), caller-owned so the engine's arena
//!   can hold it; size it with [`attention_stats_len`];
//! - `d_qkv [N, 3D]`: same layout as `qkv`, every element written (parts no score operand uses
//!   get zeros).
//!
//! Every [`AttentionMode`] has a forward and a backward, causal or not. Deterministic, no
//! global atomics: the backward is `delta` → dK/dV kernel over key tiles → dQ kernel over query
//! tiles, and each output element is owned by one thread.
//!
//! ```no_run
//! use prm::gpu::{Device, kernels::attention::*};
//! let dev = Device::sim();
//! let (width, lens) = (128usize, [50usize, 13]);
//! let n: usize = lens.iter().sum();
//! let heads = 2; // of 64
//! let qkv = dev.upload(&vec![0.1f32; n * 3 * width]).unwrap();
//! let cu = dev.upload(&[0i32, 50, 63]).unwrap();
//! let mut out = dev.alloc::<f32>(n * width).unwrap();
//! let mut lse = dev.alloc::<f32>(heads * n).unwrap();
//! attention_forward_f32(&dev, &qkv, &cu, &lens, &mut out, &mut lse, width, heads,
//!                       AttentionMode::QK, false).unwrap();
//! let d_out = dev.upload(&vec![1.0f32; n * width]).unwrap();
//! let mut d_qkv = dev.alloc::<f32>(n * 3 * width).unwrap();
//! let mut delta = dev.alloc::<f32>(attention_stats_len(n, heads)).unwrap();
//! attention_backward_f32(&dev, &qkv, &out, &d_out, &lse, &cu, &lens, &mut d_qkv, &mut delta,
//!                        width, heads, AttentionMode::QK, false).unwrap();
//! ```

use half::bf16;

use crate::gpu::{Buffer, Device, Element, GpuError, KernelArgs, LaunchConfig};

mod simt;
mod tc2;
mod tc3;
mod tc4;

use simt::checked_head_dim;
pub use simt::{attention_backward_f32, attention_forward_f32};
pub use tc2::{
    attention_backward_tc, attention_forward_tc, tensor_core_supports,
    tensor_core_v2_supports_head_dim,
};
pub use tc3::{
    attention_backward_tc3, attention_backward_tc3_bf16_dout, attention_forward_tc3,
    tensor_core_v3_supports, tensor_core_v3_supports_head_dim,
};
use tc4::tc4_grid;
pub use tc4::{attention_backward_tc4_bf16_dout, attention_forward_tc4, tc4_fits, TC4_MAX_TOKENS};

/// The head dimension of every OpenAI CLIP tower: v4's only one, and the one whose kernels keep
/// their plain names (the others are suffixed `_hd<HD>`).
pub const HEAD_DIM: usize = 64;

/// Whether the SIMT kernels (v1) run heads `head_dim` wide: every multiple of 8 from 32 to 128,
/// one instantiation each in `attention.cu`.
pub fn simt_supports_head_dim(head_dim: usize) -> bool {
    head_dim.is_multiple_of(8) && (32..=128).contains(&head_dim)
}

/// Whether a tower of `width` in `heads` heads runs on the tensor-core kernels with bf16 q|k|v
/// and context: v3 for heads [`tensor_core_v3_supports_head_dim`] allows (multiples of 8 from 64
/// to 128), and v4 too for heads of [`HEAD_DIM`]. Narrower heads run v1, on fp32 q|k|v.
pub fn tensor_cores_run_heads(width: usize, heads: usize) -> bool {
    heads > 0 && width.is_multiple_of(heads) && tensor_core_v3_supports_head_dim(width / heads)
}

const THREADS: u32 = 128;
const FWD_BQ: usize = 64;
const BWD_B: usize = 32;
const TC_TILE: usize = 64;

/// Which attention matrix the kernels form (`s = x·yᵀ / √64`, softmax over rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum AttentionMode {
    /// `q·kᵀ`: standard attention.
    QK = 0,
    /// `q·qᵀ` (SCLIP / ClearCLIP style self-self attention).
    QQ = 1,
    /// `k·kᵀ`.
    KK = 2,
    /// The identity attention matrix: `out = v` (MaskCLIP style); `lse` is written as 0.
    Identity = 3,
}

/// Whether the GPU kernels can run a tower of `width` split into `heads` heads: heads of
/// [`HEAD_DIM`] (64, every OpenAI CLIP tower) on any kernel, other head dims that
/// [`simt_supports_head_dim`] allows (open_clip's ViT-H/14 has 16 heads of 80, ViT-g/14 88,
/// ViT-bigG/14 104) on v2 or v1. The error says what the tower is and what to do.
pub fn check_head_layout(what: &str, width: usize, heads: usize) -> Result<(), String> {
    if heads > 0 && width.is_multiple_of(heads) && simt_supports_head_dim(width / heads) {
        return Ok(());
    }
    let per_head = if heads > 0 {
        format!("{} wide", width as f64 / heads as f64)
    } else {
        "of no width".into()
    };
    let noun = if heads == 1 { "head" } else { "heads" };
    Err(format!(
        "the GPU attention kernels run heads 32 to 128 wide, in steps of 8; this model's {what} \
         has {heads} {noun} {per_head} (width {width}); run it on the CPU reference engine \
         (--device cpu)"
    ))
}

/// Elements of a per-(head, row) table: the forward's `lse` and the backward's `delta`
/// scratch, `heads · tokens`.
pub fn attention_stats_len(total_tokens: usize, heads: usize) -> usize {
    heads * total_tokens
}

/// Checks the common shapes; returns (tokens, heads).
fn check_common<Q: Element>(
    qkv: &Buffer<Q>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    (width, heads): (usize, usize),
) -> (usize, usize) {
    assert!(
        heads > 0 && width.is_multiple_of(heads),
        "attention width {width} does not split into {heads} heads"
    );
    assert!(
        width <= i32::MAX as usize / 3,
        "attention width {width} too large"
    );
    let total: usize = seqlens_host.iter().sum();
    assert!(total <= i32::MAX as usize, "{total} tokens overflow i32");
    assert_eq!(
        cu_seqlens.len(),
        seqlens_host.len() + 1,
        "cu_seqlens has {} entries for {} sequences",
        cu_seqlens.len(),
        seqlens_host.len()
    );
    assert_eq!(
        qkv.len(),
        total * 3 * width,
        "qkv has {} elements, expected [{total}, 3·{width}]",
        qkv.len()
    );
    assert!(
        seqlens_host.len() <= 65_535,
        "{} sequences exceed the grid's z limit",
        seqlens_host.len()
    );
    (total, heads)
}

/// Shape checks of a forward's outputs; returns (tokens, heads).
fn check_forward<Q: Element, O: Element>(
    qkv: &Buffer<Q>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    out: &Buffer<O>,
    lse: &Buffer<f32>,
    (width, heads): (usize, usize),
) -> (usize, usize) {
    let (total, heads) = check_common(qkv, cu_seqlens, seqlens_host, (width, heads));
    assert_eq!(
        out.len(),
        total * width,
        "out has {} elements, expected [{total}, {width}]",
        out.len()
    );
    assert_eq!(
        lse.len(),
        heads * total,
        "lse has {} elements, expected [{heads}, {total}]",
        lse.len()
    );
    (total, heads)
}

/// How a kernel's CTAs cover the work: one per (`tile` rows, head, sequence) (v1–v3), or
/// `split` per (head, sequence) (v4, [`TcOptions::split`]), whose warps take
/// `blocks_per_warp` 16-row blocks at a time (two with [`TcOptions::paired_rows`]).
#[derive(Clone, Copy)]
enum Grid {
    Tiles(usize),
    Resident { split: u32, blocks_per_warp: usize },
}

impl Grid {
    fn shape(self, seqlens_host: &[usize], heads: usize) -> (u32, u32, u32) {
        match self {
            Grid::Tiles(tile) => grid(seqlens_host, heads, tile),
            Grid::Resident {
                split,
                blocks_per_warp,
            } => tc4_grid(seqlens_host, heads, split, blocks_per_warp),
        }
    }
}

/// Checks and launches a forward kernel (SIMT or tensor-core: same parameter list, and v3 / v4
/// take `straight` after it: [`TcOptions::straight_tiles`]) on `cover`'s grid.
#[allow(clippy::too_many_arguments)]
fn launch_forward<Q: Element, O: Element>(
    dev: &Device,
    kernel: &str,
    cover: Grid,
    shared_bytes: u32,
    qkv: &Buffer<Q>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    out: &mut Buffer<O>,
    lse: &mut Buffer<f32>,
    (width, heads): (usize, usize),
    mode: AttentionMode,
    causal: bool,
    straight: Option<bool>,
) -> Result<(), GpuError> {
    let shape = (width, heads);
    let (total, heads) = check_forward(qkv, cu_seqlens, seqlens_host, out, lse, shape);
    if total == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid: cover.shape(seqlens_host, heads),
        block: (THREADS, 1, 1),
        shared_bytes,
    };
    let mut args = KernelArgs::new();
    args.input(qkv)
        .input(cu_seqlens)
        .output(out)
        .output(lse)
        .i32(width as i32)
        .i32(total as i32)
        .i32(mode as i32)
        .i32(causal as i32);
    if let Some(straight) = straight {
        args.i32(straight as i32);
    }
    dev.launch(kernel, cfg, &mut args)
}

/// Shape checks of a backward's inputs, output and scratch; returns (tokens, heads).
#[allow(clippy::too_many_arguments)]
fn check_backward<Q: Element, O: Element, D: Element, G: Element>(
    qkv: &Buffer<Q>,
    out: &Buffer<O>,
    d_out: &Buffer<D>,
    lse: &Buffer<f32>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    d_qkv: &Buffer<G>,
    delta: &Buffer<f32>,
    (width, heads): (usize, usize),
) -> (usize, usize) {
    let (total, heads) = check_forward(qkv, cu_seqlens, seqlens_host, out, lse, (width, heads));
    assert_eq!(
        d_out.len(),
        total * width,
        "d_out has {} elements, expected [{total}, {width}]",
        d_out.len()
    );
    // At least: the engine hands v3 a reused product-operand scratch, possibly longer.
    assert!(
        d_qkv.len() >= total * 3 * width,
        "d_qkv has {} elements, needs [{total}, 3·{width}]",
        d_qkv.len()
    );
    assert!(
        delta.len() >= attention_stats_len(total, heads),
        "delta scratch has {} elements, needs {} (attention_stats_len)",
        delta.len(),
        attention_stats_len(total, heads)
    );
    (total, heads)
}

/// The fp32-buffer backward kernels of v1 and v2, `(name, shared bytes)` each, in stream order
/// on `grid`: parameters (qkv, d_out, lse, delta, cu_seqlens, d_qkv, width, tokens) and then
/// `flags` (v1: mode and causal; v2: causal).
#[allow(clippy::type_complexity)]
fn launch_f32_backward(
    dev: &Device,
    kernels: &[(String, u32)],
    grid: (u32, u32, u32),
    (qkv, d_out, lse, delta, cu_seqlens): (
        &Buffer<f32>,
        &Buffer<f32>,
        &Buffer<f32>,
        &Buffer<f32>,
        &Buffer<i32>,
    ),
    d_qkv: &mut Buffer<f32>,
    (width, total): (usize, usize),
    flags: &[i32],
) -> Result<(), GpuError> {
    for (name, shared_bytes) in kernels {
        let cfg = LaunchConfig {
            grid,
            block: (THREADS, 1, 1),
            shared_bytes: *shared_bytes,
        };
        let mut args = KernelArgs::new();
        args.input(qkv)
            .input(d_out)
            .input(lse)
            .input(delta)
            .input(cu_seqlens)
            .output(d_qkv)
            .i32(width as i32)
            .i32(total as i32);
        for &flag in flags {
            args.i32(flag);
        }
        dev.launch(name, cfg, &mut args)?;
    }
    Ok(())
}

/// A delta kernel and the (row, head) pairs each of its warps takes.
#[derive(Clone, Copy)]
struct DeltaKernel<'a> {
    name: &'a str,
    pairs_per_warp: usize,
}

impl<'a> DeltaKernel<'a> {
    /// One of v3's delta kernels (of a head dim: [`simt::kernel`]'s names), whose warps take
    /// `V3_DELTA_PAIRS` (4) pairs each.
    fn of(name: &'a str) -> Self {
        DeltaKernel {
            name,
            pairs_per_warp: 4,
        }
    }
}

/// v3's delta kernels with fp32 dO (it also writes dO's bf16 copy), and with bf16 dO (v3 and
/// v4), at heads of 64 (others: `_hd<HD>`).
const DELTA_TC3: &str = "prm_attention_delta_tc3";
const DELTA_BF16_TC3: &str = "prm_attention_delta_bf16_tc3";

/// `delta = rowsum(dO ⊙ O)` per (head, row) by `kernel`, the first launch of the backwards (8
/// warps per block).
#[allow(clippy::too_many_arguments)]
fn launch_delta<O: Element, D: Element>(
    dev: &Device,
    kernel: DeltaKernel<'_>,
    out: &Buffer<O>,
    d_out: &Buffer<D>,
    delta: &mut Buffer<f32>,
    d_out_copy: Option<&mut Buffer<bf16>>,
    total: usize,
    heads: usize,
    width: usize,
) -> Result<(), GpuError> {
    let per_block = 8 * kernel.pairs_per_warp;
    let cfg = LaunchConfig::linear((total * heads).div_ceil(per_block) as u32, 256, 0);
    let mut args = KernelArgs::new();
    args.input(out).input(d_out).output(delta);
    // Only v3's fp32-dO kernel takes it: the bf16 copy of dO it writes alongside delta.
    if let Some(copy) = d_out_copy {
        args.output(copy);
    }
    args.i32(width as i32).i32(total as i32);
    dev.launch(kernel.name, cfg, &mut args)
}

fn grid(seqlens_host: &[usize], heads: usize, tile: usize) -> (u32, u32, u32) {
    let max_t = seqlens_host.iter().copied().max().unwrap_or(0);
    (
        max_t.div_ceil(tile) as u32,
        heads as u32,
        seqlens_host.len() as u32,
    )
}

/// A version of the tensor-core kernels (the engine's `PRM_ATTENTION` names one, or `auto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum TensorCoreVersion {
    /// `kernels/attention_tc.cu`: fp32 q/k/v converted while loading, one load stage.
    V2,
    /// `kernels/attention_tc3.cu`: bf16 q/k/v and context, cp.async double buffering, ldmatrix.
    #[default]
    V3,
    /// `kernels/attention_tc4.cu`: v3's arithmetic with a whole head resident in shared memory
    /// (sequences up to [`TC4_MAX_TOKENS`]; v3 beyond). Bit-identical to v3.
    V4,
}

impl TensorCoreVersion {
    /// Whether this version takes bf16 q/k/v and writes a bf16 context (v3 and v4).
    pub fn bf16_qkv(self) -> bool {
        matches!(self, Self::V3 | Self::V4)
    }
}

/// Backward kernels of v3 or v4 with the dK/dV and dQ parameter list, `(name, shared bytes)`
/// each, in order (dK/dV, or dV and dK, then dQ; or dK/dV alone after the dQ that forms
/// delta), on `grid`.
#[allow(clippy::too_many_arguments)]
fn launch_dkdv_dq<K: AsRef<str>>(
    dev: &Device,
    kernels: &[(K, u32)],
    grid: (u32, u32, u32),
    qkv: &Buffer<bf16>,
    d_out: &Buffer<bf16>,
    lse: &Buffer<f32>,
    cu_seqlens: &Buffer<i32>,
    delta: &Buffer<f32>,
    d_qkv: &mut Buffer<bf16>,
    (total, width): (usize, usize),
    causal: bool,
    straight: bool,
) -> Result<(), GpuError> {
    for (name, smem) in kernels {
        let ops = (qkv, d_out, lse, delta, cu_seqlens);
        let shape = (total, width);
        launch_backward_kernel(
            dev,
            (name.as_ref(), *smem),
            grid,
            ops,
            d_qkv,
            shape,
            (causal, straight),
            None,
        )?;
    }
    Ok(())
}

/// One backward kernel of v3 or v4 with the dK/dV and dQ parameter list; given `context`, it
/// is the last parameter (v3's dQ that forms delta from it and writes `delta`: the slot is the
/// same, and the kernel runs before anything else reads delta).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn launch_backward_kernel(
    dev: &Device,
    (kernel, smem): (&str, u32),
    grid: (u32, u32, u32),
    (qkv, d_out, lse, delta, cu_seqlens): (
        &Buffer<bf16>,
        &Buffer<bf16>,
        &Buffer<f32>,
        &Buffer<f32>,
        &Buffer<i32>,
    ),
    d_qkv: &mut Buffer<bf16>,
    (total, width): (usize, usize),
    (causal, straight): (bool, bool),
    context: Option<&Buffer<bf16>>,
) -> Result<(), GpuError> {
    let cfg = LaunchConfig {
        grid,
        block: (THREADS, 1, 1),
        shared_bytes: smem,
    };
    let mut args = KernelArgs::new();
    args.input(qkv)
        .input(d_out)
        .input(lse)
        .input(delta)
        .input(cu_seqlens)
        .output(d_qkv)
        .i32(width as i32)
        .i32(total as i32)
        .i32(causal as i32)
        .i32(straight as i32);
    if let Some(out) = context {
        args.input(out);
    }
    dev.launch(kernel, cfg, &mut args)
}

/// Choices of the v3 and v4 kernels that give the same results, bit for bit: how they run,
/// not what they compute ([`TcOptions::DEFAULT`]: straight tiles, delta inside dQ, one CTA a
/// head). The engine can pick them per shape by timing (`PRM_ATTENTION=auto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcOptions {
    /// Whole tiles with nothing masked run as straight-line code (default), or through the
    /// masked tile's code (`PRM_ATTENTION_STRAIGHT=0`).
    pub straight_tiles: bool,
    /// v3's bf16-dO backward forms delta inside its dQ kernel, then runs dK/dV (default: two
    /// launches), or runs the delta kernel first (three; `PRM_ATTENTION_DELTA_IN_DQ=0`).
    pub delta_in_dq: bool,
    /// CTAs per (head, sequence) of the v4 kernels, 1 to 4 (clamped; `PRM_ATTENTION_SPLIT`).
    /// CTA `x` of `split` takes the 16-row blocks `4·x + warp + 4·split·j`.
    pub split: u32,
    /// Warps run two 16-row blocks at once (`PRM_ATTENTION_PAIRS=1`; default off): v4's
    /// forward and dQ two query blocks, its dK/dV two key blocks; v3's forward and dQ two query
    /// blocks of a 128-query tile, its dK/dV two key blocks of a 128-key tile. Each fragment
    /// read from shared memory feeds both, at about twice the registers (two CTAs an SM
    /// instead of four or three). v4's warps then take pairs of blocks as `split` says they
    /// take blocks.
    pub paired_rows: bool,
}

impl Default for TcOptions {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TcOptions {
    /// Straight tiles, delta inside dQ, one CTA a head, one block a warp.
    pub const DEFAULT: TcOptions = TcOptions {
        straight_tiles: true,
        delta_in_dq: true,
        split: 1,
        paired_rows: false,
    };

    /// The defaults, changed by the environment: `PRM_ATTENTION_STRAIGHT=0`,
    /// `PRM_ATTENTION_DELTA_IN_DQ=0`, `PRM_ATTENTION_SPLIT=1..4`, `PRM_ATTENTION_PAIRS=1`
    /// (other values are ignored).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Self::from_env`] with the variables read through `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let on = |name: &str| var(name).is_none_or(|v| v.trim() != "0");
        TcOptions {
            straight_tiles: on("PRM_ATTENTION_STRAIGHT"),
            delta_in_dq: on("PRM_ATTENTION_DELTA_IN_DQ"),
            split: var("PRM_ATTENTION_SPLIT")
                .and_then(|v| v.trim().parse::<u32>().ok())
                .filter(|v| (1..=4).contains(v))
                .unwrap_or(1),
            paired_rows: var("PRM_ATTENTION_PAIRS").is_some_and(|v| v.trim() == "1"),
        }
    }

    /// The 16-row blocks a v4 warp takes at a time: two with [`Self::paired_rows`].
    fn blocks_per_warp(self) -> usize {
        if self.paired_rows {
            2
        } else {
            1
        }
    }
}

/// The bf16-dO backward of v3 or v4: shape checks, the delta kernel, then `kernels` (dK/dV, or
/// dV and dK, then dQ) on `cover`'s grid. With `dq_delta` (v3's dQ kernel that forms delta
/// itself): that dQ kernel first, then the kernels before the last (dK/dV), and no delta
/// kernel.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn bf16_dout_backward<K: AsRef<str>>(
    dev: &Device,
    version: &str,
    (kernels, delta_kernel): (&[(K, u32)], DeltaKernel<'_>),
    dq_delta: Option<&(String, u32)>,
    cover: Grid,
    (qkv, out, d_out, lse, cu_seqlens, seqlens_host): (
        &Buffer<bf16>,
        &Buffer<bf16>,
        &Buffer<bf16>,
        &Buffer<f32>,
        &Buffer<i32>,
        &[usize],
    ),
    d_qkv: &mut Buffer<bf16>,
    delta: &mut Buffer<f32>,
    (width, heads): (usize, usize),
    mode: AttentionMode,
    causal: bool,
    straight: bool,
) -> Result<(), GpuError> {
    assert!(
        tensor_core_v3_supports(mode, true),
        "attention {version} has no backward for {mode:?}; use attention_backward_f32"
    );
    let (total, heads) = check_backward(
        qkv,
        out,
        d_out,
        lse,
        cu_seqlens,
        seqlens_host,
        d_qkv,
        delta,
        (width, heads),
    );
    if total == 0 {
        return Ok(());
    }
    let grid = cover.shape(seqlens_host, heads);
    let after_delta = match dq_delta {
        Some((dq, smem)) => {
            let ops = (qkv, d_out, lse, &*delta, cu_seqlens);
            let (shape, flags) = ((total, width), (causal, straight));
            let dq = (dq.as_str(), *smem);
            launch_backward_kernel(dev, dq, grid, ops, d_qkv, shape, flags, Some(out))?;
            &kernels[..kernels.len() - 1]
        }
        None => {
            let (n, h) = (total, heads);
            launch_delta(dev, delta_kernel, out, d_out, delta, None, n, h, width)?;
            kernels
        }
    };
    launch_dkdv_dq(
        dev,
        after_delta,
        grid,
        qkv,
        d_out,
        lse,
        cu_seqlens,
        delta,
        d_qkv,
        (total, width),
        causal,
        straight,
    )
}
