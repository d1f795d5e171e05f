//! The CUDA backend: clean errors without a driver (never a panic), and, when a device is
//! present, memory round trips, the raw launch path (argument packing, large dynamic shared
//! memory) through the built-in `prm_selftest_*` kernels, and cuBLASLt products against a
//! naive CPU product, and the product variants (C read from another buffer, bf16 output with a
//! bf16 bias epilogue) against the simulator's twins. Without a device the device tests print
//! "skipped: no CUDA device".

use half::bf16;
use prm::gpu::gemm::{
    matmul_bf16_bf16out, matmul_bf16_residual, matmul_f32, matmul_f32_residual, MatmulShape,
};
use prm::gpu::{cuda, Device, GpuError, KernelArgs, LaunchConfig};

/// The CUDA device, or None (after printing why) when there is none.
fn device() -> Option<Device> {
    if !Device::cuda_available() {
        println!("skipped: no CUDA device");
        return None;
    }
    match Device::cuda(0) {
        Ok(d) => Some(d),
        Err(GpuError::NoKernels) => {
            println!("skipped: this build has no CUDA kernels (nvcc was not found)");
            None
        }
        Err(e) => panic!("a CUDA device is present but could not be opened: {e}"),
    }
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `download_range` reads exactly the slice asked for, on the simulator and on the device,
/// and refuses a range past the end.
#[test]
fn download_range_reads_a_slice() {
    let data = values(1001, 5);
    let mut devices = vec![Device::sim()];
    devices.extend(device());
    for dev in devices {
        let buf = dev.upload(&data).unwrap();
        for (start, len) in [(0, 1001), (0, 0), (7, 64), (1000, 1), (333, 500)] {
            assert_eq!(
                dev.download_range(&buf, start, len).unwrap(),
                data[start..start + len],
                "{} {start}+{len}",
                dev.name()
            );
        }
        let past = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            dev.download_range(&buf, 1000, 2)
        }));
        assert!(past.is_err(), "{}: a range past the end", dev.name());
    }
}

#[test]
fn write_range_and_download_split_place_and_cut_pieces() {
    let data = values(1001, 6);
    let mut devices = vec![Device::sim()];
    devices.extend(device());
    for dev in devices {
        let mut buf = dev.alloc::<f32>(1001).unwrap();
        dev.poison(&mut buf).unwrap();
        // Pieces written out of order land at their offsets; an empty piece is a no-op.
        for (start, len) in [(600, 401), (0, 1), (1, 599), (300, 0)] {
            dev.write_range(&mut buf, start, &data[start..start + len])
                .unwrap();
        }
        assert_eq!(dev.download(&buf).unwrap(), data, "{}", dev.name());
        let pieces = dev.download_split(&buf, &[3, 0, 997]).unwrap();
        assert_eq!(
            pieces,
            vec![data[..3].to_vec(), Vec::new(), data[3..1000].to_vec()],
            "{}",
            dev.name()
        );
        let past = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut b = dev.alloc::<f32>(4).unwrap();
            dev.write_range(&mut b, 3, &[1.0, 2.0])
        }));
        assert!(past.is_err(), "{}: a write past the end", dev.name());
    }
}

/// `alloc` hands out zeros on both backends. `alloc_undefined` (pool misses, uploads) runs no
/// fill pass on CUDA, and under the simulator hands out 0xFF bytes (NaN), so that code reading
/// such memory before writing it fails the simulator's tests; once written it reads back what
/// was written. The pool's misses and uploads at odd sizes go through it.
#[test]
fn zeroed_and_undefined_allocations() {
    let mut devices = vec![Device::sim()];
    devices.extend(device());
    for dev in devices {
        let name = dev.name();
        for len in [1usize, 197, 4099] {
            let zeros = dev.alloc::<f32>(len).unwrap();
            assert!(
                dev.download(&zeros).unwrap().iter().all(|&v| v == 0.0),
                "{name} {len}"
            );
            let mut undefined = dev.alloc_undefined::<f32>(len).unwrap();
            if dev.is_sim() {
                let got = dev.download(&undefined).unwrap();
                assert!(got.iter().all(|v| v.to_bits() == u32::MAX), "{name} {len}");
            }
            let data = values(len, len as u64);
            dev.write(&mut undefined, &data).unwrap();
            assert_eq!(dev.download(&undefined).unwrap(), data, "{name} {len}");
            assert_eq!(dev.download(&dev.upload(&data).unwrap()).unwrap(), data);
        }
        let pool = prm::gpu::pool::BufferPool::new(&dev);
        let mut missed = pool.take(1201).unwrap();
        if dev.is_sim() {
            assert!(
                dev.download(&missed).unwrap().iter().all(|v| v.is_nan()),
                "{name}"
            );
        }
        let data = values(1201, 3);
        dev.write(&mut missed, &data).unwrap();
        assert_eq!(dev.download(&missed).unwrap(), data, "{name}");
        drop(missed);
        let zeroed = pool.take_zeroed(1201).unwrap(); // the same buffer, from the free list
        assert!(
            dev.download(&zeroed).unwrap().iter().all(|&v| v == 0.0),
            "{name}"
        );
    }
}

