//! The two inner loops everything hot reduces to: a dot product and `y += a * x`.
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

/// Four dot products against the same `x`: each load of `x` serves four weight rows, and the four
/// row streams keep more memory requests in flight than one (GEMV is bandwidth-bound).
#[inline]
pub fn dot4(x: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { x86::dot4_avx512(x, rows) };
        }
        if has_avx2_fma() {
            // SAFETY: as above.
            return unsafe { x86::dot4_avx2(x, rows) };
        }
    }
    rows.map(|r| dot_portable(x, r))
}

#[cfg(target_arch = "x86_64")]
#[inline]
pub fn has_avx512() -> bool {
    std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl")
}

/// `y += alpha * x`
#[inline]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: as above.
            return unsafe { x86::axpy_avx2(alpha, x, y) };
        }
    }
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
pub fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// Eight independent accumulators, so the compiler can keep them in one vector register.
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

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
        let acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
        let hi = _mm256_extractf128_ps(acc, 1);
        let lo = _mm256_castps256_ps128(acc);
        let s = _mm_add_ps(hi, lo);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        let mut sum = _mm_cvtss_f32(s);
        while i < n {
            sum += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4_avx2(x: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
        let n = x.len();
        let px = x.as_ptr();
        let p = rows.map(|r| r.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 8 <= n {
            let xv = _mm256_loadu_ps(px.add(i));
            for r in 0..4 {
                acc[r] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(p[r].add(i)), acc[r]);
            }
            i += 8;
        }
        let mut out = [0.0f32; 4];
        for r in 0..4 {
            let hi = _mm256_extractf128_ps(acc[r], 1);
            let s = _mm_add_ps(hi, _mm256_castps256_ps128(acc[r]));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            out[r] = _mm_cvtss_f32(s);
            for j in i..n {
                out[r] += *px.add(j) * *p[r].add(j);
            }
        }
        out
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot4_avx512(x: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
        let n = x.len();
        let px = x.as_ptr();
        let p = rows.map(|r| r.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 16 <= n {
            let xv = _mm512_loadu_ps(px.add(i));
            for r in 0..4 {
                // GEMV callers pass consecutive rows of one matrix: the same line 4 rows on
                // belongs to the next block, so asking for it now overlaps the memory latency.
                _mm_prefetch::<_MM_HINT_T0>(p[r].wrapping_add(i + 4 * n) as *const i8);
                acc[r] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(p[r].add(i)), acc[r]);
            }
            i += 16;
        }
        if i < n {
            let mask: __mmask16 = (1u16 << (n - i)) - 1;
            let xv = _mm512_maskz_loadu_ps(mask, px.add(i));
            for r in 0..4 {
                acc[r] = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(mask, p[r].add(i)), acc[r]);
            }
        }
        acc.map(|a| _mm512_reduce_add_ps(a))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_avx2(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            let r = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), r);
            i += 8;
        }
        while i < n {
            *py.add(i) += alpha * *px.add(i);
            i += 1;
        }
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
    fn dot4_matches_dot_for_every_tail_length() {
        for n in 0..70 {
            let rows: Vec<Vec<f32>> = (0..4).map(|r| (0..n).map(|i| ((i * 7 + r) as f32 * 0.3).sin()).collect()).collect();
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let got = dot4(&x, [&rows[0], &rows[1], &rows[2], &rows[3]]);
            for r in 0..4 {
                assert!((got[r] - dot_portable(&x, &rows[r])).abs() < 1e-4, "n = {n}");
            }
        }
    }

    #[test]
    fn axpy_adds_scaled_vector() {
        let x: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let mut y = vec![1.0f32; 19];
        axpy(2.0, &x, &mut y);
        for i in 0..19 {
            assert_eq!(y[i], 1.0 + 2.0 * i as f32);
        }
    }
}
