//! Matrix products. GEMM comes from the `gemm` crate; the matrix-vector case (decode, where
//! the weights are read once per token and memory bandwidth is the limit) is ours: every
//! weight row is streamed once, in parallel, against all the (few) input rows.

use rayon::prelude::*;

use super::simd::{dot, dot4};

/// Below this many input rows `linear` streams the weights row by row instead of calling GEMM.
const GEMV_MAX_ROWS: usize = 8;
/// Bytes of weights per parallel task in the streaming path: small enough that every matrix of
/// a small model splits evenly over the threads, large enough that scheduling stays cheap.
const GEMV_BYTES_PER_TASK: usize = 64 * 1024;

/// Weight rows per task for rows of length k: a multiple of 4 (the kernel's row block).
fn gemv_rows_per_task(k: usize) -> usize {
    (GEMV_BYTES_PER_TASK / (4 * k.max(1))).div_ceil(4).max(1) * 4
}

/// `out[m, n] = a[m, k] @ b[k, n]`, all row-major.
pub fn matmul(a: &[f32], b: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    matmul_with(a, b, out, m, k, n, gemm::Parallelism::Rayon(0));
}

/// `matmul` with the threading chosen by the caller.
pub fn matmul_with(a: &[f32], b: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, par: gemm::Parallelism) {
    assert_eq!(a.len(), m * k);
    assert_eq!(b.len(), k * n);
    assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    // SAFETY: the pointers and strides describe the three buffers checked above.
    unsafe {
        gemm::gemm(
            m, n, k,
            out.as_mut_ptr(), 1, n as isize, false,
            a.as_ptr(), 1, k as isize,
            b.as_ptr(), 1, n as isize,
            0.0, 1.0, false, false, false,
            par,
        );
    }
}

/// `out[m, n] = a[k, m]^T @ b[k, n]` (a weight gradient: output gradients^T times inputs).
pub fn matmul_tn(a: &[f32], b: &[f32], out: &mut [f32], k: usize, m: usize, n: usize, par: gemm::Parallelism) {
    assert_eq!(a.len(), k * m);
    assert_eq!(b.len(), k * n);
    assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    // SAFETY: a^T is a read with column stride m and row stride 1; the rest as in `matmul`.
    unsafe {
        gemm::gemm(
            m, n, k,
            out.as_mut_ptr(), 1, n as isize, false,
            a.as_ptr(), m as isize, 1,
            b.as_ptr(), 1, n as isize,
            0.0, 1.0, false, false, false,
            par,
        );
    }
}

/// Up to this many input rows `linear` splits the weight rows over the threads itself, each
/// running a single-threaded GEMM: measured here, gemm's own threading is slower than one
/// thread for such shapes (32 x 784 x 512: 630 us threaded, 306 us on one thread).
const SPLIT_COLUMNS_MAX_ROWS: usize = 256;
/// Weight rows per task when splitting columns (a multiple of gemm's register tile).
const SPLIT_COLUMNS_MIN_ROWS: usize = 64;

fn linear_split_columns(x: &[f32], weight: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    struct Columns(*mut f32);
    // SAFETY: tasks write disjoint column ranges of `out`.
    unsafe impl Sync for Columns {}
    impl Columns {
        fn at(&self, j: usize) -> *mut f32 {
            self.0.wrapping_add(j)
        }
    }
    let threads = rayon::current_num_threads().max(1);
    let per_task = n.div_ceil(threads).div_ceil(SPLIT_COLUMNS_MIN_ROWS).max(1) * SPLIT_COLUMNS_MIN_ROWS;
    let dst = Columns(out.as_mut_ptr());
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|task| {
        let first = task * per_task;
        let cols = per_task.min(n - first);
        // out^T[first..first+cols, :] = weight[first..first+cols, :] @ x^T, into out's columns.
        // SAFETY: the column range lies inside `out` and belongs to this task alone.
        unsafe {
            gemm::gemm(
                cols, m, k,
                dst.at(first), n as isize, 1, false,
                weight.as_ptr().add(first * k), 1, k as isize,
                x.as_ptr(), k as isize, 1,
                0.0, 1.0, false, false, false,
                gemm::Parallelism::None,
            );
        }
    });
}

