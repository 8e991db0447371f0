//! A small work-sharing executor for the requests of one batch: the calling thread (a queue's
//! worker) and the pool's helper threads take items from one shared list until it is empty,
//! and the caller returns once every item is done, with the results in item order.
//!
//! This is what lets one virtqueue have several requests in flight: the guest's requests in one
//! batch are independent (virtio-blk orders nothing between requests that are in flight, and a
//! flush only covers writes that were *completed* before it was submitted, which no request of
//! the same batch is), so they may run in parallel. A batch of one item never wakes a helper,
//! so a queue at queue depth 1 pays nothing for the pool.
//!
//! [`BatchPool::spawn`] is the other way to use the helpers: it hands items over and returns
//! at once, and each item's work does whatever completing it means. That lets a queue's worker
//! take the next requests while the earlier ones still wait for the disk.
//!
//! Nothing here knows about virtio: items and results are generic.

use std::collections::VecDeque;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use log::error;

type Job = Arc<dyn Fn() + Send + Sync>;
type Task = Box<dyn FnOnce() + Send>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave its data half-updated (each
    // critical section is a single push/pop/store), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
struct PoolState {
    /// Bumped for every batch handed to the helpers.
    generation: u64,
    /// The current batch's drain function (None between batches).
    job: Option<Job>,
    /// Items handed over by [`BatchPool::spawn`], oldest first.
    tasks: VecDeque<Task>,
    /// Helpers asleep on `wake`: how many a hand-over may need to wake.
    idle: usize,
    /// Wake-ups that found nothing to do (the tests' measure of needless wake-ups).
    #[cfg(test)]
    empty_wakes: u64,
    shutdown: bool,
}

struct PoolShared {
    state: Mutex<PoolState>,
    wake: Condvar,
}

/// A pool of helper threads that share the items of a batch with the calling thread.
pub struct BatchPool {
    shared: Arc<PoolShared>,
    threads: Vec<JoinHandle<()>>,
}

/// One batch: the items not yet taken, and the results of those done.
struct Batch<T, R> {
    items: Mutex<VecDeque<(usize, T)>>,
    results: Mutex<(Vec<Option<R>>, usize)>,
    done: Condvar,
    work: Arc<dyn Fn(T) -> R + Send + Sync>,
}

impl<T, R> Batch<T, R> {
    /// Takes and runs items until none is left. A panicking item is logged and yields no
    /// result (its slot stays `None`), so the caller never waits for it forever.
    fn drain(&self) {
        loop {
            let Some((i, item)) = lock(&self.items).pop_front() else {
                return;
            };
            let r = guarded(|| (self.work)(item));
            let mut res = lock(&self.results);
            if let (Some(r), Some(slot)) = (r, res.0.get_mut(i)) {
                *slot = Some(r);
            }
            res.1 -= 1;
            if res.1 == 0 {
                self.done.notify_all();
            }
        }
    }
}

impl BatchPool {
    /// A pool of `helpers` threads named `{name}-{i}` (0 helpers: every batch runs on the
    /// calling thread alone).
    pub fn new(name: &str, helpers: usize) -> io::Result<Self> {
        let shared = Arc::new(PoolShared {
            state: Mutex::new(PoolState::default()),
            wake: Condvar::new(),
        });
        let mut pool = BatchPool {
            shared,
            threads: Vec::with_capacity(helpers),
        };
        for i in 0..helpers {
            let sh = Arc::clone(&pool.shared);
            // On error `pool` is dropped, which stops the threads already started.
            let t = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || helper_loop(&sh))?;
            pool.threads.push(t);
        }
        Ok(pool)
    }

    /// Number of helper threads (not counting the caller).
    pub fn helpers(&self) -> usize {
        self.threads.len()
    }

    /// Runs `work` on every item, on this thread and on up to `items.len() - 1` helpers;
    /// returns the results in item order (`None` for an item whose handler panicked).
    pub fn run<T, R>(
        &self,
        items: Vec<T>,
        work: Arc<dyn Fn(T) -> R + Send + Sync>,
    ) -> Vec<Option<R>>
    where
        T: Send + 'static,
        R: Send + 'static,
    {
        let n = items.len();
        let wanted = self.threads.len().min(n.saturating_sub(1));
        if wanted == 0 {
            // Also the single-request case: no wake-up, no allocation beyond the result.
            return items.into_iter().map(|t| guarded(|| work(t))).collect();
        }
        let batch = Arc::new(Batch {
            items: Mutex::new(items.into_iter().enumerate().collect()),
            results: Mutex::new(((0..n).map(|_| None).collect(), n)),
            done: Condvar::new(),
            work,
        });
        {
            let b = Arc::clone(&batch);
            let mut st = lock(&self.shared.state);
            st.generation = st.generation.wrapping_add(1);
            st.job = Some(Arc::new(move || b.drain()));
        }
        for _ in 0..wanted {
            self.shared.wake.notify_one();
        }
        batch.drain();
        let results = {
            let mut res = lock(&batch.results);
            while res.1 > 0 {
                res = batch.done.wait(res).unwrap_or_else(PoisonError::into_inner);
            }
            std::mem::take(&mut res.0)
        };
        // Drop the batch's job so it does not outlive the batch (a helper that wakes late finds
        // no job, or an empty one).
        lock(&self.shared.state).job = None;
        results
    }

    /// Hands every item to the helpers and returns without waiting: `work` runs on each item
    /// on some helper, in the order given as helpers come free, and must itself deliver what
    /// the item produces. Items are never dropped unrun: the pool runs what is left before its
    /// threads exit. A panicking item is logged. With no helpers the items run here, in
    /// order, before this returns.
    pub fn spawn<T>(&self, items: Vec<T>, work: Arc<dyn Fn(T) + Send + Sync>)
    where
        T: Send + 'static,
    {
        if self.threads.is_empty() {
            for t in items {
                guarded(|| work(t));
            }
            return;
        }
        // One helper woken per item, and no more than are asleep: a helper that is awake
        // takes what is queued before it sleeps again, and waking every helper for a few
        // items (15 per queue with `--direct`) only has the others wake to find nothing.
        let wake = {
            let mut st = lock(&self.shared.state);
            let n = items.len();
            for t in items {
                let work = Arc::clone(&work);
                st.tasks.push_back(Box::new(move || work(t)));
            }
            n.min(st.idle)
        };
        for _ in 0..wake {
            self.shared.wake.notify_one();
        }
    }
}

