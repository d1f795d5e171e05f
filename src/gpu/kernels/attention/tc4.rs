//! v4: launchers for `kernels/attention_tc4.cu`: v3's arithmetic, bit-identical, with a whole
//! head resident in shared memory, up to [`TC4_MAX_TOKENS`] tokens (v3 beyond).

use super::*;

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

pub(super) fn tc4_grid(
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
/// at once with [`TcOptions::paired_rows`]). Heads that are not 64 wide, sequences longer than
/// [`TC4_MAX_TOKENS`], and those whose shared memory this device does not allow
/// ([`tc4_fits`]), run v3's kernel.
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
    heads: usize,
    mode: AttentionMode,
    causal: bool,
    options: TcOptions,
) -> Result<(), GpuError> {
    let fits = tc4_smem_on(dev, seqlens_host, options, false);
    let Some((smem, _)) = fits.filter(|_| runs_heads(width, heads)) else {
        return attention_forward_tc3(
            dev,
            qkv,
            cu_seqlens,
            seqlens_host,
            out,
            lse,
            width,
            heads,
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
        (width, heads),
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
/// Heads that are not 64 wide, sequences longer than [`TC4_MAX_TOKENS`], and those whose shared
/// memory this device does not allow ([`tc4_fits`]), run v3's kernels.
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
    heads: usize,
    mode: AttentionMode,
    causal: bool,
    options: TcOptions,
) -> Result<(), GpuError> {
    let blocks_per_warp = options.blocks_per_warp();
    let fits = tc4_smem_on(dev, seqlens_host, options, true);
    let Some((smem_dq, smem_dkdv)) = fits.filter(|_| runs_heads(width, heads)) else {
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
            heads,
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
        (
            &[(dkdv, smem_dkdv), (dq, smem_dq)],
            DeltaKernel::of(DELTA_BF16_TC3),
        ),
        None,
        Grid::Resident {
            split: options.split,
            blocks_per_warp,
        },
        (qkv, out, d_out, lse, cu_seqlens, seqlens_host),
        d_qkv,
        delta,
        (width, heads),
        mode,
        causal,
        options.straight_tiles,
    )
}

/// Whether v4 has kernels for a tower `width` wide in `heads` heads: heads of [`HEAD_DIM`].
fn runs_heads(width: usize, heads: usize) -> bool {
    heads > 0 && width == heads * HEAD_DIM
}
