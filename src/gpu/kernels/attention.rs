//! Launchers for `kernels/attention.cu`: fused multi-head attention over packed
//! variable-length sequences (fp32, SIMT), forward with saved log-sum-exp and input-gradient
//! backward by recomputation.
//!
//! Three versions of the same contract (llm.c style), checked against each other and a
//! float64 twin in `tests/kernel_attention.rs`:
//! - v1, [`attention_forward_f32`] / [`attention_backward_f32`] (`attention.cu`): SIMT fp32,
//!   every mode; the fp32 engine's kernels and the reference;
//! - v2, [`attention_forward_tc`] / [`attention_backward_tc`] (`attention_tc.cu`): tensor
//!   cores, fp32 buffers rounded to bf16 while loading;
//! - v3, [`attention_forward_tc3`] / [`attention_backward_tc3`] (`attention_tc3.cu`): tensor
//!   cores with bf16 `qkv`, context and `d_qkv` buffers, `cp.async` double-buffered tiles and
//!   `ldmatrix` fragments;
//! - v4, [`attention_forward_tc4`] / [`attention_backward_tc4_bf16_dout`] (`attention_tc4.cu`):
//!   v3's arithmetic in v3's order (bit-identical outputs) with a whole head's keys and values
//!   (or queries and output gradients) resident in shared memory, for sequences up to
//!   [`TC4_MAX_TOKENS`] tokens (v3 beyond). It has run only on the simulator so far.
//!
//! v3 and v4 take [`TcOptions`]: choices of how they run that give the same bits. Which
//! version and options the bf16 engine runs is its business (`gpu::engine::attention_plan`:
//! `PRM_ATTENTION`, by default timed on the device per shape).
//!
//! Layouts (row-major; `N = Σ T_i` tokens, `D = width`, `heads = D / 64`, head dim 64):
//! - `qkv [N, 3D]`: q | k | v along features, head `h` in columns `h·64 .. h·64 + 64` of each part;
//! - `cu_seqlens [B + 1]` (`i32`, device): sequence `i` is rows `cu_seqlens[i] .. cu_seqlens[i+1]`;
//!   `seqlens_host [B]` holds the same lengths on the host (grid sizing and shape checks);
//! - `out`, `d_out [N, D]`, head `h` in columns `h·64 ..`;
//! - `lse [heads, N]`: per (head, row) log Σ_j exp(s_ij), scores already scaled by 1/√64; index
//!   `h·N + row`. Identity mode writes zeros there;
//! - `delta [heads, N]`: backward scratch (`rowsum(dO ⊙ O)`), caller-owned so the engine's arena
//!   can hold it; size it with [`attention_scratch_len`];
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
//! let heads = width / 64;
//! let qkv = dev.upload(&vec![0.1f32; n * 3 * width]).unwrap();
//! let cu = dev.upload(&[0i32, 50, 63]).unwrap();
//! let mut out = dev.alloc::<f32>(n * width).unwrap();
//! let mut lse = dev.alloc::<f32>(heads * n).unwrap();
//! attention_forward_f32(&dev, &qkv, &cu, &lens, &mut out, &mut lse, width,
//!                       AttentionMode::QK, false).unwrap();
//! let d_out = dev.upload(&vec![1.0f32; n * width]).unwrap();
//! let mut d_qkv = dev.alloc::<f32>(n * 3 * width).unwrap();
//! let mut delta = dev.alloc::<f32>(attention_scratch_len(n, width)).unwrap();
//! attention_backward_f32(&dev, &qkv, &out, &d_out, &lse, &cu, &lens, &mut d_qkv, &mut delta,
//!                        width, AttentionMode::QK, false).unwrap();
//! ```

use half::bf16;

use crate::gpu::{Buffer, Device, Element, GpuError, KernelArgs, LaunchConfig};

/// Head dimension the kernels are written for.
pub const HEAD_DIM: usize = 64;

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

/// Elements of the `delta` scratch [`attention_backward_f32`] needs: `heads · tokens`.
pub fn attention_scratch_len(total_tokens: usize, width: usize) -> usize {
    (width / HEAD_DIM) * total_tokens
}

