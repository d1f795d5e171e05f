//! Tests of the CPU simulator of the CUDA execution model (`kernels/sim/`), driven through
//! `Device::sim()` with the test kernels of `kernels/sim_selftest.cu`.

use std::sync::RwLock;
use std::time::{Duration, Instant};

use prm::gpu::sim::Schedule;
use prm::gpu::{Device, GpuError, KernelArgs, LaunchConfig};

extern "C" {
    /// Barrier timeout for later launches in ms (0: default); returns the previous setting.
    fn prm_sim_set_barrier_timeout_ms(ms: u32) -> u32;
}

/// Tests read-lock this; the test that shortens the (process-wide) barrier timeout write-locks
/// it, so no other test launches while the short timeout is in force.
static TIMEOUT: RwLock<()> = RwLock::new(());

fn cfg(grid: (u32, u32, u32), block: (u32, u32, u32), shared_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid,
        block,
        shared_bytes,
    }
}

/// Launches prm_selftest_barrier (`iters` rounds of write, sync, read neighbours, sync) over
/// `blocks` blocks of `n` threads, checks every thread's sum, and returns the per-block
/// __syncthreads_count results.
fn barrier_rounds(dev: &Device, blocks: usize, n: usize, iters: i32) -> Vec<i32> {
    let mut out = dev.alloc::<i32>(blocks * n).unwrap();
    let mut count = dev.alloc::<i32>(blocks).unwrap();
    dev.poison(&mut out).unwrap();
    let mut args = KernelArgs::new();
    args.output(&mut out).output(&mut count).i32(iters);
    dev.launch(
        "prm_selftest_barrier",
        LaunchConfig::linear(blocks as u32, n as u32, 0),
        &mut args,
    )
    .unwrap();
    let out = dev.download(&out).unwrap();
    for b in 0..blocks {
        for t in 0..n {
            let mut want = 0i32;
            for it in 0..iters {
                let at = |u: usize| u as i32 * it + b as i32;
                want += at((t + 1) % n) + at((t + n - 1) % n);
            }
            assert_eq!(out[b * n + t], want, "block {b} thread {t}");
        }
    }
    dev.download(&count).unwrap()
}

#[test]
fn barrier_in_a_loop_and_syncthreads_count() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let dev = Device::sim();
    let (blocks, n) = (3usize, 100usize);
    let count = barrier_rounds(&dev, blocks, n, 7);
    let want_count = (0..n).filter(|t| t % 3 == 0).count() as i32;
    assert_eq!(count, vec![want_count; blocks]);
}

#[test]
fn shared_memory_is_poisoned_at_every_block_start() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let dev = Device::sim();
    let (blocks, n) = (4usize, 64usize);
    let mut out = dev.alloc::<u32>(blocks * n * 2).unwrap();
    let mut args = KernelArgs::new();
    args.output(&mut out);
    // Two launches: the second must not see the first's writes either.
    for _ in 0..2 {
        dev.launch(
            "prm_selftest_shared_poison",
            LaunchConfig::linear(blocks as u32, n as u32, (n * 4) as u32),
            &mut args,
        )
        .unwrap();
        let out = dev.download(&out).unwrap();
        for (i, &bits) in out.iter().enumerate() {
            assert_eq!(
                bits,
                0xFFFF_FFFF,
                "{} shared slot of thread {} read 0x{bits:08x}",
                if i % 2 == 0 { "static" } else { "dynamic" },
                i / 2
            );
            assert!(f32::from_bits(bits).is_nan());
        }
    }
}

#[test]
fn dynamic_shared_memory() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let dev = Device::sim();
    let (blocks, n) = (3usize, 128usize);
    let input: Vec<f32> = (0..blocks * n).map(|i| i as f32 * 0.25 - 7.0).collect();
    let x = dev.upload(&input).unwrap();
    let mut y = dev.alloc::<f32>(blocks * n).unwrap();
    dev.poison(&mut y).unwrap();
    let mut args = KernelArgs::new();
    args.input(&x).output(&mut y);
    dev.launch(
        "prm_selftest_dynamic_shared",
        LaunchConfig::linear(blocks as u32, n as u32, (n * 4) as u32),
        &mut args,
    )
    .unwrap();
    let y = dev.download(&y).unwrap();
    for b in 0..blocks {
        for t in 0..n {
            assert_eq!(
                y[b * n + t],
                input[b * n + n - 1 - t],
                "block {b} thread {t}"
            );
        }
    }
}

#[test]
fn warp_shuffles_and_votes() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let dev = Device::sim();
    let (blocks, n) = (2usize, 64usize);
    let mut out = dev.alloc::<i32>(blocks * n * 12).unwrap();
    let mut wide = dev.alloc::<u64>(blocks * n).unwrap();
    dev.poison(&mut out).unwrap();
    let mut args = KernelArgs::new();
    args.output(&mut out).output(&mut wide);
    dev.launch(
        "prm_selftest_shuffles",
        LaunchConfig::linear(blocks as u32, n as u32, 0),
        &mut args,
    )
    .unwrap();
    let out = dev.download(&out).unwrap();
    let wide = dev.download(&wide).unwrap();
    let ballot = (0..32)
        .filter(|l| l % 3 == 0)
        .fold(0u32, |m, l| m | (1 << l)) as i32;
    for g in 0..blocks * n {
        let lane = (g % 32) as i32;
        let o = &out[g * 12..g * 12 + 12];
        let down3 = if lane + 3 < 32 { lane + 3 } else { lane };
        let up5 = if lane >= 5 { lane - 5 } else { lane };
        let seg4 = lane & !3;
        let down1w4 = if lane + 1 < seg4 + 4 { lane + 1 } else { lane };
        let want = [
            lane ^ 1,
            lane ^ 16,
            down3,
            up5,
            7,
            (lane & !7) + 3,
            down1w4,
            ballot,
            1,
            1,
            0,
            ((lane ^ 2) as f32 * 0.5).to_bits() as i32,
        ];
        assert_eq!(o, &want, "thread {g} (lane {lane})");
        let src = g ^ 4;
        let want_wide = (((src % 32) as u64) << 40) | src as u64;
        assert_eq!(wide[g], want_wide, "64-bit shuffle, thread {g}");
    }
}

