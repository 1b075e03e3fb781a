//! A fixed team of threads for short parallel jobs issued from outside the pool, such as a
//! decode-sized `ops.linear` called from Python.
//!
//! Rayon suits long or uneven work, but a job of 20-50 us pays for its hand-off: the calling
//! thread injects the job, wakes sleeping workers, then sleeps itself until they finish, and
//! work stealing sends each chunk of weights to whichever core asks first, so a weight matrix
//! that would fit in the cores' L2 caches half and half is read from L3 again on every call.
//! The team works the way BLAS libraries do instead: part `i` of every job runs on the same
//! thread (the caller takes part 0), so that thread's core keeps its share of the weights
//! cached; idle helpers spin for a short while before they sleep, so back-to-back jobs start
//! without a wake-up; and the caller spins on the last part rather than sleeping.

use std::any::Any;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use super::pool::{self, PerProcess};

/// How long an idle helper keeps polling for the next job before it sleeps.
const SPIN: Duration = Duration::from_micros(100);

/// A job as the team stores it, its lifetime erased (see `Team::run`).
type Job = dyn Fn(usize, usize) + Sync;

struct Team {
    size: usize,
    /// Held by the one caller whose job is running.
    submit: Mutex<()>,
    /// Bumped once per job; helpers run a job when they see it change.
    generation: AtomicU64,
    /// The running job, valid while `pending > 0`; written only by the holder of `submit`.
    job: UnsafeCell<Option<*const Job>>,
    /// Helper parts of the current job not yet finished.
    pending: AtomicUsize,
    /// The payload of a helper's panic in the current job, raised again on the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written by the holder of `submit` before `generation` is bumped and read by
// helpers after they see the bump; the writer waits for `pending == 0` before it changes it or
// lets the closure go out of scope.
unsafe impl Sync for Team {}

/// This process's team (see `pool`: a forked child starts its own), as many threads as the pool.
fn team() -> &'static Team {
    static TEAM: PerProcess<&'static Team> = PerProcess::new();
    TEAM.get(|| {
        let size = pool::pool().current_num_threads().max(1);
        let team: &'static Team = Box::leak(Box::new(Team {
            size,
            submit: Mutex::new(()),
            generation: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            panic: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        }));
        for part in 1..size {
            std::thread::Builder::new()
                .name(format!("ellm-team-{part}"))
                .spawn(move || team.serve(part))
                .expect("spawning a team thread");
        }
        team
    })
}

