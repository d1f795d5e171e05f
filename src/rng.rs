//! Counter-based random numbers (Philox4x32-10) keyed per image.
//!
//! Every random draw of an attack (the random start, the dynamic-scale ratios) is a pure function
//! of `(seed, relative path, stream, index)`. Results therefore do not depend on batch
//! composition, device count or sharding, and a GPU kernel can reproduce the same numbers
//! bit for bit from the same counter (the CUDA twin lives in `kernels/update.cu`).

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// Streams separate independent uses of one image's key.
pub const STREAM_INIT: u32 = 1;
pub const STREAM_SCALE: u32 = 2;
pub const STREAM_ESCAPE: u32 = 3;

/// Philox4x32 with 10 rounds (Salmon et al., SC'11), as in cuRAND and Random123.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W0);
            k[1] = k[1].wrapping_add(PHILOX_W1);
        }
        let p0 = u64::from(PHILOX_M0) * u64::from(c[0]);
        let p1 = u64::from(PHILOX_M1) * u64::from(c[2]);
        c = [
            ((p1 >> 32) as u32) ^ c[1] ^ k[0],
            p1 as u32,
            ((p0 >> 32) as u32) ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// A hash of a relative path that is stable across platforms and releases (used for seeding
/// and for `--shard`).
pub fn stable_path_hash(rel_path: &str) -> u64 {
    splitmix64(fnv1a64(rel_path.as_bytes()))
}

/// FNV-1a over the bytes of a relative path.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64 finaliser: mixes the seed and the path hash so nearby seeds give unrelated keys.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The random source of one image: a Philox key derived from `(seed, relative path)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageRng {
    key: [u32; 2],
}

impl ImageRng {
    /// `rel_path` uses `/` separators on every platform, so keys match across machines.
    pub fn new(seed: u64, rel_path: &str) -> Self {
        let k = splitmix64(seed ^ stable_path_hash(rel_path));
        ImageRng {
            key: [k as u32, (k >> 32) as u32],
        }
    }

    pub fn key(&self) -> [u32; 2] {
        self.key
    }

    /// Four raw 32-bit words for counter `(index, stream)`.
    pub fn words(&self, stream: u32, index: u64) -> [u32; 4] {
        philox4x32_10([index as u32, (index >> 32) as u32, stream, 0], self.key)
    }

    /// A uniform draw in [0, 1) with 24 random bits, exactly representable in f32.
    pub fn uniform(&self, stream: u32, index: u64) -> f32 {
        (self.words(stream, index)[0] >> 8) as f32 * (1.0 / 16_777_216.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_matches_random123_known_answers() {
        // Known-answer vectors from Random123's kat_vectors for philox4x32_10.
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn image_rng_depends_on_seed_and_path_only() {
        let a = ImageRng::new(7, "a/b.png");
        assert_eq!(a, ImageRng::new(7, "a/b.png"));
        assert_ne!(a, ImageRng::new(8, "a/b.png"));
        assert_ne!(a, ImageRng::new(7, "a/c.png"));
        let u: Vec<f32> = (0..1000).map(|i| a.uniform(STREAM_INIT, i)).collect();
        assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = u.iter().sum::<f32>() / u.len() as f32;
        assert!((mean - 0.5).abs() < 0.05, "mean {mean}");
    }
}
