//! Kernel tests of kernels/loss.cu against the loss twins of `prm::attack::loss`
//! (`mean_token_cosine`, and f64 twins here of its private `neg_mean_squared_distance` and
//! `dispersion`, copied formula for formula).
//!
//! fp32 tolerance: per-image loss values within 1e-5 relative; gradients within
//! 1e-5 × max |reference gradient| of the image (max-norm relative error).

#![allow(dead_code)]

use prm::attack::loss::mean_token_cosine;
use prm::attack::settings::TokenSelection;
use prm::gpu::kernels::loss::{
    layer_cosine_f32, layer_loss_f32, layer_loss_f32_gradient, Gradient, LayerLoss, LossScratch,
    PackedTokens,
};
use prm::gpu::{Device, GpuError};

use crate::common::kernel as kernel_common;
use kernel_common::{max_abs, on_devices, Rng};

fn rows_of(tokens: usize, sel: TokenSelection) -> std::ops::Range<usize> {
    match sel {
        TokenSelection::All => 0..tokens,
        TokenSelection::Patch => 1..tokens,
    }
}

/// Twin of `attack::loss::neg_mean_squared_distance`.
fn nrd_twin(a: &[f32], c: &[f32], dim: usize, sel: TokenSelection) -> (f64, Vec<f32>) {
    let rows = rows_of(a.len() / dim, sel);
    let range = rows.start * dim..rows.end * dim;
    let n = range.len() as f64;
    let sum: f64 = range
        .clone()
        .map(|i| (a[i] as f64 - c[i] as f64).powi(2))
        .sum();
    let mut g = vec![0.0f32; a.len()];
    for i in range {
        g[i] = (-2.0 * (a[i] as f64 - c[i] as f64) / n) as f32;
    }
    (-sum / n, g)
}

