//! The stages of an evaluation run, overlapped on threads, so that the devices do not wait for
//! the host's reading and post-processing, nor the host for the devices.
//!
//! ```text
//!  loader thread: read chunks of items in parallel (rayon), in input order
//!        │ one queued chunk
//!  the calling thread: cut groups of `batch` loaded items, in input order; at most
//!        │ `2 × engines + 2` groups in flight (sent and not yet finished)
//!        │ groups, each claimed by one engine
//!  one thread per engine (one per device): claims a group, and the group after it when one is
//!        │ queued (a hint: the engine can move it to its device while it runs the first), runs it
//!        │ results
//!  finisher thread: puts the results back in input order; metrics, writes, records, progress
//! ```
//!
//! Every stage but the engines sees the items in input order, so the results are those of
//! running the stages one item after another, whichever engine ran a group (as long as an
//! engine's result for an item does not depend on the items batched with it, nor on the
//! engine: the devices of one run are of one kind). What is in memory at once is bounded: a
//! chunk holds at most [`LOOKAHEAD_BYTES`] of loaded items (at least one item); at most three
//! chunks are being read, queued or cut, and the groups in flight are bounded as above (the
//! finisher holds results of later groups until the earlier ones are done).

use std::collections::{BTreeMap, VecDeque};
use std::panic::resume_unwind;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// Loaded bytes a chunk may hold (at least one item).
pub const LOOKAHEAD_BYTES: usize = 256 << 20;

/// Where a run's time went: says which stage holds the others back.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineTime {
    /// Seconds the engines spent in `infer` (the devices' work, and the host's waits for it),
    /// summed over the engines.
    pub busy: f64,
    /// Seconds the engines waited for a group, summed over the engines.
    pub idle: f64,
    /// Seconds the groups waited for the loader's next chunk (reading and decoding is the slower
    /// stage).
    pub waiting_for_input: f64,
    /// Seconds the finisher spent finishing items (metrics and files): near the run's wall time
    /// when it is the slower stage.
    pub finisher_busy: f64,
}

/// An item's index, and the item with its result or its error: what the finisher is sent.
type Finished<P, R, E> = (usize, Result<(P, R), E>);

/// A group of consecutive items: the index of its first, and each item loaded or its error.
struct Group<P, E> {
    first: usize,
    items: Vec<Result<P, E>>,
}