#[test]
fn no_driver_or_no_kernels_is_an_error_not_a_panic() {
    let available = Device::cuda_available();
    let count = cuda::device_count();
    assert_eq!(available, count > 0);
    if !cuda::driver_present() {
        assert!(!available, "no driver, yet a device is reported");
        assert!(matches!(Device::cuda(0), Err(GpuError::NoDriver)));
        assert!(matches!(Device::cuda(3), Err(GpuError::NoDriver)));
        println!(
            "no CUDA driver: Device::cuda(0) -> {}",
            Device::cuda(0).err().unwrap()
        );
        return;
    }
    // A driver: an ordinal past the last device is a clean error.
    match Device::cuda(count + 5) {
        Err(GpuError::NoSuchDevice { ordinal, count: c }) => {
            assert_eq!((ordinal, c), (count + 5, count))
        }
        Err(e) => panic!("expected NoSuchDevice, got {e}"),
        Ok(_) => panic!("opened a device that does not exist"),
    }
    if count > 0 && !cuda::has_kernels() {
        assert!(matches!(Device::cuda(0), Err(GpuError::NoKernels)));
    }
}

#[test]
fn kernel_table_matches_build() {
    let names = cuda::kernel_names();
    if cuda::has_kernels() {
        assert!(names.contains(&"prm_selftest_args"), "{names:?}");
        assert!(names.contains(&"prm_selftest_smem"), "{names:?}");
    } else {
        assert!(names.is_empty());
    }
}

#[test]
fn upload_download_round_trip() {
    let Some(dev) = device() else { return };
    println!("device: {}", dev.name());
    for n in [0usize, 1, 3, 197 * 768, 1_000_003] {
        let data = values(n, n as u64);
        let buf = dev.upload(&data).unwrap();
        assert_eq!(dev.download(&buf).unwrap(), data, "f32 round trip of {n}");
        let zeros = dev.alloc::<f32>(n).unwrap();
        assert!(dev.download(&zeros).unwrap().iter().all(|&v| v == 0.0));
        let mut p = dev.alloc::<u32>(n).unwrap();
        dev.poison(&mut p).unwrap();
        assert!(dev.download(&p).unwrap().iter().all(|&v| v == u32::MAX));
    }
    let bytes: Vec<u8> = (0..1001).map(|i| (i * 7) as u8).collect();
    let mut b = dev.alloc::<u8>(bytes.len()).unwrap();
    dev.write(&mut b, &bytes).unwrap();
    assert_eq!(dev.download(&b).unwrap(), bytes);
    assert_eq!(b.address() % 256, 0);
    let backend = cuda::CudaBackend::new(0).unwrap();
    let (free, total) = backend.free_memory().unwrap();
    assert!(free > 0 && free <= total, "free {free} total {total}");
}

#[test]
fn round_trips_from_several_threads() {
    let Some(dev) = device() else { return };
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let dev = dev.clone();
            s.spawn(move || {
                for i in 0..20 {
                    let data = values(10_000 + i, t * 100 + i as u64);
                    let b = dev.upload(&data).unwrap();
                    assert_eq!(dev.download(&b).unwrap(), data);
                }
            });
        }
    });
}