fn check_common<Q: Element>(
    qkv: &Buffer<Q>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    width: usize,
) -> (usize, usize) {
    assert!(
        width > 0 && width % HEAD_DIM == 0,
        "attention width {width} is not a multiple of the head dim {HEAD_DIM}"
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
    (total, width / HEAD_DIM)
}

/// Shape checks of a forward's outputs; returns (tokens, heads).
fn check_forward<Q: Element, O: Element>(
    qkv: &Buffer<Q>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    out: &Buffer<O>,
    lse: &Buffer<f32>,
    width: usize,
) -> (usize, usize) {
    let (total, heads) = check_common(qkv, cu_seqlens, seqlens_host, width);
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
    width: usize,
    mode: AttentionMode,
    causal: bool,
    straight: Option<bool>,
) -> Result<(), GpuError> {
    let (total, heads) = check_forward(qkv, cu_seqlens, seqlens_host, out, lse, width);
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
    width: usize,
) -> (usize, usize) {
    let (total, heads) = check_forward(qkv, cu_seqlens, seqlens_host, out, lse, width);
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
        delta.len() >= attention_scratch_len(total, width),
        "delta scratch has {} elements, needs {} (attention_scratch_len)",
        delta.len(),
        attention_scratch_len(total, width)
    );
    (total, heads)
}

/// A delta kernel and the (row, head) pairs each of its warps takes.
#[derive(Clone, Copy)]
struct DeltaKernel {
    name: &'static str,
    pairs_per_warp: usize,
}

/// v1's (fp32 `out` and dO): one pair a warp.
const DELTA_F32: DeltaKernel = DeltaKernel {
    name: "prm_attention_delta_f32",
    pairs_per_warp: 1,
};
/// v3's with fp32 dO (it also writes dO's bf16 copy), and with bf16 dO (v3 and v4):
/// `V3_DELTA_PAIRS` in attention_tc3.cu.
const DELTA_TC3: DeltaKernel = DeltaKernel {
    name: "prm_attention_delta_tc3",
    pairs_per_warp: 4,
};
const DELTA_BF16_TC3: DeltaKernel = DeltaKernel {
    name: "prm_attention_delta_bf16_tc3",
    pairs_per_warp: 4,
};

/// `delta = rowsum(dO ⊙ O)` per (head, row) by `kernel`, the first launch of the backwards (8
/// warps per block).
#[allow(clippy::too_many_arguments)]
fn launch_delta<O: Element, D: Element>(
    dev: &Device,
    kernel: DeltaKernel,
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

/// Forward attention: `out = softmax(x·yᵀ/√64 [causal mask]) · v` per sequence and head, and the
/// per-(head, row) log-sum-exp `lse [heads, N]` for the backward.
///
/// One CTA per (64-query tile, head, sequence), 128 threads, online softmax over 32-key tiles
/// (shared memory does not grow with `T`). `causal` allows key `j` for query `i` only when
/// `j ≤ i`.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_f32(
    dev: &Device,
    qkv: &Buffer<f32>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    out: &mut Buffer<f32>,
    lse: &mut Buffer<f32>,
    width: usize,
    mode: AttentionMode,
    causal: bool,
) -> Result<(), GpuError> {
    launch_forward(
        dev,
        "prm_attention_forward_f32",
        Grid::Tiles(FWD_BQ),
        0,
        qkv,
        cu_seqlens,
        seqlens_host,
        out,
        lse,
        width,
        mode,
        causal,
        None,
    )
}

