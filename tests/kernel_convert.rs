//! `kernels/convert.cu` (fp32 → bf16, round to nearest even) against `half::bf16::from_f32`,
//! bit for bit, the mixed-precision product `gemm::matmul_bf16` against a host product of
//! the bf16-rounded inputs, and the product variants (`_residual`: C read from another buffer;
//! `matmul_bf16_bf16out`: bf16 output with a bf16 bias) against the products they replace,
//! directly and replayed from a graph. Fresh random inputs, poisoned outputs, odd sizes; the simulator
//! always, CUDA when present.

use crate::common;

use common::devices;

use half::bf16;
use prm::gpu::gemm::{
    matmul_bf16, matmul_bf16_bf16out, matmul_bf16_residual, matmul_f32, matmul_f32_residual,
    MatmulShape,
};
use prm::gpu::kernels::convert::to_bf16;
use prm::gpu::{Buffer, Device};

/// Reproducible pseudo-random numbers (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let v = self.next().wrapping_mul(0x2545_F491_4F6C_DD1D);
        lo + (hi - lo) * ((v >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

fn poisoned<T: prm::gpu::Element>(dev: &Device, len: usize) -> Buffer<T> {
    let mut b = dev.alloc::<T>(len).unwrap();
    dev.poison(&mut b).unwrap();
    b
}

#[test]
fn to_bf16_rounds_to_nearest_even_bit_for_bit() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for dev in devices() {
        // 600_001 elements run past the grid cap (2048 blocks of 256): the grid-stride loop.
        for n in [1usize, 50, 197 * 129, 1201, 600_001] {
            let mut x: Vec<f32> = (0..n)
                .map(|i| match i % 4 {
                    // every bit pattern, halfway cases, subnormals, infinities and NaNs included
                    0 => f32::from_bits(rng.next() as u32),
                    // exact ties: the low 16 bits are 0x8000
                    1 => f32::from_bits((rng.next() as u32 & 0xFFFF_0000) | 0x8000),
                    _ => rng.uniform(-4.0, 4.0) * 10f32.powi((rng.next() % 9) as i32 - 4),
                })
                .collect();
            if n > 8 {
                x[..8].copy_from_slice(&[
                    0.0,
                    -0.0,
                    f32::INFINITY,
                    f32::NEG_INFINITY,
                    f32::MAX,
                    f32::MIN_POSITIVE,
                    1e-40,
                    1.0 + 1.0 / 256.0,
                ]);
            }
            let xb = dev.upload(&x).unwrap();
            let extra = 3; // elements past n must be left alone
            let mut out = poisoned::<bf16>(&dev, n + extra);
            to_bf16(&dev, &xb, &mut out, n).unwrap();
            let got = dev.download(&out).unwrap();
            for (i, (&g, &v)) in got.iter().zip(&x).enumerate() {
                let want = bf16::from_f32(v);
                if v.is_nan() {
                    assert!(g.is_nan(), "{} n={n} [{i}]: NaN became {g}", dev.name());
                } else {
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "{} n={n} [{i}]: bf16({v:e}) = {g} (bits {:#06x}), want {want} ({:#06x})",
                        dev.name(),
                        g.to_bits(),
                        want.to_bits()
                    );
                }
            }
            assert!(
                got[n..].iter().all(|v| v.to_bits() == 0xFFFF),
                "{}: to_bf16 wrote past n",
                dev.name()
            );
        }
    }
}