#[test]
fn partial_last_warp() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let dev = Device::sim();
    let n = 50usize;
    let input: Vec<f32> = (0..n).map(|i| (i * i % 17) as f32 + 0.5).collect();
    let x = dev.upload(&input).unwrap();
    let mut y = dev.alloc::<f32>(4 * n).unwrap();
    dev.poison(&mut y).unwrap();
    let mut args = KernelArgs::new();
    args.input(&x).output(&mut y);
    dev.launch(
        "prm_selftest_partial_warp",
        LaunchConfig::linear(1, n as u32, 0),
        &mut args,
    )
    .unwrap();
    let y = dev.download(&y).unwrap();
    for t in 0..n {
        let (w0, lanes) = if t < 32 { (0, 32) } else { (32, n - 32) };
        let mask = if lanes == 32 {
            u32::MAX
        } else {
            (1u32 << lanes) - 1
        };
        let sum: f32 = input[w0..w0 + lanes].iter().sum();
        assert_eq!(y[4 * t], sum, "warp sum, thread {t}");
        assert_eq!(y[4 * t + 1].to_bits(), mask, "__activemask, thread {t}");
        assert_eq!(y[4 * t + 2].to_bits(), mask, "__ballot_sync, thread {t}");
        // The butterfly over the active mask: a lane whose xor partner does not exist adds
        // nothing at that step.
        let mut vals: Vec<f32> = input[w0..w0 + lanes].to_vec();
        let mut offset = 16;
        while offset > 0 {
            let prev = vals.clone();
            for l in 0..lanes {
                let src = l ^ offset;
                vals[l] = prev[l] + if src < lanes { prev[src] } else { 0.0 };
            }
            offset >>= 1;
        }
        assert_eq!(y[4 * t + 3], vals[t - w0], "butterfly, thread {t}");
    }
}

/// What a GPU leaves undefined in warp collectives is an error in the simulator, naming the
/// kernel: a mask naming lanes that do not exist (a full-mask `prm_warp_sum` in a block of 50
/// threads), and a shuffle reading a lane outside its mask.
#[test]
fn undefined_warp_masks_are_refused() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let dev = Device::sim();
    let mut y = dev.alloc::<f32>(64).unwrap();
    for (mode, threads, says) in [
        (0, 50u32, "lanes 0x0003ffff exist"),
        (1, 32, "reads a lane outside its mask"),
    ] {
        let mut args = KernelArgs::new();
        args.i32(mode).output(&mut y);
        let msg = sim_message(dev.launch(
            "prm_selftest_bad_warp_masks",
            LaunchConfig::linear(1, threads, 0),
            &mut args,
        ));
        assert!(msg.contains(says), "mode {mode}: {msg}");
    }
    // The same kernel with whole warps and a mask of existing lanes is fine.
    let mut args = KernelArgs::new();
    args.i32(0).output(&mut y);
    dev.launch(
        "prm_selftest_bad_warp_masks",
        LaunchConfig::linear(1, 64, 0),
        &mut args,
    )
    .unwrap();
    assert_eq!(dev.download(&y).unwrap(), vec![32.0; 64]);
}

#[test]
fn atomics_from_every_thread() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let dev = Device::sim();
    let (blocks, n) = (4u32, 128u32);
    let total = (blocks * n) as u64;
    let mut fsum = dev.alloc::<f32>(1).unwrap();
    let mut isum = dev.alloc::<i32>(1).unwrap();
    let mut umax = dev.alloc::<u32>(1).unwrap();
    let mut u64sum = dev.alloc::<u64>(1).unwrap();
    let mut cas = dev.alloc::<i32>(1).unwrap();
    let mut dsum = dev.alloc::<u64>(1).unwrap();
    let mut args = KernelArgs::new();
    args.output(&mut fsum)
        .output(&mut isum)
        .output(&mut umax)
        .output(&mut u64sum)
        .output(&mut cas)
        .output(&mut dsum);
    dev.launch(
        "prm_selftest_atomics",
        LaunchConfig::linear(blocks, n, 0),
        &mut args,
    )
    .unwrap();
    let tri = total * (total - 1) / 2;
    assert_eq!(dev.download(&fsum).unwrap()[0], total as f32);
    assert_eq!(dev.download(&isum).unwrap()[0] as u64, tri);
    assert_eq!(dev.download(&umax).unwrap()[0] as u64, total - 1);
    assert_eq!(dev.download(&u64sum).unwrap()[0], tri);
    assert_eq!(dev.download(&cas).unwrap()[0] as u64, total);
    assert_eq!(
        f64::from_bits(dev.download(&dsum).unwrap()[0]),
        total as f64 * 0.5
    );
}