/// Input gradient of [`attention_forward_f32`]: from `d_out [N, D]` (and the forward's `out` and
/// `lse`), writes `d_qkv [N, 3D]` completely. `delta` is caller-owned scratch of
/// [`attention_scratch_len`] elements (contents on return: `rowsum(dO ⊙ O)` as `[heads, N]`;
/// untouched in identity mode).
///
/// Three launches, in stream order and without atomics: `delta`; dK/dV (one CTA per 32-key tile,
/// head and sequence, looping over query tiles); dQ (one CTA per 32-query tile, head and
/// sequence, looping over key tiles). Every mode and `causal` are supported; `mode` and
/// `causal` must be those of the forward that produced `out` and `lse`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_f32(
    dev: &Device,
    qkv: &Buffer<f32>,
    out: &Buffer<f32>,
    d_out: &Buffer<f32>,
    lse: &Buffer<f32>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    d_qkv: &mut Buffer<f32>,
    delta: &mut Buffer<f32>,
    width: usize,
    mode: AttentionMode,
    causal: bool,
) -> Result<(), GpuError> {
    let (total, heads) = check_backward(
        qkv,
        out,
        d_out,
        lse,
        cu_seqlens,
        seqlens_host,
        d_qkv,
        delta,
        width,
    );
    if total == 0 {
        return Ok(());
    }
    let (w, n, m, c) = (width as i32, total as i32, mode as i32, causal as i32);

    if mode != AttentionMode::Identity {
        launch_delta(dev, DELTA_F32, out, d_out, delta, None, total, heads, width)?;
    }

    let cfg = LaunchConfig {
        grid: grid(seqlens_host, heads, BWD_B),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    };
    let mut args = KernelArgs::new();
    args.input(qkv)
        .input(d_out)
        .input(lse)
        .input(delta)
        .input(cu_seqlens)
        .output(d_qkv)
        .i32(w)
        .i32(n)
        .i32(m)
        .i32(c);
    dev.launch("prm_attention_bwd_dkdv_f32", cfg, &mut args)?;

    if mode != AttentionMode::Identity {
        let mut args = KernelArgs::new();
        args.input(qkv)
            .input(d_out)
            .input(lse)
            .input(delta)
            .input(cu_seqlens)
            .output(d_qkv)
            .i32(w)
            .i32(n)
            .i32(m)
            .i32(c);
        dev.launch("prm_attention_bwd_dq_f32", cfg, &mut args)?;
    }
    Ok(())
}

/// Whether the tensor-core kernels (`kernels/attention_tc.cu`) implement `mode` / `causal`
/// in the given direction; [`attention_forward_tc`] and [`attention_backward_tc`] fall back to
/// the SIMT kernels otherwise.
pub fn tensor_core_supports(mode: AttentionMode, backward: bool) -> bool {
    match mode {
        AttentionMode::QK => true,
        AttentionMode::QQ | AttentionMode::KK => !backward,
        AttentionMode::Identity => false,
    }
}

/// [`attention_forward_f32`] on tensor cores: q, k, v and the probabilities are rounded to bf16
/// where they enter a product (`mma.sync` m16n8k16), products accumulate in fp32, softmax and
/// `lse` are fp32. Same layouts and contract; one CTA per (64-query tile, head, sequence).
/// Falls back to the SIMT kernel for the identity mode.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_tc(
    dev: &Device,
    qkv: &Buffer<f32>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    out: &mut Buffer<f32>,
    lse: &mut Buffer<f32>,
    width: usize,
    mode: AttentionMode,
    causal: bool,
) -> Result<(), GpuError> {
    if !tensor_core_supports(mode, false) {
        return attention_forward_f32(
            dev,
            qkv,
            cu_seqlens,
            seqlens_host,
            out,
            lse,
            width,
            mode,
            causal,
        );
    }
    launch_forward(
        dev,
        "prm_attention_forward_tc",
        Grid::Tiles(TC_TILE),
        0,
        qkv,
        cu_seqlens,
        seqlens_host,
        out,
        lse,
        width,
        mode,
        causal,
        None,
    )
}