#[test]
fn matmul_bf16_is_the_fp32_product_of_the_rounded_inputs() {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let round = |v: &[f32]| -> Vec<bf16> { v.iter().map(|&x| bf16::from_f32(x)).collect() };
    for dev in devices() {
        for (m, n, k) in [
            (1usize, 1usize, 1usize),
            (7, 13, 33),
            (50, 197, 31),
            (197, 50, 129),
            (3, 5, 0),
        ] {
            for b_transposed in [true, false] {
                for (with_bias, accumulate) in [(false, false), (true, false), (true, true)] {
                    let what = format!(
                        "{} m={m} n={n} k={k} b_transposed={b_transposed} bias={with_bias} \
                         accumulate={accumulate}",
                        dev.name()
                    );
                    let a = round(&rng.vec(m * k, -2.0, 2.0));
                    let b = round(&rng.vec(n * k, -2.0, 2.0));
                    let bias = rng.vec(n, -1.0, 1.0);
                    let c0 = rng.vec(m * n, -1.0, 1.0);
                    let (da, db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
                    let dbias = dev.upload(&bias).unwrap();
                    let mut dc = if accumulate {
                        dev.upload(&c0).unwrap()
                    } else {
                        poisoned::<f32>(&dev, m * n)
                    };
                    let shape = MatmulShape {
                        m,
                        n,
                        k,
                        b_transposed,
                    };
                    matmul_bf16(
                        &dev,
                        shape,
                        &da,
                        &db,
                        with_bias.then_some(&dbias),
                        &mut dc,
                        accumulate,
                    )
                    .unwrap();
                    let got = dev.download(&dc).unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            // f64 product of the bf16 values: what fp32 accumulation approaches.
                            let (mut want, mut mag) = (0.0f64, 0.0f64);
                            for p in 0..k {
                                let bv = if b_transposed {
                                    b[j * k + p]
                                } else {
                                    b[p * n + j]
                                };
                                let t = a[i * k + p].to_f64() * bv.to_f64();
                                want += t;
                                mag += t.abs();
                            }
                            if with_bias {
                                want += bias[j] as f64;
                                mag += (bias[j] as f64).abs();
                            }
                            if accumulate {
                                want += c0[i * n + j] as f64;
                                mag += (c0[i * n + j] as f64).abs();
                            }
                            let g = got[i * n + j] as f64;
                            // fp32 accumulation error bound, with room for any summation order
                            let tol = 4.0 * (k as f64 + 2.0) * f32::EPSILON as f64 * mag + 1e-30;
                            assert!(
                                (g - want).abs() <= tol,
                                "{what} [{i},{j}]: {g} vs {want} (tolerance {tol:e})"
                            );
                        }
                    }
                }
            }
        }
    }
}

