//! How close ellm's decode GEMV comes to the machine's memory bandwidth: the time to read a
//! [49152, 576] f32 matrix (SmolLM2's vocabulary projection, 113 MB: more than any core's cache)
//! on ellm's threads and do nothing else, against `matmul::linear` with one input row, which
//! reads it once too. No GEMV can beat the first number; bench_ops.py compares the second with
//! NumPy/OpenBLAS.
//!
//! cargo bench --no-default-features --bench memory_ceiling

use std::sync::Mutex;
use std::time::Instant;

use _lowlevel::kernels::{matmul, team};

const ROWS: usize = 49152;
const K: usize = 576;

/// The sum of `a`, read in `streams` interleaved pieces at once, prefetching `prefetch`
/// floats ahead in each (0: none).
fn read(a: &[f32], streams: usize, prefetch: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { read_avx512(a, streams, prefetch) };
        }
    }
    let _ = (streams, prefetch);
    a.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn read_avx512(a: &[f32], streams: usize, prefetch: usize) -> f32 {
    use std::arch::x86_64::*;
    let piece = a.len() / streams / 16 * 16;
    let mut acc = [_mm512_setzero_ps(); 8];
    let mut i = 0;
    while i < piece {
        for s in 0..streams {
            let p = a.as_ptr().add(s * piece + i);
            if prefetch > 0 {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(prefetch) as *const i8);
            }
            acc[s % 8] = _mm512_add_ps(acc[s % 8], _mm512_loadu_ps(p));
        }
        i += 16;
    }
    let tail: f32 = a[streams * piece..].iter().sum();
    acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum::<f32>() + tail
}

/// The best of `repeat` timed calls, in seconds.
fn best_of(repeat: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..repeat)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let weight: Vec<f32> = (0..ROWS * K).map(|i| (i % 97) as f32 * 1e-3).collect();
    let x: Vec<f32> = (0..K).map(|i| (i % 13) as f32 * 1e-2).collect();
    let mut out = vec![0.0f32; ROWS];
    let bytes = (ROWS * K * 4) as f64;
    let sink = Mutex::new(0.0f32);
    // The fastest of a few ways to read: one stream or several, with prefetching or without.
    let t_read = [(1, 0), (1, 1024), (4, 1024), (8, 1024)]
        .into_iter()
        .map(|(streams, prefetch)| {
            best_of(30, || {
                team::run(&|part, parts| {
                    let rows = team::share(ROWS, 4, part, parts);
                    let sum = read(&weight[rows.start * K..rows.end * K], streams, prefetch);
                    *sink.lock().unwrap() += sum;
                })
            })
        })
        .fold(f64::INFINITY, f64::min);
    let t_gemv = best_of(30, || matmul::linear(&x, &weight, None, &mut out, 1, K, ROWS));
    println!(
        "memory ceiling: [{ROWS}, {K}] f32, {:.0} MB, on {} threads",
        bytes / 1e6,
        _lowlevel::kernels::pool::pool().current_num_threads()
    );
    println!("  read only    {:8.0} us  {:5.1} GB/s", t_read * 1e6, bytes / t_read / 1e9);
    println!(
        "  ellm GEMV    {:8.0} us  {:5.1} GB/s  ({:.0}% of the read-only rate)",
        t_gemv * 1e6,
        bytes / t_gemv / 1e9,
        100.0 * t_read / t_gemv
    );
    println!("  (checksums {} {})", sink.lock().unwrap(), out.iter().sum::<f32>());
}
