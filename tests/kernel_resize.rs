//! Kernel tests of kernels/resize.cu against `prm::reference::resize` (torch bicubic semantics).
//!
//! Forward: bit-identical to the reference (asserted; f32 with every operation rounded as
//! ATen's CPU kernel does). Backward (exact transpose, gather form): fp32 sums against the
//! reference's f64 sums, max |error| ≤ 1e-5 × max |reference| per image.

use prm::gpu::kernels::resize::{resize_backward_f32, resize_forward_f32, ResizePlan};
use prm::gpu::{Device, GpuError};
use prm::reference::resize::{bicubic_resize, bicubic_resize_backward};

use crate::common::kernel as kernel_common;
use kernel_common::{assert_close, on_devices, Rng};

type Sizes = ((usize, usize), (usize, usize));

/// Forward and backward of a batch, each image checked against the reference.
fn check_batch(dev: &Device, sizes: &[Sizes], seed: u64) -> Result<(), GpuError> {
    const C: usize = 3;
    let plan = ResizePlan::packed(dev, C, sizes)?;
    let mut rng = Rng::new(seed);
    let x = rng.vec(plan.input_len(), -1.0, 1.0);
    let g = rng.vec(plan.output_len(), -1.0, 1.0);
    let prior = rng.vec(plan.input_len(), -1.0, 1.0);
    let xb = dev.upload(&x)?;
    let gb = dev.upload(&g)?;
    let mut out = dev.alloc::<f32>(plan.output_len())?;
    let mut gin = dev.alloc::<f32>(plan.input_len())?;
    let mut scratch = dev.alloc::<f32>(plan.scratch_len().max(1))?;
    dev.poison(&mut out)?;
    dev.poison(&mut gin)?;
    dev.poison(&mut scratch)?;
    resize_forward_f32(dev, &plan, &xb, &mut out)?;
    resize_backward_f32(dev, &plan, &gb, &mut gin, &mut scratch, false)?;
    let out_h = dev.download(&out)?;
    let gin_h = dev.download(&gin)?;
    // Accumulating form: grad_in = prior + transpose.
    let mut gacc = dev.upload(&prior)?;
    dev.poison(&mut scratch)?;
    resize_backward_f32(dev, &plan, &gb, &mut gacc, &mut scratch, true)?;
    let gacc_h = dev.download(&gacc)?;
    for (e, &((ih, iw), (oh, ow))) in plan.images.iter().zip(sizes) {
        let tag = format!("{ih}x{iw}->{oh}x{ow} on {}", dev.name());
        let (ni, no) = (C * ih * iw, C * oh * ow);
        let xi = &x[e.in_offset..e.in_offset + ni];
        let want = bicubic_resize(xi, C, ih, iw, oh, ow);
        let got = &out_h[e.out_offset..e.out_offset + no];
        let differ = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_close(&format!("forward {tag}"), got, &want, 1e-6);
        assert_eq!(
            differ, 0,
            "forward {tag}: {differ} of {no} values not bit-identical"
        );
        let gi = &g[e.out_offset..e.out_offset + no];
        let want_b = bicubic_resize_backward(gi, C, ih, iw, oh, ow);
        assert_close(
            &format!("backward {tag}"),
            &gin_h[e.in_offset..e.in_offset + ni],
            &want_b,
            1e-5,
        );
        let want_acc: Vec<f32> = want_b
            .iter()
            .zip(&prior[e.in_offset..e.in_offset + ni])
            .map(|(a, b)| a + b)
            .collect();
        assert_close(
            &format!("backward (accumulate) {tag}"),
            &gacc_h[e.in_offset..e.in_offset + ni],
            &want_acc,
            1e-5,
        );
    }
    // Determinism: a second run gives the same bits.
    let mut out2 = dev.alloc::<f32>(plan.output_len())?;
    let mut gin2 = dev.alloc::<f32>(plan.input_len())?;
    dev.poison(&mut out2)?;
    dev.poison(&mut gin2)?;
    resize_forward_f32(dev, &plan, &xb, &mut out2)?;
    resize_backward_f32(dev, &plan, &gb, &mut gin2, &mut scratch, false)?;
    assert!(
        bits_equal(&out_h, &dev.download(&out2)?),
        "forward not deterministic"
    );
    assert!(
        bits_equal(&gin_h, &dev.download(&gin2)?),
        "backward not deterministic"
    );
    Ok(())
}

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn resize_downscale_odd_sizes() {
    on_devices("resize 43x61->30x41", |dev| {
        check_batch(dev, &[((43, 61), (30, 41))], 1)
    });
}

#[test]
fn resize_upscale_odd_sizes() {
    on_devices("resize 30x41->43x61", |dev| {
        check_batch(dev, &[((30, 41), (43, 61))], 2)
    });
}

#[test]
fn resize_mixed_batch() {
    on_devices("resize mixed batch", |dev| {
        check_batch(
            dev,
            &[
                ((43, 61), (30, 41)),
                ((17, 23), (17, 23)),
                ((50, 50), (77, 31)),
                ((14, 14), (37, 9)),
                ((224, 224), (112, 112)),
                ((1, 5), (3, 2)),
                ((33, 20), (33, 47)),
            ],
            3,
        )
    });
}

#[test]
fn resize_large_image_once() {
    on_devices("resize 480x640->359x479", |dev| {
        check_batch(dev, &[((480, 640), (359, 479))], 4)
    });
}