impl Team {
    fn serve(&self, part: usize) {
        let mut seen = 0;
        loop {
            seen = self.wait_for_job(seen);
            // SAFETY: see `unsafe impl Sync`: the job stays alive until `pending` reaches 0.
            let job = unsafe { &*(*self.job.get()).expect("a job is published before its generation") };
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| job(part, self.size))) {
                *lock(&self.panic) = Some(payload);
            }
            self.pending.fetch_sub(1, SeqCst);
        }
    }

    /// Spin, then sleep, until the generation differs from `seen`; returns the new one.
    fn wait_for_job(&self, seen: u64) -> u64 {
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            let now = self.generation.load(SeqCst);
            if now != seen {
                return now;
            }
            polls += 1;
            if polls.is_multiple_of(64) && start.elapsed() > SPIN {
                break;
            }
            std::hint::spin_loop();
        }
        let mut guard = lock(&self.sleep);
        self.sleepers.fetch_add(1, SeqCst);
        while self.generation.load(SeqCst) == seen {
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        self.sleepers.fetch_sub(1, SeqCst);
        self.generation.load(SeqCst)
    }

    fn run(&self, job: &(dyn Fn(usize, usize) + Sync)) {
        // SAFETY: only the holder of `submit` writes `job`, and no helper reads it between jobs.
        // The lifetime is erased; `run` returns only after every helper is done with it.
        unsafe {
            *self.job.get() =
                Some(std::mem::transmute::<&(dyn Fn(usize, usize) + Sync), &'static Job>(job) as *const Job);
        }
        self.pending.store(self.size - 1, SeqCst);
        self.generation.fetch_add(1, SeqCst);
        if self.sleepers.load(SeqCst) > 0 {
            let _guard = lock(&self.sleep);
            self.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job(0, self.size)));
        let start = Instant::now();
        let mut polls = 0u32;
        while self.pending.load(SeqCst) > 0 {
            polls += 1;
            if polls.is_multiple_of(64) && start.elapsed() > SPIN {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        let theirs = lock(&self.panic).take();
        if let Some(payload) = mine.err().or(theirs) {
            resume_unwind(payload);
        }
    }
}

/// Locks a mutex whose data can't be left inconsistent by a panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `job(part, parts)` for every part in `0..parts` at once, part 0 on the calling thread,
/// and returns when all are done; `parts` is the number of threads of the pool. Returns false
/// without running anything when the caller is a pool thread (the engine's step: its other
/// thread is busy or about to be, and a spinning helper would take a core from it; measured,
/// decode lost 15%), or when another job holds the team (another thread's, or this one's: a
/// part that asks again); the caller then uses the pool.
pub fn try_run(job: &(dyn Fn(usize, usize) + Sync)) -> bool {
    if rayon::current_thread_index().is_some() {
        return false;
    }
    let team = team();
    // A job that panicked poisoned the lock on its way out; the team itself is fine.
    let _lock = match team.submit.try_lock() {
        Ok(guard) => guard,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return false,
    };
    if team.size == 1 {
        job(0, 1);
    } else {
        team.run(job);
    }
    true
}

/// `try_run`, or the same parts as tasks on the pool when the team can't take the job.
pub fn run(job: &(dyn Fn(usize, usize) + Sync)) {
    if !try_run(job) {
        let pool = pool::pool();
        let parts = pool.current_num_threads().max(1);
        pool.scope(|s| {
            for part in 0..parts {
                s.spawn(move |_| job(part, parts));
            }
        });
    }
}

/// Part `part` of `0..len` cut into `parts` nearly equal ranges whose bounds are multiples of
/// `align` (the last range takes the rest).
pub fn share(len: usize, align: usize, part: usize, parts: usize) -> std::ops::Range<usize> {
    share_lighter_first(len, align, part, parts, 0)
}

/// `share`, with the first part (the caller's) given about `lighter` fewer elements than the
/// others (it has other work too).
pub fn share_lighter_first(
    len: usize,
    align: usize,
    part: usize,
    parts: usize,
    lighter: usize,
) -> std::ops::Range<usize> {
    let bound = |p: usize| ((len + lighter) * p / parts).saturating_sub(lighter).next_multiple_of(align).min(len);
    bound(part)..bound(part + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Other tests running at the same time may hold the team.
    fn run_when_free(job: &(dyn Fn(usize, usize) + Sync)) {
        while !try_run(job) {
            std::thread::yield_now();
        }
    }

    #[test]
    fn shares_cover_the_range_once() {
        for (len, parts) in [(0, 2), (1, 2), (10, 3), (1536, 2), (7, 8)] {
            for lighter in [0, 3, 100, 5000] {
                let all: Vec<usize> = (0..parts).flat_map(|p| share_lighter_first(len, 4, p, parts, lighter)).collect();
                assert_eq!(all, (0..len).collect::<Vec<_>>());
            }
        }
        assert_eq!(share_lighter_first(512, 4, 0, 2, 24), 0..244);
    }

    #[test]
    fn every_part_runs_once_per_job() {
        let hits: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..1000 {
            run_when_free(&|part, parts| {
                assert!(part < parts);
                hits[part].fetch_add(1, SeqCst);
            });
        }
        let parts = pool::pool().current_num_threads();
        assert!(hits[..parts].iter().all(|h| h.load(SeqCst) == 1000));
        assert!(hits[parts..].iter().all(|h| h.load(SeqCst) == 0));
    }

    #[test]
    fn a_panicking_part_reaches_the_caller_and_the_team_survives() {
        // The last part panics: on a helper thread, or on the caller when there is one part.
        let result = catch_unwind(|| run_when_free(&|part, parts| assert!(part + 1 < parts, "boom")));
        assert!(result.is_err());
        let ran = AtomicUsize::new(0);
        run_when_free(&|_, _| {
            ran.fetch_add(1, SeqCst);
        });
        assert_eq!(ran.load(SeqCst), pool::pool().current_num_threads());
    }
}
