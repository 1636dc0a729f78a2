//! The inference thread pools, how `--threads` is shared out among the instances of a model version, and
//! keeping a pool's threads awake through one model run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Threads each instance gets when `threads` are divided among `instances`: an even share, and never none,
/// so more instances than threads oversubscribe the cores rather than starve an instance.
pub fn threads_per_instance(threads: usize, instances: usize) -> usize {
    (threads / instances.max(1)).max(1)
}

/// One rayon pool per instance, for every instance count in use. Instance `i` of every model version with
/// the same count runs on the same pool, so several models share the cores as they would share one pool,
/// instead of each starting `threads` threads of its own.
pub struct Pools {
    threads: usize,
    layouts: Mutex<BTreeMap<usize, Arc<[Arc<rayon::ThreadPool>]>>>,
}

impl Pools {
    /// No pools yet; [`Pools::get`] starts them as model versions ask for them.
    pub fn new(threads: usize) -> Self {
        Self {
            threads,
            layouts: Mutex::default(),
        }
    }

    /// Every inference thread, before dividing.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The pools of `instances` instances, started on first use.
    pub fn get(
        &self,
        instances: usize,
    ) -> Result<Arc<[Arc<rayon::ThreadPool>]>, rayon::ThreadPoolBuildError> {
        // Nothing in the map can be half-updated, so a panic elsewhere leaves it usable.
        let mut layouts = self.layouts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pools) = layouts.get(&instances) {
            return Ok(pools.clone());
        }
        let per_instance = threads_per_instance(self.threads, instances);
        let pools = (0..instances.max(1))
            .map(|instance| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(per_instance)
                    .thread_name(move |i| thread_name(instances, instance, i))
                    .build()
                    .map(Arc::new)
            })
            .collect::<Result<Arc<[_]>, _>>()?;
        layouts.insert(instances, pools.clone());
        Ok(pools)
    }
}

/// Runs `f` on this rayon worker while the pool's other threads stay awake
/// for it, spinning and taking its parallel steps as soon as they appear.
///
/// A network spread over several threads hands work over at every layer
/// (about twenty times an image for EfficientNet-Lite0), each step a fraction
/// of a millisecond. A rayon worker with nothing to do sleeps after a few
/// dozen idle rounds, and waking a sleeping thread costs tens of
/// microseconds, more on a virtual CPU that the host has to reschedule: at
/// batch 1 on 2 threads that was a tenth of the time. The spinning ends with
/// `f`, and a spinner that no thread took in time is a no-op, so this never
/// waits for a busy thread. Outside a pool, or on one thread, it just runs `f`.
pub fn with_pool_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    if threads < 2 || rayon::current_thread_index().is_none() {
        return f();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        // Pushed before any of `f`'s work: a thread stealing from this deque
        // takes the oldest job first, so `f` never finds a spinner of its own
        // under the work it waits for.
        for _ in 1..threads {
            s.spawn(|_| {
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        // Set however `f` ends: a panic must end the spinning too, or the
        // scope would wait for the spinners forever instead of passing it on.
        let _done = Done(&done);
        f()
    })
}

/// Sets its flag when dropped.
struct Done<'a>(&'a AtomicBool);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn thread_name(instances: usize, instance: usize, thread: usize) -> String {
    // Linux keeps 15 bytes of a thread name: the single-instance names stay as they always were.
    if instances == 1 {
        format!("inference-{thread}")
    } else {
        format!("infer-{instance}-{thread}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_divided_evenly_and_every_instance_gets_one() {
        assert_eq!(threads_per_instance(8, 1), 8);
        assert_eq!(threads_per_instance(8, 2), 4);
        assert_eq!(threads_per_instance(8, 3), 2);
        assert_eq!(threads_per_instance(2, 2), 1);
        assert_eq!(threads_per_instance(2, 4), 1);
    }

    #[test]
    fn a_layout_is_started_once_and_shared() {
        let pools = Pools::new(4);
        let two = pools.get(2).unwrap();
        assert_eq!(two.len(), 2);
        assert!(two.iter().all(|p| p.current_num_threads() == 2));
        assert!(Arc::ptr_eq(&two, &pools.get(2).unwrap()));
        let one = pools.get(1).unwrap();
        assert_eq!((one.len(), one[0].current_num_threads()), (1, 4));
    }

    fn sum_of_squares() -> u64 {
        use rayon::prelude::*;
        (0..100_000u64).into_par_iter().map(|i| i * i).sum()
    }

    fn expected_sum() -> u64 {
        (0..100_000u64).map(|i| i * i).sum()
    }

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool")
    }

    #[test]
    fn work_runs_with_the_threads_awake_and_outside_a_pool() {
        for threads in [1, 2, 3] {
            let got = pool(threads).install(|| with_pool_awake(sum_of_squares));
            assert_eq!(got, expected_sum(), "{threads} threads");
        }
        assert_eq!(with_pool_awake(sum_of_squares), expected_sum(), "no pool");
    }

    #[test]
    fn a_panic_in_the_work_reaches_the_caller_and_ends_the_spinning() {
        use std::sync::mpsc;
        use std::time::Duration;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let pool = pool(2);
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.install(|| {
                    with_pool_awake(|| {
                        sum_of_squares();
                        panic!("a model bug")
                    })
                })
            }));
            // The pool is still usable afterwards.
            let after = pool.install(|| with_pool_awake(sum_of_squares));
            tx.send((caught.is_err(), after)).ok();
        });
        let (panicked, after) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the panic ended the run instead of hanging it");
        assert!(panicked);
        assert_eq!(after, expected_sum());
    }

    #[test]
    fn a_busy_thread_is_not_waited_for() {
        use std::sync::mpsc;
        use std::time::Duration;
        let pool = pool(2);
        let (release, blocked) = mpsc::channel::<()>();
        let (started, running) = mpsc::channel();
        // One of the two threads is held until the work is done: the spinner
        // meant for it is never taken by it.
        pool.spawn(move || {
            started.send(()).expect("test waits");
            blocked.recv().ok();
        });
        running.recv().expect("the blocker runs");
        let (tx, rx) = mpsc::channel();
        pool.spawn(move || {
            tx.send(with_pool_awake(sum_of_squares)).ok();
        });
        let got = rx.recv_timeout(Duration::from_secs(30));
        release.send(()).ok();
        assert_eq!(
            got.expect("finished without the busy thread"),
            expected_sum()
        );
    }
}