#[test]
fn launch_packs_arguments_like_cu_launch_kernel() {
    let Some(dev) = device() else { return };
    let n = 1000usize;
    let input = values(n, 7);
    let x = dev.upload(&input).unwrap();
    let mut out = dev.alloc::<u32>(6 + n).unwrap();
    dev.poison(&mut out).unwrap();
    let w: u64 = 0x0123_4567_89AB_CDEF;
    let mut args = KernelArgs::new();
    args.output(&mut out)
        .i32(-42)
        .f32(3.25)
        .u32(0xDEAD_BEEF)
        .u64(w)
        .input(&x)
        .i32(n as i32);
    dev.launch(
        "prm_selftest_args",
        LaunchConfig::linear(3, 128, 0),
        &mut args,
    )
    .unwrap();
    let got = dev.download(&out).unwrap();
    assert_eq!(got[0], (-42i32) as u32);
    assert_eq!(f32::from_bits(got[1]), 3.25);
    assert_eq!(got[2], 0xDEAD_BEEF);
    assert_eq!(got[3], w as u32);
    assert_eq!(got[4], (w >> 32) as u32);
    assert_eq!(got[5], 3 * 128);
    for i in 0..n {
        assert_eq!(f32::from_bits(got[6 + i]), 2.0 * input[i], "element {i}");
    }
}

#[test]
fn launch_with_large_dynamic_shared_memory() {
    let Some(dev) = device() else { return };
    for kib in [4usize, 47, 64, 100] {
        let n = kib * 1024 / 4;
        let mut out = dev.alloc::<f32>(n).unwrap();
        dev.poison(&mut out).unwrap();
        let mut args = KernelArgs::new();
        args.output(&mut out).i32(n as i32);
        dev.launch(
            "prm_selftest_smem",
            LaunchConfig::linear(1, 256, (n * 4) as u32),
            &mut args,
        )
        .unwrap_or_else(|e| panic!("{kib} KiB: {e}"));
        let got = dev.download(&out).unwrap();
        for (j, v) in got.iter().enumerate() {
            assert_eq!(*v, (n - 1 - j) as f32 + 0.5, "{kib} KiB, element {j}");
        }
    }
    dev.synchronize().unwrap();
}

#[test]
fn unknown_kernel_is_an_error() {
    let Some(dev) = device() else { return };
    let mut args = KernelArgs::new();
    match dev.launch(
        "prm_no_such_kernel",
        LaunchConfig::linear(1, 32, 0),
        &mut args,
    ) {
        Err(GpuError::UnknownKernel(name)) => assert_eq!(name, "prm_no_such_kernel"),
        other => panic!("expected UnknownKernel, got {:?}", other.err()),
    }
}

/// `c = (acc ? c0 : 0) + a · op(b) + bias` in f64.
#[allow(clippy::too_many_arguments)]
fn naive(
    s: MatmulShape,
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    c0: &[f32],
    acc: bool,
) -> Vec<f64> {
    let mut c = vec![0f64; s.m * s.n];
    for i in 0..s.m {
        for j in 0..s.n {
            let mut sum = if acc { c0[i * s.n + j] as f64 } else { 0.0 };
            for p in 0..s.k {
                let bv = if s.b_transposed {
                    b[j * s.k + p]
                } else {
                    b[p * s.n + j]
                };
                sum += a[i * s.k + p] as f64 * bv as f64;
            }
            if let Some(bias) = bias {
                sum += bias[j] as f64;
            }
            c[i * s.n + j] = sum;
        }
    }
    c
}