fn round_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// `matmul_*_residual` (C from a separate buffer) equals a copy of C into D followed by the
/// in-place accumulating product, bit for bit, and leaves C untouched; `matmul_bf16_bf16out`
/// equals the fp32-output product with the widened bias, rounded once to bf16 (and is within
/// one bf16 rounding of an f64 product). Odd shapes, poisoned outputs, the simulator always
/// (tests/cuda_backend.rs holds the cuBLASLt comparisons).
#[test]
fn product_variants_match_the_products_they_replace() {
    let mut rng = Rng(0x4F1B_BCDC_BFA5_3E0B);
    let dev = Device::sim();
    for (m, n, k) in [
        (197usize, 37usize, 33usize),
        (13, 50, 129),
        (3, 5, 0),
        (1201, 7, 5),
    ] {
        for b_transposed in [true, false] {
            let what = format!("m={m} n={n} k={k} b_transposed={b_transposed}");
            let shape = MatmulShape {
                m,
                n,
                k,
                b_transposed,
            };
            let (a, b) = (rng.vec(m * k, -2.0, 2.0), rng.vec(n * k, -2.0, 2.0));
            let (bias, c) = (rng.vec(n, -1.0, 1.0), rng.vec(m * n, -1.0, 1.0));
            let (da, db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
            let (dab, dbb) = (
                dev.upload(&round_bf16(&a)).unwrap(),
                dev.upload(&round_bf16(&b)).unwrap(),
            );
            let (dbias, dc) = (dev.upload(&bias).unwrap(), dev.upload(&c).unwrap());

            let mut want = dev.upload(&c).unwrap();
            matmul_f32(&dev, shape, &da, &db, Some(&dbias), &mut want, true).unwrap();
            let mut got = poisoned::<f32>(&dev, m * n);
            matmul_f32_residual(&dev, shape, &da, &db, Some(&dbias), Some(&dc), &mut got).unwrap();
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            assert_eq!(
                bits(dev.download(&got).unwrap()),
                bits(dev.download(&want).unwrap()),
                "{what}: f32 residual"
            );

            let mut want = dev.upload(&c).unwrap();
            matmul_bf16(&dev, shape, &dab, &dbb, Some(&dbias), &mut want, true).unwrap();
            let mut got = poisoned::<f32>(&dev, m * n);
            matmul_bf16_residual(&dev, shape, &dab, &dbb, Some(&dbias), Some(&dc), &mut got)
                .unwrap();
            assert_eq!(
                bits(dev.download(&got).unwrap()),
                bits(dev.download(&want).unwrap()),
                "{what}: bf16 residual"
            );
            assert_eq!(dev.download(&dc).unwrap(), c, "{what}: C was modified");

            for with_bias in [false, true] {
                let bias16 = round_bf16(&bias);
                let wide: Vec<f32> = bias16.iter().map(|v| v.to_f32()).collect();
                let (dbias16, dwide) = (dev.upload(&bias16).unwrap(), dev.upload(&wide).unwrap());
                let mut want = poisoned::<f32>(&dev, m * n);
                let wbias = with_bias.then_some(&dwide);
                matmul_bf16(&dev, shape, &dab, &dbb, wbias, &mut want, false).unwrap();
                let want = round_bf16(&dev.download(&want).unwrap());
                let mut got = poisoned::<bf16>(&dev, m * n + 3);
                let gbias = with_bias.then_some(&dbias16);
                matmul_bf16_bf16out(&dev, shape, &dab, &dbb, gbias, &mut got).unwrap();
                let got = dev.download(&got).unwrap();
                assert_eq!(got[..m * n], want[..], "{what} bias={with_bias}: bf16 out");
                assert!(
                    got[m * n..].iter().all(|v| v.to_bits() == 0xFFFF),
                    "{what}: bf16 out wrote past m·n"
                );
                // Against an f64 product of the bf16 values: one bf16 rounding plus fp32 error.
                let (ar, br) = (round_bf16(&a), round_bf16(&b));
                for i in 0..m {
                    for j in 0..n {
                        let (mut exact, mut mag) = (0.0f64, 0.0f64);
                        for p in 0..k {
                            let bv = if b_transposed {
                                br[j * k + p]
                            } else {
                                br[p * n + j]
                            };
                            let t = ar[i * k + p].to_f64() * bv.to_f64();
                            exact += t;
                            mag += t.abs();
                        }
                        if with_bias {
                            exact += wide[j] as f64;
                            mag += (wide[j] as f64).abs();
                        }
                        let g = got[i * n + j].to_f64();
                        let tol = exact.abs() / 256.0
                            + 4.0 * (k as f64 + 2.0) * f32::EPSILON as f64 * mag
                            + 1e-30;
                        assert!(
                            (g - exact).abs() <= tol,
                            "{what} bias={with_bias} [{i},{j}]: {g} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}

/// The product variants record into a graph and replay there with the results of direct calls.
#[test]
fn product_variants_replay_from_a_graph() {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let dev = Device::sim();
    let (m, n, k) = (197usize, 37usize, 65usize);
    let shape = MatmulShape {
        m,
        n,
        k,
        b_transposed: true,
    };
    let a = dev.upload(&round_bf16(&rng.vec(m * k, -2.0, 2.0))).unwrap();
    let b = dev.upload(&round_bf16(&rng.vec(n * k, -2.0, 2.0))).unwrap();
    let bias16 = dev.upload(&round_bf16(&rng.vec(n, -1.0, 1.0))).unwrap();
    let bias = dev.upload(&rng.vec(n, -1.0, 1.0)).unwrap();
    let c = dev.upload(&rng.vec(m * n, -1.0, 1.0)).unwrap();
    let (mut d, mut d16) = (poisoned::<f32>(&dev, m * n), poisoned::<bf16>(&dev, m * n));
    let graph = dev
        .capture(|| {
            matmul_bf16_residual(&dev, shape, &a, &b, Some(&bias), Some(&c), &mut d)?;
            matmul_bf16_bf16out(&dev, shape, &a, &b, Some(&bias16), &mut d16)
        })
        .unwrap();
    assert!(dev.download(&d).unwrap().iter().all(|v| v.is_nan()));
    graph.launch().unwrap();
    let (mut want, mut want16) = (poisoned::<f32>(&dev, m * n), poisoned::<bf16>(&dev, m * n));
    matmul_bf16_residual(&dev, shape, &a, &b, Some(&bias), Some(&c), &mut want).unwrap();
    matmul_bf16_bf16out(&dev, shape, &a, &b, Some(&bias16), &mut want16).unwrap();
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    assert_eq!(
        bits(dev.download(&d).unwrap()),
        bits(dev.download(&want).unwrap())
    );
    assert_eq!(dev.download(&d16).unwrap(), dev.download(&want16).unwrap());
}