/// `out[m, n] = x[m, k] @ weight[n, k]^T` on the calling thread (callers that already run one
/// task per thread, or have too little work to wake the pool).
pub fn linear_single_thread(x: &[f32], weight: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    assert_eq!(x.len(), m * k);
    assert_eq!(weight.len(), n * k);
    assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if m <= GEMV_MAX_ROWS {
        for (row, xi) in out.chunks_exact_mut(n).zip(x.chunks_exact(k)) {
            gemv_rows(xi, weight, row, k);
        }
        return;
    }
    // SAFETY: as in `linear`.
    unsafe {
        gemm::gemm(
            n, m, k,
            out.as_mut_ptr(), n as isize, 1, false,
            weight.as_ptr(), 1, k as isize,
            x.as_ptr(), k as isize, 1,
            0.0, 1.0, false, false, false,
            gemm::Parallelism::None,
        );
    }
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
        linear_streaming(x, weight, out, m, k, n);
    } else if m <= SPLIT_COLUMNS_MAX_ROWS {
        linear_split_columns(x, weight, out, m, k, n);
    } else {
        // Computed as out^T [n, m] = weight [n, k] @ x^T [k, m], written straight into the
        // row-major `out` (column stride n): both inputs are then read along their rows.
        // SAFETY: the pointers and strides describe the buffers checked above.
        unsafe {
            gemm::gemm(
                n, m, k,
                out.as_mut_ptr(), n as isize, 1, false,
                weight.as_ptr(), 1, k as isize,
                x.as_ptr(), k as isize, 1,
                0.0, 1.0, false, false, false,
                gemm::Parallelism::Rayon(0),
            );
        }
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

/// `out[j] = dot(x, weight row j)` for the rows of `weight` (`[out.len(), k]`), four at a time.
fn gemv_rows(x: &[f32], weight: &[f32], out: &mut [f32], k: usize) {
    let full = out.len() / 4 * 4;
    for j in (0..full).step_by(4) {
        let row = |r: usize| &weight[(j + r) * k..(j + r + 1) * k];
        out[j..j + 4].copy_from_slice(&dot4(x, [row(0), row(1), row(2), row(3)]));
    }
    for j in full..out.len() {
        out[j] = dot(x, &weight[j * k..(j + 1) * k]);
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
    let mut tasks: Vec<(&[f32], &mut [f32])> = Vec::new();
    for ((w, _), out) in weights.iter().zip(outs.iter_mut()) {
        for (i, chunk) in out.chunks_mut(per_task).enumerate() {
            let first = i * per_task;
            tasks.push((&w[first * k..(first + chunk.len()) * k], chunk));
        }
    }
    tasks.into_par_iter().for_each(|(w, chunk)| gemv_rows(x, w, chunk, k));
}

fn linear_streaming(x: &[f32], weight: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    let per_task = gemv_rows_per_task(k);
    if m == 1 {
        out.par_chunks_mut(per_task).enumerate().for_each(|(task, chunk)| {
            let first = task * per_task;
            gemv_rows(x, &weight[first * k..(first + chunk.len()) * k], chunk, k);
        });
        return;
    }
    // Several input rows: compute a block of output columns for all of them, reading each
    // weight row once, then scatter into the row-major output.
    let blocks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(per_task))
        .into_par_iter()
        .map(|task| {
            let first = task * per_task;
            let last = (first + per_task).min(n);
            let mut block = vec![0.0f32; (last - first) * m];
            for j in first..last {
                let row = &weight[j * k..(j + 1) * k];
                for i in 0..m {
                    block[(j - first) * m + i] = dot(&x[i * k..(i + 1) * k], row);
                }
            }
            (first, block)
        })
        .collect();
    for (first, block) in blocks {
        let cols = block.len() / m;
        for jj in 0..cols {
            for i in 0..m {
                out[i * n + first + jj] = block[jj * m + i];
            }
        }
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
