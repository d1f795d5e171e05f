//! v2: launchers for `kernels/attention_tc.cu`, tensor-core attention on fp32 buffers (q, k, v
//! and the probabilities rounded to bf16 where they enter a product), one load stage, for heads
//! of every width [`tensor_core_v2_supports_head_dim`] allows (multiples of 8 from 64 to 128).

use super::simt::{kernel, launch_delta_f32};
use super::tc3::dkdv_then_dq;
use super::*;

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

/// Whether v2 has kernels for heads `head_dim` wide: every multiple of 8 from 64 to 128 (64,
/// and open_clip's 80 for ViT-H/14, 88 for ViT-g/14, 104 for ViT-bigG/14, among them);
/// [`attention_forward_tc`] and [`attention_backward_tc`] send other head dims to the SIMT
/// kernels.
pub fn tensor_core_v2_supports_head_dim(head_dim: usize) -> bool {
    head_dim.is_multiple_of(8) && (64..=128).contains(&head_dim)
}

/// Bytes of one bf16 tile of attention_tc.cu's `PrmTcHead<HD>`: max(64, KP) rows of
/// max(64, KP) + 8 elements, KP the head dim rounded up to 16.
fn tile_bytes(head_dim: usize) -> usize {
    let rows = head_dim.next_multiple_of(16).max(TC_TILE);
    rows * (rows + 8) * 2
}

/// Dynamic shared memory of the forward and the dQ kernel (three tiles each).
fn three_tiles(head_dim: usize) -> u32 {
    (3 * tile_bytes(head_dim)) as u32
}

/// Dynamic shared memory of the dK/dV kernel (or of each of its two halves): four tiles and two
/// 64-float rows.
fn dkdv_shared_bytes(head_dim: usize) -> u32 {
    (4 * tile_bytes(head_dim) + 2 * TC_TILE * 4) as u32
}

/// [`attention_forward_f32`] on tensor cores: q, k, v and the probabilities are rounded to bf16
/// where they enter a product (`mma.sync` m16n8k16), products accumulate in fp32, softmax and
/// `lse` are fp32. Same layouts and contract; one CTA per (64-query tile, head, sequence).
/// Falls back to the SIMT kernels for the identity mode and for head dims v2 has no kernels for.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_tc(
    dev: &Device,
    qkv: &Buffer<f32>,
    cu_seqlens: &Buffer<i32>,
    seqlens_host: &[usize],
    out: &mut Buffer<f32>,
    lse: &mut Buffer<f32>,
    width: usize,
    heads: usize,
    mode: AttentionMode,
    causal: bool,
) -> Result<(), GpuError> {
    let head_dim = checked_head_dim(width, heads);
    if !tensor_core_supports(mode, false) || !tensor_core_v2_supports_head_dim(head_dim) {
        return attention_forward_f32(
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
        );
    }
    launch_forward(
        dev,
        &kernel("prm_attention_forward_tc", head_dim),
        Grid::Tiles(TC_TILE),
        three_tiles(head_dim),
        qkv,
        cu_seqlens,
        seqlens_host,
        out,
        lse,
        (width, heads),
        mode,
        causal,
        None,
    )
}

/// [`attention_backward_f32`] on tensor cores (bf16 operands, fp32 accumulation), for the
/// q·kᵀ mode, causal or not; other modes and head dims go to the SIMT kernels, which assume
/// `out` and `lse` came from [`attention_forward_f32`] (so run q·qᵀ / k·kᵀ forwards that will
/// be differentiated through the fp32 kernels). Three launches without atomics: `delta`, dK/dV
/// over 64-key tiles (two, dV then dK, for heads wider than 96), dQ over 64-query tiles.
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
    heads: usize,
    mode: AttentionMode,
    causal: bool,
) -> Result<(), GpuError> {
    let head_dim = checked_head_dim(width, heads);
    if !tensor_core_supports(mode, true) || !tensor_core_v2_supports_head_dim(head_dim) {
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
            heads,
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
        (width, heads),
    );
    if total == 0 {
        return Ok(());
    }
    launch_delta_f32(dev, head_dim, out, d_out, delta, total, heads, width)?;
    let smem = (dkdv_shared_bytes(head_dim), three_tiles(head_dim));
    let kernels = dkdv_then_dq("tc", head_dim, smem);
    let grid = grid(seqlens_host, heads, TC_TILE);
    let ops = (qkv, d_out, lse, &*delta, cu_seqlens);
    launch_f32_backward(
        dev,
        &kernels,
        grid,
        ops,
        d_qkv,
        (width, total),
        &[causal as i32],
    )
}
