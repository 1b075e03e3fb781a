//! Products of a weight matrix with a few input rows: decode's GEMV (one row) and small batches
//! (up to 64). The weights are the big operand, so each weight row is streamed once against all
//! the inputs; the threads of the team share the weight rows (or, inside the engine, rayon's
//! tasks do), and the kernels are `simd::dot_tile`.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use rayon::prelude::*;

use super::pool::{self, DisjointWrites};
use super::simd::{self, dot_tile, RowsAlignedLike};
use super::team;

/// Bytes of weights per parallel task in the streaming path: small enough that every matrix of
/// a small model splits evenly over the threads, large enough that scheduling stays cheap.
const GEMV_BYTES_PER_TASK: usize = 64 * 1024;

/// Weight rows per task for rows of length k: a multiple of 4 (the kernel's row block).
fn gemv_rows_per_task(k: usize) -> usize {
    (GEMV_BYTES_PER_TASK / (4 * k.max(1))).div_ceil(4).max(1) * 4
}

/// How `gemv_rows` walks a matrix's rows.
#[derive(Clone, Copy)]
struct Walk {
    /// Last to first (the same numbers either way; see `linear_aligned`).
    backwards: bool,
    /// Prefetch the next block's rows: it overlaps memory latency when the weights stream from
    /// RAM, and costs a load slot per vector when they are already in the core's cache.
    prefetch: bool,
}

impl Walk {
    /// Weights read once from RAM (the engine's step, a matrix larger than the caches).
    const STREAMING: Walk = Walk { backwards: false, prefetch: true };
}

/// `out[j] = dot(x, weight row j)` for the rows of `weight` (`[out.len(), k]`), four at a time,
/// in the order `walk` says; `head` as `simd::dot_tile` takes it, for the matrix these rows
/// belong to.
fn gemv_rows(x: &[f32], weight: &[f32], out: &mut [f32], k: usize, head: usize, walk: Walk) {
    let row = |j: usize| weight[j * k..].as_ptr();
    let x = [x.as_ptr()];
    let blocks = out.len() / 4;
    let full = blocks * 4;
    // The same place 4 rows on (or back) belongs to the next block.
    let prefetch = match walk {
        Walk { prefetch: false, .. } => 0,
        Walk { backwards: true, .. } => -4 * k as isize,
        Walk { backwards: false, .. } => 4 * k as isize,
    };
    // SAFETY (both calls): every row pointer addresses k floats of `weight`, x holds k floats.
    for b in 0..blocks {
        let j = 4 * if walk.backwards { blocks - 1 - b } else { b };
        let tile = unsafe { dot_tile::<4, 1>(std::array::from_fn(|r| row(j + r)), x, k, head, prefetch) };
        for (o, [v]) in out[j..j + 4].iter_mut().zip(tile) {
            *o = v;
        }
    }
    for (j, o) in out.iter_mut().enumerate().skip(full) {
        *o = unsafe { dot_tile::<1, 1>([row(j)], x, k, head, 0) }[0][0];
    }
}

/// Weight rows per tile of `FewRowProduct`; with `TILE_INPUTS` input rows this makes 16
/// accumulators, which with the 10 operands loaded per step fit the 32 vector registers of
/// AVX-512 (24 accumulators would spill).
const TILE_WEIGHTS: usize = 2;
const TILE_INPUTS: usize = 8;
/// Input rows in the widest tile this CPU's registers hold: AVX-512 has 32 vector registers,
/// enough for `TILE_WEIGHTS x TILE_INPUTS` accumulators and their operands; AVX2 has 16, which
/// that many would overflow (each step would then store and reload accumulators). The tile
/// shape does not change any product's value: each keeps its own accumulator and order.
fn widest_tile() -> usize {
    #[cfg(target_arch = "x86_64")]
    if !simd::has_avx512() {
        return 4;
    }
    TILE_INPUTS
}

/// No software prefetch for tiles: each weight row is read over many multiply-adds, and the
/// hardware prefetcher keeps up (measured: no gain at 32, 64 or 128 elements ahead).
const TILE_PREFETCH: isize = 0;
/// Bytes of weight rows `FewRowProduct` multiplies against all its inputs before moving on.
const BLOCK_BYTES: usize = 256 << 10;

