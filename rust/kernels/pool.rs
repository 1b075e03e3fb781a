//! The process's threads. Rayon's global pool does not survive fork(): a child made by
//! `multiprocessing`, a `DataLoader` worker or a pre-forking server inherits the pool's state
//! but none of its threads, and its first parallel call waits forever. So ellm keeps its
//! threads per process: a child starts its own, leaking the parent's, whose threads don't exist
//! there (dropping them would wait for them).

use std::sync::atomic::{
    AtomicPtr, AtomicUsize,
    Ordering::{Acquire, Release, SeqCst},
};
use std::sync::{Mutex, Once};

use rayon::ThreadPool;

/// Forks seen since ellm first asked; a child's count is its parent's plus one.
static FORKS: AtomicUsize = AtomicUsize::new(0);

#[cfg(unix)]
extern "C" fn count_fork_in_child() {
    FORKS.fetch_add(1, SeqCst);
}

/// Which process this is, as far as values built by `PerProcess` go: it changes in a forked
/// child. (Comparing pids would do too, but getpid() is a system call, and the team asks on
/// every call.)
fn generation() -> usize {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: the handler only bumps an atomic, which is async-signal-safe.
        #[cfg(unix)]
        unsafe {
            libc::pthread_atfork(None, None, Some(count_fork_in_child));
        }
    });
    FORKS.load(SeqCst)
}

/// A value built once per process, on first use.
pub(crate) struct PerProcess<T: 'static> {
    /// The value, once built.
    value: AtomicPtr<T>,
    /// `generation() + 1` of the process that built `value` (0: not built).
    built_by: AtomicUsize,
    build_lock: Mutex<()>,
}

impl<T> PerProcess<T> {
    pub const fn new() -> Self {
        PerProcess {
            value: AtomicPtr::new(std::ptr::null_mut()),
            built_by: AtomicUsize::new(0),
            build_lock: Mutex::new(()),
        }
    }

    pub fn get(&self, build: impl FnOnce() -> T) -> &'static T {
        let current = generation() + 1;
        if self.built_by.load(Acquire) != current {
            let _lock = self.build_lock.lock().unwrap_or_else(|e| e.into_inner());
            if self.built_by.load(Acquire) != current {
                self.value.store(Box::leak(Box::new(build())), Release);
                self.built_by.store(current, Release);
            }
        }
        // SAFETY: `value` was stored, from a leaked box, before `built_by` said so.
        unsafe { &*self.value.load(Acquire) }
    }
}

/// This process's pool, with RAYON_NUM_THREADS threads (default: one per core) as rayon's
/// global pool would have.
pub fn pool() -> &'static ThreadPool {
    static POOL: PerProcess<ThreadPool> = PerProcess::new();
    POOL.get(|| {
        rayon::ThreadPoolBuilder::new().thread_name(|i| format!("ellm-{i}")).build().expect("starting the thread pool")
    })
}

/// Runs `f` on this process's pool, so that its parallel regions run there.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    pool().install(f)
}

/// A pointer into an output buffer that parallel tasks share, each writing only its own
/// disjoint part (columns of a product, heads of an attention output, rows of a batch).
pub(crate) struct DisjointWrites<T = f32>(pub *mut T);
// SAFETY: users write disjoint ranges only; the buffer outlives the parallel region.
unsafe impl<T> Sync for DisjointWrites<T> {}
// SAFETY: as above; a task may carry its share to another thread.
unsafe impl<T> Send for DisjointWrites<T> {}

impl<T> DisjointWrites<T> {
    pub fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }

    /// Elements `i..i + len` as a slice.
    ///
    /// # Safety
    /// The range lies inside the buffer and no one else touches it while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, i: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.at(i), len)
    }
}
