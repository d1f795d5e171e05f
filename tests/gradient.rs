//! Finite-difference checks of the reference engine's input gradient, for every loss and for
//! the native-resolution, fixed-size and dynamic-scale geometries.

use crate::common;

use common::{small_model, small_model_without_class_token, Draw};
use prm::attack::*;
use prm::reference::ReferenceVit as Vit;

/// Loss and input gradient of the single image of `attack` at `x`, seen at `size`.
fn one(attack: &Attack<Vit>, x: &[f32], size: (usize, usize)) -> (f64, Vec<f32>) {
    let r = attack
        .loss_and_gradient(&[x.to_vec()], &[size])
        .unwrap()
        .remove(0);
    (r.loss, r.gradient)
}

use prm::model::{Activation, Model};
use prm::reference::ReferenceVit;
use prm::rng::ImageRng;

fn settings(loss: LossKind, tokens: TokenSelection, resolution: Resolution) -> AttackSettings {
    AttackSettings {
        loss,
        tokens,
        resolution,
        ..Preset::Pgd.settings()
    }
}

/// Compares ⟨∇L, u⟩ with a central difference of L along random directions u.
fn check_directional(
    model: &Model,
    s: &AttackSettings,
    h: usize,
    w: usize,
    size: Option<(usize, usize)>,
    seed: u64,
) {
    let engine = ReferenceVit::new(model);
    let layers = s.layers.resolve(model.config.feature_layers()).unwrap();
    let objective = Objective::new(s.loss, layers, s.tokens, model).unwrap();
    let mut d = Draw::new(seed);
    let clean = d.vec(3 * h * w, 0.05, 0.95);
    let attack = Attack::new(
        &engine,
        &objective,
        s,
        vec![(
            Planar {
                data: &clean,
                height: h,
                width: w,
            },
            ImageRng::new(1, "x"),
        )],
    )
    .unwrap();
    // A point well away from the clean image, where the gradient is large.
    let x: Vec<f32> = clean.iter().map(|&c| c + d.uniform(-0.2, 0.2)).collect();
    let size = size.unwrap_or(match s.resolution {
        Resolution::Native => (h, w),
        Resolution::Fixed(n) => (n, n),
    });
    let (loss, grad) = one(&attack, &x, size);
    assert!(loss.is_finite());
    for trial in 0..3 {
        let u = d.vec(x.len(), -1.0, 1.0);
        let step = 2e-3f32;
        let shifted = |sgn: f32| -> f64 {
            let xs: Vec<f32> = x.iter().zip(&u).map(|(a, b)| a + sgn * step * b).collect();
            one(&attack, &xs, size).0
        };
        let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * step as f64);
        let analytic: f64 = grad
            .iter()
            .zip(&u)
            .map(|(&g, &b)| g as f64 * b as f64)
            .sum();
        let err = (numeric - analytic).abs() / numeric.abs().max(analytic.abs()).max(1e-6);
        assert!(
            err < 2e-2,
            "{:?}/{:?}/{:?} trial {trial}: analytic {analytic:.6e} vs numeric {numeric:.6e} (rel err {err:.2e})",
            s.loss,
            s.tokens,
            s.resolution
        );
    }
}

#[test]
fn every_loss_matches_finite_differences_at_native_resolution() {
    let model = small_model(64, 2, 2, 8, 4, Activation::QuickGelu, 3);
    for loss in [
        LossKind::Prm,
        LossKind::Nrd,
        LossKind::Dr,
        LossKind::DrOfficial,
        LossKind::Embed,
    ] {
        // 27×45: sides not multiples of the patch, so the position embedding is interpolated
        // (3×5 grid from 4×4) and the remainder pixels are dropped.
        check_directional(
            &model,
            &settings(loss, TokenSelection::All, Resolution::Native),
            27,
            45,
            None,
            11,
        );
    }
    check_directional(
        &model,
        &settings(LossKind::Prm, TokenSelection::Patch, Resolution::Native),
        27,
        45,
        None,
        12,
    );
}