/// Sets the run's stop flag when dropped during a panic, so that the other stages stop
/// waiting for the panicking one.
struct StopOnPanic<'a>(&'a AtomicBool);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `load` (on the loader thread, `chunk` items at a time in parallel), then `infer` (on one
/// thread per engine of `engines`, each over groups of at most `batch` loaded items), then
/// `finish` (on the finisher thread) for every item, loading and finishing in input order. An
/// item whose load fails goes to `finish` as its error; `infer` returns one result per item it
/// is given, in order. `infer` is also given the loaded items of the group its engine runs
/// next, when that group is queued already (empty otherwise): a hint, so that the engine can
/// start moving them to its device.
///
/// A group never spans two chunks, so a chunk holds at least `batch` items where memory allows:
/// chunks are cut at `max(max_chunk, batch)` items. `bytes` says how much memory a loaded item
/// holds; it sizes the chunks. Groups are cut the same way whatever the number of engines. A
/// panic in any stage stops the others and is resumed on the calling thread. Returns where the
/// run's time went.
#[allow(clippy::too_many_arguments)]
pub fn overlapped<T, P, R, E, G>(
    items: &[T],
    max_chunk: usize,
    batch: usize,
    bytes: impl Fn(&P) -> usize + Sync,
    load: impl Fn(&T) -> Result<P, E> + Sync,
    engines: &[G],
    infer: impl Fn(&G, &[&P], &[&P]) -> Vec<Result<R, E>> + Sync,
    mut finish: impl FnMut(usize, Result<(P, R), E>) + Send,
) -> EngineTime
where
    T: Sync,
    P: Send,
    R: Send,
    E: Send,
    G: Sync,
{
    assert!(!engines.is_empty(), "an evaluation needs an engine");
    let batch = batch.max(1);
    let max_chunk = max_chunk.max(batch);
    let window = 2 * engines.len() + 2;
    let stop = AtomicBool::new(false);
    // Items finished, in input order, and a signal when it grows.
    let finished = (Mutex::new(0usize), Condvar::new());
    // Unbounded: the window bounds what is in flight.
    let (to_engines, queued) = channel::<Group<P, E>>();
    let queued = Mutex::new(queued);
    std::thread::scope(|s| {
        let (to_dispatcher, loaded) = sync_channel::<Vec<Result<P, E>>>(1);
        let (to_finisher, inferred) = channel::<Finished<P, R, E>>();
        let (load, bytes, stop, finished) = (&load, &bytes, &stop, &finished);
        s.spawn(move || {
            let _stop = StopOnPanic(stop);
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
                if to_dispatcher.send(batch).is_err() {
                    return; // a later stage stopped
                }
            }
        });
        let finisher = s.spawn(move || {
            let _stop = StopOnPanic(stop);
            // Results of later items wait here until the earlier ones are in.
            let mut waiting = BTreeMap::new();
            let (mut next, mut busy) = (0, 0.0);
            for (index, result) in inferred {
                waiting.insert(index, result);
                let before = next;
                let started = Instant::now();
                while let Some(result) = waiting.remove(&next) {
                    finish(next, result);
                    next += 1;
                }
                busy += started.elapsed().as_secs_f64();
                if next > before {
                    *lock(&finished.0) = next;
                    finished.1.notify_all();
                }
            }
            busy
        });
        let workers: Vec<_> = engines
            .iter()
            .map(|engine| {
                let (to_finisher, queued, infer) = (to_finisher.clone(), &queued, &infer);
                s.spawn(move || {
                    let _stop = StopOnPanic(stop);
                    run_engine(engine, queued, infer, &to_finisher)
                })
            })
            .collect();
        drop(to_finisher);

        let mut time = EngineTime::default();
        let since = |t: Instant| t.elapsed().as_secs_f64();
        // The end (one past the last item) of each group sent and not yet finished.
        let mut in_flight: VecDeque<usize> = VecDeque::new();
        let mut index = 0;
        'dispatch: loop {
            let waited = Instant::now();
            let Ok(chunk) = loaded.recv() else { break };
            time.waiting_for_input += since(waited);
            for items in cut_groups(chunk, batch) {
                // Room in the window: not timed, since the engines or the finisher may fill it
                // (their own times say which).
                let mut done = lock(&finished.0);
                loop {
                    while in_flight.front().is_some_and(|&end| end <= *done) {
                        in_flight.pop_front();
                    }
                    if in_flight.len() < window {
                        break;
                    }
                    if stop.load(Ordering::SeqCst) {
                        break 'dispatch;
                    }
                    // A timeout, so that a stage that panicked cannot leave this waiting.
                    done = finished
                        .1
                        .wait_timeout(done, Duration::from_millis(50))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                drop(done);
                let first = index;
                index += items.len();
                in_flight.push_back(index);
                if stop.load(Ordering::SeqCst) || to_engines.send(Group { first, items }).is_err() {
                    break 'dispatch;
                }
            }
        }
        drop(to_engines);
        drop(loaded);
        let mut panic = None;
        for worker in workers {
            match worker.join() {
                Ok((busy, idle)) => {
                    time.busy += busy;
                    time.idle += idle;
                }
                Err(p) => panic = panic.or(Some(p)),
            }
        }
        match finisher.join() {
            Ok(busy) => time.finisher_busy = busy,
            Err(p) => panic = panic.or(Some(p)),
        }
        if let Some(p) = panic {
            resume_unwind(p);
        }
        time
    })
}

