//! Tests of the reference bicubic resize (PyTorch `F.interpolate(mode="bicubic",
//! align_corners=False)` semantics), its transpose, and position-embedding interpolation.

use crate::common::kernel::Rng;
use prm::reference::resize::{
    bicubic_resize, bicubic_resize_backward, interpolate_position_embedding, scaled_size,
    PositionEmbeddingCache,
};

/// Independent f64 implementation written from the formula (Keys cubic kernel, A = -0.75):
/// src = (dst + 0.5) * in / out - 0.5, i0 = floor(src), t = src - i0, taps i0-1..=i0+2 clamped.
fn keys(x: f64) -> f64 {
    let a = -0.75;
    let x = x.abs();
    if x <= 1.0 {
        (a + 2.0) * x * x * x - (a + 3.0) * x * x + 1.0
    } else if x < 2.0 {
        a * x * x * x - 5.0 * a * x * x + 8.0 * a * x - 4.0 * a
    } else {
        0.0
    }
}

fn taps_f64(in_size: usize, out_size: usize, dst: usize) -> Vec<(usize, f64)> {
    let src = (dst as f64 + 0.5) * in_size as f64 / out_size as f64 - 0.5;
    let i0 = src.floor() as i64;
    let t = src - i0 as f64;
    (-1i64..=2)
        .map(|k| {
            let idx = (i0 + k).clamp(0, in_size as i64 - 1) as usize;
            (idx, keys(t - k as f64))
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn golden_pixel(
    x: &[f32],
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    c: usize,
    oy: usize,
    ox: usize,
) -> f64 {
    let mut s = 0.0;
    for (iy, wy) in taps_f64(in_h, out_h, oy) {
        for &(ix, wx) in &taps_f64(in_w, out_w, ox) {
            s += wy * wx * x[c * in_h * in_w + iy * in_w + ix] as f64;
        }
    }
    s
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn norm(a: &[f32]) -> f64 {
    dot(a, a).sqrt()
}

type SizePair = ((usize, usize), (usize, usize));

const SIZE_PAIRS: &[SizePair] = &[
    ((4, 4), (8, 8)),     // up
    ((8, 8), (3, 3)),     // down
    ((5, 9), (11, 4)),    // mixed
    ((7, 6), (7, 6)),     // identity
    ((6, 6), (6, 10)),    // identity in y only
    ((5, 7), (1, 1)),     // 1-pixel output
    ((1, 1), (4, 3)),     // 1-pixel input
    ((9, 3), (1, 5)),     // 1-row output
    ((13, 17), (9, 23)),  // odd sizes
    ((43, 61), (30, 41)), // odd downscale
    ((14, 14), (30, 40)), // position-embedding-like grid
    ((2, 2), (64, 3)),    // strong upscale, edge clamping
];

#[test]
fn adjoint_identity() {
    let mut rng = Rng::new(1);
    for &((ih, iw), (oh, ow)) in SIZE_PAIRS {
        for &c in &[1usize, 3] {
            let x = rng.vec(c * ih * iw, -1.0, 1.0);
            let g = rng.vec(c * oh * ow, -1.0, 1.0);
            let y = bicubic_resize(&x, c, ih, iw, oh, ow);
            let gx = bicubic_resize_backward(&g, c, ih, iw, oh, ow);
            assert_eq!(y.len(), c * oh * ow);
            assert_eq!(gx.len(), c * ih * iw);
            let lhs = dot(&y, &g);
            let rhs = dot(&x, &gx);
            let scale = norm(&y) * norm(&g) + norm(&x) * norm(&gx);
            assert!(
                (lhs - rhs).abs() <= 1e-5 * scale,
                "{ih}x{iw} -> {oh}x{ow} c={c}: <Ax,g>={lhs} <x,A'g>={rhs}"
            );
        }
    }
}

#[test]
fn adjoint_identity_large() {
    let mut rng = Rng::new(2);
    let (c, ih, iw, oh, ow) = (3, 480, 640, 359, 479);
    let x = rng.vec(c * ih * iw, -1.0, 1.0);
    let g = rng.vec(c * oh * ow, -1.0, 1.0);
    let lhs = dot(&bicubic_resize(&x, c, ih, iw, oh, ow), &g);
    let gx = bicubic_resize_backward(&g, c, ih, iw, oh, ow);
    let rhs = dot(&x, &gx);
    let rel = (lhs - rhs).abs() / lhs.abs().max(rhs.abs());
    let scale = norm(&x) * norm(&gx);
    assert!(
        (lhs - rhs).abs() <= 1e-5 * scale,
        "lhs={lhs} rhs={rhs} rel={rel}"
    );
    // And back up: the transpose of an upscale.
    let g2 = rng.vec(c * ih * iw, -1.0, 1.0);
    let x2 = rng.vec(c * oh * ow, -1.0, 1.0);
    let lhs = dot(&bicubic_resize(&x2, c, oh, ow, ih, iw), &g2);
    let rhs = dot(&x2, &bicubic_resize_backward(&g2, c, oh, ow, ih, iw));
    assert!(
        (lhs - rhs).abs() <= 1e-5 * lhs.abs().max(1.0),
        "{lhs} {rhs}"
    );
}

/// The adjoint is also checked exactly against a dense matrix built column by column from the
/// forward (which is linear): A'[i, o] must equal A[o, i].
#[test]
fn backward_is_dense_transpose() {
    for &((ih, iw), (oh, ow)) in &[((5, 4), (3, 7)), ((3, 3), (8, 2)), ((6, 9), (6, 4))] {
        let n_in = ih * iw;
        let n_out = oh * ow;
        let mut a = vec![0.0f32; n_out * n_in];
        for i in 0..n_in {
            let mut e = vec![0.0f32; n_in];
            e[i] = 1.0;
            let col = bicubic_resize(&e, 1, ih, iw, oh, ow);
            for o in 0..n_out {
                a[o * n_in + i] = col[o];
            }
        }
        for o in 0..n_out {
            let mut e = vec![0.0f32; n_out];
            e[o] = 1.0;
            let row = bicubic_resize_backward(&e, 1, ih, iw, oh, ow);
            for i in 0..n_in {
                let want = a[o * n_in + i];
                assert!(
                    (row[i] - want).abs() <= 1e-6,
                    "{ih}x{iw}->{oh}x{ow} o={o} i={i}: {} vs {want}",
                    row[i]
                );
            }
        }
    }
}

#[test]
fn identity_is_exact() {
    let mut rng = Rng::new(3);
    let mut x = rng.vec(3 * 11 * 7, -1.0, 1.0);
    x[5] = -0.0;
    x[6] = f32::MIN_POSITIVE / 4.0; // subnormal
    x[7] = 1e30;
    let y = bicubic_resize(&x, 3, 11, 7, 11, 7);
    assert_eq!(
        x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    let g = bicubic_resize_backward(&x, 3, 11, 7, 11, 7);
    assert_eq!(x, g);
}

#[test]
fn identity_in_one_dimension_copies_that_axis() {
    // Resizing only the width: each row must equal the 1-D resize of that row.
    let mut rng = Rng::new(4);
    let (h, iw, ow) = (5, 9, 13);
    let x = rng.vec(h * iw, -1.0, 1.0);
    let y = bicubic_resize(&x, 1, h, iw, h, ow);
    for r in 0..h {
        let row = bicubic_resize(&x[r * iw..(r + 1) * iw], 1, 1, iw, 1, ow);
        assert_eq!(&y[r * ow..(r + 1) * ow], &row[..], "row {r}");
    }
}

/// Tolerance against the independent f64 formula for data in [-1, 1). Torch evaluates the
/// source coordinate and the cubic weights in f32 (e.g. `((A*x - 5A)*x + 8A)*x - 4A` cancels
/// terms of size ~4 down to ~0.05), so its weights carry ~1e-6 absolute error; the largest
/// deviation observed over these cases is ~6e-6. We keep torch's f32 arithmetic for bit-exact
/// agreement with PyTorch rather than the f64 formula.
const GOLDEN_TOL: f64 = 1e-5;

#[test]
fn matches_independent_f64_formula() {
    let mut rng = Rng::new(5);
    for &((ih, iw), (oh, ow)) in SIZE_PAIRS {
        let c = 2;
        let x = rng.vec(c * ih * iw, -1.0, 1.0);
        let y = bicubic_resize(&x, c, ih, iw, oh, ow);
        for ch in 0..c {
            for oy in 0..oh {
                for ox in 0..ow {
                    let want = golden_pixel(&x, ih, iw, oh, ow, ch, oy, ox);
                    let got = y[ch * oh * ow + oy * ow + ox] as f64;
                    assert!(
                        (got - want).abs() <= GOLDEN_TOL,
                        "{ih}x{iw}->{oh}x{ow} c{ch} ({oy},{ox}): {got} vs {want}"
                    );
                }
            }
        }
    }
    // The big odd case, sampled. Here torch's f32 source coordinate (|src| up to ~640, f32
    // ulp 6.1e-5) perturbs t by up to ~1e-4, so the deviation scales with the local slope of
    // the image: a smooth image stays within GOLDEN_TOL, white noise needs a looser bound.
    let (ih, iw, oh, ow) = (480, 640, 359, 479);
    let smooth: Vec<f32> = (0..ih * iw)
        .map(|k| {
            let (r, c) = ((k / iw) as f64, (k % iw) as f64);
            (0.5 + 0.4 * (0.05 * r + 0.3).sin() * (0.07 * c).cos()) as f32
        })
        .collect();
    let noise = rng.vec(ih * iw, -1.0, 1.0);
    for (x, tol) in [(&smooth, GOLDEN_TOL), (&noise, 5e-4)] {
        let y = bicubic_resize(x, 1, ih, iw, oh, ow);
        for k in 0..2000 {
            let (oy, ox) = ((k * 7919) % oh, (k * 104_729) % ow);
            let want = golden_pixel(x, ih, iw, oh, ow, 0, oy, ox);
            let got = y[oy * ow + ox] as f64;
            assert!((got - want).abs() <= tol, "({oy},{ox}): {got} vs {want}");
        }
    }
}

/// Values derived by hand (exact dyadic rationals, so float32 torch produces them exactly):
/// `F.interpolate(torch.tensor([[[[0., 1.], [2., 3.]]]]), size=(4, 4), mode="bicubic",
/// align_corners=False)`. Scale 0.5, t alternates 0.75 / 0.25; for t = 0.75 the weights are
/// (-0.03515625, 0.26171875, 0.87890625, -0.10546875). The 1-D resize of [0, 1] is
/// [-0.10546875, 0.2265625, 0.7734375, 1.10546875], and the image is x + 2y.
#[test]
fn hand_derived_2x2_to_4x4() {
    let x = [0.0f32, 1.0, 2.0, 3.0];
    let y = bicubic_resize(&x, 1, 2, 2, 4, 4);
    // -27/256, 58/256, 198/256, 283/256.
    let r = [-27.0f32 / 256.0, 58.0 / 256.0, 198.0 / 256.0, 283.0 / 256.0];
    for oy in 0..4 {
        for ox in 0..4 {
            assert_eq!(y[oy * 4 + ox], r[ox] + 2.0 * r[oy], "({oy},{ox})");
        }
    }
    let row = bicubic_resize(&[0.0, 1.0], 1, 1, 2, 1, 4);
    assert_eq!(row, r);
}

/// Downscale 4 -> 2 in 1-D: scale 2, src = 0.5 and 2.5, t = 0.5, weights
/// (-0.09375, 0.59375, 0.59375, -0.09375).
#[test]
fn hand_derived_downscale() {
    let x = [1.0f32, 2.0, 4.0, 8.0];
    let y = bicubic_resize(&x, 1, 1, 4, 1, 2);
    // taps for out 0: -1,0,1,2 -> 0,0,1,2 ; out 1: 1,2,3,4 -> 1,2,3,3.
    let w = [-0.09375f64, 0.59375, 0.59375, -0.09375];
    let want0 = w[0] * 1.0 + w[1] * 1.0 + w[2] * 2.0 + w[3] * 4.0;
    let want1 = w[0] * 2.0 + w[1] * 4.0 + w[2] * 8.0 + w[3] * 8.0;
    assert_eq!(y, [want0 as f32, want1 as f32]);
}

#[test]
fn one_pixel_output_and_input() {
    // 1x1 output of a WxW image samples around the centre: src = in/2 - 0.5.
    let x: Vec<f32> = (0..25).map(|v| v as f32).collect();
    let y = bicubic_resize(&x, 1, 5, 5, 1, 1);
    assert!((y[0] - 12.0).abs() < 1e-6, "{}", y[0]); // exact centre pixel
                                                     // 1x1 input broadcasts.
                                                     // (Not bit-exact: torch's f32 cubic weights sum to 1 only within a few 1e-7.)
    let y = bicubic_resize(&[0.375], 1, 1, 1, 3, 4);
    assert!(y.iter().all(|&v| (v - 0.375).abs() <= 1e-6), "{y:?}");
}

#[test]
fn constant_stays_constant() {
    for &((ih, iw), (oh, ow)) in SIZE_PAIRS {
        let x = vec![0.6f32; 2 * ih * iw];
        let y = bicubic_resize(&x, 2, ih, iw, oh, ow);
        for v in y {
            assert!((v - 0.6).abs() <= 1e-6, "{ih}x{iw}->{oh}x{ow}: {v}");
        }
    }
}

/// With A = -0.75 the cubic convolution kernel reproduces constants but **not** linear
/// functions in general (only A = -0.5 does): at t = 0.25 the weights
/// (-0.10546875, 0.87890625, 0.26171875, -0.03515625) have first moment 0.296875, not 0.25.
/// It does reproduce them wherever t is 0 or 0.5 (symmetric weights), e.g. a 2x downscale
/// (src = 2*dst + 0.5) or an odd-factor downscale (t = 0), away from the clamped borders.
#[test]
fn linear_ramp_stays_linear_in_interior() {
    let (a, b, c0) = (0.03f64, -0.02f64, 0.5f64);
    // (in, out) pairs per axis where t is always 0.5 (factor 2) or 0 (factor 3).
    for &((ih, oh), (iw, ow)) in &[
        ((20, 10), (30, 15)),
        ((21, 7), (40, 20)),
        ((33, 11), (27, 9)),
    ] {
        let x: Vec<f32> = (0..ih * iw)
            .map(|k| (c0 + a * (k / iw) as f64 + b * (k % iw) as f64) as f32)
            .collect();
        let y = bicubic_resize(&x, 1, ih, iw, oh, ow);
        let src = |d: usize, i: usize, o: usize| (d as f64 + 0.5) * i as f64 / o as f64 - 0.5;
        let interior = |s: f64, n: usize| s.floor() >= 1.0 && s.floor() + 2.0 <= (n - 1) as f64;
        let mut checked = 0;
        for oy in 0..oh {
            for ox in 0..ow {
                let (sy, sx) = (src(oy, ih, oh), src(ox, iw, ow));
                if interior(sy, ih) && interior(sx, iw) {
                    let want = c0 + a * sy + b * sx;
                    let got = y[oy * ow + ox] as f64;
                    assert!((got - want).abs() <= 2e-6, "({oy},{ox}) {got} vs {want}");
                    checked += 1;
                }
            }
        }
        assert!(checked >= 20, "{checked}");
    }
    // And it is *not* linear at t = 0.25 / 0.75 (2x upscale): the known overshoot.
    let y = bicubic_resize(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], 1, 1, 6, 1, 12);
    // out 5: src = 2.25, taps 1..4 -> 1*w0 + 2*w1 + 3*w2 + 4*w3 = 2.296875, not 2.25.
    assert!((y[5] - 2.296875).abs() < 1e-6, "{}", y[5]);
}

#[test]
fn deterministic_and_parallel_consistent() {
    // Large enough to take the rayon path; compare against per-channel (smaller) calls,
    // which must be bit-identical since every output element is computed independently.
    let mut rng = Rng::new(6);
    let (c, ih, iw, oh, ow) = (3, 120, 160, 97, 131);
    let x = rng.vec(c * ih * iw, -1.0, 1.0);
    let y1 = bicubic_resize(&x, c, ih, iw, oh, ow);
    let y2 = bicubic_resize(&x, c, ih, iw, oh, ow);
    assert_eq!(y1, y2);
    for ch in 0..c {
        let yc = bicubic_resize(&x[ch * ih * iw..(ch + 1) * ih * iw], 1, ih, iw, oh, ow);
        assert_eq!(&y1[ch * oh * ow..(ch + 1) * oh * ow], &yc[..]);
    }
    let g = rng.vec(c * oh * ow, -1.0, 1.0);
    let b1 = bicubic_resize_backward(&g, c, ih, iw, oh, ow);
    let b2 = bicubic_resize_backward(&g, c, ih, iw, oh, ow);
    assert_eq!(b1, b2);
    for ch in 0..c {
        let bc = bicubic_resize_backward(&g[ch * oh * ow..(ch + 1) * oh * ow], 1, ih, iw, oh, ow);
        assert_eq!(&b1[ch * ih * iw..(ch + 1) * ih * iw], &bc[..]);
    }
}

fn pos_to_planar(pos: &[f32], dim: usize, n: usize) -> Vec<f32> {
    let mut p = vec![0.0f32; dim * n];
    for t in 0..n {
        for d in 0..dim {
            p[d * n + t] = pos[(1 + t) * dim + d];
        }
    }
    p
}

#[test]
fn position_embedding_interpolation() {
    let mut rng = Rng::new(7);
    let (dim, g) = (48, 14);
    let pos = rng.vec((1 + g * g) * dim, -1.0, 1.0);
    // Identity.
    assert_eq!(interpolate_position_embedding(&pos, dim, g, g, g), pos);
    for &(gh, gw) in &[(30usize, 40usize), (7, 9), (14, 20), (1, 1)] {
        let out = interpolate_position_embedding(&pos, dim, g, gh, gw);
        assert_eq!(out.len(), (1 + gh * gw) * dim, "{gh}x{gw}");
        assert_eq!(&out[..dim], &pos[..dim], "CLS row");
        // Bit-identical to the planar path.
        let planar = bicubic_resize(&pos_to_planar(&pos, dim, g * g), dim, g, g, gh, gw);
        assert_eq!(pos_to_planar(&out, dim, gh * gw), planar, "{gh}x{gw}");
    }
}

#[test]
fn position_embedding_large_dim_parallel() {
    let mut rng = Rng::new(8);
    let (dim, g) = (768, 14);
    let pos = rng.vec((1 + g * g) * dim, -1.0, 1.0);
    let out = interpolate_position_embedding(&pos, dim, g, 30, 40);
    assert_eq!(out.len(), (1 + 30 * 40) * dim);
    let planar = bicubic_resize(&pos_to_planar(&pos, dim, g * g), dim, g, g, 30, 40);
    assert_eq!(pos_to_planar(&out, dim, 30 * 40), planar);
}

#[test]
fn position_embedding_cache() {
    let mut rng = Rng::new(9);
    let (dim, g) = (16, 7);
    let pos = rng.vec((1 + g * g) * dim, -1.0, 1.0);
    let cache = PositionEmbeddingCache::new(pos.clone(), dim, g);
    let a = cache.get(10, 12);
    let b = cache.get(10, 12);
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert_eq!(*a, interpolate_position_embedding(&pos, dim, g, 10, 12));
    assert_eq!(*cache.get(g, g), pos);
    // Usable across threads.
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PositionEmbeddingCache>();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| assert_eq!(*cache.get(5, 6), *cache.get(5, 6)));
        }
    });
}