fn check_matmul(dev: &Device, m: usize, n: usize, k: usize) {
    for b_transposed in [true, false] {
        for with_bias in [false, true] {
            for acc in [false, true] {
                let s = MatmulShape {
                    m,
                    n,
                    k,
                    b_transposed,
                };
                let seed = (m * 31 + n * 7 + k) as u64 * 8
                    + b_transposed as u64 * 4
                    + with_bias as u64 * 2
                    + acc as u64;
                let a = values(m * k, seed);
                let b = values(n * k, seed + 1);
                let bias = values(n, seed + 2);
                let c0 = values(m * n, seed + 3);
                let da = dev.upload(&a).unwrap();
                let db = dev.upload(&b).unwrap();
                let dbias = dev.upload(&bias).unwrap();
                let mut dc = if acc {
                    dev.upload(&c0).unwrap()
                } else {
                    let mut c = dev.alloc::<f32>(m * n).unwrap();
                    dev.poison(&mut c).unwrap(); // must be ignored when not accumulating
                    c
                };
                // Twice for the same shape: the second call reuses the cached plan.
                for rep in 0..2 {
                    if rep == 1 {
                        if acc {
                            dev.write(&mut dc, &c0).unwrap();
                        } else {
                            dev.poison(&mut dc).unwrap();
                        }
                    }
                    matmul_f32(dev, s, &da, &db, with_bias.then_some(&dbias), &mut dc, acc)
                        .unwrap();
                    let got = dev.download(&dc).unwrap();
                    let want = naive(s, &a, &b, with_bias.then_some(&bias[..]), &c0, acc);
                    let tol = 2e-5 * (k.max(1) as f64).sqrt() * 8.0;
                    for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (*g as f64 - w).abs() <= tol * (1.0 + w.abs()),
                            "{s:?} bias={with_bias} acc={acc} rep={rep}: c[{}, {}] = {g}, want {w}",
                            idx / n,
                            idx % n
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_matches_naive_product() {
    let Some(dev) = device() else { return };
    check_matmul(&dev, 197, 768, 64);
    check_matmul(&dev, 50, 3072, 768);
    check_matmul(&dev, 1, 1, 1);
    check_matmul(&dev, 7, 5, 3);
    check_matmul(&dev, 13, 9, 0);
}

#[test]
fn sim_matmul_still_works() {
    // The shared product path on the simulator (no CUDA needed): a small sanity check that the
    // row-major contract used above is the one the simulator implements.
    let dev = Device::sim();
    let s = MatmulShape {
        m: 3,
        n: 4,
        k: 5,
        b_transposed: true,
    };
    let a = values(15, 1);
    let b = values(20, 2);
    let bias = values(4, 3);
    let (da, db, dbias) = (
        dev.upload(&a).unwrap(),
        dev.upload(&b).unwrap(),
        dev.upload(&bias).unwrap(),
    );
    let mut dc = dev.alloc::<f32>(12).unwrap();
    matmul_f32(&dev, s, &da, &db, Some(&dbias), &mut dc, false).unwrap();
    let got = dev.download(&dc).unwrap();
    let want = naive(s, &a, &b, Some(&bias), &[0.0; 12], false);
    for (g, w) in got.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-5);
    }
}

/// One product variant on `dev`: the f32 and bf16 residual forms (`c` separate from `d`) and
/// the bf16-output form with and without its bf16 bias. Returns (f32 residual, bf16 residual,
/// bf16 out without bias, bf16 out with bias), and checks that `c` was only read.
fn product_variants(dev: &Device, s: MatmulShape, seed: u64) -> [Vec<f32>; 4] {
    let MatmulShape { m, n, k, .. } = s;
    let round = |v: Vec<f32>| -> Vec<bf16> { v.into_iter().map(bf16::from_f32).collect() };
    let (a, b) = (values(m * k, seed), values(n * k, seed + 1));
    let (bias, c) = (values(n, seed + 2), values(m * n, seed + 3));
    let (da, db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
    let (dab, dbb) = (
        dev.upload(&round(a.clone())).unwrap(),
        dev.upload(&round(b.clone())).unwrap(),
    );
    let (dbias, dbias16) = (
        dev.upload(&bias).unwrap(),
        dev.upload(&round(bias.clone())).unwrap(),
    );
    let dc = dev.upload(&c).unwrap();
    let poisoned = |len: usize| {
        let mut d = dev.alloc::<f32>(len).unwrap();
        dev.poison(&mut d).unwrap();
        d
    };
    let poisoned16 = |len: usize| {
        let mut d = dev.alloc::<bf16>(len).unwrap();
        dev.poison(&mut d).unwrap();
        d
    };
    let mut d32 = poisoned(m * n);
    matmul_f32_residual(dev, s, &da, &db, Some(&dbias), Some(&dc), &mut d32).unwrap();
    let mut dmix = poisoned(m * n);
    matmul_bf16_residual(dev, s, &dab, &dbb, Some(&dbias), Some(&dc), &mut dmix).unwrap();
    let mut plain = poisoned16(m * n);
    matmul_bf16_bf16out(dev, s, &dab, &dbb, None, &mut plain).unwrap();
    let mut biased = poisoned16(m * n);
    matmul_bf16_bf16out(dev, s, &dab, &dbb, Some(&dbias16), &mut biased).unwrap();
    assert_eq!(dev.download(&dc).unwrap(), c, "{s:?}: C was written");
    let wide = |v: Vec<bf16>| v.into_iter().map(|x| x.to_f32()).collect::<Vec<_>>();
    [
        dev.download(&d32).unwrap(),
        dev.download(&dmix).unwrap(),
        wide(dev.download(&plain).unwrap()),
        wide(dev.download(&biased).unwrap()),
    ]
}

/// cuBLASLt's C ≠ D and bf16-output descriptors against the simulator's twins, at the engine's
/// shapes (ViT-B qkv over 3 images of 197 tokens, 1201-token MLP products, an input-gradient
/// product) and odd ones (bf16 rows of odd length are only 2-byte aligned; k = 0). A
/// configuration cuBLASLt has no algorithm for fails with a typed error, never garbage.
#[test]
fn product_variants_match_the_simulator() {
    let Some(dev) = device() else { return };
    let sim = Device::sim();
    let shapes = [
        (197 * 3, 2304, 768, true),
        (1201, 3072, 768, true),
        (1201, 768, 3072, true),
        (197, 768, 3072, false),
        (197, 37, 33, true),
        (13, 9, 0, true),
    ];
    for (i, &(m, n, k, b_transposed)) in shapes.iter().enumerate() {
        let s = MatmulShape {
            m,
            n,
            k,
            b_transposed,
        };
        let got = product_variants(&dev, s, 100 + i as u64);
        let want = product_variants(&sim, s, 100 + i as u64);
        // fp32 accumulation in another order; bf16 outputs may round the other way (one bf16
        // step, 2^-8 relative). With a bias, cuBLASLt's bf16-output epilogue behaves as if it
        // rounded the product to bf16 before adding the bias (seen on an H200 with cuBLAS 13's
        // nvjet kernels: 0.11328125 against 0.111328125 where the bias cancelled most of the
        // product), so that error scales with the product's size, not the sum's.
        let f32_tol = 2e-5 * (k.max(1) as f64).sqrt() * 8.0;
        let names = [
            "f32 residual",
            "bf16 residual",
            "bf16 out",
            "bf16 out + bias",
        ];
        for (v, (g, w)) in got.iter().zip(&want).enumerate() {
            for (idx, (&g, &w)) in g.iter().zip(w).enumerate() {
                let (g, w) = (g as f64, w as f64);
                // The simulator's bf16 product without the bias, for the biased variant.
                let product = want[2][idx] as f64;
                let tol = match v {
                    0 | 1 => f32_tol * (1.0 + w.abs()),
                    2 => w.abs() / 128.0 + f32_tol,
                    _ => (w.abs() + product.abs()) / 128.0 + f32_tol,
                };
                assert!(
                    g.is_finite() && (g - w).abs() <= tol,
                    "{s:?} {}: d[{}, {}] = {g}, simulator {w}",
                    names[v],
                    idx / n,
                    idx % n
                );
            }
        }
    }
}

/// `PRM_PRODUCTS=timed` (`Device::set_timed_products`) keeps only cuBLASLt answers that give
/// the first answer's bits: every variant, and an f32 product accumulated in place (its C
/// copied for the tuning, so the tuning's runs do not add to it), gives the heuristic's bits
/// exactly, at the engine's shapes and odd ones, and each product key large enough for the bit
/// comparison is tuned once with the first answer timed. The simulator has nothing to time.
#[test]
fn timed_products_give_the_bits_of_the_heuristic_answer() {
    let sim = Device::sim();
    sim.set_timed_products(true);
    assert!(!sim.timed_products() && sim.product_tunings().is_empty());
    let Some(dev) = device() else { return };
    let shapes = [
        (64 * 197, 768, 768, true),
        (64 * 197, 3072, 768, true),
        (1201, 768, 3072, false),
        (197, 37, 33, true),
        (7, 5, 3, true),
    ];
    let in_place = |dev: &Device, s: MatmulShape, seed: u64| {
        let (a, b) = (values(s.m * s.k, seed), values(s.n * s.k, seed + 1));
        let (da, db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
        let mut dc = dev.upload(&values(s.m * s.n, seed + 3)).unwrap();
        // No bias: a key of its own (the f32 residual variant has one), so that this call,
        // in place, is the one its tuning runs on.
        matmul_f32(dev, s, &da, &db, None, &mut dc, true).unwrap();
        dev.download(&dc).unwrap()
    };
    let bits = |v: &[Vec<f32>]| -> Vec<Vec<u32>> {
        v.iter()
            .map(|x| x.iter().map(|f| f.to_bits()).collect())
            .collect()
    };
    for (i, &(m, n, k, b_transposed)) in shapes.iter().enumerate() {
        let s = MatmulShape {
            m,
            n,
            k,
            b_transposed,
        };
        let seed = 300 + 10 * i as u64;
        let run = |timed: bool| {
            dev.set_timed_products(timed);
            let mut all = product_variants(&dev, s, seed).to_vec();
            all.push(in_place(&dev, s, seed));
            bits(&all)
        };
        let heuristic = run(false);
        let tuned_before = dev.product_tunings().len();
        let timed = run(true);
        assert!(heuristic == timed, "{s:?}: timed products changed the bits");
        let tunings = dev.product_tunings();
        // Products too small for their bits to show another order of the sums keep the first
        // answer untuned: of the five kinds, three have fp32 outputs and two bf16 ones.
        let large = |bf16_output| prm::gpu::product_timing::large_enough_to_tune(m, n, bf16_output);
        let tuned_kinds = 3 * usize::from(large(false)) + 2 * usize::from(large(true));
        assert_eq!(
            tunings.len(),
            tuned_before + tuned_kinds,
            "{s:?}: one tuning per product kind, when large enough"
        );
        // Again: nothing more is tuned, and the bits stay.
        assert!(
            run(true) == heuristic,
            "{s:?}: a second timed run changed the bits"
        );
        assert_eq!(
            dev.product_tunings().len(),
            tunings.len(),
            "{s:?}: tuned twice"
        );
        for t in &tunings[tuned_before..] {
            println!("{}", prm::gpu::product_timing::describe(t));
            assert!(t.times_us().is_some(), "{s:?}: {t:?}");
        }
    }
}

/// The variants inside a captured CUDA graph replay with the results of direct calls.
#[test]
fn product_variants_replay_from_a_cuda_graph() {
    let Some(dev) = device() else { return };
    let s = MatmulShape {
        m: 197,
        n: 2304,
        k: 768,
        b_transposed: true,
    };
    let direct = product_variants(&dev, s, 7);
    let round = |v: Vec<f32>| -> Vec<bf16> { v.into_iter().map(bf16::from_f32).collect() };
    let a = dev.upload(&round(values(s.m * s.k, 7))).unwrap();
    let b = dev.upload(&round(values(s.n * s.k, 8))).unwrap();
    let bias = dev.upload(&values(s.n, 9)).unwrap();
    let bias16 = dev.upload(&round(values(s.n, 9))).unwrap();
    let c = dev.upload(&values(s.m * s.n, 10)).unwrap();
    let mut d = dev.alloc::<f32>(s.m * s.n).unwrap();
    let mut d16 = dev.alloc::<bf16>(s.m * s.n).unwrap();
    let graph = dev
        .capture(|| {
            matmul_bf16_residual(&dev, s, &a, &b, Some(&bias), Some(&c), &mut d)?;
            matmul_bf16_bf16out(&dev, s, &a, &b, Some(&bias16), &mut d16)
        })
        .unwrap();
    graph.launch().unwrap();
    let got16: Vec<f32> = dev
        .download(&d16)
        .unwrap()
        .into_iter()
        .map(|x| x.to_f32())
        .collect();
    assert_eq!(dev.download(&d).unwrap(), direct[1], "bf16 residual");
    assert_eq!(got16, direct[3], "bf16 out + bias");
}