/// Twin of `attack::loss::dispersion`.
fn dr_twin(a: &[f32], dim: usize, sel: TokenSelection, sign: f64) -> (f64, Vec<f32>) {
    let rows = rows_of(a.len() / dim, sel);
    let range = rows.start * dim..rows.end * dim;
    let n = range.len() as f64;
    let mean = range.clone().map(|i| a[i] as f64).sum::<f64>() / n;
    let var = range
        .clone()
        .map(|i| (a[i] as f64 - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    let std = var.sqrt();
    let mut g = vec![0.0f32; a.len()];
    let scale = sign / ((n - 1.0) * std.max(1e-12));
    for i in range {
        g[i] = ((a[i] as f64 - mean) * scale) as f32;
    }
    (sign * std, g)
}

fn twin(kind: LayerLoss, a: &[f32], c: &[f32], dim: usize, sel: TokenSelection) -> (f64, Vec<f32>) {
    match kind {
        LayerLoss::Prm => {
            let mut g = vec![0.0f32; a.len()];
            let v = mean_token_cosine(a, c, dim, sel, Some(&mut g));
            (v, g)
        }
        LayerLoss::Nrd => nrd_twin(a, c, dim, sel),
        LayerLoss::Dr => dr_twin(a, dim, sel, 1.0),
        LayerLoss::DrOfficial => dr_twin(a, dim, sel, -1.0),
    }
}

const KINDS: [LayerLoss; 4] = [
    LayerLoss::Prm,
    LayerLoss::Nrd,
    LayerLoss::Dr,
    LayerLoss::DrOfficial,
];

/// One packed layer with `tokens[b]` rows per image: every kind, both token selections,
/// loss overwritten and accumulated, gradient added into a prefilled running gradient.
fn check_layer(dev: &Device, tokens: &[usize], dim: usize, seed: u64) -> Result<(), GpuError> {
    let images = tokens.len();
    let rows: usize = tokens.iter().sum();
    let mut cu = vec![0i32];
    for &t in tokens {
        cu.push(cu.last().unwrap() + t as i32);
    }
    let mut rng = Rng::new(seed);
    // Features with a per-image offset and clean = 0.8·adv + noise (cosines around 0.8).
    let mut a = rng.vec(rows * dim, -1.0, 1.0);
    for (b, w) in cu.windows(2).enumerate() {
        for v in &mut a[w[0] as usize * dim..w[1] as usize * dim] {
            *v = *v * (1.0 + b as f32) + 0.3 * b as f32;
        }
    }
    let noise = rng.vec(rows * dim, -0.6, 0.6);
    let c: Vec<f32> = a.iter().zip(&noise).map(|(x, n)| 0.8 * x + n).collect();
    let cu_b = dev.upload(&cu)?;
    let ab = dev.upload(&a)?;
    let cb = dev.upload(&c)?;
    let shape = PackedTokens {
        cu_seqlens: &cu_b,
        images,
        rows,
        dim,
    };
    let mut scratch = LossScratch::new(dev, rows, images)?;
    for sel in [TokenSelection::All, TokenSelection::Patch] {
        for kind in KINDS {
            let tag = format!("{kind:?} {sel:?} T={tokens:?} D={dim} on {}", dev.name());
            let refs: Vec<(f64, Vec<f32>)> = cu
                .windows(2)
                .map(|w| {
                    let r = w[0] as usize * dim..w[1] as usize * dim;
                    twin(kind, &a[r.clone()], &c[r], dim, sel)
                })
                .collect();
            // Running gradient prefilled with values of the gradient's own size.
            let gscale = refs.iter().map(|r| max_abs(&r.1)).fold(0.0f32, f32::max);
            let prior = rng.vec(rows * dim, -gscale, gscale);
            let mut grad = dev.upload(&prior)?;
            let mut loss = dev.alloc::<f32>(images)?;
            dev.poison(&mut loss)?;
            layer_loss_f32(
                dev,
                kind,
                sel,
                shape,
                &ab,
                &cb,
                &mut loss,
                false,
                Some(&mut grad),
                &mut scratch,
            )?;
            // The bf16 engine's variant: the same gradient, bit for bit, and its bf16 copy
            // (every row, the unselected CLS rows included).
            let mut grad2 = dev.upload(&prior)?;
            let mut copy = dev.alloc::<half::bf16>(rows * dim)?;
            dev.poison(&mut copy)?;
            let mut loss2 = dev.alloc::<f32>(images)?;
            layer_loss_f32_gradient(
                dev,
                kind,
                sel,
                shape,
                &ab,
                &cb,
                &mut loss2,
                false,
                Some(Gradient {
                    grad: &mut grad2,
                    copy: Some(&mut copy),
                }),
                &mut scratch,
            )?;
            let (g1, g2) = (dev.download(&grad)?, dev.download(&grad2)?);
            assert!(
                g1.iter().zip(&g2).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{tag}: the bf16-copy variant's fp32 gradient differs"
            );
            let rounded: Vec<half::bf16> = g1.iter().map(|&v| half::bf16::from_f32(v)).collect();
            assert_eq!(dev.download(&copy)?, rounded, "{tag}: bf16 copy");
            assert_eq!(dev.download(&loss2)?, dev.download(&loss)?, "{tag}: loss");
            let loss_h = dev.download(&loss)?;
            let grad_h = dev.download(&grad)?;
            // Accumulated value: loss = 0.25 + value.
            let mut acc = dev.upload(&vec![0.25f32; images])?;
            layer_loss_f32(
                dev,
                kind,
                sel,
                shape,
                &ab,
                &cb,
                &mut acc,
                true,
                None,
                &mut scratch,
            )?;
            let acc_h = dev.download(&acc)?;
            for (b, w) in cu.windows(2).enumerate() {
                let (want, want_g) = &refs[b];
                let got = loss_h[b] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1e-3),
                    "{tag}: image {b} loss {got} vs twin {want}"
                );
                let got_acc = acc_h[b] as f64;
                assert!(
                    (got_acc - (0.25 + want)).abs() <= 1e-5 * (0.25 + want.abs()),
                    "{tag}: image {b} accumulated loss {got_acc} vs {}",
                    0.25 + want
                );
                let r = w[0] as usize * dim..w[1] as usize * dim;
                let g_rows: Vec<f32> = grad_h[r.clone()]
                    .iter()
                    .zip(&prior[r.clone()])
                    .map(|(g, p)| g - p)
                    .collect();
                let scale = max_abs(want_g);
                for (i, (g, wv)) in g_rows.iter().zip(want_g).enumerate() {
                    // 1e-5 relative to the image's max gradient, plus the rounding of the
                    // subtraction of the prior (a few ulps of |prior|).
                    let tol = 1e-5 * scale + 4.0 * f32::EPSILON * prior[r.start + i].abs();
                    assert!(
                        (g - wv).abs() <= tol,
                        "{tag}: image {b} grad[{i}] {g} vs twin {wv} (tol {tol})"
                    );
                }
                if sel == TokenSelection::Patch {
                    // The CLS row is not selected: the running gradient is untouched there.
                    let cls = w[0] as usize * dim..w[0] as usize * dim + dim;
                    assert_eq!(&grad_h[cls.clone()], &prior[cls], "{tag}: CLS row touched");
                }
            }
            // Determinism: the same inputs give the same bits (one cheap and one multi-pass loss).
            if !matches!(kind, LayerLoss::Prm | LayerLoss::Dr) {
                continue;
            }
            let mut grad2 = dev.upload(&prior)?;
            let mut loss2 = dev.alloc::<f32>(images)?;
            layer_loss_f32(
                dev,
                kind,
                sel,
                shape,
                &ab,
                &cb,
                &mut loss2,
                false,
                Some(&mut grad2),
                &mut scratch,
            )?;
            let same =
                |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(
                same(&loss_h, &dev.download(&loss2)?),
                "{tag}: loss not deterministic"
            );
            assert!(
                same(&grad_h, &dev.download(&grad2)?),
                "{tag}: grad not deterministic"
            );
        }
        // Per-layer cosine report (no gradient).
        let mut cosv = dev.alloc::<f32>(images)?;
        dev.poison(&mut cosv)?;
        layer_cosine_f32(dev, sel, shape, &ab, &cb, &mut cosv, &mut scratch)?;
        let cos_h = dev.download(&cosv)?;
        for (b, w) in cu.windows(2).enumerate() {
            let r = w[0] as usize * dim..w[1] as usize * dim;
            let want = mean_token_cosine(&a[r.clone()], &c[r], dim, sel, None);
            assert!(
                (cos_h[b] as f64 - want).abs() <= 1e-5 * want.abs(),
                "layer cosine image {b}: {} vs {want}",
                cos_h[b]
            );
        }
    }
    Ok(())
}