#[test]
fn exact_gelu_model_matches_finite_differences() {
    let model = small_model(64, 2, 2, 8, 4, Activation::Gelu, 5);
    check_directional(
        &model,
        &settings(LossKind::Prm, TokenSelection::All, Resolution::Native),
        32,
        32,
        None,
        13,
    );
}

#[test]
fn tanh_gelu_model_matches_finite_differences() {
    let model = small_model(64, 2, 2, 8, 4, Activation::GeluTanh, 9);
    check_directional(
        &model,
        &settings(LossKind::Prm, TokenSelection::All, Resolution::Native),
        32,
        32,
        None,
        17,
    );
}

/// Each activation's derivative (`ops::activation_backward`) against central differences of
/// `ops::activation` on [−8, 8], at points and a step (2⁻⁷) exact in f32: the difference's
/// truncation (h²/6 · |a'''|) and rounding (a's f32 rounding over 2h) measured at most 6.5e-5
/// (QuickGELU near z = 7). The tolerance, 2e-4, is a quarter of what separates GELU's two forms
/// (their derivatives differ by up to 8.7e-4, near z = −2), which the last check confirms it
/// sees.
#[test]
fn activation_derivatives_match_finite_differences() {
    use prm::reference::ops;
    let h = 1.0f32 / 128.0;
    let z: Vec<f32> = (-512..=512).map(|i| i as f32 / 64.0).collect();
    let numeric = |act: Activation| -> Vec<f64> {
        let (mut up, mut down): (Vec<f32>, Vec<f32>) = z.iter().map(|&v| (v + h, v - h)).unzip();
        ops::activation(act, &mut up);
        ops::activation(act, &mut down);
        up.iter()
            .zip(&down)
            .map(|(&a, &b)| (a as f64 - b as f64) / (2.0 * h as f64))
            .collect()
    };
    let analytic = |act: Activation| -> Vec<f32> {
        let mut d = vec![1.0f32; z.len()];
        ops::activation_backward(act, &z, &mut d);
        d
    };
    // The largest |numeric − analytic| and the z where it is.
    let worst = |numeric: &[f64], analytic: &[f32]| -> (f64, f32) {
        numeric
            .iter()
            .zip(analytic)
            .zip(&z)
            .map(|((&n, &a), &v)| ((n - a as f64).abs(), v))
            .fold((0.0, 0.0), |m, e| if e.0 > m.0 { e } else { m })
    };
    for act in [
        Activation::QuickGelu,
        Activation::Gelu,
        Activation::GeluTanh,
    ] {
        let (err, at) = worst(&numeric(act), &analytic(act));
        println!("{act:?}: worst |numeric − analytic| {err:.2e} at z = {at}");
        assert!(
            err < 2e-4,
            "{act:?}: derivative off by {err:.2e} at z = {at}"
        );
    }
    let (err, at) = worst(&numeric(Activation::GeluTanh), &analytic(Activation::Gelu));
    assert!(
        err > 5e-4,
        "exact GELU's derivative passes for the tanh GELU's ({err:.2e} at z = {at})"
    );
}

/// A tower without LN_pre (open_clip `no_ln_pre`, CLIPA): F_0 is the embedded tokens, and the
/// gradient at F_0 flows to them directly. The embed loss goes through the average pooling.
#[test]
fn a_tower_without_ln_pre_matches_finite_differences() {
    let mut model = small_model(64, 2, 2, 8, 4, Activation::Gelu, 8);
    model.weights.ln_pre = None;
    model.config.pooling = prm::model::Pooling::PatchAverage;
    for loss in [LossKind::Prm, LossKind::Nrd, LossKind::Dr, LossKind::Embed] {
        let mut s = settings(loss, TokenSelection::All, Resolution::Native);
        // F_0 alone and with the blocks: the path without LN_pre by itself, then through them.
        s.layers = LayerSelection::List(vec![0]);
        check_directional(&model, &s, 27, 45, None, 15);
        s.layers = LayerSelection::All;
        check_directional(&model, &s, 27, 45, None, 16);
    }
    // The embedding with the post-LayerNorm before the average.
    model.config.pooling = prm::model::Pooling::NormedPatchAverage;
    let s = settings(LossKind::Embed, TokenSelection::All, Resolution::Native);
    check_directional(&model, &s, 27, 45, None, 19);
}