#[test]
fn bf16_round_to_nearest_even() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let dev = Device::sim();
    let one = 1.0f32.to_bits();
    let mut cases: Vec<(f32, u16)> = vec![
        (1.0, 0x3F80),
        (f32::from_bits(one + 0x8000), 0x3F80), // tie, even below: stays 1.0
        (f32::from_bits(one + 0x8001), 0x3F81), // just above the tie: rounds up
        (f32::from_bits(one + 0x18000), 0x3F82), // tie, odd below: rounds up to even
        (f32::from_bits(one + 0x7FFF), 0x3F80),
        (-2.5, 0xC020),
        (0.0, 0x0000),
        (-0.0, 0x8000),
        (f32::INFINITY, 0x7F80),
        (f32::NEG_INFINITY, 0xFF80),
        (f32::MAX, 0x7F80), // rounds to infinity
        (f32::from_bits(0x7F7F_7FFF), 0x7F7F),
        (f32::from_bits(1), 0x0000), // smallest subnormal rounds to zero
        (f32::from_bits(0x0001_8000), 0x0002), // subnormal tie, odd below
    ];
    let mut state = 0x1234_5678u32;
    for _ in 0..200 {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let f = f32::from_bits(state);
        if !f.is_nan() {
            cases.push((f, half::bf16::from_f32(f).to_bits()));
        }
    }
    let nans = [
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7F80_0001),
        f32::from_bits(0xFFC1_2345),
    ];
    let mut input: Vec<f32> = cases.iter().map(|c| c.0).collect();
    input.extend_from_slice(&nans);
    let n = input.len();
    let x = dev.upload(&input).unwrap();
    let mut y = dev.alloc::<half::bf16>(n).unwrap();
    let mut back = dev.alloc::<f32>(n).unwrap();
    let mut args = KernelArgs::new();
    args.input(&x)
        .output(&mut y)
        .output(&mut back)
        .i32(n as i32);
    dev.launch(
        "prm_selftest_bf16",
        LaunchConfig::linear(n.div_ceil(64) as u32, 64, 0),
        &mut args,
    )
    .unwrap();
    let y = dev.download(&y).unwrap();
    let back = dev.download(&back).unwrap();
    for (i, &(f, want)) in cases.iter().enumerate() {
        assert_eq!(
            y[i].to_bits(),
            want,
            "bf16 of {f:e} (0x{:08x})",
            f.to_bits()
        );
        assert_eq!(back[i].to_bits(), (want as u32) << 16);
    }
    for (k, f) in nans.iter().enumerate() {
        let b = y[cases.len() + k];
        assert!(
            b.is_nan(),
            "NaN 0x{:08x} became 0x{:04x}",
            f.to_bits(),
            b.to_bits()
        );
        assert_eq!(
            b.to_bits() & 0x8000,
            ((f.to_bits() >> 16) & 0x8000) as u16,
            "NaN sign"
        );
        assert!(back[cases.len() + k].is_nan());
    }
}

#[test]
fn multi_dimensional_grid_and_block() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let (grid, block) = ((3u32, 2u32, 2u32), (4u32, 3u32, 2u32));
    let nblocks = (grid.0 * grid.1 * grid.2) as usize;
    let nthreads = (block.0 * block.1 * block.2) as usize;
    for schedule in [Schedule::Forward, Schedule::Reverse] {
        let dev = Device::sim_with_schedule(schedule);
        let mut out = dev.alloc::<i32>(nblocks * nthreads).unwrap();
        let mut order = dev.alloc::<i32>(nblocks).unwrap();
        let mut counter = dev.alloc::<i32>(1).unwrap();
        dev.poison(&mut out).unwrap();
        let mut args = KernelArgs::new();
        args.output(&mut out)
            .output(&mut order)
            .output(&mut counter);
        dev.launch("prm_selftest_dims", cfg(grid, block, 0), &mut args)
            .unwrap();
        check_dims(&dev.download(&out).unwrap(), grid, block);
        // Blocks run one after the other: x fastest, or the reverse.
        let mut want: Vec<i32> = (0..nblocks as i32).collect();
        if schedule == Schedule::Reverse {
            want.reverse();
        }
        assert_eq!(dev.download(&order).unwrap(), want, "{schedule:?}");
    }
}

/// Every thread wrote its coordinates to its linear position in the grid.
fn check_dims(out: &[i32], grid: (u32, u32, u32), block: (u32, u32, u32)) {
    let mut i = 0;
    for bz in 0..grid.2 {
        for by in 0..grid.1 {
            for bx in 0..grid.0 {
                for tz in 0..block.2 {
                    for ty in 0..block.1 {
                        for tx in 0..block.0 {
                            let want = tx | ty << 4 | tz << 8 | bx << 12 | by << 16 | bz << 20;
                            assert_eq!(out[i], want as i32, "element {i}");
                            i += 1;
                        }
                    }
                }
            }
        }
    }
}

fn sim_message(r: Result<(), GpuError>) -> String {
    match r {
        Err(GpuError::Sim { message, .. }) => message,
        other => panic!("expected GpuError::Sim, got {other:?}"),
    }
}

