//! v2: launchers for `kernels/attention_tc.cu`, tensor-core attention on fp32 buffers (q, k, v
//! and the probabilities rounded to bf16 where they enter a product), one load stage.

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
            tc_heads(width),
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
        (width, tc_heads(width)),
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
            tc_heads(width),
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
        (width, tc_heads(width)),
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