/// A tower without a class token (SigLIP): the tokens are the patches, the patch convolution has
/// a bias and there is no LN_pre; `--tokens patch` selects every token. The embed loss goes
/// through the attention-pooling head (its folded scores and values, its MLP).
#[test]
fn a_tower_without_a_class_token_matches_finite_differences() {
    let model = small_model_without_class_token(64, 2, 2, 8, 4, Activation::GeluTanh, 10);
    for loss in [LossKind::Prm, LossKind::Nrd, LossKind::Dr, LossKind::Embed] {
        let mut s = settings(loss, TokenSelection::Patch, Resolution::Native);
        s.layers = LayerSelection::List(vec![0]);
        check_directional(&model, &s, 27, 45, None, 17);
        s.layers = LayerSelection::All;
        check_directional(&model, &s, 27, 45, None, 18);
    }
}

#[test]
fn layer_subset_matches_finite_differences() {
    let model = small_model(64, 2, 3, 8, 4, Activation::QuickGelu, 6);
    let mut s = settings(LossKind::Prm, TokenSelection::All, Resolution::Native);
    s.layers = LayerSelection::List(vec![0, 2]);
    check_directional(&model, &s, 35, 29, None, 14);
}

#[test]
fn resized_geometries_match_finite_differences() {
    let model = small_model(64, 2, 2, 8, 4, Activation::QuickGelu, 7);
    // Fixed working size: the whole image is resized to 40×40.
    check_directional(
        &model,
        &settings(LossKind::Prm, TokenSelection::All, Resolution::Fixed(40)),
        37,
        51,
        None,
        15,
    );
    // A dynamic-scale draw: adv and clean resized to 0.73 of the native size.
    check_directional(
        &model,
        &settings(LossKind::Prm, TokenSelection::All, Resolution::Native),
        43,
        61,
        Some((31, 44)),
        16,
    );
}

/// SigLIP's attention-pooling head over a batch of 11 images of mixed token counts (more than
/// one block of the head's shared products, the last one ragged): each image's embedding and
/// gradient have the bits it gets alone, which the engines' batch invariance rests on.
#[test]
fn the_pooling_head_gives_each_image_its_bits_alone() {
    use prm::reference::pooling::pooled_embeddings;
    let model = small_model_without_class_token(64, 2, 2, 8, 4, Activation::GeluTanh, 12);
    let mut d = Draw::new(21);
    let last: Vec<Vec<f32>> = (0..11).map(|i| d.vec((3 + i) * 64, -2.0, 2.0)).collect();
    let last: Vec<&[f32]> = last.iter().map(Vec::as_slice).collect();
    let d_embed = d.vec(11 * 64, -1.0, 1.0);
    let batch = pooled_embeddings(&model, &last).unwrap();
    let grads = batch.backward(&model, &last, &d_embed);
    for (i, f) in last.iter().enumerate() {
        let alone = pooled_embeddings(&model, &[f]).unwrap();
        let rows = i * 64..(i + 1) * 64;
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same(&alone.embeddings, &batch.embeddings[rows.clone()]),
            "image {i}"
        );
        let g = alone.backward(&model, &[f], &d_embed[rows]);
        assert_eq!(g[0].len(), f.len());
        assert!(same(&g[0], &grads[i]), "image {i}: gradient");
    }
}