/// `out[m, n] = x[m, k] @ weight[n, k]^T` for a few input rows, computed by ranges of output
/// columns (weight rows) that threads may take in parallel: four weight rows at a time against
/// a single input row, tiles of dot products for several.
struct FewRowProduct<'a> {
    x: &'a RowsAlignedLike,
    weight: &'a [f32],
    out: DisjointWrites,
    m: usize,
    k: usize,
    n: usize,
    /// Where the vector steps start, the same for every row of the matrix (see `dot_tile`).
    head: usize,
    /// How a single input walks the weight rows.
    walk: Walk,
    _out: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> FewRowProduct<'a> {
    fn new(x: &'a RowsAlignedLike, weight: &'a [f32], out: &'a mut [f32], m: usize, k: usize, n: usize) -> Self {
        let head = simd::head(weight.as_ptr());
        let out = DisjointWrites(out.as_mut_ptr());
        FewRowProduct { x, weight, out, m, k, n, head, walk: Walk::STREAMING, _out: std::marker::PhantomData }
    }

    /// Columns `cols` of `out`, a block of weight rows at a time; within a block, input rows
    /// outermost so that a group of them stays in L1 while the block's weight rows stream past.
    ///
    /// # Safety
    /// Nobody else writes these columns meanwhile.
    unsafe fn columns(&self, cols: Range<usize>) {
        if cols.is_empty() {
            return;
        }
        if self.m == 1 {
            let weight = &self.weight[cols.start * self.k..cols.end * self.k];
            gemv_rows(self.x.row(0), weight, self.out.slice(cols.start, cols.len()), self.k, self.head, self.walk);
            return;
        }
        // A block of weight rows at a time stays in the core's cache while every group of inputs
        // passes over it; otherwise all of them would be read from further out once per group
        // (784 -> 512, 16 inputs: 10% faster).
        let block = (BLOCK_BYTES / (4 * self.k.max(1))).next_multiple_of(TILE_WEIGHTS).max(TILE_WEIGHTS);
        let widest = widest_tile();
        for first in cols.clone().step_by(block) {
            let block = first..(first + block).min(cols.end);
            let mut i = 0;
            while i < self.m {
                let rows = [TILE_INPUTS, 4, 2, 1].into_iter().find(|&r| r <= widest && r <= self.m - i).unwrap_or(1);
                match rows {
                    TILE_INPUTS => self.tiles::<TILE_INPUTS>(i, block.clone()),
                    4 => self.tiles::<4>(i, block.clone()),
                    2 => self.tiles::<2>(i, block.clone()),
                    _ => self.tiles::<1>(i, block.clone()),
                }
                i += rows;
            }
        }
    }

    /// `columns` for the RX input rows from `i`.
    unsafe fn tiles<const RX: usize>(&self, i: usize, cols: Range<usize>) {
        let (k, n) = (self.k, self.n);
        let inputs: [*const f32; RX] = std::array::from_fn(|c| self.x.row(i + c).as_ptr());
        let row = |j: usize| self.weight[j * k..].as_ptr();
        let mut j = cols.start;
        while j + TILE_WEIGHTS <= cols.end {
            let tile =
                dot_tile::<TILE_WEIGHTS, RX>(std::array::from_fn(|r| row(j + r)), inputs, k, self.head, TILE_PREFETCH);
            for (r, values) in tile.iter().enumerate() {
                for (c, &v) in values.iter().enumerate() {
                    *self.out.at((i + c) * n + j + r) = v;
                }
            }
            j += TILE_WEIGHTS;
        }
        for j in j..cols.end {
            let [values] = dot_tile::<1, RX>([row(j)], inputs, k, self.head, TILE_PREFETCH);
            for (c, &v) in values.iter().enumerate() {
                *self.out.at((i + c) * n + j) = v;
            }
        }
    }
}

/// Several GEMVs of the same input row in one parallel region: the weights of all of them are
/// streamed by one set of tasks (decode's q/k/v, gate/up).
pub fn linear_many(x: &[f32], k: usize, weights: &[(&[f32], usize)], outs: &mut [Vec<f32>]) {
    assert_eq!(weights.len(), outs.len());
    assert_eq!(x.len(), k);
    let per_task = gemv_rows_per_task(k);
    let mut tasks: Vec<(&[f32], &mut [f32], usize)> = Vec::new();
    for ((w, _), out) in weights.iter().zip(outs.iter_mut()) {
        let head = simd::head(w.as_ptr());
        for (i, chunk) in out.chunks_mut(per_task).enumerate() {
            let first = i * per_task;
            tasks.push((&w[first * k..(first + chunk.len()) * k], chunk, head));
        }
    }
    pool::install(|| {
        tasks.into_par_iter().for_each(|(w, chunk, head)| gemv_rows(x, w, chunk, k, head, Walk::STREAMING))
    });
}

