//! Matrix products. GEMM comes from the `gemm` crate; the matrix-vector case (decode, where
//! the weights are read once per token and memory bandwidth is the limit) is ours: every
//! weight row is streamed once, in parallel, against all the (few) input rows.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use rayon::prelude::*;

use super::pool;
use super::simd::{self, dot_tile, RowsAlignedLike};
use super::team;

/// Below this many input rows `linear` streams the weights row by row instead of calling GEMM.
const GEMV_MAX_ROWS: usize = 64;
/// Bytes of weights per parallel task in the streaming path: small enough that every matrix of
/// a small model splits evenly over the threads, large enough that scheduling stays cheap.
const GEMV_BYTES_PER_TASK: usize = 64 * 1024;

/// Weight rows per task for rows of length k: a multiple of 4 (the kernel's row block).
fn gemv_rows_per_task(k: usize) -> usize {
    (GEMV_BYTES_PER_TASK / (4 * k.max(1))).div_ceil(4).max(1) * 4
}

/// A pointer into an output buffer that parallel tasks share, each writing only its own
/// disjoint part (columns of a product, heads of an attention output).
pub(crate) struct DisjointWrites<T = f32>(pub *mut T);
// SAFETY: users write disjoint ranges only; the buffer outlives the parallel region.
unsafe impl<T> Sync for DisjointWrites<T> {}

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

/// A matrix operand for `gemm`: element (row, col) sits at `ptr + row * row_stride + col * col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct View {
    pub ptr: *const f32,
    pub row_stride: usize,
    pub col_stride: usize,
}
// SAFETY: a view only reads, and its users keep the memory alive while they hold it.
unsafe impl Send for View {}
unsafe impl Sync for View {}

/// `dst[m, n] = lhs[m, k] @ rhs[k, n]` on strided views, the one place that calls `gemm`.
///
/// # Safety
/// Every view must address valid memory over its whole extent, `dst` must be writable there
/// and must not overlap the inputs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into(m: usize, n: usize, k: usize, dst: *mut f32, dst_row_stride: usize, dst_col_stride: usize,
                    lhs: View, rhs: View, par: gemm::Parallelism) {
    gemm::gemm(
        m, n, k,
        dst, dst_col_stride as isize, dst_row_stride as isize, false,
        lhs.ptr, lhs.col_stride as isize, lhs.row_stride as isize,
        rhs.ptr, rhs.col_stride as isize, rhs.row_stride as isize,
        0.0, 1.0, false, false, false,
        par,
    );
}

/// `out[:, first..first + cols] = x[m, k] @ weight_rows[cols, k]^T`, where `out` rows have
/// length `n`: computed as out^T = weight_rows @ x^T so that both inputs are read along rows.
///
/// # Safety
/// `x` holds m*k values, `weight_rows` cols*k, and `out_cols` points at column `first` of an
/// `[m, n]` buffer with `first + cols <= n`, owned by the caller for those columns.
#[allow(clippy::too_many_arguments)]
unsafe fn linear_gemm(x: *const f32, weight_rows: *const f32, out_cols: *mut f32, m: usize, k: usize, cols: usize,
                      n: usize, par: gemm::Parallelism) {
    gemm_into(cols, m, k, out_cols, 1, n,
              View { ptr: weight_rows, row_stride: k, col_stride: 1 },
              View { ptr: x, row_stride: 1, col_stride: k }, par);
}

/// `out[m, n] = a[m, k] @ b[k, n]`, all row-major.
pub fn matmul(a: &[f32], b: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    matmul_with(a, b, out, m, k, n, gemm::Parallelism::Rayon(0));
}

/// `matmul` with the threading chosen by the caller.
pub fn matmul_with(a: &[f32], b: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, par: gemm::Parallelism) {
    product(a, View { ptr: a.as_ptr(), row_stride: k, col_stride: 1 }, b, out, m, k, n, par);
}

/// `out[m, n] = a[k, m]^T @ b[k, n]` (a weight gradient: output gradients^T times inputs).
pub fn matmul_tn(a: &[f32], b: &[f32], out: &mut [f32], k: usize, m: usize, n: usize, par: gemm::Parallelism) {
    product(a, View { ptr: a.as_ptr(), row_stride: 1, col_stride: m }, b, out, m, k, n, par);
}

/// Multiply-adds below which `product` stays on the calling thread.
const PARALLEL_PRODUCT_WORK: usize = 1 << 20;

