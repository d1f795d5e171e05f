//! The three stages of an evaluation run, overlapped on threads, so that the device does not
//! wait for the host's reading and post-processing, nor the host for the device.
//!
//! ```text
//!  loader thread: read chunks of items in parallel (rayon), in input order
//!        │ one queued chunk
//!  the calling thread: the engine, up to `batch` items at a time, in input order (told the
//!        │ group after, when read already)
//!        │ a group of queued items
//!  finisher thread: metrics, writes, records, progress, in input order
//! ```
//!
//! Every stage sees the items in input order, so the results are those of running the three
//! stages one item after another (as long as the engine's result for an item does not depend on
//! the items batched with it). What is in memory at once is bounded: a chunk holds at most
//! [`LOOKAHEAD_BYTES`] of loaded items (at least one item), and at most four chunks (one being
//! read, one queued, and at the engine the rest of one and the next, taken early so that the
//! engine knows the group after the one it runs) and a group plus two finished items exist at a
//! time.
//! The finisher's queue holds a whole group, so that the engine goes on to the next group while
//! the finisher works through the last one.

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, TryRecvError};
use std::time::Instant;

use rayon::prelude::*;

/// Loaded bytes a chunk may hold (at least one item).
pub const LOOKAHEAD_BYTES: usize = 256 << 20;

/// Where the engine's thread spent a run: says which stage holds the others back.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineTime {
    /// Seconds in `infer` (the device's work, and the host's waits for it).
    pub busy: f64,
    /// Seconds waiting for the loader's next chunk (reading and decoding is the slower stage).
    pub waiting_for_input: f64,
    /// Seconds waiting for room in the finisher's queue (metrics and files are the slower stage).
    pub waiting_for_finisher: f64,
}

/// Runs `load` (on the loader thread, `chunk` items at a time in parallel), then `infer` (on the
/// calling thread, over groups of at most `batch` loaded items), then `finish` (on the finisher
/// thread) for every item, each stage in input order. An item whose load fails goes to `finish`
/// as its error; `infer` returns one result per item it is given, in order. `infer` is also
/// given the loaded items of the group after this one when the loader has read it already
/// (empty otherwise): a hint, so that an engine can start moving them to its device.
///
/// A group never spans two chunks, so a chunk holds at least `batch` items where memory allows:
/// chunks are cut at `max(max_chunk, batch)` items. `bytes` says how much memory a loaded item
/// holds; it sizes the chunks. A panic in any stage is resumed on the calling thread once the
/// others have stopped. Returns where the engine's thread spent the run.
pub fn overlapped<T, P, R, E>(
    items: &[T],
    max_chunk: usize,
    batch: usize,
    bytes: impl Fn(&P) -> usize + Sync,
    load: impl Fn(&T) -> Result<P, E> + Sync,
    mut infer: impl FnMut(&[&P], &[&P]) -> Vec<Result<R, E>>,
    mut finish: impl FnMut(usize, Result<(P, R), E>) + Send,
) -> EngineTime
where
    T: Sync,
    P: Send,
    R: Send,
    E: Send,
{
    let batch = batch.max(1);
    let max_chunk = max_chunk.max(batch);
    std::thread::scope(|s| {
        let (to_engine, loaded) = sync_channel::<Vec<Result<P, E>>>(1);
        let (to_finisher, inferred) = sync_channel::<(usize, Result<(P, R), E>)>(batch + 1);
        let (load, bytes) = (&load, &bytes);
        s.spawn(move || {
            // The first chunk is one item: its size is not known before it is read.
            let (mut next, mut chunk) = (0, 1);
            while next < items.len() {
                let end = (next + chunk).min(items.len());
                let batch: Vec<Result<P, E>> = items[next..end].par_iter().map(load).collect();
                let largest = batch
                    .iter()
                    .filter_map(|r| r.as_ref().ok())
                    .map(bytes)
                    .max()
                    .unwrap_or(0);
                chunk = (LOOKAHEAD_BYTES / largest.max(1)).clamp(1, max_chunk);
                next = end;
                if to_engine.send(batch).is_err() {
                    return; // a later stage stopped
                }
            }
        });
        let finisher = s.spawn(move || {
            for (index, result) in inferred {
                finish(index, result);
            }
        });
        let mut index = 0;
        let mut time = EngineTime::default();
        let since = |t: Instant| t.elapsed().as_secs_f64();
        // Groups cut from the chunks received so far, in order. The engine is given the group
        // after the one it runs, when the loader has it already, as a hint (it may start moving
        // it to the device): so a second chunk is taken, without waiting, when one group is
        // left of the first.
        let mut groups: VecDeque<Vec<Result<P, E>>> = VecDeque::new();
        let mut loader_done = false;
        'engine: loop {
            if groups.is_empty() {
                if loader_done {
                    break;
                }
                let waited = Instant::now();
                match loaded.recv() {
                    Ok(chunk) => cut_groups(chunk, batch, &mut groups),
                    Err(_) => loader_done = true,
                }
                time.waiting_for_input += since(waited);
                continue;
            }
            if groups.len() < 2 && !loader_done {
                match loaded.try_recv() {
                    Ok(chunk) => cut_groups(chunk, batch, &mut groups),
                    Err(TryRecvError::Empty) => {}
                    Err(TryRecvError::Disconnected) => loader_done = true,
                }
            }
            let group = groups.pop_front().expect("a group is queued");
            let inputs: Vec<&P> = group.iter().filter_map(|r| r.as_ref().ok()).collect();
            let next: Vec<&P> = groups
                .front()
                .map(|g| g.iter().filter_map(|r| r.as_ref().ok()).collect())
                .unwrap_or_default();
            let started = Instant::now();
            let outputs = if inputs.is_empty() {
                Vec::new()
            } else {
                infer(&inputs, &next)
            };
            time.busy += since(started);
            assert_eq!(
                outputs.len(),
                inputs.len(),
                "the engine gave {} results for {} items",
                outputs.len(),
                inputs.len()
            );
            let mut outputs = outputs.into_iter();
            for item in group {
                let result = item.and_then(|p| {
                    let inferred = outputs.next().expect("one result per loaded item");
                    inferred.map(|r| (p, r))
                });
                let waited = Instant::now();
                if to_finisher.send((index, result)).is_err() {
                    break 'engine; // the finisher stopped (a panic, resumed below)
                }
                time.waiting_for_finisher += since(waited);
                index += 1;
            }
        }
        drop(to_finisher);
        if let Err(panic) = finisher.join() {
            std::panic::resume_unwind(panic);
        }
        time
    })
}