/// The smallest chunk `claim_guided` hands out.
const GUIDED_MIN_COLUMNS: usize = 64;

/// Matrices up to this size alternate their direction from call to call (see `linear_aligned`).
const ZIGZAG_MAX_BYTES: usize = 8 << 20;

/// Multiply-adds below which `linear_few_rows` stays on the calling thread: less than the
/// cost of handing half of it to another thread.
const PARALLEL_GEMV_WORK: usize = 1 << 15;

/// `linear` for a few input rows: the weights are streamed once, the threads of the team taking
/// fixed shares of the output columns (cache-sized weights) or claiming chunks as they go (larger
/// ones), or tasks of `GEMV_BYTES_PER_TASK` inside rayon.
pub(crate) fn linear_few_rows(x: &[f32], weight: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    linear_aligned(&RowsAlignedLike::new(x, k, weight.as_ptr()), weight, out, m, k, n);
}

/// `linear_few_rows` for input rows already laid out against `weight` by `RowsAlignedLike`
/// (for callers that transform the rows as they lay them out); any number of rows.
pub fn linear_aligned(x: &RowsAlignedLike, weight: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    linear_aligned_beside(x, weight, out, m, k, n, &|| {}, 0);
}

/// `linear_aligned`, also running `beside` (work worth about `beside_work` multiply-adds, which
/// does not touch `out`) on the calling thread once its share of the product, cut to match, is
/// done: the other threads learn of the job a little later, so it tends to finish first.
#[allow(clippy::too_many_arguments)]
pub fn linear_aligned_beside(
    x: &RowsAlignedLike,
    weight: &[f32],
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    beside: &(dyn Fn() + Sync),
    beside_work: usize,
) {
    assert_eq!(weight.len(), n * k);
    assert_eq!(out.len(), m * n);
    if m == 0 {
        beside();
        return;
    }
    assert_eq!(x.row(m - 1).len(), k);
    let mut product = FewRowProduct::new(x, weight, out, m, k, n);
    // A matrix that about fills the cores' caches, read the same way on every call, misses
    // nearly everywhere (each line is evicted just before it comes round again); walking it
    // backwards every other call finds the lines the last call left. For [1536, 576] that
    // is 20% faster. A matrix far larger than the caches streams better forwards, with
    // prefetching.
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let cached = n * k * 4 <= ZIGZAG_MAX_BYTES;
    product.walk = Walk { backwards: cached && CALLS.fetch_add(1, Relaxed) % 2 == 1, prefetch: !cached };
    // SAFETY (every call below): each gets its own range of columns.
    if m * n * k < PARALLEL_GEMV_WORK {
        beside();
        unsafe { product.columns(0..n) };
        return;
    }
    let beside_columns = beside_work / (m * k).max(1);
    let claimed = AtomicUsize::new(0);
    let part = |part: usize, parts: usize| {
        if cached {
            unsafe { product.columns(team::share_lighter_first(n, 4, part, parts, beside_columns)) };
        } else {
            // Weights streamed from memory leave no cache to keep: the threads claim shrinking
            // chunks as they go, so a core that gets less bandwidth does less of the work.
            while let Some(cols) = claim_guided(&claimed, n, parts) {
                unsafe { product.columns(cols) };
            }
        }
        if part == 0 {
            beside();
        }
    };
    if team::try_run(&part) {
        return;
    }
    let per_task = gemv_rows_per_task(k);
    pool::install(|| {
        rayon::join(beside, || {
            (0..n.div_ceil(per_task))
                .into_par_iter()
                .for_each(|task| unsafe { product.columns(task * per_task..((task + 1) * per_task).min(n)) })
        })
    });
}