/// `out[m, n] = lhs[m, k] @ b[k, n]`, where `lhs` views the m*k values of `a`.
#[allow(clippy::too_many_arguments)]
fn product(a: &[f32], lhs: View, b: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, par: gemm::Parallelism) {
    assert!(a.len() == m * k && b.len() == k * n && out.len() == m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    // Handing a product this small to the pool costs more than it saves.
    let par = if m * n * k < PARALLEL_PRODUCT_WORK { gemm::Parallelism::None } else { par };
    // SAFETY: `lhs` views `a` (checked above) and b is row-major [k, n].
    let mut run = || unsafe { gemm_into(m, n, k, out.as_mut_ptr(), n, 1, lhs, View { ptr: b.as_ptr(), row_stride: n, col_stride: 1 }, par) };
    match par {
        gemm::Parallelism::None => run(),
        _ => pool::install(run),
    }
}

/// Up to this many input rows `linear` splits the weight rows over the threads itself, each
/// running a single-threaded GEMM: measured here, gemm's own threading is slower than one
/// thread for such shapes (32 x 784 x 512: 630 us threaded, 306 us on one thread).
const SPLIT_COLUMNS_MAX_ROWS: usize = 256;
/// Weight rows per task when splitting columns (a multiple of gemm's register tile).
const SPLIT_COLUMNS_MIN_ROWS: usize = 64;

fn linear_split_columns(x: &[f32], weight: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    let threads = pool::pool().current_num_threads().max(1);
    let per_task = n.div_ceil(threads).div_ceil(SPLIT_COLUMNS_MIN_ROWS).max(1) * SPLIT_COLUMNS_MIN_ROWS;
    let dst = DisjointWrites(out.as_mut_ptr());
    pool::install(|| (0..n.div_ceil(per_task)).into_par_iter().for_each(|task| {
        let first = task * per_task;
        let cols = per_task.min(n - first);
        // SAFETY: the column range lies inside `out` and belongs to this task alone.
        unsafe {
            linear_gemm(x.as_ptr(), weight.as_ptr().add(first * k), dst.at(first), m, k, cols, n, gemm::Parallelism::None);
        }
    }));
}

/// `out[m, n] = x[m, k] @ weight[n, k]^T (+ bias[n])`: PyTorch's `nn.Linear`.
pub fn linear(x: &[f32], weight: &[f32], bias: Option<&[f32]>, out: &mut [f32], m: usize, k: usize, n: usize) {
    assert_eq!(x.len(), m * k);
    assert_eq!(weight.len(), n * k);
    assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if m <= GEMV_MAX_ROWS || k == 0 {
        linear_few_rows(x, weight, out, m, k, n);
    } else if m <= SPLIT_COLUMNS_MAX_ROWS {
        linear_split_columns(x, weight, out, m, k, n);
    } else {
        // SAFETY: the pointers describe the buffers checked above.
        pool::install(|| unsafe { linear_gemm(x.as_ptr(), weight.as_ptr(), out.as_mut_ptr(), m, k, n, n, gemm::Parallelism::Rayon(0)) });
    }
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n);
        for row in out.chunks_exact_mut(n) {
            for (o, b) in row.iter_mut().zip(bias) {
                *o += b;
            }
        }
    }
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
        for first in cols.clone().step_by(block) {
            let block = first..(first + block).min(cols.end);
            let mut i = 0;
            while i < self.m {
                let rows = [TILE_INPUTS, 4, 2, 1].into_iter().find(|&r| r <= self.m - i).unwrap_or(1);
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
            let tile = dot_tile::<TILE_WEIGHTS, RX>(std::array::from_fn(|r| row(j + r)), inputs, k, self.head, TILE_PREFETCH);
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

/// Several `linear`s of the same input in one parallel region: for decode-sized inputs the
/// weights of all of them are streamed by one set of tasks (q/k/v, gate/up).
pub fn linear_many(x: &[f32], m: usize, k: usize, weights: &[(&[f32], usize)], outs: &mut [Vec<f32>]) {
    assert_eq!(weights.len(), outs.len());
    if m != 1 {
        for ((w, n), out) in weights.iter().zip(outs.iter_mut()) {
            linear(x, w, None, out, m, k, *n);
        }
        return;
    }
    let per_task = gemv_rows_per_task(k);
    let mut tasks: Vec<(&[f32], &mut [f32], usize)> = Vec::new();
    for ((w, _), out) in weights.iter().zip(outs.iter_mut()) {
        let head = simd::head(w.as_ptr());
        for (i, chunk) in out.chunks_mut(per_task).enumerate() {
            let first = i * per_task;
            tasks.push((&w[first * k..(first + chunk.len()) * k], chunk, head));
        }
    }
    pool::install(|| tasks.into_par_iter().for_each(|(w, chunk, head)| gemv_rows(x, w, chunk, k, head, Walk::STREAMING)));
}

/// The smallest chunk `claim_guided` hands out.
const GUIDED_MIN_COLUMNS: usize = 64;

/// Matrices up to this size alternate their direction from call to call (see `linear_aligned`).
const ZIGZAG_MAX_BYTES: usize = 8 << 20;

/// Multiply-adds below which `linear_few_rows` stays on the calling thread: less than the
/// cost of handing half of it to another thread.
const PARALLEL_GEMV_WORK: usize = 1 << 15;

/// `linear` for a few input rows: the weights are streamed once, each thread taking a fixed
/// share of the output columns (see `team`), or tasks of `GEMV_BYTES_PER_TASK` inside rayon.
fn linear_few_rows(x: &[f32], weight: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
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
pub fn linear_aligned_beside(x: &RowsAlignedLike, weight: &[f32], out: &mut [f32], m: usize, k: usize, n: usize,
                             beside: &(dyn Fn() + Sync), beside_work: usize) {
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

    fn naive_linear(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    fn values(len: usize, salt: f32) -> Vec<f32> {
        (0..len).map(|i| ((i as f32 + salt) * 0.713).sin()).collect()
    }

    #[test]
    fn linear_matches_naive_on_both_paths() {
        for &(m, k, n) in &[(1, 37, 130), (3, 64, 65), (9, 33, 17), (40, 100, 70)] {
            let x = values(m * k, 1.0);
            let w = values(n * k, 2.0);
            let bias = values(n, 3.0);
            let mut out = vec![0.0; m * n];
            linear(&x, &w, Some(&bias), &mut out, m, k, n);
            let mut expect = naive_linear(&x, &w, m, k, n);
            for i in 0..m {
                for j in 0..n {
                    expect[i * n + j] += bias[j];
                }
            }
            for (a, b) in out.iter().zip(&expect) {
                assert!((a - b).abs() < 1e-4, "{m}x{k}x{n}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn few_row_products_match_naive_at_every_alignment_and_split() {
        // Large enough for the team (or the pool), with row counts that leave remainders after
        // the 8-row tiles, weights starting off a cache line (the head), and k not a multiple
        // of 16; one thread's answer must equal the split one's bit for bit, and one call's the
        // next one's.
        // The last two are larger than ZIGZAG_MAX_BYTES: the threads claim chunks as they go.
        for &(m, k, n) in &[(1, 576, 1536), (1, 100, 1027), (13, 200, 301), (64, 784, 96), (1, 576, 4100), (3, 300, 7010)] {
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
    fn guided_claims_cover_the_columns_once_in_shrinking_chunks() {
        let claimed = AtomicUsize::new(0);
        let chunks: Vec<Range<usize>> = std::iter::from_fn(|| claim_guided(&claimed, 10_000, 2)).collect();
        assert_eq!(chunks.iter().flat_map(|c| c.clone()).collect::<Vec<_>>(), (0..10_000).collect::<Vec<_>>());
        assert_eq!(chunks[0], 0..2500);
        assert!(chunks.windows(2).all(|w| w[1].len() <= w[0].len()));
        assert!(chunks[..chunks.len() - 1].iter().all(|c| c.len() >= GUIDED_MIN_COLUMNS));
    }

    #[test]
    fn matmul_matches_linear_with_transposed_weight() {
        let (m, k, n) = (12, 20, 7);
        let a = values(m * k, 0.5);
        let b = values(k * n, 1.5);
        let mut bt = vec![0.0; n * k];
        for p in 0..k {
            for j in 0..n {
                bt[j * k + p] = b[p * n + j];
            }
        }
        let mut out = vec![0.0; m * n];
        matmul(&a, &b, &mut out, m, k, n);
        let expect = naive_linear(&a, &bt, m, k, n);
        for (x, y) in out.iter().zip(&expect) {
            assert!((x - y).abs() < 1e-4);
        }
    }
}