#[test]
fn deadlock_is_reported_not_hung_and_the_pool_survives() {
    let _guard = TIMEOUT.write().unwrap_or_else(|e| e.into_inner());
    // The messages name the first thread (and block) to get stuck, which depends on the order:
    // the forward schedule's.
    let dev = Device::sim_with_schedule(Schedule::Forward);
    let mut y = dev.alloc::<f32>(64).unwrap();

    // Early return before a __syncthreads: seen at once, naming kernel, block and thread.
    let start = Instant::now();
    let mut args = KernelArgs::new();
    args.output(&mut y);
    let msg = sim_message(dev.launch(
        "prm_selftest_early_return",
        cfg((2, 1, 1), (64, 1, 1), 0),
        &mut args,
    ));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(msg.contains("prm_selftest_early_return"), "{msg}");
    assert!(msg.contains("block (0,0,0)"), "{msg}");
    assert!(msg.contains("thread (0,0,0)"), "{msg}");
    assert!(msg.contains("deadlock"), "{msg}");

    // Lane 0 waits in a warp collective for lane 1, which waits in __syncthreads with the rest:
    // every live thread is blocked, which is also seen at once.
    let start = Instant::now();
    let mut args = KernelArgs::new();
    args.output(&mut y);
    let msg = sim_message(dev.launch(
        "prm_selftest_stuck",
        cfg((1, 1, 1), (64, 1, 1), 0),
        &mut args,
    ));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(msg.contains("prm_selftest_stuck"), "{msg}");
    assert!(msg.contains("block (0,0,0)"), "{msg}");
    assert!(msg.contains("thread (0,0,0) in a warp collective"), "{msg}");
    assert!(msg.contains("in __syncthreads"), "{msg}");

    // A thread that keeps running past the barrier timeout: the waiters give up and name it.
    // SAFETY: plain setter of an atomic in the simulator runtime.
    let previous = unsafe { prm_sim_set_barrier_timeout_ms(150) };
    let start = Instant::now();
    let mut args = KernelArgs::new();
    args.output(&mut y).u64(600_000_000);
    let r = dev.launch(
        "prm_selftest_slow_thread",
        cfg((1, 1, 1), (64, 1, 1), 0),
        &mut args,
    );
    // SAFETY: as above.
    unsafe { prm_sim_set_barrier_timeout_ms(previous) };
    let msg = sim_message(r);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(msg.contains("prm_selftest_slow_thread"), "{msg}");
    assert!(msg.contains("block (0,0,0)"), "{msg}");
    assert!(msg.contains("waited more than 150 ms"), "{msg}");
    assert!(msg.contains("thread (63,0,0) running"), "{msg}");

    // The pool still works.
    block_sums(&dev, 3, 256, 1000, 1.0);
}

#[test]
fn unknown_kernel_and_bad_configurations() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let dev = Device::sim();
    let mut args = KernelArgs::new();
    match dev.launch(
        "prm_no_such_kernel",
        LaunchConfig::linear(1, 32, 0),
        &mut args,
    ) {
        Err(GpuError::UnknownKernel(name)) => assert_eq!(name, "prm_no_such_kernel"),
        other => panic!("expected UnknownKernel, got {other:?}"),
    }
    let mut y = dev.alloc::<f32>(64).unwrap();
    for (c, what) in [
        (cfg((0, 1, 1), (32, 1, 1), 0), "non-zero"),
        (cfg((1, 1, 1), (32, 0, 1), 0), "non-zero"),
        (cfg((1, 1, 1), (1025, 1, 1), 0), "1024"),
        (cfg((1, 1, 1), (32, 32, 2), 0), "1024"),
        (cfg((1, 1, 1), (32, 1, 1), 228 * 1024), "shared"),
    ] {
        let mut args = KernelArgs::new();
        args.output(&mut y);
        let msg = sim_message(dev.launch("prm_selftest_early_return", c, &mut args));
        assert!(msg.contains(what), "{c:?}: {msg}");
    }
}

/// Launches prm_selftest_block_sum over `blocks` chunks of `chunk` elements (values depend on
/// `seed`) and checks the sums.
fn block_sums(dev: &Device, blocks: usize, threads: u32, chunk: usize, seed: f32) {
    let input: Vec<f32> = (0..blocks * chunk)
        .map(|i| ((i % 13) as f32 - 6.0) * seed)
        .collect();
    let x = dev.upload(&input).unwrap();
    let mut y = dev.alloc::<f32>(blocks).unwrap();
    dev.poison(&mut y).unwrap();
    let mut args = KernelArgs::new();
    args.input(&x).output(&mut y).i32(chunk as i32);
    dev.launch(
        "prm_selftest_block_sum",
        LaunchConfig::linear(blocks as u32, threads, 0),
        &mut args,
    )
    .unwrap();
    let y = dev.download(&y).unwrap();
    for b in 0..blocks {
        let want: f64 = input[b * chunk..(b + 1) * chunk]
            .iter()
            .map(|&v| v as f64)
            .sum();
        assert!(
            (y[b] as f64 - want).abs() <= 1e-3 * (1.0 + want.abs()),
            "block {b}: {} vs {want}",
            y[b]
        );
    }
}

#[test]
fn parallel_launches_from_several_threads() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let dev = Device::sim();
    std::thread::scope(|s| {
        for k in 0..4 {
            let dev = dev.clone();
            s.spawn(move || {
                for r in 0..4 {
                    let threads = [32u32, 64, 128, 96][(k + r) % 4];
                    block_sums(&dev, 3 + k, threads, 777 + 31 * r, (k * 4 + r + 1) as f32);
                }
            });
        }
    });
}

/// Launches on different devices run at once, each OS thread with its own fibers, shared-memory
/// arena and shared-array sites: four threads, each with its own device, launch a kernel with a
/// static shared array and warp shuffles (block sums) and one with barriers in a loop over
/// shared memory, over and over with sizes of their own, and every result is what that launch
/// alone gives. Process-wide state in the simulator or in a kernel (a static that is not
/// `thread_local`) would mix the launches' blocks and fail here.
#[test]
fn launches_on_different_devices_run_at_once_without_mixing() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let start = std::sync::Barrier::new(4);
    std::thread::scope(|s| {
        for k in 0..4usize {
            let start = &start;
            s.spawn(move || {
                let dev = Device::sim();
                start.wait();
                for r in 0..24usize {
                    let threads = [32u32, 64, 128, 96][(k + r) % 4];
                    block_sums(&dev, 2 + k, threads, 301 + 17 * r, (k * 24 + r + 1) as f32);
                    let n = [40usize, 64, 100, 128][(k + 2 * r) % 4];
                    let count = barrier_rounds(&dev, 1 + (k + r) % 3, n, 2 + (r % 4) as i32);
                    let want = (0..n).filter(|t| t % 3 == 0).count() as i32;
                    assert!(count.iter().all(|&c| c == want), "thread {k} round {r}");
                }
            });
        }
    });
}