/// Cuts a chunk into groups of `batch` loaded items each (the failed loads among them ride
/// along, in place), appended to `groups` in order.
fn cut_groups<P, E>(
    chunk: Vec<Result<P, E>>,
    batch: usize,
    groups: &mut VecDeque<Vec<Result<P, E>>>,
) {
    let mut rest = chunk.into_iter().peekable();
    while rest.peek().is_some() {
        let (mut group, mut ready) = (Vec::new(), 0);
        while ready < batch {
            let Some(item) = rest.next() else { break };
            ready += usize::from(item.is_ok());
            group.push(item);
        }
        groups.push_back(group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_stage_sees_the_items_in_input_order_with_their_errors() {
        let items: Vec<usize> = (0..203).collect();
        for batch in [1, 3, 7, 20] {
            let loads = AtomicUsize::new(0);
            let mut inferred = Vec::new();
            let mut groups = Vec::new();
            let mut finished = Vec::new();
            overlapped(
                &items,
                7,
                batch,
                |&p: &usize| 1 + p % 5 * (LOOKAHEAD_BYTES / 3),
                |&i| {
                    loads.fetch_add(1, Ordering::Relaxed);
                    if i % 17 == 3 {
                        Err(format!("load {i}"))
                    } else {
                        Ok(i)
                    }
                },
                |group: &[&usize], _next: &[&usize]| {
                    groups.push(group.len());
                    group
                        .iter()
                        .map(|&&p| {
                            inferred.push(p);
                            if p % 29 == 5 {
                                Err(format!("infer {p}"))
                            } else {
                                Ok(p * 10)
                            }
                        })
                        .collect()
                },
                |index, result| finished.push((index, result)),
            );
            assert_eq!(loads.load(Ordering::Relaxed), items.len());
            let want_inferred: Vec<usize> = items.iter().copied().filter(|i| i % 17 != 3).collect();
            assert_eq!(inferred, want_inferred, "batch {batch}");
            assert!(
                groups.iter().all(|&g| (1..=batch).contains(&g)),
                "{groups:?}"
            );
            assert_eq!(finished.len(), items.len());
            for (k, (index, result)) in finished.into_iter().enumerate() {
                assert_eq!(index, k);
                let want = if k % 17 == 3 {
                    Err(format!("load {k}"))
                } else if k % 29 == 5 {
                    Err(format!("infer {k}"))
                } else {
                    Ok((k, k * 10))
                };
                assert_eq!(result, want);
            }
        }
    }

    /// The engine is told the group after the one it runs whenever the loader has read it: here
    /// every group of the second chunk (the first chunk is one item, whose successor may not be
    /// read yet), and nothing after the last.
    #[test]
    fn the_engine_is_told_the_next_group() {
        let items: Vec<usize> = (0..40).collect();
        let mut calls: Vec<(Vec<usize>, Vec<usize>)> = Vec::new();
        overlapped(
            &items,
            64,
            6,
            |_: &usize| 1,
            |&i| if i % 9 == 4 { Err(()) } else { Ok(i) },
            |group: &[&usize], next: &[&usize]| {
                calls.push((
                    group.iter().map(|&&p| p).collect(),
                    next.iter().map(|&&p| p).collect(),
                ));
                group.iter().map(|&&p| Ok(p)).collect()
            },
            |_, _| {},
        );
        assert!(calls.len() > 3, "{calls:?}");
        let (first_next, second) = (&calls[0].1, &calls[1].0);
        assert!(first_next.is_empty() || first_next == second, "{calls:?}");
        for pair in calls[1..].windows(2) {
            assert_eq!(pair[0].1, pair[1].0, "{calls:?}");
        }
        assert!(calls.last().unwrap().1.is_empty(), "{calls:?}");
    }

    /// Small items fill whole groups: chunks are cut at `batch` items at least.
    #[test]
    fn small_items_go_to_the_engine_in_full_groups() {
        let items: Vec<usize> = (0..100).collect();
        let mut groups = Vec::new();
        overlapped(
            &items,
            4,
            16,
            |_: &usize| 1,
            |&i| Ok::<usize, ()>(i),
            |group: &[&usize], _next: &[&usize]| {
                groups.push(group.len());
                group.iter().map(|&&p| Ok(p)).collect()
            },
            |_, _| {},
        );
        // The first chunk is one item (its size unknown before it is read).
        assert_eq!(groups, [1, 16, 16, 16, 16, 16, 16, 3]);
    }

    /// The engine does not wait for the finisher to work through a group before it starts the
    /// next: the finisher holds the second group's first item until the third group is
    /// inferred (with a queue of two items the engine would block on the second group's third).
    #[test]
    fn the_engine_runs_the_next_group_while_the_finisher_works() {
        let items: Vec<usize> = (0..12).collect();
        let groups = AtomicUsize::new(0);
        let mut overlapped_with_finisher = false;
        overlapped(
            &items,
            4,
            4,
            |_: &usize| 1,
            |&i| Ok::<usize, ()>(i),
            |group: &[&usize], _next: &[&usize]| {
                groups.fetch_add(1, Ordering::SeqCst);
                group.iter().map(|&&p| Ok(p)).collect()
            },
            |index, _| {
                if index == 1 {
                    let waited = std::time::Instant::now();
                    while groups.load(Ordering::SeqCst) < 3 {
                        if waited.elapsed() > std::time::Duration::from_secs(5) {
                            return;
                        }
                        std::thread::yield_now();
                    }
                    overlapped_with_finisher = true;
                }
            },
        );
        assert!(
            overlapped_with_finisher,
            "the engine waited for the finisher"
        );
    }

    /// The engine's time split has at least the time each stage was made to take: its own
    /// work, the loader's reading (the first chunk), the finisher's (batch 1, so the queue of
    /// two fills).
    #[test]
    fn the_engine_time_says_which_stage_it_waited_for() {
        let ms = std::time::Duration::from_millis;
        let items: Vec<usize> = (0..8).collect();
        let time = overlapped(
            &items,
            8,
            1,
            |_: &usize| 1,
            |&i| {
                std::thread::sleep(ms(if i == 0 { 60 } else { 0 }));
                Ok::<usize, ()>(i)
            },
            |group: &[&usize], _next: &[&usize]| {
                std::thread::sleep(ms(10));
                group.iter().map(|&&p| Ok(p)).collect()
            },
            |_, _| std::thread::sleep(ms(40)),
        );
        assert!(time.busy >= 0.079, "{time:?}");
        assert!(time.waiting_for_input >= 0.059, "{time:?}");
        // 8 items at 40 ms against 10 ms of work each: the engine waits for most of them.
        assert!(time.waiting_for_finisher >= 0.1, "{time:?}");
    }

    #[test]
    fn no_items_is_no_work() {
        let items: Vec<u8> = Vec::new();
        let mut calls = 0;
        overlapped(
            &items,
            4,
            4,
            |_: &u8| 1,
            |&i| Ok::<u8, ()>(i),
            |g: &[&u8], _: &[&u8]| g.iter().map(|&&p| Ok::<u8, ()>(p)).collect(),
            |_, _| calls += 1,
        );
        assert_eq!(calls, 0);
    }

    #[test]
    #[should_panic(expected = "finisher fails")]
    fn a_panic_in_the_finisher_reaches_the_caller() {
        let items: Vec<usize> = (0..50).collect();
        overlapped(
            &items,
            4,
            2,
            |_: &usize| 1,
            |&i| Ok::<usize, ()>(i),
            |g: &[&usize], _: &[&usize]| g.iter().map(|&&p| Ok::<usize, ()>(p)).collect(),
            |index, _| assert!(index < 10, "finisher fails"),
        );
    }
}