/// One engine's thread: claims groups until there are none, runs each with a hint of the next
/// one it holds, and sends every item's result to the finisher. Returns the seconds it was
/// busy and idle.
fn run_engine<P, R, E, G>(
    engine: &G,
    queued: &Mutex<Receiver<Group<P, E>>>,
    infer: &(impl Fn(&G, &[&P], &[&P]) -> Vec<Result<R, E>> + Sync),
    to_finisher: &Sender<Finished<P, R, E>>,
) -> (f64, f64) {
    let (mut busy, mut idle) = (0.0, 0.0);
    let mut held: Option<Group<P, E>> = None;
    loop {
        let group = match held.take() {
            Some(g) => g,
            None => {
                let waited = Instant::now();
                // A poisoned lock is a receiver that another engine's panic left as it was.
                let claimed = lock(queued).recv();
                idle += waited.elapsed().as_secs_f64();
                match claimed {
                    Ok(g) => g,
                    Err(_) => break, // nothing more to run
                }
            }
        };
        // The group after, only when it is queued now and no other engine is waiting for the
        // queue (an engine waiting holds its lock): never a wait for a hint.
        held = queued.try_lock().ok().and_then(|rx| rx.try_recv().ok());
        let inputs: Vec<&P> = group.items.iter().filter_map(|r| r.as_ref().ok()).collect();
        let next: Vec<&P> = held
            .as_ref()
            .map(|g| g.items.iter().filter_map(|r| r.as_ref().ok()).collect())
            .unwrap_or_default();
        let started = Instant::now();
        let outputs = if inputs.is_empty() {
            Vec::new()
        } else {
            infer(engine, &inputs, &next)
        };
        busy += started.elapsed().as_secs_f64();
        assert_eq!(
            outputs.len(),
            inputs.len(),
            "the engine gave {} results for {} items",
            outputs.len(),
            inputs.len()
        );
        let mut outputs = outputs.into_iter();
        for (k, item) in group.items.into_iter().enumerate() {
            let result = item.and_then(|p| {
                let inferred = outputs.next().expect("one result per loaded item");
                inferred.map(|r| (p, r))
            });
            if to_finisher.send((group.first + k, result)).is_err() {
                return (busy, idle); // the finisher stopped (a panic, resumed by the caller)
            }
        }
    }
    (busy, idle)
}