#[test]
fn warp_allgather_with_a_partial_warp() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let dev = Device::sim();
    let (blocks, n) = (2usize, 40usize);
    let mut out = dev.alloc::<i32>(blocks * n).unwrap();
    dev.poison(&mut out).unwrap();
    let mut args = KernelArgs::new();
    args.output(&mut out);
    dev.launch(
        "prm_selftest_allgather",
        LaunchConfig::linear(blocks as u32, n as u32, 0),
        &mut args,
    )
    .unwrap();
    let out = dev.download(&out).unwrap();
    for (g, &got) in out.iter().enumerate().take(blocks * n) {
        let (b, t) = (g / n, g % n);
        let w0 = t / 32 * 32;
        let lanes = (n - w0).min(32);
        let want: i32 = (0..lanes).map(|l| 3 * l as i32).sum();
        assert_eq!(got, want, "block {b} thread {t}");
    }
}

/// cp.async (with zero fill) and ldmatrix .x4 / .x4.trans of `kernels/tile_io.cuh` against the
/// PTX ISA's definitions: lanes 8j..8j+7 address the rows of 8×8 matrix j; lane i receives
/// (row i/4, cols 2(i%4), +1) of each matrix, or with .trans (rows 2(i%4), +1, col i/4).
#[test]
fn cp_async_and_ldmatrix_follow_the_isa() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let dev = Device::sim();
    let skip = 5usize;
    // 32 rows of 8 distinct bf16 bit patterns (finite values).
    let bits: Vec<u16> = (0..256u16).map(|i| 0x3f80 + i * 3 % 256).collect();
    let src: Vec<half::bf16> = bits.iter().map(|&b| half::bf16::from_bits(b)).collect();
    let src_b = dev.upload(&src).unwrap();
    let mut out = dev.alloc::<u32>(32 * 8).unwrap();
    dev.poison(&mut out).unwrap();
    let mut args = KernelArgs::new();
    args.input(&src_b).output(&mut out).i32(skip as i32);
    dev.launch(
        "prm_selftest_tile_io",
        LaunchConfig::linear(1, 32, 0),
        &mut args,
    )
    .unwrap();
    let out = dev.download(&out).unwrap();
    // Shared row r as copied: zeros for the skipped row.
    let shared = |r: usize, c: usize| -> u32 {
        if r == skip {
            0
        } else {
            bits[r * 8 + c] as u32
        }
    };
    // The shared row lane `l` addressed.
    let row_of = |l: usize| (7 * l + 3) % 32;
    for lane in 0..32 {
        for j in 0..4 {
            let (g, t) = (lane / 4, 2 * (lane % 4));
            let plain = shared(row_of(8 * j + g), t) | shared(row_of(8 * j + g), t + 1) << 16;
            let trans = shared(row_of(8 * j + t), g) | shared(row_of(8 * j + t + 1), g) << 16;
            assert_eq!(out[lane * 8 + j], plain, "lane {lane} matrix {j}: ldmatrix");
            assert_eq!(
                out[lane * 8 + 4 + j],
                trans,
                "lane {lane} matrix {j}: ldmatrix.trans"
            );
        }
    }
}

/// cp.async lands at the cp.async.wait_group that covers its group under the forward schedule
/// (as late as the GPU may land it), and an uncommitted copy is not covered by any wait (as on
/// the GPU, where reading it is a race). Under the reverse schedule every copy lands at issue
/// (as early as the GPU may).
#[test]
fn cp_async_lands_at_the_wait_that_covers_its_group() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let poison = 0xFFFF_FFFFu32;
    for schedule in [Schedule::Forward, Schedule::Reverse] {
        let dev = Device::sim_with_schedule(schedule);
        let src: Vec<u32> = (0..32 * 4).map(|i| 0x1000 + i as u32).collect();
        let src_b = dev.upload(&src).unwrap();
        let mut out = dev.alloc::<u32>(32 * 4).unwrap();
        dev.poison(&mut out).unwrap();
        let mut args = KernelArgs::new();
        args.input(&src_b).output(&mut out);
        dev.launch(
            "prm_selftest_cp_async_groups",
            LaunchConfig::linear(1, 32, 0),
            &mut args,
        )
        .unwrap();
        let out = dev.download(&out).unwrap();
        for lane in 0..32 {
            let v = src[lane * 4];
            let want = match schedule {
                Schedule::Forward => [v, poison, v, poison],
                Schedule::Reverse => [v, v, v, v],
            };
            assert_eq!(
                &out[lane * 4..lane * 4 + 4],
                &want,
                "{schedule:?} lane {lane}: [A after wait 1, B after wait 1, B after wait 0, uncommitted C]"
            );
        }
    }
}