#[test]
fn loss_single_images() {
    on_devices("loss single images", |dev| {
        check_layer(dev, &[50], 64, 1)?;
        check_layer(dev, &[197], 768, 2)?;
        check_layer(dev, &[1201], 64, 3)
    });
}

#[test]
fn loss_mixed_batch_d64() {
    on_devices("loss mixed batch D=64", |dev| {
        check_layer(dev, &[50, 197, 1201, 2], 64, 4)
    });
}

#[test]
fn loss_mixed_batch_d768() {
    on_devices("loss mixed batch D=768", |dev| {
        check_layer(dev, &[197, 50, 1201], 768, 5)
    });
}

#[test]
fn loss_identical_features_prm_is_one() {
    // At x_adv = x every token's cosine is 1: the loss is exactly the selection's mean of 1s.
    on_devices("loss at the clean point", |dev| {
        let (tokens, dim) = ([50usize, 197], 64);
        let rows: usize = tokens.iter().sum();
        let a = Rng::new(9).vec(rows * dim, -1.0, 1.0);
        let cu = dev.upload(&[0i32, 50, 247])?;
        let ab = dev.upload(&a)?;
        let shape = PackedTokens {
            cu_seqlens: &cu,
            images: 2,
            rows,
            dim,
        };
        let mut scratch = LossScratch::new(dev, rows, 2)?;
        let mut out = dev.alloc::<f32>(2)?;
        layer_cosine_f32(
            dev,
            TokenSelection::All,
            shape,
            &ab,
            &ab,
            &mut out,
            &mut scratch,
        )?;
        for v in dev.download(&out)? {
            assert!((v - 1.0).abs() <= 1e-6, "cos at the clean point {v}");
        }
        Ok(())
    });
}

/// Rows wider than 768 take the streaming kernel (`prm_loss_rows_f32`); rows of up to 768 the
/// register-held one (`_d768`), including widths that leave some lanes' last slots empty.
#[test]
fn loss_wide_and_odd_widths() {
    on_devices("loss D=1024 and D=100", |dev| {
        check_layer(dev, &[197, 50], 1024, 6)?;
        check_layer(dev, &[197, 3], 100, 7)
    });
}

/// Gradient bits, bf16 copy bits, row-value bits.
type RowsBits = (Vec<u32>, Vec<u16>, Vec<u32>);