/// The next chunk of `0..n` for one of `parts` threads sharing it through `claimed`: half of an
/// equal share of what is left (at least `GUIDED_MIN_COLUMNS`), so early chunks are large and
/// the last ones small enough to even out the finish.
fn claim_guided(claimed: &AtomicUsize, n: usize, parts: usize) -> Option<Range<usize>> {
    let mut start = claimed.load(Relaxed);
    loop {
        if start >= n {
            return None;
        }
        let size = ((n - start) / (2 * parts)).next_multiple_of(4).max(GUIDED_MIN_COLUMNS);
        let end = (start + size).min(n);
        match claimed.compare_exchange_weak(start, end, Relaxed, Relaxed) {
            Ok(_) => return Some(start..end),
            Err(now) => start = now,
        }
    }
}

/// `linear_aligned` on the calling thread alone, for callers that share out the work themselves.
pub fn linear_aligned_serial(x: &RowsAlignedLike, weight: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    assert_eq!(weight.len(), n * k);
    assert_eq!(out.len(), m * n);
    if m > 0 {
        assert_eq!(x.row(m - 1).len(), k);
        // SAFETY: all of `out` belongs to this call.
        unsafe { FewRowProduct::new(x, weight, out, m, k, n).columns(0..n) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::linear;
    use crate::kernels::matmul::tests::{naive_linear, values};

    #[test]
    fn few_row_products_match_naive_at_every_alignment_and_split() {
        // Large enough for the team (or the pool), with row counts that leave remainders after
        // the 8-row tiles, weights starting off a cache line (the head), and k not a multiple
        // of 16; one thread's answer must equal the split one's bit for bit, and one call's the
        // next one's.
        // The last two are larger than ZIGZAG_MAX_BYTES: the threads claim chunks as they go.
        for &(m, k, n) in
            &[(1, 576, 1536), (1, 100, 1027), (13, 200, 301), (64, 784, 96), (1, 576, 4100), (3, 300, 7010)]
        {
            let x = values(m * k, 4.0);
            let storage = values(n * k + 3, 5.0);
            for offset in [0, 1, 3] {
                let w = &storage[offset..offset + n * k];
                let mut split = vec![0.0; m * n];
                linear(&x, w, None, &mut split, m, k, n);
                // The next call walks the rows the other way (see `linear_aligned`).
                let mut again = vec![0.0; m * n];
                linear(&x, w, None, &mut again, m, k, n);
                assert_eq!(split, again, "{m}x{k}x{n}: forwards and backwards differ");
                let mut single = vec![0.0; m * n];
                linear_aligned_serial(&RowsAlignedLike::new(&x, k, w.as_ptr()), w, &mut single, m, k, n);
                assert_eq!(split, single, "{m}x{k}x{n} at offset {offset}");
                for (a, b) in split.iter().zip(naive_linear(&x, w, m, k, n)) {
                    assert!((a - b).abs() < 1e-3, "{m}x{k}x{n}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn a_rows_product_does_not_depend_on_the_rows_beside_it() {
        // Tiles of 8, 4, 2 and 1 input rows, and the single-row GEMV: an f32 model's step must
        // give a sequence the same numbers whatever else shares the step.
        let (k, n) = (200, 37);
        let w = values(n * k, 5.0);
        for m in [3, 7, 13, 64] {
            let x = values(m * k, 4.0);
            let mut all = vec![0.0; m * n];
            linear(&x, &w, None, &mut all, m, k, n);
            for i in 0..m {
                let mut alone = vec![0.0; n];
                linear(&x[i * k..(i + 1) * k], &w, None, &mut alone, 1, k, n);
                assert_eq!(&all[i * n..(i + 1) * n], &alone[..], "row {i} of {m}");
            }
        }
    }

    #[test]
    fn guided_claims_cover_the_columns_once_in_shrinking_chunks() {
        let claimed = AtomicUsize::new(0);
        let chunks: Vec<Range<usize>> = std::iter::from_fn(|| claim_guided(&claimed, 10_000, 2)).collect();
        assert_eq!(chunks.iter().flat_map(|c| c.clone()).collect::<Vec<_>>(), (0..10_000).collect::<Vec<_>>());
        assert_eq!(chunks[0], 0..2500);
        assert!(chunks.windows(2).all(|w| w[1].len() <= w[0].len()));
        assert!(chunks[..chunks.len() - 1].iter().all(|c| c.len() >= GUIDED_MIN_COLUMNS));
    }
}