/// Each kind of race gives different bits under the two schedules, and the race-free form the
/// same: the forward schedule alone would have passed the first two races.
#[test]
fn races_give_different_bits_under_the_two_schedules() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let (blocks, threads) = (3usize, 80usize); // a partial third warp in every block
    let n = blocks * threads;
    let input: Vec<f32> = (0..4 * n).map(|i| 1.0 + i as f32).collect();
    let run = |mode: i32, schedule: Schedule| -> Vec<u32> {
        let dev = Device::sim_with_schedule(schedule);
        let input_b = dev.upload(&input).unwrap();
        let mut out = dev.alloc::<f32>(n).unwrap();
        let mut scratch = dev.alloc::<f32>(n).unwrap();
        dev.poison(&mut out).unwrap();
        dev.poison(&mut scratch).unwrap();
        let mut args = KernelArgs::new();
        args.input(&input_b)
            .output(&mut out)
            .output(&mut scratch)
            .i32(mode);
        dev.launch(
            "prm_selftest_race",
            LaunchConfig::linear(blocks as u32, threads as u32, 0),
            &mut args,
        )
        .unwrap();
        dev.download(&out)
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    let neighbour = |g: usize, first_of: usize| {
        if g.is_multiple_of(first_of) {
            input[g].to_bits()
        } else {
            input[g - 1].to_bits()
        }
    };
    for (mode, what) in [
        (0, "no race"),
        (1, "shared memory without a barrier"),
        (2, "global memory across threads and blocks"),
        (3, "a cp.async destination read before the wait"),
    ] {
        let (forward, reverse) = (run(mode, Schedule::Forward), run(mode, Schedule::Reverse));
        match mode {
            0 => {
                let want: Vec<u32> = (0..n).map(|g| neighbour(g, threads)).collect();
                assert_eq!(forward, want, "{what}: forward");
                assert_eq!(reverse, want, "{what}: reverse");
            }
            1 | 2 => {
                let first_of = if mode == 1 { threads } else { n };
                let want: Vec<u32> = (0..n).map(|g| neighbour(g, first_of)).collect();
                assert_eq!(forward, want, "{what}: forward sees every write");
                assert_ne!(forward, reverse, "{what}: reverse must differ");
            }
            _ => {
                let want: Vec<u32> = (0..n).map(|g| input[4 * g].to_bits()).collect();
                assert_eq!(reverse, want, "{what}: reverse lands the copy at issue");
                assert_ne!(forward, reverse, "{what}: forward must differ");
            }
        }
    }
}

/// Addresses the GPU would fault on fail the launch with a message naming the instruction.
#[test]
fn misaligned_or_non_shared_tile_addresses_fail_the_launch() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let dev = Device::sim();
    let src_b = dev.upload(&vec![1u32; 32 * 4 + 8]).unwrap();
    let mut out = dev.alloc::<u32>(32 * 4).unwrap();
    for (mode, want) in [
        (0, "cp.async destination: shared address"),
        (1, "not in the block's shared memory"),
        (2, "cp.async: global source"),
        (3, "ldmatrix row: shared address"),
    ] {
        let mut args = KernelArgs::new();
        args.input(&src_b).output(&mut out).i32(mode);
        let msg = sim_message(dev.launch(
            "prm_selftest_tile_io_misuse",
            LaunchConfig::linear(1, 32, 0),
            &mut args,
        ));
        assert!(msg.contains(want), "mode {mode}: {msg}");
        assert!(
            msg.contains("prm_selftest_tile_io_misuse"),
            "mode {mode}: {msg}"
        );
        if mode == 3 {
            assert!(msg.contains("thread (9,0,0)"), "mode {mode}: {msg}");
        }
    }
}

/// A float4, float2 or bf16-pair access at an address that is not a multiple of its width faults
/// on a GPU ("misaligned address", which ends the context) and not on x86: the simulator fails
/// the launch, naming the access and the thread.
#[test]
fn misaligned_vector_accesses_fail_the_launch() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let dev = Device::sim();
    let input: Vec<f32> = (0..32 * 4 + 4).map(|i| i as f32).collect();
    let src = dev.upload(&input).unwrap();
    let run = |mode: i32| {
        let mut out = dev.alloc::<u32>(64).unwrap();
        let mut args = KernelArgs::new();
        args.input(&src).output(&mut out).i32(mode);
        let launched = dev.launch(
            "prm_selftest_vector_misuse",
            LaunchConfig::linear(1, 32, 0),
            &mut args,
        );
        (launched, out)
    };

    let (ok, out) = run(0);
    ok.unwrap();
    let out = dev.download(&out).unwrap();
    let want: Vec<u32> = (0..32).map(|l| input[4 * l + 3].to_bits()).collect();
    assert_eq!(&out[..32], &want[..], "aligned float4 loads");
    assert!(
        out[32..].iter().all(|&w| w == 0x4000_3f80),
        "aligned bf16-pair stores (1.0 low, 2.0 high): {:x?}",
        &out[32..]
    );

    for (mode, thread, want) in [
        (1, "thread (5,0,0)", "vector load of 16 bytes"),
        (2, "thread (7,0,0)", "vector store of 4 bytes"),
    ] {
        let msg = sim_message(run(mode).0);
        assert!(msg.contains(want), "mode {mode}: {msg}");
        assert!(
            msg.contains("not 16-byte aligned") || msg.contains("not 4-byte aligned"),
            "mode {mode}: {msg}"
        );
        assert!(msg.contains(thread), "mode {mode}: {msg}");
        assert!(
            msg.contains("prm_selftest_vector_misuse"),
            "mode {mode}: {msg}"
        );
    }
}

