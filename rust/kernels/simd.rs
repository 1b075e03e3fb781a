//! The inner loops everything hot reduces to: a dot product, a tile of dot products and
//! `y += a * x`.
//!
//! Each has a portable version and an AVX2+FMA version chosen at run time, so one wheel runs
//! everywhere and still uses the vector units where they exist.

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { x86::dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// The RW x RX dot products of `RW` weight rows with `RX` input rows (all of length `k`):
/// `out[r][c] = dot(w[r], x[c])`. Each loaded vector of a weight row serves RX inputs and each
/// vector of an input row serves RW weight rows, so a small batch against a weight matrix runs
/// at the multiply-add rate rather than the load rate; with RX = 1 and four rows it is the GEMV
/// kernel, whose four streams keep more memory requests in flight than one.
///
/// `head` (see `head`) sets where the full vector steps start. Products of one matrix must pass
/// the same `head` for all its rows, so that a row's sum does not depend on which tile or
/// thread computed it. `prefetch` is how many elements ahead to prefetch the weight rows
/// (negative: behind, for a caller walking the rows backwards; 0: none).
///
/// # Safety
/// Every pointer must address `k` readable floats.
#[inline]
pub unsafe fn dot_tile<const RW: usize, const RX: usize>(
    w: [*const f32; RW],
    x: [*const f32; RX],
    k: usize,
    head: usize,
    prefetch: isize,
) -> [[f32; RX]; RW] {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            // SAFETY: the CPU supports the features the function is compiled for.
            return x86::dot_tile_avx512(w, x, k, head.min(k), prefetch);
        }
        if has_avx2_fma() {
            // SAFETY: as above.
            return x86::dot_tile_avx2(w, x, k);
        }
    }
    let slice = |p: *const f32| std::slice::from_raw_parts(p, k);
    w.map(|wr| x.map(|xc| dot_portable(slice(wr), slice(xc))))
}

/// Rows of `k` floats copied so that each starts at the same place within a 64-byte cache line
/// as `like` (a weight matrix): with the matching `head`, the vector kernels then read both
/// operands in whole cache lines. A 64-byte load across two lines costs two, which halves the
/// throughput of a kernel that loads as much as it multiplies.
pub struct RowsAlignedLike {
    buf: Vec<f32>,
    start: usize,
    stride: usize,
    k: usize,
}

impl RowsAlignedLike {
    pub fn new(x: &[f32], k: usize, like: *const f32) -> Self {
        Self::map(x, k, like, |src, dst| dst.copy_from_slice(src))
    }

    /// `new`, with each row written by `f(source row, destination row)` (a copy in `new`).
    pub fn map(x: &[f32], k: usize, like: *const f32, f: impl Fn(&[f32], &mut [f32])) -> Self {
        let stride = k.next_multiple_of(16);
        let rows = x.len().checked_div(k).unwrap_or(0);
        let mut buf = vec![0.0f32; rows * stride + 16];
        let lane = |p: *const f32| (p as usize % 64) / 4;
        let start = (lane(like) + 16 - lane(buf.as_ptr())) % 16;
        for (r, row) in x.chunks_exact(k.max(1)).enumerate() {
            f(row, &mut buf[start + r * stride..][..k]);
        }
        RowsAlignedLike { buf, start, stride, k }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.buf[self.start + r * self.stride..][..self.k]
    }
}

/// Elements before `p` (a matrix) reaches a 64-byte boundary: the `head` of `dot_tile`.
#[inline]
pub fn head(p: *const f32) -> usize {
    p.align_offset(64).min(15)
}

#[cfg(target_arch = "x86_64")]
#[inline]
pub fn has_avx512() -> bool {
    std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl")
}

