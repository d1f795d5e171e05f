//! Runs the build's compiles (the simulator's C++ objects and nvcc's fatbins) on one pool of
//! `NUM_JOBS` threads, longest expected first, each thread taking the next job when it finishes
//! one. The build then ends within about one short job of the ideal, where fixed pairs (the old
//! scheme) made a long nvcc job wait for its partner and the simulator compiled one file at a
//! time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

pub type Job<'a, T> = Box<dyn FnOnce() -> T + Send + 'a>;

/// The threads cargo allows this build script (`NUM_JOBS`), at least one.
pub fn workers() -> usize {
    std::env::var("NUM_JOBS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(2)
        .max(1)
}

/// Runs every job, those of the highest cost estimate first (ties in the given order), and
/// returns their results in the given order.
pub fn run<T: Send>(jobs: Vec<(u64, Job<'_, T>)>, workers: usize) -> Vec<T> {
    let n = jobs.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(jobs[i].0));
    let mut given: Vec<Option<Job<'_, T>>> = jobs.into_iter().map(|(_, j)| Some(j)).collect();
    let queue: Vec<Mutex<Option<Job<'_, T>>>> =
        order.iter().map(|&i| Mutex::new(given[i].take())).collect();
    let results: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..workers.min(n) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let job = queue[i].lock().unwrap().take().expect("each job runs once");
                let result = job();
                *results[order[i]].lock().unwrap() = Some(result);
            });
        }
    });
    results
        .into_iter()
        .map(|r| r.into_inner().unwrap().expect("every job ran"))
        .collect()
}