/// [`attention_backward_f32`] on tensor cores (bf16 operands, fp32 accumulation), for the
/// q·kᵀ mode, causal or not; other modes go to the SIMT kernels, which assume `out` and `lse`
/// came from [`attention_forward_f32`] (so run q·qᵀ / k·kᵀ forwards that will be
/// differentiated through the fp32 kernels). Three launches without
/// atomics: `delta`, dK/dV over 64-key tiles, dQ over 64-query tiles.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_tc(
    dev: &Device,
    qkv: &Buffer<f32>,
    out: &Buffer<f32>,
    d_out: &Buffer<f32>,
    lse: &Buffer<f32>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    d_qkv: &mut Buffer<f32>,
    delta: &mut Buffer<f32>,
    width: usize,
    mode: AttentionMode,
    causal: bool,
) -> Result<(), GpuError> {
    if !tensor_core_supports(mode, true) {
        return attention_backward_f32(
            dev,
            qkv,
            out,
            d_out,
            lse,
            cu_seqlens,
            seqlens_host,
            d_qkv,
            delta,
            width,
            mode,
            causal,
        );
    }
    let (total, heads) = check_backward(
        qkv,
        out,
        d_out,
        lse,
        cu_seqlens,
        seqlens_host,
        d_qkv,
        delta,
        width,
    );
    if total == 0 {
        return Ok(());
    }
    let (w, n, c) = (width as i32, total as i32, causal as i32);
    launch_delta(dev, DELTA_F32, out, d_out, delta, None, total, heads, width)?;

    let cfg = LaunchConfig {
        grid: grid(seqlens_host, heads, TC_TILE),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    };
    for kernel in ["prm_attention_bwd_dkdv_tc", "prm_attention_bwd_dq_tc"] {
        let mut args = KernelArgs::new();
        args.input(qkv)
            .input(d_out)
            .input(lse)
            .input(delta)
            .input(cu_seqlens)
            .output(d_qkv)
            .i32(w)
            .i32(n)
            .i32(c);
        dev.launch(kernel, cfg, &mut args)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// v3: kernels/attention_tc3.cu (bf16 in and out, cp.async double buffering, ldmatrix)
// ---------------------------------------------------------------------------------------------

/// Bytes of one 64×64 bf16 shared tile of the v3 kernels (row stride 72 elements).
const TC3_TILE_BYTES: u32 = 64 * 72 * 2;
/// Dynamic shared memory of the v3 kernels: Q + two stages of K and V; Q and dO + two stages
/// of K and V; K and V + two stages of Q and dO and of their lse / delta (64 floats each).
const TC3_FORWARD_SMEM: u32 = 5 * TC3_TILE_BYTES;
/// The paired forward ([`TcOptions::paired_rows`]): a 128-row Q tile, two stages of K and V.
const TC3_FORWARD_PAIRS_SMEM: u32 = 6 * TC3_TILE_BYTES;
const TC3_DQ_SMEM: u32 = 6 * TC3_TILE_BYTES;
const TC3_DKDV_SMEM: u32 = 6 * TC3_TILE_BYTES + 2 * 2 * 64 * 4;
/// v3's dK/dV and dQ kernels with their shared memory, in launch order.
const TC3_DKDV_DQ: [(&str, u32); 2] = [
    ("prm_attention_bwd_dkdv_tc3", TC3_DKDV_SMEM),
    ("prm_attention_bwd_dq_tc3", TC3_DQ_SMEM),
];
/// v3's dQ kernel that forms delta itself (and writes it for dK/dV, launched after it).
const TC3_DQ_DELTA: (&str, u32) = ("prm_attention_bwd_dq_delta_tc3", TC3_DQ_SMEM);
/// The paired backward ([`TcOptions::paired_rows`]), over 128-row tiles: dQ keeps 128 rows of
/// Q and dO with two stages of K and V; dK/dV 128 keys of K and V with two stages of Q and dO
/// and their statistics.
const TC3_DQ_PAIRS_SMEM: u32 = 8 * TC3_TILE_BYTES;
const TC3_DKDV_PAIRS_SMEM: u32 = 8 * TC3_TILE_BYTES + 2 * 2 * 64 * 4;
const TC3_DKDV_DQ_PAIRS: [(&str, u32); 2] = [
    ("prm_attention_bwd_dkdv_tc3_pairs", TC3_DKDV_PAIRS_SMEM),
    ("prm_attention_bwd_dq_tc3_pairs", TC3_DQ_PAIRS_SMEM),
];
const TC3_DQ_DELTA_PAIRS: (&str, u32) = ("prm_attention_bwd_dq_delta_tc3_pairs", TC3_DQ_PAIRS_SMEM);

/// v3's backward kernels for `options` (dK/dV then dQ; the dQ that forms delta) and the rows
/// a CTA covers.
fn tc3_backward_kernels(
    options: TcOptions,
) -> ([(&'static str, u32); 2], (&'static str, u32), usize) {
    if options.paired_rows {
        (TC3_DKDV_DQ_PAIRS, TC3_DQ_DELTA_PAIRS, 2 * TC_TILE)
    } else {
        (TC3_DKDV_DQ, TC3_DQ_DELTA, TC_TILE)
    }
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

/// Whether the v3 kernels implement `mode` / `causal` in the given direction: the forward
/// takes q·kᵀ, q·qᵀ and k·kᵀ, the backward q·kᵀ (causal or not in both), the same cases as v2
/// ([`tensor_core_supports`]). Other cases need the fp32 kernels ([`attention_forward_f32`],
/// [`attention_backward_f32`]).
pub fn tensor_core_v3_supports(mode: AttentionMode, backward: bool) -> bool {
    tensor_core_supports(mode, backward)
}

/// Forward attention v3 on tensor cores: `out = softmax(x·yᵀ/√64 [causal]) · v` from bf16
/// `qkv [N, 3D]` into the bf16 context `out [N, D]` (the out-projection's operand), and fp32
/// `lse [heads, N]`. Products take bf16 operands (P rounded to bf16) and accumulate in fp32;
/// softmax statistics are fp32. One CTA of 128 threads per (64-query tile, head, sequence),
/// 46,080 bytes of dynamic shared memory; with [`TcOptions::paired_rows`], per 128-query tile
/// (each warp running two 16-row blocks at once; 55,296 bytes), with the same bits.
///
/// Panics (a programming error, like a shape mismatch) for a mode
/// [`tensor_core_v3_supports`] rejects.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_tc3(
    dev: &Device,
    qkv: &Buffer<bf16>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    out: &mut Buffer<bf16>,
    lse: &mut Buffer<f32>,
    width: usize,
    mode: AttentionMode,
    causal: bool,
    options: TcOptions,
) -> Result<(), GpuError> {
    assert!(
        tensor_core_v3_supports(mode, false),
        "attention v3 has no forward for {mode:?}; use attention_forward_f32"
    );
    let (kernel, tile, smem) = if options.paired_rows {
        (
            "prm_attention_forward_tc3_pairs",
            2 * TC_TILE,
            TC3_FORWARD_PAIRS_SMEM,
        )
    } else {
        ("prm_attention_forward_tc3", TC_TILE, TC3_FORWARD_SMEM)
    };
    launch_forward(
        dev,
        kernel,
        Grid::Tiles(tile),
        smem,
        qkv,
        cu_seqlens,
        seqlens_host,
        out,
        lse,
        width,
        mode,
        causal,
        Some(options.straight_tiles),
    )
}

/// Input gradient of [`attention_forward_tc3`] (q·kᵀ, causal or not): from the fp32 `d_out
/// [N, D]` (the out-projection's input gradient) and the forward's bf16 `out` and fp32 `lse`,
/// writes every element of the bf16 `d_qkv [N, 3D]`, the operand of the QKV input-gradient
/// product. Scratch, caller-owned: `delta` ([`attention_scratch_len`] fp32; on return
/// `rowsum(dO ⊙ O)` as `[heads, N]`) and `d_out_bf16 [N, D]` (on return bf16(`d_out`)).
///
/// Three launches without atomics: delta (which also rounds dO to bf16), dK/dV over 64-key
/// tiles (56,320 bytes of shared memory), dQ over 64-query tiles (55,296 bytes); with
/// [`TcOptions::paired_rows`], over 128-row tiles, each warp running two 16-row blocks at once
/// (74,752 and 73,728 bytes), with the same bits.
///
/// Panics (a programming error) for a mode [`tensor_core_v3_supports`] rejects.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_tc3(
    dev: &Device,
    qkv: &Buffer<bf16>,
    out: &Buffer<bf16>,
    d_out: &Buffer<f32>,
    lse: &Buffer<f32>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    d_qkv: &mut Buffer<bf16>,
    delta: &mut Buffer<f32>,
    d_out_bf16: &mut Buffer<bf16>,
    width: usize,
    mode: AttentionMode,
    causal: bool,
    options: TcOptions,
) -> Result<(), GpuError> {
    assert!(
        tensor_core_v3_supports(mode, true),
        "attention v3 has no backward for {mode:?}; use attention_backward_f32"
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
        width,
    );
    assert_eq!(
        d_out_bf16.len(),
        total * width,
        "d_out_bf16 has {} elements, expected [{total}, {width}]",
        d_out_bf16.len()
    );
    if total == 0 {
        return Ok(());
    }
    launch_delta(
        dev,
        DELTA_TC3,
        out,
        d_out,
        delta,
        Some(&mut *d_out_bf16),
        total,
        heads,
        width,
    )?;
    tc3_dkdv_dq(
        dev,
        qkv,
        d_out_bf16,
        lse,
        cu_seqlens,
        seqlens_host,
        delta,
        d_qkv,
        (total, width),
        causal,
        options,
    )
}

/// [`attention_backward_tc3`] with `d_out` already in bf16 (the engine's path: the
/// out-projection's input-gradient product writes it in bf16, as PyTorch autocast does).
/// `delta` is formed from the bf16 `d_out`; on a `d_out` whose values are bf16-exact the
/// results are bit-identical to [`attention_backward_tc3`]'s. Two launches: dQ, which forms
/// delta for its own rows and writes it, then dK/dV (with [`TcOptions::delta_in_dq`] off: the
/// delta kernel first, then dK/dV and dQ; same bits). [`TcOptions::paired_rows`] as in
/// [`attention_backward_tc3`].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_tc3_bf16_dout(
    dev: &Device,
    qkv: &Buffer<bf16>,
    out: &Buffer<bf16>,
    d_out: &Buffer<bf16>,
    lse: &Buffer<f32>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    d_qkv: &mut Buffer<bf16>,
    delta: &mut Buffer<f32>,
    width: usize,
    mode: AttentionMode,
    causal: bool,
    options: TcOptions,
) -> Result<(), GpuError> {
    let (dkdv_dq, dq_delta, tile) = tc3_backward_kernels(options);
    bf16_dout_backward(
        dev,
        "v3",
        dkdv_dq,
        options.delta_in_dq.then_some(dq_delta),
        Grid::Tiles(tile),
        (qkv, out, d_out, lse, cu_seqlens, seqlens_host),
        d_qkv,
        delta,
        width,
        mode,
        causal,
        options.straight_tiles,
    )
}

/// The v3 dK/dV and dQ kernels, after the delta kernel.
#[allow(clippy::too_many_arguments)]
fn tc3_dkdv_dq(
    dev: &Device,
    qkv: &Buffer<bf16>,
    d_out: &Buffer<bf16>,
    lse: &Buffer<f32>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    delta: &Buffer<f32>,
    d_qkv: &mut Buffer<bf16>,
    (total, width): (usize, usize),
    causal: bool,
    options: TcOptions,
) -> Result<(), GpuError> {
    let (dkdv_dq, _, tile) = tc3_backward_kernels(options);
    let straight = options.straight_tiles;
    launch_dkdv_dq(
        dev,
        &dkdv_dq,
        grid(seqlens_host, width / HEAD_DIM, tile),
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

/// Backward kernels of v3 or v4 with the dK/dV and dQ parameter list, `(name, shared bytes)`
/// each, in order (dK/dV then dQ, or dK/dV alone after the dQ that forms delta), on `grid`.
#[allow(clippy::too_many_arguments)]
fn launch_dkdv_dq(
    dev: &Device,
    kernels: &[(&str, u32)],
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
    for &kernel in kernels {
        let ops = (qkv, d_out, lse, delta, cu_seqlens);
        let shape = (total, width);
        launch_backward_kernel(
            dev,
            kernel,
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

// ---------------------------------------------------------------------------------------------
// v4: kernels/attention_tc4.cu (v3's arithmetic, a whole head resident in shared memory)
// ---------------------------------------------------------------------------------------------

/// The longest sequence the v4 kernels take. The forward's and dQ's resident tiles are two of
/// `16·⌈T/16⌉` rows × 128 bytes: 53,248 bytes at ViT-B/16's 197 tokens (four CTAs an SM),
/// 69,632 at ViT-L/14's 257 (three on an H100), 131,072 at 512 (one). Longer sequences run v3,
/// and so do shorter ones whose kernels would ask for more shared memory than the device
/// allows a block ([`tc4_fits`]). A power of two, so that `auto`'s shape buckets are all
/// v4-eligible or none.
pub const TC4_MAX_TOKENS: usize = 512;

/// Dynamic shared memory of the v4 kernels for a longest sequence of `max_t` tokens, or `None`
/// past [`TC4_MAX_TOKENS`]: (forward and dQ, dK/dV), dK/dV's with `blocks_per_warp` key
/// blocks a warp.
fn tc4_smem(seqlens_host: &[usize], blocks_per_warp: usize) -> Option<(u32, u32)> {
    let max_t = seqlens_host.iter().copied().max().unwrap_or(0);
    if max_t > TC4_MAX_TOKENS {
        return None;
    }
    let rows = max_t.div_ceil(16) * 16;
    let stat_rows = max_t.div_ceil(TC_TILE) * TC_TILE;
    let resident = 2 * rows * HEAD_DIM * 2;
    // dK/dV adds each query's lse and delta (fp32) and each warp's K and V blocks (16 rows
    // each).
    let warp_blocks = (THREADS as usize / 32) * blocks_per_warp * 2 * 16 * HEAD_DIM * 2;
    let dkdv = resident + 2 * stat_rows * 4 + warp_blocks;
    Some((resident as u32, dkdv as u32))
}

/// The shared memory of v4's forward (`backward` false) or of its backward kernels with
/// `options` on `seqlens_host`, where the v4 kernels take them and `dev` allows it per block;
/// `None` where they run v3's kernels instead.
fn tc4_smem_on(
    dev: &Device,
    seqlens_host: &[usize],
    options: TcOptions,
    backward: bool,
) -> Option<(u32, u32)> {
    let (resident, dkdv) = tc4_smem(seqlens_host, options.blocks_per_warp())?;
    // dK/dV asks for the most of the backward's kernels (the resident tiles and more).
    let need = if backward { dkdv } else { resident };
    match dev.max_shared_per_block() {
        Some(limit) if need > limit => None,
        _ => Some((resident, dkdv)),
    }
}

/// Whether the v4 kernels with `options` run as themselves on `seqlens_host` (forward, or
/// `backward`) on `dev`: at most [`TC4_MAX_TOKENS`] tokens, and shared memory within the
/// device's per-block limit (an H100 allows 227 KiB, an A100 163, the sm_86/sm_89 GPUs 99).
/// Otherwise the v4 launchers run v3's kernels, with the same bits; `auto` does not time v4
/// there.
pub fn tc4_fits(dev: &Device, seqlens_host: &[usize], options: TcOptions, backward: bool) -> bool {
    tc4_smem_on(dev, seqlens_host, options, backward).is_some()
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

fn tc4_grid(
    seqlens_host: &[usize],
    heads: usize,
    split: u32,
    blocks_per_warp: usize,
) -> (u32, u32, u32) {
    let max_units = seqlens_host
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .div_ceil(16 * blocks_per_warp);
    // No more CTAs than there are groups of 4 warps' units: the extra ones would exit at once.
    let split = split.clamp(1, 4).min(max_units.div_ceil(4).max(1) as u32);
    (split, heads as u32, seqlens_host.len() as u32)
}

/// Forward attention v4: [`attention_forward_tc3`]'s contract and bit-identical results. Each
/// CTA (128 threads; [`TcOptions::split`] CTAs per head, default one) loads a head's keys and
/// values into shared memory once and its 4 warps take the head's 16-query blocks in turn (two
/// at once with [`TcOptions::paired_rows`]). Sequences longer than [`TC4_MAX_TOKENS`], or whose
/// shared memory this device does not allow ([`tc4_fits`]), run v3's kernel.
///
/// Panics (a programming error) for a mode [`tensor_core_v3_supports`] rejects.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_tc4(
    dev: &Device,
    qkv: &Buffer<bf16>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    out: &mut Buffer<bf16>,
    lse: &mut Buffer<f32>,
    width: usize,
    mode: AttentionMode,
    causal: bool,
    options: TcOptions,
) -> Result<(), GpuError> {
    let Some((smem, _)) = tc4_smem_on(dev, seqlens_host, options, false) else {
        return attention_forward_tc3(
            dev,
            qkv,
            cu_seqlens,
            seqlens_host,
            out,
            lse,
            width,
            mode,
            causal,
            options,
        );
    };
    assert!(
        tensor_core_v3_supports(mode, false),
        "attention v4 has no forward for {mode:?}; use attention_forward_f32"
    );
    let kernel = if options.paired_rows {
        "prm_attention_forward_tc4_pairs"
    } else {
        "prm_attention_forward_tc4"
    };
    launch_forward(
        dev,
        kernel,
        Grid::Resident {
            split: options.split,
            blocks_per_warp: options.blocks_per_warp(),
        },
        smem,
        qkv,
        cu_seqlens,
        seqlens_host,
        out,
        lse,
        width,
        mode,
        causal,
        Some(options.straight_tiles),
    )
}

/// Input gradient of [`attention_forward_tc4`] with bf16 `d_out`:
/// [`attention_backward_tc3_bf16_dout`]'s contract and bit-identical results. Three launches:
/// v3's delta kernel, then dK/dV (each CTA holds a head's queries, output gradients and their
/// statistics; its warps take the 16-key blocks) and dQ (keys and values resident; warps take
/// the 16-query blocks); with [`TcOptions::paired_rows`] both take two blocks at once.
/// Sequences longer than [`TC4_MAX_TOKENS`], or whose shared memory this device does not allow
/// ([`tc4_fits`]), run v3's kernels.
///
/// Panics (a programming error) for a mode [`tensor_core_v3_supports`] rejects.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_tc4_bf16_dout(
    dev: &Device,
    qkv: &Buffer<bf16>,
    out: &Buffer<bf16>,
    d_out: &Buffer<bf16>,
    lse: &Buffer<f32>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    d_qkv: &mut Buffer<bf16>,
    delta: &mut Buffer<f32>,
    width: usize,
    mode: AttentionMode,
    causal: bool,
    options: TcOptions,
) -> Result<(), GpuError> {
    let blocks_per_warp = options.blocks_per_warp();
    let Some((smem_dq, smem_dkdv)) = tc4_smem_on(dev, seqlens_host, options, true) else {
        return attention_backward_tc3_bf16_dout(
            dev,
            qkv,
            out,
            d_out,
            lse,
            cu_seqlens,
            seqlens_host,
            d_qkv,
            delta,
            width,
            mode,
            causal,
            options,
        );
    };
    let (dkdv, dq) = if options.paired_rows {
        (
            "prm_attention_bwd_dkdv_tc4_pairs",
            "prm_attention_bwd_dq_tc4_pairs",
        )
    } else {
        ("prm_attention_bwd_dkdv_tc4", "prm_attention_bwd_dq_tc4")
    };
    bf16_dout_backward(
        dev,
        "v4",
        [(dkdv, smem_dkdv), (dq, smem_dq)],
        None,
        Grid::Resident {
            split: options.split,
            blocks_per_warp,
        },
        (qkv, out, d_out, lse, cu_seqlens, seqlens_host),
        d_qkv,
        delta,
        width,
        mode,
        causal,
        options.straight_tiles,
    )
}

/// The bf16-dO backward of v3 or v4: shape checks, v3's delta kernel, then `kernels` (dK/dV,
/// dQ) on `cover`'s grid. With `dq_delta` (v3's dQ kernel that forms delta itself): that dQ
/// kernel first, then dK/dV, and no delta kernel.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn bf16_dout_backward(
    dev: &Device,
    version: &str,
    kernels: [(&str, u32); 2],
    dq_delta: Option<(&str, u32)>,
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
    width: usize,
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
        width,
    );
    if total == 0 {
        return Ok(());
    }
    let grid = cover.shape(seqlens_host, heads);
    let [dkdv, _] = kernels;
    let after_delta: &[(&str, u32)] = match dq_delta {
        Some(dq) => {
            let ops = (qkv, d_out, lse, &*delta, cu_seqlens);
            let (shape, flags) = ((total, width), (causal, straight));
            launch_backward_kernel(dev, dq, grid, ops, d_qkv, shape, flags, Some(out))?;
            std::slice::from_ref(&dkdv)
        }
        None => {
            let (n, h) = (total, heads);
            launch_delta(dev, DELTA_BF16_TC3, out, d_out, delta, None, n, h, width)?;
            &kernels
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