/// The `_d768` rows kernel is the streaming one with the row held in registers: the same sums
/// in the same order, so the row values, the gradient and its bf16 copy agree bit for bit, in
/// every mode, at widths 768, 100 and 64.
#[test]
fn d768_rows_kernel_is_the_streaming_kernel_bit_for_bit() {
    use prm::gpu::{KernelArgs, LaunchConfig};
    on_devices("loss rows d768 vs streaming", |dev| {
        for (dim, tokens) in [
            (768usize, vec![197usize, 50]),
            (100, vec![13, 7]),
            (64, vec![5]),
        ] {
            let rows: usize = tokens.iter().sum();
            let mut cu = vec![0i32];
            for &t in &tokens {
                cu.push(cu.last().unwrap() + t as i32);
            }
            let mut rng = Rng::new(dim as u64);
            let (a, c) = (
                rng.vec(rows * dim, -1.0, 1.0),
                rng.vec(rows * dim, -1.0, 1.0),
            );
            let prior = rng.vec(rows * dim, -0.01, 0.01);
            let stats: Vec<f32> = (0..2 * tokens.len())
                .map(|i| 0.1 + i as f32 * 0.01)
                .collect();
            let (ab, cb, cub, sb) = (
                dev.upload(&a)?,
                dev.upload(&c)?,
                dev.upload(&cu)?,
                dev.upload(&stats)?,
            );
            // The gradient and its copy written, the gradient alone, neither (the report).
            for (writes, mode, skip) in (0..3)
                .flat_map(|w| (0..5).map(move |m| (w, m)))
                .flat_map(|(w, m)| [0, 1].map(|s| (w, m, s)))
            {
                let run = |kernel: &str| -> Result<RowsBits, GpuError> {
                    let mut grad = dev.upload(&prior)?;
                    let mut copy = dev.alloc::<half::bf16>(rows * dim)?;
                    let mut row_val = dev.alloc::<f32>(rows)?;
                    dev.poison(&mut copy)?;
                    dev.poison(&mut row_val)?;
                    let mut args = KernelArgs::new();
                    args.input(&ab)
                        .input(&cb)
                        .input(&cub)
                        .i32(tokens.len() as i32)
                        .i32(dim as i32)
                        .i32(skip)
                        .i32(mode)
                        .input(&sb);
                    match writes {
                        0 => args.output(&mut grad).output(&mut copy),
                        1 => args.output(&mut grad).u64(0),
                        _ => args.u64(0).u64(0),
                    };
                    args.f32(0.7).output(&mut row_val);
                    dev.launch(
                        kernel,
                        LaunchConfig::linear(rows.div_ceil(8) as u32, 256, 0),
                        &mut args,
                    )?;
                    dev.synchronize()?;
                    // Modes 2 and 3 write no gradient (and no copy): compare what they write.
                    let writes_grad = matches!(mode, 0 | 1 | 4);
                    let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    Ok((
                        bits(dev.download(&grad)?),
                        if writes_grad {
                            dev.download(&copy)?.iter().map(|x| x.to_bits()).collect()
                        } else {
                            Vec::new()
                        },
                        if mode == 4 {
                            Vec::new()
                        } else {
                            bits(dev.download(&row_val)?)
                        },
                    ))
                };
                let want = run("prm_loss_rows_f32")?;
                let got = run("prm_loss_rows_f32_d768")?;
                let what = format!(
                    "{} D={dim} mode {mode} skip {skip} outputs {writes}",
                    dev.name()
                );
                assert!(got.0 == want.0, "{what}: gradient differs");
                assert!(got.1 == want.1, "{what}: bf16 copy differs");
                assert!(got.2 == want.2, "{what}: row values differ");
            }
        }
        Ok(())
    });
}

