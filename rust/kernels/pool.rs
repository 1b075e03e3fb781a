//! The process's threads. Rayon's global pool does not survive fork(): a child made by
//! `multiprocessing`, a `DataLoader` worker or a pre-forking server inherits the pool's state
//! but none of its threads, and its first parallel call waits forever. So ellm keeps its
//! threads per process: a child sees another pid and starts its own, leaking the parent's,
//! whose threads don't exist there (dropping them would wait for them).

use std::sync::Mutex;

use rayon::ThreadPool;

/// A value built once per process, on first use.
pub(crate) struct PerProcess<T: 'static> {
    cell: Mutex<Option<(u32, &'static T)>>,
}

impl<T> PerProcess<T> {
    pub const fn new() -> Self {
        PerProcess { cell: Mutex::new(None) }
    }

    pub fn get(&self, build: impl FnOnce() -> T) -> &'static T {
        let pid = std::process::id();
        let mut cell = self.cell.lock().unwrap_or_else(|e| e.into_inner());
        match *cell {
            Some((owner, value)) if owner == pid => value,
            _ => {
                let value: &'static T = Box::leak(Box::new(build()));
                *cell = Some((pid, value));
                value
            }
        }
    }
}

/// This process's pool, with RAYON_NUM_THREADS threads (default: one per core) as rayon's
/// global pool would have.
pub fn pool() -> &'static ThreadPool {
    static POOL: PerProcess<ThreadPool> = PerProcess::new();
    POOL.get(|| rayon::ThreadPoolBuilder::new().thread_name(|i| format!("ellm-{i}")).build().expect("starting the thread pool"))
}

/// Runs `f` on this process's pool, so that its parallel regions run there.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    pool().install(f)
}