/// Runs one item's work; a panic in it is logged and gives `None` (the pool keeps working).
fn guarded<R>(f: impl FnOnce() -> R) -> Option<R> {
    let r = catch_unwind(AssertUnwindSafe(f));
    if r.is_err() {
        error!("a request handler panicked; its request is not completed");
    }
    r.ok()
}

fn helper_loop(sh: &PoolShared) {
    let mut seen = 0u64;
    loop {
        // Handed-over items first (they are older than any batch their worker runs now),
        // and all of them before a shutdown.
        let (task, job) = {
            let mut st = lock(&sh.state);
            while st.tasks.is_empty() && st.generation == seen && !st.shutdown {
                st.idle += 1;
                st = sh.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
                st.idle -= 1;
                #[cfg(test)]
                if st.tasks.is_empty() && st.generation == seen && !st.shutdown {
                    st.empty_wakes += 1;
                }
            }
            if let Some(t) = st.tasks.pop_front() {
                (Some(t), None)
            } else if st.shutdown {
                return;
            } else {
                seen = st.generation;
                (None, st.job.clone())
            }
        };
        if let Some(task) = task {
            guarded(task);
        } else if let Some(job) = job {
            job();
        }
    }
}

impl Drop for BatchPool {
    fn drop(&mut self) {
        lock(&self.shared.state).shutdown = true;
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                error!("a request pool thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn results_come_back_in_item_order() {
        let pool = BatchPool::new("t", 3).unwrap();
        for n in [0usize, 1, 2, 5, 64] {
            let items: Vec<usize> = (0..n).collect();
            let out = pool.run(items, Arc::new(|x: usize| x * 10));
            let want: Vec<Option<usize>> = (0..n).map(|x| Some(x * 10)).collect();
            assert_eq!(out, want);
        }
    }

    #[test]
    fn helpers_share_the_work() {
        let pool = BatchPool::new("t", 2).unwrap();
        // Items that sleep long enough that the caller alone cannot take them all before a
        // helper wakes: several threads must have run some.
        let out = pool.run(
            (0..12).collect::<Vec<u32>>(),
            Arc::new(|_x: u32| {
                std::thread::sleep(Duration::from_millis(20));
                std::thread::current().id()
            }),
        );
        let threads: HashSet<_> = out.iter().flatten().collect();
        assert_eq!(out.iter().flatten().count(), 12);
        assert!(
            threads.len() >= 2,
            "only {} thread ran items",
            threads.len()
        );
    }

    #[test]
    fn a_single_item_runs_on_the_caller() {
        let pool = BatchPool::new("t", 2).unwrap();
        let me = std::thread::current().id();
        let out = pool.run(vec![()], Arc::new(|()| std::thread::current().id()));
        assert_eq!(out, vec![Some(me)]);
    }

    #[test]
    fn a_panicking_item_yields_none_and_the_pool_keeps_working() {
        let pool = BatchPool::new("t", 2).unwrap();
        let out = pool.run(
            (0..8).collect::<Vec<u32>>(),
            Arc::new(|x: u32| {
                if x == 3 {
                    panic!("item 3");
                }
                x
            }),
        );
        assert_eq!(out.iter().filter(|r| r.is_none()).count(), 1);
        assert_eq!(out.get(3), Some(&None));
        let again = pool.run(vec![1u32, 2, 3], Arc::new(|x: u32| x + 1));
        assert_eq!(again, vec![Some(2), Some(3), Some(4)]);
    }

    #[test]
    fn many_batches_back_to_back_lose_nothing() {
        let pool = BatchPool::new("t", 3).unwrap();
        let total = Arc::new(AtomicUsize::new(0));
        for round in 0..500usize {
            let t = Arc::clone(&total);
            let n = 1 + round % 9;
            let out = pool.run(
                vec![1usize; n],
                Arc::new(move |x: usize| t.fetch_add(x, Ordering::Relaxed)),
            );
            assert_eq!(out.iter().flatten().count(), n);
        }
        let want: usize = (0..500usize).map(|r| 1 + r % 9).sum();
        assert_eq!(total.load(Ordering::Relaxed), want);
    }

    #[test]
    fn spawned_items_run_on_helpers_and_the_caller_does_not_wait() {
        let pool = BatchPool::new("t", 2).unwrap();
        let me = std::thread::current().id();
        let (tx, rx) = std::sync::mpsc::channel();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let g = Arc::clone(&gate);
        let tx = Mutex::new(tx);
        // Every item blocks until the gate opens: spawn returning at all shows the caller
        // did not run or wait for them.
        pool.spawn(
            (0..6).collect::<Vec<u32>>(),
            Arc::new(move |x: u32| {
                let mut open = lock(&g.0);
                while !*open {
                    open = g.1.wait(open).unwrap_or_else(PoisonError::into_inner);
                }
                drop(open);
                let _ = lock(&tx).send((x, std::thread::current().id()));
            }),
        );
        *lock(&gate.0) = true;
        gate.1.notify_all();
        let mut got: Vec<_> = (0..6)
            .map(|_| rx.recv_timeout(Duration::from_secs(30)).unwrap())
            .collect();
        assert!(got.iter().all(|(_, t)| *t != me));
        got.sort_unstable_by_key(|(x, _)| *x);
        assert_eq!(
            got.iter().map(|(x, _)| *x).collect::<Vec<_>>(),
            (0..6).collect::<Vec<_>>()
        );
    }

    #[test]
    fn spawned_items_beside_batches_all_run_even_when_the_pool_is_dropped() {
        let pool = BatchPool::new("t", 2).unwrap();
        let total = Arc::new(AtomicUsize::new(0));
        for round in 0..300usize {
            let t = Arc::clone(&total);
            pool.spawn(
                vec![1usize; 1 + round % 4],
                Arc::new(move |x: usize| {
                    t.fetch_add(x, Ordering::Relaxed);
                }),
            );
            let t = Arc::clone(&total);
            let out = pool.run(
                vec![1usize; 1 + round % 3],
                Arc::new(move |x: usize| t.fetch_add(x, Ordering::Relaxed)),
            );
            assert_eq!(out.iter().flatten().count(), 1 + round % 3);
        }
        // One that panics is logged and the rest still run.
        pool.spawn(vec![0usize, 1], Arc::new(|x: usize| assert_eq!(x, 1)));
        drop(pool);
        let want: usize = (0..300usize).map(|r| 1 + r % 4 + 1 + r % 3).sum();
        assert_eq!(total.load(Ordering::Relaxed), want);
    }

    /// A hand-over of a few items wakes about as many helpers, not all of them, and every
    /// item still runs while the pool lives (no wake-up is lost when fewer helpers sleep
    /// than items come).
    #[test]
    fn a_hand_over_wakes_one_helper_per_item_and_loses_none() {
        let pool = BatchPool::new("t", 12).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        // Items long enough that each woken helper finds one (a helper done with a short
        // item would take the next before the helper woken for it gets there).
        let work = Arc::new(move |x: usize| {
            std::thread::sleep(Duration::from_millis(2));
            let _ = lock(&tx).send(x);
        });
        // Let every helper reach its wait first.
        while lock(&pool.shared.state).idle < 12 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let rounds = 300usize;
        for round in 0..rounds {
            let n = 1 + round % 3;
            pool.spawn(
                (0..n).collect(),
                Arc::clone(&work) as Arc<dyn Fn(usize) + Send + Sync>,
            );
            let mut got: Vec<usize> = (0..n)
                .map(|_| rx.recv_timeout(Duration::from_secs(30)).unwrap())
                .collect();
            got.sort_unstable();
            assert_eq!(got, (0..n).collect::<Vec<_>>());
        }
        // Waking every sleeping helper for each hand-over gave 2,985 empty wake-ups here (about
        // 10 a round). Waking one per item leaves a helper empty-handed only when another
        // woken one took its item first: at most n - 1 a round, 300 in all, plus the rare
        // spurious wake-up (33-50 seen on 2 CPUs).
        let empty = lock(&pool.shared.state).empty_wakes;
        assert!(
            empty < 2 * rounds as u64,
            "{empty} empty wake-ups in {rounds} rounds"
        );
    }

    #[test]
    fn spawn_without_helpers_runs_the_items_here_in_order() {
        let pool = BatchPool::new("t", 0).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        pool.spawn(
            vec![3u32, 1, 2],
            Arc::new(move |x: u32| lock(&s).push((x, std::thread::current().id()))),
        );
        let me = std::thread::current().id();
        assert_eq!(*lock(&seen), vec![(3, me), (1, me), (2, me)]);
    }

    #[test]
    fn dropping_the_pool_stops_its_threads() {
        let pool = BatchPool::new("t", 4).unwrap();
        assert_eq!(pool.helpers(), 4);
        drop(pool); // joins: a hang here fails the test by timeout
    }
}