/// The cache keeps at most its bound beyond the model's own embedding, starting afresh when a
/// grid would pass it, and what it hands out stays the interpolation.
#[test]
fn position_embedding_cache_is_bounded() {
    let mut rng = Rng::new(10);
    let (dim, g) = (8, 5);
    let pos = rng.vec((1 + g * g) * dim, -1.0, 1.0);
    let own = pos.len() * 4;
    let grid_bytes = |gh: usize, gw: usize| (1 + gh * gw) * dim * 4;
    // Room for the 6×6 and 4×9 grids (1,184 and 1,184 bytes), not for a third.
    let cache = PositionEmbeddingCache::new(pos.clone(), dim, g).with_limit(2500);
    let held = cache.get(6, 6);
    cache.get(4, 9);
    assert_eq!(
        cache.cached_bytes(),
        own + grid_bytes(6, 6) + grid_bytes(4, 9)
    );
    let third = cache.get(7, 3);
    assert_eq!(cache.cached_bytes(), own + grid_bytes(7, 3));
    assert_eq!(*third, interpolate_position_embedding(&pos, dim, g, 7, 3));
    assert_eq!(*held, interpolate_position_embedding(&pos, dim, g, 6, 6));
    assert_eq!(*cache.get(6, 6), *held);
    assert_eq!(*cache.get(g, g), pos);
}

#[test]
fn scaled_size_truncates_like_python() {
    assert_eq!(scaled_size(480, 640, 0.5), (240, 320));
    assert_eq!(scaled_size(224, 224, 0.75), (168, 168));
    // 0.9999999 * 3 rounds (in f32) to 2.9999998 -> 2.
    assert_eq!(scaled_size(3, 3, 0.999_999_9), (2, 2));
    // f32 product: 0.7f32 * 10 = 7.0000000 in f32 (0.699999988 * 10 = 6.99999988 -> rounds to 7).
    assert_eq!(scaled_size(10, 10, 0.7), (7, 7));
    assert_eq!(scaled_size(1, 1, 0.5), (1, 1));
    assert_eq!(scaled_size(333, 501, 0.6), (199, 300));
}
