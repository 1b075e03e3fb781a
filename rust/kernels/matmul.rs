//! Matrix products on `gemm`, and `linear`, which picks a kernel by the number of input rows:
//! a few rows stream the weights (`few_rows`), more go to GEMM.

use rayon::prelude::*;

use super::few_rows::linear_few_rows;
use super::pool::{self, DisjointWrites};

/// Up to this many input rows `linear` streams the weights (`few_rows`) instead of calling GEMM.
const FEW_ROWS_MAX: usize = 64;

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
pub(crate) unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_row_stride: usize,
    dst_col_stride: usize,
    lhs: View,
    rhs: View,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_col_stride as isize,
        dst_row_stride as isize,
        false,
        lhs.ptr,
        lhs.col_stride as isize,
        lhs.row_stride as isize,
        rhs.ptr,
        rhs.col_stride as isize,
        rhs.row_stride as isize,
        0.0,
        1.0,
        false,
        false,
        false,
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
unsafe fn linear_gemm(
    x: *const f32,
    weight_rows: *const f32,
    out_cols: *mut f32,
    m: usize,
    k: usize,
    cols: usize,
    n: usize,
    par: gemm::Parallelism,
) {
    gemm_into(
        cols,
        m,
        k,
        out_cols,
        1,
        n,
        View { ptr: weight_rows, row_stride: k, col_stride: 1 },
        View { ptr: x, row_stride: 1, col_stride: k },
        par,
    );
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
    let mut run = || unsafe {
        gemm_into(m, n, k, out.as_mut_ptr(), n, 1, lhs, View { ptr: b.as_ptr(), row_stride: n, col_stride: 1 }, par)
    };
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
    pool::install(|| {
        (0..n.div_ceil(per_task)).into_par_iter().for_each(|task| {
            let first = task * per_task;
            let cols = per_task.min(n - first);
            // SAFETY: the column range lies inside `out` and belongs to this task alone.
            unsafe {
                linear_gemm(
                    x.as_ptr(),
                    weight.as_ptr().add(first * k),
                    dst.at(first),
                    m,
                    k,
                    cols,
                    n,
                    gemm::Parallelism::None,
                );
            }
        })
    });
}

/// `out[m, n] = x[m, k] @ weight[n, k]^T (+ bias[n])`: PyTorch's `nn.Linear`.
pub fn linear(x: &[f32], weight: &[f32], bias: Option<&[f32]>, out: &mut [f32], m: usize, k: usize, n: usize) {
    assert_eq!(x.len(), m * k);
    assert_eq!(weight.len(), n * k);
    assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if m <= FEW_ROWS_MAX || k == 0 {
        linear_few_rows(x, weight, out, m, k, n);
    } else if m <= SPLIT_COLUMNS_MAX_ROWS {
        linear_split_columns(x, weight, out, m, k, n);
    } else {
        // SAFETY: the pointers describe the buffers checked above.
        pool::install(|| unsafe {
            linear_gemm(x.as_ptr(), weight.as_ptr(), out.as_mut_ptr(), m, k, n, n, gemm::Parallelism::Rayon(0))
        });
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `linear` without bias, summed in f64 one output at a time.
    pub(crate) fn naive_linear(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    /// `len` deterministic values in [-1, 1].
    pub(crate) fn values(len: usize, salt: f32) -> Vec<f32> {
        (0..len).map(|i| ((i as f32 + salt) * 0.713).sin()).collect()
    }

    #[test]
    fn linear_matches_naive_on_every_path() {
        // few rows (<= 64), split columns (65..=256 rows), threaded GEMM (> 256 rows)
        let shapes = [
            (1, 37, 130),
            (3, 64, 65),
            (9, 33, 17),
            (40, 100, 70),
            (65, 48, 130),
            (200, 70, 257),
            (256, 16, 64),
            (257, 40, 90),
            (600, 33, 129),
        ];
        for &(m, k, n) in &shapes {
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
