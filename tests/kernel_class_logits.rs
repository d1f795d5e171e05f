//! `kernels/class_logits.cu` (rows normalised on the device, and their cosine logits with class
//! embeddings) against the host twins `prm::eval::ops::normalize_rows` and `dot_logits`, bit for
//! bit: fresh random rows, poisoned outputs, odd sizes (1, 50, 197 and 1201 rows; 1, 17, 150 and
//! 1000 classes; widths of 64, 100, 512 and 768, a tile's 32 and not), rows of norm zero, rows
//! scaled far up and down. The simulator under both schedules always, CUDA when present.

use crate::common::kernel as kernel_common;

use kernel_common::{on_devices, Rng};
use prm::eval::ops::{dot_logits, normalize_rows};
use prm::gpu::kernels::class_logits::{
    class_logits_f32, class_logits_f32_in_row_tiles, normalize_rows_f32,
};
use prm::gpu::{Device, GpuError};

/// Rows of width `dim` as a projection gives them: a few units, every seventh scaled by 10³ and
/// every eleventh by 10⁻³, and row 2 all zeros (it must stay zero).
fn rows(rng: &mut Rng, n: usize, dim: usize) -> Vec<f32> {
    let mut x = rng.vec(n * dim, -2.0, 2.0);
    for (r, row) in x.chunks_mut(dim).enumerate() {
        let scale = match r {
            2 => 0.0,
            _ if r % 7 == 0 => 1e3,
            _ if r % 11 == 0 => 1e-3,
            _ => 1.0,
        };
        row.iter_mut().for_each(|v| *v *= scale);
    }
    x
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The device's normalisation of `n` rows (inside a buffer one row longer, whose last row must
/// stay as it was) against the host's.
fn check_normalize(dev: &Device, n: usize, dim: usize, seed: u64) -> Result<Vec<f32>, GpuError> {
    let mut rng = Rng::new(seed);
    let x = rows(&mut rng, n + 1, dim);
    let mut want = x.clone();
    normalize_rows(&mut want[..n * dim], dim);
    let mut buf = dev.upload(&x)?;
    normalize_rows_f32(dev, &mut buf, n, dim)?;
    let got = dev.download(&buf)?;
    assert_eq!(
        bits(&got),
        bits(&want),
        "normalised {n} rows of {dim} differ from the host's"
    );
    Ok(want[..n * dim].to_vec())
}

/// The device's logits of `n` rows with `c` classes, into a poisoned buffer one row longer
/// (which must stay poisoned), against the host's.
fn check_logits(dev: &Device, n: usize, c: usize, dim: usize, seed: u64) -> Result<(), GpuError> {
    let x = check_normalize(dev, n, dim, seed)?;
    let mut rng = Rng::new(seed ^ 0xC1A55);
    let mut classes = rng.vec(c * dim, -1.0, 1.0);
    normalize_rows(&mut classes, dim);
    let want = dot_logits(&x, &classes, dim);
    let x_dev = dev.upload(&x)?;
    let classes_dev = dev.upload(&classes)?;
    let mut logits = dev.alloc::<f32>((n + 1) * c)?;
    dev.poison(&mut logits)?;
    class_logits_f32(dev, &x_dev, &classes_dev, n, c, dim, &mut logits)?;
    let got = dev.download(&logits)?;
    assert_eq!(
        bits(&got[..n * c]),
        bits(&want),
        "logits of {n} rows of {dim} with {c} classes differ from the host's"
    );
    assert!(
        got[n * c..].iter().all(|v| v.is_nan()),
        "the row after the last was written"
    );
    Ok(())
}

#[test]
fn normalised_rows_match_the_host_bit_for_bit() {
    on_devices("normalize rows", |dev| {
        for (k, &(n, dim)) in [(1201, 64), (197, 768), (50, 100), (3, 1)]
            .iter()
            .enumerate()
        {
            check_normalize(dev, n, dim, 3 + k as u64)?;
        }
        Ok(())
    });
}

#[test]
fn logits_match_the_host_bit_for_bit() {
    on_devices("class logits", |dev| {
        for (k, &(n, c, dim)) in [
            (197, 150, 512),
            (1201, 17, 64),
            (50, 1000, 100),
            (1, 1, 768),
            (33, 16, 32),
            (18, 3, 33),
            // One past a 64-row and two 64-class tiles, a width of two whole steps and one
            // part-step.
            (65, 129, 47),
        ]
        .iter()
        .enumerate()
        {
            check_logits(dev, n, c, dim, 21 + k as u64)?;
        }
        Ok(())
    });
}

/// More row tiles than the grid holds (65,535 of them on a GPU; 2 here): the kernel's loop over
/// the rest gives the same bits.
#[test]
fn row_tiles_past_the_grid_are_looped_over() {
    on_devices("class logits past the grid", |dev| {
        let (n, c, dim) = (197, 19, 40);
        let mut rng = Rng::new(5);
        let mut x = rows(&mut rng, n, dim);
        normalize_rows(&mut x, dim);
        let classes = rng.vec(c * dim, -1.0, 1.0);
        let want = dot_logits(&x, &classes, dim);
        let (x_dev, classes_dev) = (dev.upload(&x)?, dev.upload(&classes)?);
        for tiles in [1, 2, 5] {
            let mut logits = dev.alloc::<f32>(n * c)?;
            dev.poison(&mut logits)?;
            class_logits_f32_in_row_tiles(
                dev,
                &x_dev,
                &classes_dev,
                n,
                c,
                dim,
                &mut logits,
                tiles,
            )?;
            let got = dev.download(&logits)?;
            assert_eq!(bits(&got), bits(&want), "a grid of {tiles} row tiles");
        }
        Ok(())
    });
}

#[test]
fn nothing_to_do_is_no_launch() {
    on_devices("class logits with no rows", |dev| {
        let x = dev.upload(&[1.0f32; 8])?;
        let classes = dev.upload(&[1.0f32; 8])?;
        let mut logits = dev.alloc::<f32>(4)?;
        dev.poison(&mut logits)?;
        class_logits_f32(dev, &x, &classes, 0, 2, 4, &mut logits)?;
        class_logits_f32(dev, &x, &classes, 2, 0, 4, &mut logits)?;
        assert!(dev.download(&logits)?.iter().all(|v| v.is_nan()));
        let mut y = dev.upload(&[3.0f32, 4.0])?;
        normalize_rows_f32(dev, &mut y, 0, 2)?;
        assert_eq!(dev.download(&y)?, [3.0, 4.0]);
        Ok(())
    });
}