/// A launch the GPU refuses for resources (a block past the kernel's `__launch_bounds__`, or
/// one whose threads need more registers than a block has) fails under the simulator too, from
/// the limits ptxas reported at build time. The GPU's error leaves the context usable, but
/// finding it in CI spares a GPU session.
#[test]
fn launches_a_gpu_refuses_for_resources_fail() {
    use prm::gpu::sim::{block_registers, kernel_limits};
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    // The occupancy rules of sm_80 / sm_90: a warp's registers in units of 256, 64 Ki a block.
    assert_eq!(block_registers(255, 256), 65_536);
    assert_eq!(block_registers(255, 288), 73_728);
    assert_eq!(block_registers(64, 1024), 65_536);
    assert_eq!(block_registers(65, 1024), 73_728);
    assert_eq!(block_registers(1, 1), 256);

    let (registers, max_threads) = kernel_limits("prm_attention_forward_tc3");
    if registers.is_none() {
        eprintln!("skipped: built without nvcc, so there is no ptxas report to check against");
        return;
    }
    assert_eq!(
        max_threads,
        Some(128),
        "prm_attention_forward_tc3's __launch_bounds__"
    );
    // The build reads the bounds from nvcc's PTX (`.maxntid`); every literal bound in the
    // sources must be there with its value.
    let mut literal_bounds = 0;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "cu") {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        let code: Vec<&str> = source
            .lines()
            .map(|l| l.split("//").next().unwrap_or_default())
            .collect();
        for rest in code.join("\n").split("__launch_bounds__(").skip(1) {
            let (args, after) = rest.split_once(')').unwrap();
            // A bound spelled through a macro is fine (nvcc evaluates it); only literals are
            // checked here.
            let Ok(threads) = args.split(',').next().unwrap().trim().parse::<u32>() else {
                continue;
            };
            // Inside a macro the name may follow a line continuation.
            let after = after.trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
            let kernel: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // A macro's parameter (`NAME`) or a name it pastes together
            // (`prm_attention_forward_tc3_hd##HD`, one kernel per head dim) is no kernel's: the
            // instantiations are checked below.
            let pasted = after[kernel.len()..].trim_start().starts_with("##");
            if pasted || !kernel.starts_with("prm_") {
                continue;
            }
            assert_eq!(
                kernel_limits(&kernel).1,
                Some(threads),
                "{kernel} in {path:?}"
            );
            literal_bounds += 1;
        }
    }
    assert!(
        literal_bounds >= 14,
        "found {literal_bounds} bounded kernels in kernels/*.cu"
    );
    for kernel in [
        "prm_attention_forward_tc3_hd80",
        "prm_attention_bwd_dq_delta_tc3_hd104",
        "prm_attention_bwd_dkdv_tc3_hd96",
        "prm_attention_bwd_dk_tc3_hd128",
    ] {
        assert_eq!(kernel_limits(kernel).1, Some(128), "{kernel}'s bounds");
    }
    let dev = Device::sim();
    let mut args = KernelArgs::new();
    let msg = sim_message(dev.launch(
        "prm_attention_forward_tc3",
        cfg((1, 1, 1), (256, 1, 1), 0),
        &mut args,
    ));
    assert!(msg.contains("__launch_bounds__ allows 128"), "{msg}");

    // A kernel without launch bounds and over 128 registers a thread: the smallest block of
    // whole warps that needs more than 64 Ki registers is refused.
    let heavy = "prm_layernorm_loss_backward_f32_d768";
    let (registers, max_threads) = kernel_limits(heavy);
    assert_eq!(max_threads, None, "{heavy} has no __launch_bounds__");
    let per_thread = registers.expect("ptxas reports every kernel");
    match (32..=1024)
        .step_by(32)
        .find(|&t| block_registers(per_thread, t) > 65_536)
    {
        Some(threads) => {
            let mut args = KernelArgs::new();
            let msg = sim_message(dev.launch(heavy, cfg((1, 1, 1), (threads, 1, 1), 0), &mut args));
            assert!(msg.contains("more than the 65536 a block has"), "{msg}");
        }
        None => eprintln!("{heavy} uses {per_thread} registers: every block size fits"),
    }
}

/// A full 1024-thread block through many barriers and warp collectives (the simulator's
/// fibers: every thread meets every other one 2·iters times).
#[test]
fn largest_block_through_many_barriers() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let dev = Device::sim();
    let count = barrier_rounds(&dev, 2, 1024, 20);
    assert_eq!(
        count,
        vec![(0..1024).filter(|t| t % 3 == 0).count() as i32; 2]
    );
    block_sums(&dev, 5, 1024, 100_000, 0.5);
}

/// Run only as the child of `reading_outside_a_buffer_faults_and_names_the_kernel`: launches a
/// kernel whose thread t reads element t + `PRM_TEST_OVERRUN` of a 64-float buffer, on a
/// simulator device of schedule `PRM_TEST_SCHEDULE` (forward or reverse).
#[test]
#[ignore = "run by reading_outside_a_buffer_faults_and_names_the_kernel in a child process"]
fn overrun_child() {
    let past: i32 = std::env::var("PRM_TEST_OVERRUN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let schedule = match std::env::var("PRM_TEST_SCHEDULE").as_deref() {
        Ok("reverse") => Schedule::Reverse,
        _ => Schedule::Forward,
    };
    let dev = Device::sim_with_schedule(schedule);
    let input = dev.upload(&[1.0f32; 64]).unwrap();
    let mut out = dev.alloc::<f32>(64).unwrap();
    let mut args = KernelArgs::new();
    args.input(&input).output(&mut out).i32(past);
    dev.launch(
        "prm_selftest_overrun",
        LaunchConfig::linear(1, 64, 0),
        &mut args,
    )
    .unwrap();
    assert_eq!(dev.download(&out).unwrap(), vec![1.0f32; 64]);
}

