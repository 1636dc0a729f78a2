//! The inference thread pools, and how `--threads` is shared out among the instances of a model version.

use std::collections::BTreeMap;
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
}
