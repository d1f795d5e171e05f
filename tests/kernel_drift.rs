//! `kernels/drift.cu` (the features target's per-token drift sums, in f64) against its host
//! twin `prm::eval::ops::token_sums`, bit for bit: fresh random rows, poisoned output, odd
//! sizes (50, 197 and 1201 token pairs; widths of 64, 100 and 768), pairs in any order and rows
//! compared with themselves, an output offset. The simulator under both schedules always, CUDA
//! when present.

use crate::common::kernel as kernel_common;

use kernel_common::{on_devices, Rng};
use prm::eval::ops::{drift_of, token_sums, TokenSums};
use prm::gpu::kernels::drift::token_sums_f32;
use prm::gpu::{Device, GpuError};

/// `n` token pairs over `rows` rows of `dim`: the kernel's sums against the host's, written
/// `offset` rows into a poisoned output whose other rows must stay poisoned.
fn check(dev: &Device, rows: usize, dim: usize, n: usize, seed: u64) -> Result<(), GpuError> {
    let mut rng = Rng::new(seed);
    // Activations of a few units, some rows scaled far up (the f64 sums must not care).
    let mut feats = rng.vec(rows * dim, -3.0, 3.0);
    for r in (0..rows).step_by(7) {
        feats[r * dim..(r + 1) * dim]
            .iter_mut()
            .for_each(|x| *x *= 1e3);
    }
    let pick = |rng: &mut Rng| ((rng.unit() * rows as f32) as usize).min(rows - 1);
    let mut pairs: Vec<i32> = Vec::with_capacity(2 * n);
    for r in 0..n {
        let clean = pick(&mut rng);
        // Every fifth pair compares a row with itself (zero drift, cosine one).
        let adv = if r % 5 == 0 { clean } else { pick(&mut rng) };
        pairs.extend([clean as i32, adv as i32]);
    }
    let offset = 3;
    let feats_dev = dev.upload(&feats)?;
    let pairs_dev = dev.upload(&pairs)?;
    let mut out = dev.alloc::<f64>(4 * (n + offset + 2))?;
    dev.poison(&mut out)?;
    token_sums_f32(dev, &feats_dev, &pairs_dev, n, dim, &mut out, offset)?;
    let got = dev.download(&out)?;
    let row = |r: usize| &feats[r * dim..(r + 1) * dim];
    for (r, p) in pairs.chunks_exact(2).enumerate() {
        let want = token_sums(row(p[1] as usize), row(p[0] as usize), dim)[0];
        let have = TokenSums::from_row(&got[4 * (offset + r)..4 * (offset + r + 1)]);
        let bits = |s: TokenSums| [s.ac, s.aa, s.cc, s.dd].map(f64::to_bits);
        assert_eq!(
            bits(have),
            bits(want),
            "{rows} rows of {dim}, pair {r}: {have:?} against {want:?}"
        );
    }
    let untouched = got[..4 * offset]
        .iter()
        .chain(&got[4 * (offset + n)..])
        .all(|x| x.to_bits() == u64::MAX);
    assert!(untouched, "rows outside the output range were written");
    Ok(())
}

#[test]
fn token_sums_match_the_host_bit_for_bit() {
    on_devices("drift token sums", |dev| {
        for (k, &(rows, dim, n)) in [
            (197, 768, 197),
            (1201, 64, 1201),
            (394, 100, 50),
            (3, 768, 1),
        ]
        .iter()
        .enumerate()
        {
            check(dev, rows, dim, n, 11 + k as u64)?;
        }
        Ok(())
    });
}

#[test]
fn no_pairs_is_no_launch() {
    on_devices("drift with no pairs", |dev| {
        let feats = dev.upload(&[1.0f32; 8])?;
        let pairs = dev.upload(&[0i32; 2])?;
        let mut out = dev.alloc::<f64>(4)?;
        dev.poison(&mut out)?;
        token_sums_f32(dev, &feats, &pairs, 0, 4, &mut out, 0)?;
        assert!(dev.download(&out)?.iter().all(|x| x.to_bits() == u64::MAX));
        Ok(())
    });
}

/// The drift of a layer from its sums: a token compared with itself has cosine one and no
/// drift; an opposite one cosine minus one and twice its norm.
#[test]
fn drift_of_known_tokens() {
    let c = [3.0f32, 4.0, 0.0, 1.0];
    let same = token_sums(&c, &c, 2);
    assert_eq!(drift_of(&same), (1.0, 0.0));
    let opposite: Vec<f32> = c.iter().map(|x| -x).collect();
    let (cos, rel) = drift_of(&token_sums(&opposite, &c, 2));
    assert_eq!((cos, rel), (-1.0, 2.0));
}