/// The fused LN1-backward-and-loss pass (kernels/layernorm_loss.cu) is the LayerNorm backward
/// (accumulating) followed by the loss's rows and images passes, bit for bit, for prm and nrd:
/// the running gradient, its bf16 copy and the per-image loss, with and without the copy, every
/// token or the patches only, the loss overwritten or accumulated; at ViT-B's width (whole
/// rows), at widths under it (masked rows, one not a multiple of 32), and at 1201 tokens.
#[test]
fn fused_layernorm_backward_and_loss_is_the_two_passes_bit_for_bit() {
    use prm::gpu::kernels::layernorm::{layernorm_backward_f32, layernorm_backward_f32_bf16copy};
    use prm::gpu::kernels::layernorm_loss::{layernorm_backward_then_loss_f32, LayerNormBackward};
    on_devices("layernorm + cosine fused vs two passes", |dev| {
        for (dim, tokens) in [
            (768usize, vec![197usize, 50]),
            (200, vec![1201]),
            (100, vec![13, 7, 1]),
        ] {
            let (images, rows) = (tokens.len(), tokens.iter().sum::<usize>());
            let mut cu = vec![0i32];
            for &t in &tokens {
                cu.push(cu.last().unwrap() + t as i32);
            }
            let mut rng = Rng::new(17 + dim as u64);
            let x = rng.vec(rows * dim, -2.0, 2.0);
            let noise = rng.vec(rows * dim, -0.5, 0.5);
            let c: Vec<f32> = x.iter().zip(&noise).map(|(v, n)| 0.7 * v + n).collect();
            let dy = rng.vec(rows * dim, -0.1, 0.1);
            let gamma = rng.vec(dim, 0.5, 1.5);
            let mean = rng.vec(rows, -0.2, 0.2);
            let rstd = rng.vec(rows, 0.5, 2.0);
            let prior = rng.vec(rows * dim, -0.01, 0.01);
            let prior_loss = rng.vec(images, -1.0, 1.0);
            let up = |v: &[f32]| dev.upload(v);
            let (xb, cb, dyb, gb, mb, rb) = (
                up(&x)?,
                up(&c)?,
                up(&dy)?,
                up(&gamma)?,
                up(&mean)?,
                up(&rstd)?,
            );
            let cub = dev.upload(&cu)?;
            let shape = PackedTokens {
                cu_seqlens: &cub,
                images,
                rows,
                dim,
            };
            let ln = LayerNormBackward {
                x: &xb,
                dy: &dyb,
                gamma: &gb,
                mean: &mb,
                rstd: &rb,
            };
            for (kind, sel) in [LayerLoss::Prm, LayerLoss::Nrd]
                .into_iter()
                .flat_map(|k| [TokenSelection::All, TokenSelection::Patch].map(|s| (k, s)))
            {
                for (with_copy, accumulate) in [(true, false), (false, true), (true, true)] {
                    let run = |fused: bool| -> Result<PassBits, GpuError> {
                        let mut grad = dev.upload(&prior)?;
                        let mut copy = dev.alloc::<half::bf16>(rows * dim)?;
                        dev.poison(&mut copy)?;
                        let mut loss = dev.upload(&prior_loss)?;
                        let mut scratch = LossScratch::new(dev, rows, images)?;
                        let mut copy_arg = with_copy.then_some(&mut copy);
                        if !fused {
                            // The engine's unfused order: LN1's backward (with the copy, as it
                            // used to write it), then the loss pass, which rewrites the copy.
                            match copy_arg.as_deref_mut() {
                                Some(c) => layernorm_backward_f32_bf16copy(
                                    dev, &xb, &dyb, &gb, &mb, &rb, &mut grad, c, rows, dim, true,
                                )?,
                                None => layernorm_backward_f32(
                                    dev, &xb, &dyb, &gb, &mb, &rb, &mut grad, rows, dim, true,
                                )?,
                            }
                        }
                        let g = Gradient {
                            grad: &mut grad,
                            copy: copy_arg,
                        };
                        if fused {
                            layernorm_backward_then_loss_f32(
                                dev,
                                ln,
                                kind,
                                sel,
                                shape,
                                &cb,
                                &mut loss,
                                accumulate,
                                g,
                                &mut scratch,
                            )?;
                        } else {
                            layer_loss_f32_gradient(
                                dev,
                                kind,
                                sel,
                                shape,
                                &xb,
                                &cb,
                                &mut loss,
                                accumulate,
                                Some(g),
                                &mut scratch,
                            )?;
                        }
                        dev.synchronize()?;
                        let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        Ok((
                            bits(dev.download(&grad)?),
                            if with_copy {
                                dev.download(&copy)?.iter().map(|x| x.to_bits()).collect()
                            } else {
                                Vec::new()
                            },
                            bits(dev.download(&loss)?),
                        ))
                    };
                    let want = run(false)?;
                    let got = run(true)?;
                    let what = format!(
                        "{} {kind:?} D={dim} T={tokens:?} {sel:?} copy {with_copy} accumulate \
                         {accumulate}",
                        dev.name()
                    );
                    assert!(got.0 == want.0, "{what}: gradient differs");
                    assert!(got.1 == want.1, "{what}: bf16 copy differs");
                    assert!(got.2 == want.2, "{what}: loss differs");
                    // Not a vacuous agreement: the loss and the gradient moved.
                    assert!(got.2 != bits_of(&prior_loss), "{what}: loss untouched");
                    assert!(got.0 != bits_of(&prior), "{what}: gradient untouched");
                }
            }
        }
        Ok(())
    });
}

/// Gradient bits, bf16 copy bits, per-image loss bits.
type PassBits = (Vec<u32>, Vec<u16>, Vec<u32>);

fn bits_of(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