/// Every simulator buffer ends at an inaccessible page (forward-schedule devices) or starts
/// where one ends (reverse-schedule devices): a kernel that reads past that end aborts the
/// process with a message naming the kernel, block and thread, where a GPU would read a
/// neighbour's bytes. Reading exactly up to the end is fine.
#[test]
fn reading_outside_a_buffer_faults_and_names_the_kernel() {
    let child = |past: i32, schedule: &str| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "overrun_child", "--nocapture"])
            .env("PRM_TEST_OVERRUN", past.to_string())
            .env("PRM_TEST_SCHEDULE", schedule)
            .output()
            .unwrap()
    };
    for schedule in ["forward", "reverse"] {
        let within = child(0, schedule);
        assert!(
            within.status.success(),
            "{schedule}: {}",
            String::from_utf8_lossy(&within.stderr)
        );
    }
    for (past, schedule, thread) in [(1, "forward", 63), (-1, "reverse", 0)] {
        let out = child(past, schedule);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{schedule}: reading element t + {past} passed"
        );
        let want = format!(
            "prm sim: kernel prm_selftest_overrun, block (0,0,0), thread ({thread},0,0) touched"
        );
        assert!(stderr.contains(&want), "{schedule}: {stderr}");
    }
}

/// A write just past an output buffer's last element, inside the buffer's rounding to 16 bytes
/// (where the guard page cannot see it), fails the launch naming the kernel and the buffer:
/// the simulator fills the accessible bytes after each output with a canary before a launch
/// and checks them after it, at a direct launch and at each replay of a graph. 64 threads
/// write 64 floats into buffers of 61 to 64.
#[test]
fn writing_just_past_an_output_buffer_fails_the_launch() {
    for dev in [
        Device::sim_with_schedule(Schedule::Forward),
        Device::sim_with_schedule(Schedule::Reverse),
    ] {
        let input = dev.upload(&[1.0f32; 64]).unwrap();
        for len in [61usize, 63, 64] {
            let mut out = dev.alloc::<f32>(len).unwrap();
            let mut args = KernelArgs::new();
            args.input(&input).output(&mut out).i32(0);
            let result = dev.launch(
                "prm_selftest_overrun",
                LaunchConfig::linear(1, 64, 0),
                &mut args,
            );
            let what = format!("{}, {len} floats", dev.name());
            if len == 64 {
                result.unwrap();
                continue;
            }
            let e = result.expect_err(&what).to_string();
            assert!(
                e.contains("prm_selftest_overrun")
                    && e.contains("wrote past the end of its output buffer 1 of 1: byte 0"),
                "{what}: {e}"
            );
            // The same launch captured into a graph: each replay checks the tail too.
            let graph = dev
                .capture(|| {
                    let mut args = KernelArgs::new();
                    args.input(&input).output(&mut out).i32(0);
                    dev.launch(
                        "prm_selftest_overrun",
                        LaunchConfig::linear(1, 64, 0),
                        &mut args,
                    )
                })
                .unwrap();
            let e = graph.launch().expect_err(&what).to_string();
            assert!(
                e.contains("wrote past the end of its output buffer 1 of 1"),
                "{what}, replayed: {e}"
            );
        }
    }
}

/// A 16-byte red zone follows the dynamic shared memory and every static shared array: a block
/// that ends with one written fails the launch, naming the kernel, the block and the array.
#[test]
fn writing_past_a_shared_array_fails_the_launch() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    // The forward schedule: block (0,0,0) is the first to end.
    let dev = Device::sim_with_schedule(Schedule::Forward);
    for (mode, want) in [
        (0, Some("a write past the end of shared array tile")),
        (1, Some("a write past the end of the dynamic shared memory")),
        (2, None),
    ] {
        let mut out = dev.alloc::<f32>(32).unwrap();
        let mut args = KernelArgs::new();
        args.output(&mut out).i32(mode);
        let result = dev.launch(
            "prm_selftest_shared_overrun",
            LaunchConfig::linear(2, 32, 32 * 4),
            &mut args,
        );
        match want {
            Some(want) => {
                let msg = sim_message(result);
                assert!(msg.contains(want), "mode {mode}: {msg}");
                assert!(
                    msg.contains("prm_selftest_shared_overrun, block (0,0,0)"),
                    "mode {mode}: {msg}"
                );
            }
            None => {
                result.unwrap();
                let mut want = vec![1.0f32; 32];
                want[0] = 0.0;
                assert_eq!(dev.download(&out).unwrap(), want);
            }
        }
    }
}

/// The fibers of a launch share the launching thread's floating-point modes (the switch between
/// them does not save them), so a kernel that changes the rounding mode fails its launch, naming
/// the block, and the launching thread gets its round-to-nearest back.
#[test]
fn a_kernel_that_changes_the_rounding_mode_fails_its_launch() {
    let _guard = TIMEOUT.read().unwrap_or_else(|e| e.into_inner());
    let dev = Device::sim();
    let tiny = f32::EPSILON / 2.0; // 2^-24: 1 + tiny is 1 to nearest, the next float upward
    let run = |change_block: i32| {
        let mut out = dev.alloc::<f32>(64).unwrap();
        let mut args = KernelArgs::new();
        args.output(&mut out).f32(tiny).i32(change_block);
        let launched = dev.launch(
            "prm_selftest_fp_modes",
            LaunchConfig::linear(2, 32, 0),
            &mut args,
        );
        (launched, out)
    };
    let msg = sim_message(run(1).0);
    assert!(msg.contains("changed the floating-point modes"), "{msg}");
    assert!(msg.contains("block (1,0,0)"), "{msg}");
    let one = std::hint::black_box(1.0f32) + std::hint::black_box(tiny);
    assert_eq!(one, 1.0, "the launching thread rounds to nearest again");

    let (ok, out) = run(-1);
    ok.unwrap();
    assert!(dev.download(&out).unwrap().iter().all(|&v| v == 1.0));
}