#[cfg(target_arch = "x86_64")]
#[inline]
pub fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// The sum of `a` in sixteen independent lanes, so it vectorizes (a plain left-to-right sum is
/// one chain of dependent adds). Inlined into a `dispatch!` kernel, it uses that kernel's vectors.
#[inline(always)]
pub fn sum(a: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let mut chunks = a.chunks_exact(16);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Eight independent accumulators, so the compiler can keep them in one vector register (inlined
/// into callers compiled for a vector unit, such as `attention`'s `dispatch!`ed loop).
#[inline(always)]
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b[..a.len()].chunks_exact(8));
    let (a_tail, b_tail) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * y;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The sum of the eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum256(a: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut acc2 = _mm256_setzero_ps();
        let mut acc3 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 32 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), acc1);
            acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 16)), _mm256_loadu_ps(pb.add(i + 16)), acc2);
            acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 24)), _mm256_loadu_ps(pb.add(i + 24)), acc3);
            i += 32;
        }
        while i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            i += 8;
        }
        let mut sum = hsum256(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
        while i < n {
            sum += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_tile_avx2<const RW: usize, const RX: usize>(
        w: [*const f32; RW],
        x: [*const f32; RX],
        k: usize,
    ) -> [[f32; RX]; RW] {
        let mut acc = [[_mm256_setzero_ps(); RX]; RW];
        let mut i = 0;
        while i + 8 <= k {
            let wv = w.map(|p| _mm256_loadu_ps(p.add(i)));
            for c in 0..RX {
                let xv = _mm256_loadu_ps(x[c].add(i));
                for r in 0..RW {
                    acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
                }
            }
            i += 8;
        }
        let mut out = [[0.0f32; RX]; RW];
        for r in 0..RW {
            for c in 0..RX {
                out[r][c] = hsum256(acc[r][c]);
                for j in i..k {
                    out[r][c] += *w[r].add(j) * *x[c].add(j);
                }
            }
        }
        out
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_tile_avx512<const RW: usize, const RX: usize>(
        w: [*const f32; RW],
        x: [*const f32; RX],
        k: usize,
        head: usize,
        prefetch: isize,
    ) -> [[f32; RX]; RW] {
        let mut acc = [[_mm512_setzero_ps(); RX]; RW];
        let mut step = |i: usize, mask: __mmask16| {
            for p in w.iter().filter(|_| prefetch != 0) {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_offset(i as isize + prefetch) as *const i8);
            }
            let wv = w.map(|p| _mm512_maskz_loadu_ps(mask, p.add(i)));
            for c in 0..RX {
                let xv = _mm512_maskz_loadu_ps(mask, x[c].add(i));
                for r in 0..RW {
                    acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
                }
            }
        };
        if head > 0 {
            step(0, (1u16 << head) - 1);
        }
        let mut i = head;
        while i + 16 <= k {
            step(i, u16::MAX);
            i += 16;
        }
        if i < k {
            step(i, (1u16 << (k - i)) - 1);
        }
        if RW * RX == 16 {
            let sums = reduce16(std::array::from_fn(|a| acc[a / RX][a % RX]));
            return std::array::from_fn(|r| std::array::from_fn(|c| sums[r * RX + c]));
        }
        acc.map(|row| row.map(|a| _mm512_reduce_add_ps(a)))
    }

    /// The horizontal sums of sixteen vectors at once: 15 shuffles of pairs and 15 adds instead
    /// of sixteen separate reductions. The additions follow `_mm512_reduce_add_ps`'s tree
    /// exactly (halves of 256, of 128, then elements 2 apart, then 1 apart), so every sum equals
    /// the one reduction would give, whatever the tile shape.
    #[cfg(test)]
    pub unsafe fn reduce16_for_test(v: [__m512; 16]) -> [f32; 16] {
        reduce16(v)
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn reduce16(v: [__m512; 16]) -> [f32; 16] {
        // Lane groups of 128 bits: [x0 + x2, x1 + x3, y0 + y2, y1 + y3] for each pair (x, y).
        let v: [__m512; 8] = std::array::from_fn(|k| {
            let (x, y) = (v[2 * k], v[2 * k + 1]);
            _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(x, y), _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y))
        });
        // Group g of w[k] now holds the four partial sums of vector 4 k + g.
        let w: [__m512; 4] = std::array::from_fn(|k| {
            let (a, b) = (v[2 * k], v[2 * k + 1]);
            _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b))
        });
        // Within each group: elements 2 apart, then 1 apart.
        let u: [__m512; 2] = std::array::from_fn(|k| {
            let (a, b) = (w[2 * k], w[2 * k + 1]);
            _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(a, b), _mm512_shuffle_ps::<0b11_10_11_10>(a, b))
        });
        let z = _mm512_add_ps(
            _mm512_shuffle_ps::<0b10_00_10_00>(u[0], u[1]),
            _mm512_shuffle_ps::<0b11_01_11_01>(u[0], u[1]),
        );
        // Lane 4 g + j of z is the sum of vector 4 j + g.
        let mut lanes = [0.0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), z);
        std::array::from_fn(|a| lanes[4 * (a % 4) + a / 4])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_portable_for_every_tail_length() {
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - exact).abs() < 1e-4, "n = {n}");
            assert!((dot_portable(&a, &b) as f64 - exact).abs() < 1e-4, "n = {n}");
        }
    }

    #[test]
    fn dot_tile_matches_dot_for_every_length_and_head() {
        for n in 0..40 {
            let rows: Vec<Vec<f32>> =
                (0..5).map(|r| (0..n).map(|i| ((i * 7 + r) as f32 * 0.3).sin()).collect()).collect();
            let w = [rows[0].as_ptr(), rows[1].as_ptr(), rows[2].as_ptr()];
            let x = [rows[3].as_ptr(), rows[4].as_ptr()];
            for head in [0, 3, 15] {
                // SAFETY: every row holds n floats.
                let got = unsafe { dot_tile::<3, 2>(w, x, n, head, 64) };
                for r in 0..3 {
                    for c in 0..2 {
                        assert!((got[r][c] - dot_portable(&rows[r], &rows[3 + c])).abs() < 1e-4, "n = {n}");
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore = "needs AVX-512F/VL: make test runs it where /proc/cpuinfo lists them"]
    fn avx512_sixteen_sums_at_once_equal_sixteen_reductions() {
        use std::arch::x86_64::*;
        assert!(has_avx512(), "this CPU has no AVX-512F/VL: the test cannot run here");
        let values: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 * 0.731).sin() * 1e3_f32.powi(i % 3)).collect();
        // SAFETY: the CPU has AVX-512 (checked above); each load reads 16 of the 256 values.
        let (got, want) = unsafe {
            let v: [__m512; 16] = std::array::from_fn(|a| _mm512_loadu_ps(values[16 * a..].as_ptr()));
            (x86::reduce16_for_test(v), v.map(|x| _mm512_reduce_add_ps(x)))
        };
        assert_eq!(got, want);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore = "needs AVX2 and FMA: make test runs it where /proc/cpuinfo lists them"]
    fn avx2_tile_matches_dot_on_machines_that_would_use_it() {
        assert!(has_avx2_fma(), "this CPU has no AVX2/FMA: the test cannot run here");
        for n in [0, 7, 8, 9, 31, 100] {
            let rows: Vec<Vec<f32>> =
                (0..6).map(|r| (0..n).map(|i| ((i * 3 + r) as f32 * 0.7).sin()).collect()).collect();
            // SAFETY: the CPU has AVX2 and FMA (checked above); every row holds n floats.
            let got = unsafe {
                x86::dot_tile_avx2::<2, 4>(
                    [rows[0].as_ptr(), rows[1].as_ptr()],
                    std::array::from_fn(|c| rows[2 + c].as_ptr()),
                    n,
                )
            };
            for r in 0..2 {
                for c in 0..4 {
                    assert!((got[r][c] - dot_portable(&rows[r], &rows[2 + c])).abs() < 1e-4, "n = {n}");
                }
            }
        }
    }

    #[test]
    fn a_row_sums_the_same_in_every_tile_shape() {
        // The GEMV kernel (4 x 1), a wide tile (2 x 8) and a lone row (1 x 1) must agree exactly,
        // or a result would depend on batch size or thread count.
        let k = 100;
        let rows: Vec<Vec<f32>> = (0..8).map(|r| (0..k).map(|i| ((i * 5 + r) as f32 * 0.7).cos()).collect()).collect();
        let p: Vec<*const f32> = rows.iter().map(|r| r.as_ptr()).collect();
        let head = head(p[0]);
        // SAFETY: every row holds k floats.
        let (a, b, c) = unsafe {
            (
                dot_tile::<4, 1>([p[0], p[1], p[2], p[3]], [p[7]], k, head, 0),
                dot_tile::<2, 8>([p[0], p[1]], std::array::from_fn(|i| p[i]), k, head, 0),
                dot_tile::<1, 1>([p[1]], [p[7]], k, head, 0),
            )
        };
        assert_eq!(a[0][0], b[0][7]);
        assert_eq!(a[1][0], b[1][7]);
        assert_eq!(a[1][0], c[0][0]);
    }

    #[test]
    fn aligned_rows_keep_the_values_and_share_the_cache_line_place() {
        let x: Vec<f32> = (0..3 * 21).map(|i| i as f32).collect();
        let like = [0.0f32; 40];
        for offset in 0..4 {
            let rows = RowsAlignedLike::map(&x, 21, like[offset..].as_ptr(), |s, d| d.copy_from_slice(s));
            for r in 0..3 {
                assert_eq!(rows.row(r), &x[r * 21..(r + 1) * 21]);
                assert_eq!(rows.row(r).as_ptr() as usize % 64, like[offset..].as_ptr() as usize % 64);
            }
        }
    }
}
