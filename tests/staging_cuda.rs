//! The staging lane on a real GPU (`gpu::staging`): pinned host slots, the copy stream and the
//! events that order it against the compute stream. What the simulator cannot show: a staged
//! copy completes while the compute stream is still busy (it does not queue behind compute
//! work), growth of the slots, and the data arriving intact through the event handshake.
//! Without a device every test prints "skipped: no CUDA device".

use prm::gpu::gemm::{matmul_f32, MatmulShape};
use prm::gpu::staging::Stager;
use prm::gpu::{Device, GpuError};

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

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32)
        .collect()
}

#[test]
fn staged_uploads_round_trip_and_grow() {
    let Some(dev) = device() else { return };
    let mut stager: Stager<u32> = Stager::new(&dev).unwrap();
    // Growing sizes (the slots reallocate), both slots in turn, then a smaller one.
    for (key, lens) in [
        (1u32, vec![3 * 45 * 61, 3 * 197 * 3]),
        (2, vec![3 * 224 * 224; 8]),
        (3, vec![3 * 640 * 480; 4]),
        (4, vec![7]),
    ] {
        let parts: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| values(n, key * 100 + i as u32))
            .collect();
        let views: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
        stager.stage(key, &views).unwrap();
        let mut dst = dev.alloc::<f32>(lens.iter().sum()).unwrap();
        dev.poison(&mut dst).unwrap();
        assert!(stager.take(&(key + 1), &lens, &mut dst).unwrap().is_none());
        let taken = stager.take(&key, &lens, &mut dst).unwrap();
        assert!(taken.is_some(), "key {key} not taken");
        assert_eq!(dev.download(&dst).unwrap(), parts.concat(), "key {key}");
    }
}

/// The point of the copy stream: with the compute stream busy for a long while (a chain of
/// large products), a staged copy still completes; on one stream it would wait behind them.
/// Prints the timings for the performance notes; asserts only the order of events.
#[test]
fn a_staged_copy_does_not_wait_for_queued_compute() {
    let Some(dev) = device() else { return };
    let n = 4096;
    let shape = MatmulShape {
        m: n,
        n,
        k: n,
        b_transposed: false,
    };
    let a = dev.upload(&values(n * n, 1)).unwrap();
    let b = dev.upload(&values(n * n, 2)).unwrap();
    let mut c = dev.alloc::<f32>(n * n).unwrap();
    // Warm-up (plans, workspace) so the timed queue is only products.
    matmul_f32(&dev, shape, &a, &b, None, &mut c, false).unwrap();
    dev.synchronize().unwrap();
    let payload = values(3 * 224 * 224 * 64, 3); // a batch of 64 images at 224 px, 38 MB
    let mut stager: Stager<u32> = Stager::new(&dev).unwrap();
    // First staging allocates the slot; do it before the timed part.
    stager.stage(0, &[&payload]).unwrap();
    let mut dst = dev.alloc::<f32>(payload.len()).unwrap();
    stager.take(&0, &[payload.len()], &mut dst).unwrap();
    dev.synchronize().unwrap();

    let t0 = std::time::Instant::now();
    for _ in 0..200 {
        matmul_f32(&dev, shape, &a, &b, None, &mut c, false).unwrap();
    }
    let queued = t0.elapsed();
    stager.stage(1, &[&payload]).unwrap();
    let staged = t0.elapsed();
    // Long enough for a 38 MB copy over any PCIe link, far shorter than 200 products of 137
    // GFLOP each.
    std::thread::sleep(std::time::Duration::from_millis(100));
    dev.poison(&mut dst).unwrap();
    let taken = stager
        .take(&1, &[payload.len()], &mut dst)
        .unwrap()
        .unwrap();
    dev.synchronize().unwrap();
    let done = t0.elapsed();
    println!(
        "products queued in {queued:?}, staging returned at {staged:?}, compute done at \
         {done:?}; copy pending when taken: {}",
        taken.copy_pending
    );
    assert!(
        !taken.copy_pending,
        "the staged copy was still running 100 ms after it was queued: it waited for compute"
    );
    assert_eq!(dev.download(&dst).unwrap(), payload);
}

#[test]
fn pinned_downloads_match_plain_downloads() {
    let Some(dev) = device() else { return };
    let mut stager: Stager<u32> = Stager::new(&dev).unwrap();
    // Growing, then smaller (the readback buffer is reused), then empty.
    for (i, n) in [1usize, 3 * 45 * 61, 3 * 640 * 480 * 8, 7, 0]
        .into_iter()
        .enumerate()
    {
        let want = values(n, 40 + i as u32);
        let buf = dev.upload(&want).unwrap();
        assert_eq!(
            stager.download_split(&buf, &[n]).unwrap(),
            vec![want.clone()],
            "{n} elements"
        );
        // Cut into pieces (one per image of a batch), short of the end.
        let cut = [n / 3, 0, n - n / 3 - n.min(1)];
        let pieces = stager.download_split(&buf, &cut).unwrap();
        assert_eq!(
            pieces.concat(),
            want[..cut.iter().sum::<usize>()],
            "{n} elements, cut"
        );
        assert_eq!(pieces.iter().map(Vec::len).collect::<Vec<_>>(), cut);
        assert_eq!(dev.download(&buf).unwrap(), want);
    }
}

/// Page-locked host memory running out is the host's shortage, not the device's: staging
/// fails with `PinnedHostMemory` (never `OutOfMemory`, which would make the campaign halve
/// its batch), and downloads fall back to ordinary host memory with the same values. Once
/// pinned memory is available again the stager works as before.
#[test]
fn without_pinned_memory_downloads_fall_back_and_staging_says_why() {
    let Some(dev) = device() else { return };
    let mut stager: Stager<u32> = Stager::new(&dev).unwrap();
    stager.limit_pinned_memory(1000);
    let want = values(3 * 45 * 61, 50);
    let buf = dev.upload(&want).unwrap();
    let cut = [1000, 0, want.len() - 1000];
    let pieces = stager.download_split(&buf, &cut).unwrap();
    assert_eq!(pieces.concat(), want);
    assert_eq!(pieces.iter().map(Vec::len).collect::<Vec<_>>(), cut);
    // Small enough for the limit: still through the pinned buffer.
    assert_eq!(
        stager.download_split(&buf, &[100]).unwrap(),
        vec![want[..100].to_vec()]
    );
    match stager.stage(7, &[&want]) {
        Err(GpuError::PinnedHostMemory { bytes }) => {
            assert!(bytes >= 4 * want.len(), "{bytes} bytes")
        }
        other => panic!("staging without pinned memory gave {other:?}"),
    }
    let mut dst = dev.alloc::<f32>(want.len()).unwrap();
    assert!(
        stager.take(&7, &[want.len()], &mut dst).unwrap().is_none(),
        "a failed staging was taken"
    );
    stager.limit_pinned_memory(usize::MAX);
    stager.stage(8, &[&want]).unwrap();
    assert!(stager.take(&8, &[want.len()], &mut dst).unwrap().is_some());
    assert_eq!(dev.download(&dst).unwrap(), want);
    assert_eq!(
        stager.download_split(&buf, &[want.len()]).unwrap(),
        vec![want]
    );
}