/// Cuts a chunk into groups of `batch` loaded items each (the failed loads among them ride
/// along, in place), in order.
fn cut_groups<P, E>(chunk: Vec<Result<P, E>>, batch: usize) -> Vec<Vec<Result<P, E>>> {
    let mut groups = Vec::new();
    let mut rest = chunk.into_iter().peekable();
    while rest.peek().is_some() {
        let (mut group, mut ready) = (Vec::new(), 0);
        while ready < batch {
            let Some(item) = rest.next() else { break };
            ready += usize::from(item.is_ok());
            group.push(item);
        }
        groups.push(group);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Engines for the tests: the number of them, each with its name.
    fn engines(n: usize) -> Vec<usize> {
        (0..n).collect()
    }

    #[test]
    fn every_stage_sees_the_items_in_input_order_with_their_errors() {
        let items: Vec<usize> = (0..203).collect();
        for (batch, n) in [(1, 1), (3, 1), (7, 1), (20, 1), (1, 3), (7, 2), (20, 4)] {
            let loads = AtomicUsize::new(0);
            let inferred = Mutex::new(Vec::new());
            let groups = Mutex::new(Vec::new());
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
                &engines(n),
                |_, group: &[&usize], _next: &[&usize]| {
                    lock(&groups).push(group.len());
                    group
                        .iter()
                        .map(|&&p| {
                            lock(&inferred).push(p);
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
            let mut inferred = lock(&inferred).clone();
            if n > 1 {
                inferred.sort(); // engines run groups in any order
            }
            let want_inferred: Vec<usize> = items.iter().copied().filter(|i| i % 17 != 3).collect();
            assert_eq!(inferred, want_inferred, "batch {batch}, {n} engines");
            let groups = lock(&groups);
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

    /// Groups are cut the same way whatever the number of engines, and every engine runs some.
    #[test]
    fn the_groups_do_not_depend_on_the_number_of_engines() {
        let items: Vec<usize> = (0..90).collect();
        let run = |n: usize| {
            let groups = Mutex::new(Vec::new());
            let by_engine = Mutex::new(vec![0usize; n]);
            let arrived = Mutex::new(vec![false; n]);
            overlapped(
                &items,
                8,
                5,
                |_: &usize| 1,
                |&i| if i % 11 == 2 { Err(()) } else { Ok(i) },
                &engines(n),
                |&engine, group: &[&usize], _: &[&usize]| {
                    // Each engine's groups wait (5 s at most) until every engine has one, so
                    // that all of them run some, however the threads are scheduled.
                    lock(&arrived)[engine] = true;
                    let waited = Instant::now();
                    while !lock(&arrived).iter().all(|&a| a)
                        && waited.elapsed() < Duration::from_secs(5)
                    {
                        std::thread::yield_now();
                    }
                    lock(&groups).push(group.iter().map(|&&p| p).collect::<Vec<_>>());
                    lock(&by_engine)[engine] += 1;
                    group.iter().map(|&&p| Ok(p)).collect()
                },
                |_, _| {},
            );
            let mut groups = groups.into_inner().unwrap();
            groups.sort();
            (groups, by_engine.into_inner().unwrap())
        };
        let (one, _) = run(1);
        let (three, by_engine) = run(3);
        assert_eq!(one, three);
        assert!(by_engine.iter().all(|&g| g > 0), "{by_engine:?}");
    }

    /// Small items fill whole groups: chunks are cut at `batch` items at least.
    #[test]
    fn small_items_go_to_the_engine_in_full_groups() {
        let items: Vec<usize> = (0..100).collect();
        let groups = Mutex::new(Vec::new());
        overlapped(
            &items,
            4,
            16,
            |_: &usize| 1,
            |&i| Ok::<usize, ()>(i),
            &engines(1),
            |_, group: &[&usize], _next: &[&usize]| {
                lock(&groups).push(group.len());
                group.iter().map(|&&p| Ok(p)).collect()
            },
            |_, _| {},
        );
        // The first chunk is one item (its size unknown before it is read).
        assert_eq!(*lock(&groups), [1, 16, 16, 16, 16, 16, 16, 3]);
    }

    /// The engine is told the group after the one it runs whenever it is queued, and nothing
    /// after the last.
    #[test]
    fn the_engine_is_told_the_next_group() {
        let items: Vec<usize> = (0..40).collect();
        let calls: Mutex<Vec<(Vec<usize>, Vec<usize>)>> = Mutex::new(Vec::new());
        overlapped(
            &items,
            64,
            6,
            |_: &usize| 1,
            |&i| if i % 9 == 4 { Err(()) } else { Ok(i) },
            &engines(1),
            |_, group: &[&usize], next: &[&usize]| {
                // Long enough for the dispatcher to queue the next group first.
                std::thread::sleep(Duration::from_millis(20));
                lock(&calls).push((
                    group.iter().map(|&&p| p).collect(),
                    next.iter().map(|&&p| p).collect(),
                ));
                group.iter().map(|&&p| Ok(p)).collect()
            },
            |_, _| {},
        );
        let calls = calls.into_inner().unwrap();
        assert!(calls.len() > 4, "{calls:?}");
        // A hint is the next group or nothing. The first two calls may come before the next
        // group is queued (the second chunk's groups are queued while the engine claims the
        // first of them); from the third on, the groups in flight are queued ahead.
        for (k, pair) in calls.windows(2).enumerate() {
            if k < 2 {
                assert!(pair[0].1.is_empty() || pair[0].1 == pair[1].0, "{calls:?}");
            } else {
                assert_eq!(pair[0].1, pair[1].0, "{calls:?}");
            }
        }
        assert!(calls.last().unwrap().1.is_empty(), "{calls:?}");
    }

    /// The engine does not wait for the finisher to work through a group before it starts the
    /// next: the finisher holds the second group's first item until the third group is
    /// inferred.
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
            &engines(1),
            |_, group: &[&usize], _next: &[&usize]| {
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

    /// The time split has at least the time each stage was made to take: the engine's own
    /// work, the loader's reading (the first chunk), the finisher's.
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
            &engines(1),
            |_, group: &[&usize], _next: &[&usize]| {
                std::thread::sleep(ms(10));
                group.iter().map(|&&p| Ok(p)).collect()
            },
            |_, _| std::thread::sleep(ms(40)),
        );
        assert!(time.busy >= 0.079, "{time:?}");
        assert!(time.waiting_for_input >= 0.059, "{time:?}");
        // The engine waited for the first (slow) item.
        assert!(time.idle >= 0.059, "{time:?}");
        assert!(time.finisher_busy >= 0.319, "{time:?}");
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
            &engines(2),
            |_, g: &[&u8], _: &[&u8]| g.iter().map(|&&p| Ok::<u8, ()>(p)).collect(),
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
            &engines(2),
            |_, g: &[&usize], _: &[&usize]| g.iter().map(|&&p| Ok::<usize, ()>(p)).collect(),
            |index, _| assert!(index < 10, "finisher fails"),
        );
    }

    #[test]
    #[should_panic(expected = "engine fails")]
    fn a_panic_in_an_engine_reaches_the_caller() {
        let items: Vec<usize> = (0..500).collect();
        overlapped(
            &items,
            4,
            2,
            |_: &usize| 1,
            |&i| Ok::<usize, ()>(i),
            &engines(3),
            |_, g: &[&usize], _: &[&usize]| {
                assert!(g.iter().all(|&&p| p != 37), "engine fails");
                g.iter().map(|&&p| Ok::<usize, ()>(p)).collect()
            },
            |_, _| {},
        );
    }
}
