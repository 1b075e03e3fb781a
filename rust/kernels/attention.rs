//! Scaled dot-product attention with grouped-query heads and a causal mask.
//!
//! Keys and values are read through `KvView`, so the same code serves `ops.attention`
//! (`[seq, kv_heads, d]`) and the model's cache (`[kv_heads, max_seq, d]` per sequence).

use rayon::prelude::*;

use super::matmul::{gemm_into, View};
use super::pool;
use super::pool::DisjointWrites;
use super::simd::dot_portable;
use super::softmax::softmax_in_place;
use crate::error::{EllmError, Result};

/// Key or value vectors as a cache holds them: f32, or f16 (half the bytes to read; attention
/// widens a head's vectors to f32 as it reads them).
#[derive(Clone, Copy)]
pub enum KvData<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

/// Where key/value vector (position t, kv head g) starts: `t * row_stride + g * head_stride`.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub data: KvData<'a>,
    pub row_stride: usize,
    pub head_stride: usize,
}

impl<'a> KvView<'a> {
    pub fn f32(data: &'a [f32], row_stride: usize, head_stride: usize) -> Self {
        KvView { data: KvData::F32(data), row_stride, head_stride }
    }

    /// Head g's vectors from position `first` on, as stored.
    fn head_as<T: Element>(
        data: &'a [T],
        row_stride: usize,
        head_stride: usize,
        g: usize,
        first: usize,
    ) -> HeadView<'a, T> {
        HeadView { data: &data[first * row_stride + g * head_stride..], stride: row_stride }
    }

    /// The first `len` positions of every one of `heads` heads as f32, `[heads, len, d]`.
    fn widened(&self, len: usize, heads: usize, d: usize) -> Vec<f32> {
        let mut out = vec![0.0; heads * len * d];
        for (i, row) in out.chunks_exact_mut(d).enumerate() {
            let at = (i % len) * self.row_stride + (i / len) * self.head_stride;
            match self.data {
                KvData::F32(data) => row.copy_from_slice(&data[at..at + d]),
                KvData::F16(data) => half::slice::HalfFloatSliceExt::convert_to_f32_slice(&data[at..at + d], row),
            }
        }
        out
    }
}

/// One head's key or value vectors: vector t starts at `t * stride`.
pub struct HeadView<'a, T = f32> {
    data: &'a [T],
    stride: usize,
}

impl<T> Clone for HeadView<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for HeadView<'_, T> {}

/// A cache element attention reads: f32, or f16 widened as it is loaded.
pub trait Element: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    /// Eight elements from `p` as f32 lanes.
    ///
    /// # Safety
    /// `p..p + 8` is readable and the CPU has AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen elements from `p` as f32 lanes.
    ///
    /// # Safety
    /// `p..p + 16` is readable and the CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl Element for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const half::f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }
}

pub struct AttentionShape {
    pub q_len: usize,
    pub kv_len: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub start_pos: usize,
    pub scale: f32,
    /// Sliding-window attention: a causal query sees only its last `window` keys (itself
    /// included). 0 means no window.
    pub window: usize,
}

impl AttentionShape {
    pub fn check(&self) -> Result<()> {
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(EllmError::Value(format!(
                "n_heads ({}) must be a multiple of n_kv_heads ({})",
                self.n_heads, self.n_kv_heads
            )));
        }
        if self.causal && self.q_len > 0 && self.start_pos + self.q_len > self.kv_len {
            return Err(EllmError::Value(format!(
                "causal attention at start_pos {} with {} queries needs {} keys, got {}",
                self.start_pos,
                self.q_len,
                self.start_pos + self.q_len,
                self.kv_len
            )));
        }
        Ok(())
    }

    /// The keys query i sees: `first..end`.
    #[inline]
    fn visible(&self, i: usize) -> std::ops::Range<usize> {
        if !self.causal {
            return 0..self.kv_len;
        }
        let end = self.start_pos + i + 1;
        let first = if self.window > 0 { end.saturating_sub(self.window) } else { 0 };
        first..end
    }
}

/// Queries per call from which attention is done head by head with GEMMs (prefill) rather than
/// query by query (decode).
const GEMM_MIN_QUERIES: usize = 16;

/// q: `[q_len, n_heads, d]` contiguous; out: the same shape.
pub fn attention(q: &[f32], k: KvView, v: KvView, shape: &AttentionShape, out: &mut [f32]) -> Result<()> {
    shape.check()?;
    if shape.head_dim == 0 || q.is_empty() {
        return Ok(());
    }
    if shape.kv_len == 0 {
        out.fill(0.0); // nothing to attend to (non-causal with no keys)
        return Ok(());
    }
    if shape.q_len >= GEMM_MIN_QUERIES {
        attention_by_heads(q, k, v, shape, out);
        return Ok(());
    }
    let d = shape.head_dim;
    let group = shape.n_heads / shape.n_kv_heads;
    assert_eq!(q.len(), shape.q_len * shape.n_heads * d);
    assert_eq!(out.len(), q.len());
    // Query heads that share a key/value head go together (`heads` of them a task) where a kernel
    // for that many exists: each key and value is then read once for all of them.
    let heads =
        if grouped_kernel(d) { [4, 3, 2].into_iter().find(|&g| group.is_multiple_of(g)).unwrap_or(1) } else { 1 };
    pool::install(|| {
        out.par_chunks_mut(heads * d).enumerate().for_each_init(Vec::new, |scores, (idx, o)| {
            let (i, h) = (idx * heads / shape.n_heads, idx * heads % shape.n_heads);
            let keys = shape.visible(i);
            scores.clear();
            scores.resize(heads * keys.len(), 0.0);
            let (g, first, qv) = (h / group, keys.start, &q[(i * shape.n_heads + h) * d..][..heads * d]);
            let (rk, hk, rv, hv) = (k.row_stride, k.head_stride, v.row_stride, v.head_stride);
            match (k.data, v.data) {
                (KvData::F32(kd), KvData::F32(vd)) => {
                    let (kg, vg) = (KvView::head_as(kd, rk, hk, g, first), KvView::head_as(vd, rv, hv, g, first));
                    attend_heads(heads, qv, kg, vg, shape.scale, scores, o)
                }
                (KvData::F16(kd), KvData::F16(vd)) => {
                    let (kg, vg) = (KvView::head_as(kd, rk, hk, g, first), KvView::head_as(vd, rv, hv, g, first));
                    attend_heads(heads, qv, kg, vg, shape.scale, scores, o)
                }
                _ => unreachable!("keys and values of one cache share an element type"),
            }
        })
    });
    Ok(())
}

/// Whether `attend_heads` has a kernel for several heads at once, for heads of `d` values.
#[cfg(target_arch = "x86_64")]
fn grouped_kernel(d: usize) -> bool {
    d.is_multiple_of(16) && crate::kernels::simd::has_avx512()
}

#[cfg(not(target_arch = "x86_64"))]
fn grouped_kernel(_d: usize) -> bool {
    false
}

/// `heads` consecutive query heads (`qs`, `[heads, d]`) that share the key/value head `k`, `v`,
/// against its `scores.len() / heads` vectors from the views' first position: the scores
/// (`[heads, keys]`), their softmax, and the weighted sums of the values into `out` (`[heads,
/// d]`). More than one head needs `grouped_kernel`.
fn attend_heads<T: Element>(
    heads: usize,
    qs: &[f32],
    k: HeadView<'_, T>,
    v: HeadView<'_, T>,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    // SAFETY (the arms of more than one head): `grouped_kernel` found AVX-512F/VL.
    match heads {
        #[cfg(target_arch = "x86_64")]
        2 => unsafe { avx512::attend_group::<T, 2>(qs, k, v, scale, scores, out) },
        #[cfg(target_arch = "x86_64")]
        3 => unsafe { avx512::attend_group::<T, 3>(qs, k, v, scale, scores, out) },
        #[cfg(target_arch = "x86_64")]
        4 => unsafe { avx512::attend_group::<T, 4>(qs, k, v, scale, scores, out) },
        1 => {
            #[cfg(target_arch = "x86_64")]
            if qs.len().is_multiple_of(8)
                && crate::kernels::simd::has_avx2_fma()
                && std::is_x86_feature_detected!("f16c")
            {
                // SAFETY: the CPU has AVX2, FMA and F16C.
                return unsafe { avx2::attend_one(qs, k, v, scale, scores, out) };
            }
            attend_one_portable(qs, k, v, scale, scores, out)
        }
        _ => unreachable!("no kernel for {heads} heads at once"),
    }
}

fn attend_one_portable<T: Element>(
    qv: &[f32],
    k: HeadView<'_, T>,
    v: HeadView<'_, T>,
    scale: f32,
    scores: &mut [f32],
    o: &mut [f32],
) {
    let d = qv.len();
    let mut key = vec![0.0f32; d];
    for (t, s) in scores.iter_mut().enumerate() {
        for (x, &e) in key.iter_mut().zip(&k.data[t * k.stride..t * k.stride + d]) {
            *x = e.to_f32();
        }
        *s = dot_portable(qv, &key) * scale;
    }
    softmax_in_place(scores);
    o.fill(0.0);
    for (t, &p) in scores.iter().enumerate() {
        for (oj, &vj) in o.iter_mut().zip(&v.data[t * v.stride..t * v.stride + d]) {
            *oj += p * vj.to_f32();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Element, HeadView};
    use crate::kernels::softmax::softmax_in_place;

    /// `attend_heads` for one head of a multiple of 8 values. A key's score is a chain of dependent
    /// multiply-adds, so keys go four at a time, each in its own accumulator; the weighted sum
    /// keeps 64 columns of the output in registers while it walks the values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn attend_one<T: Element>(
        qv: &[f32],
        k: HeadView<'_, T>,
        v: HeadView<'_, T>,
        scale: f32,
        scores: &mut [f32],
        o: &mut [f32],
    ) {
        let (d, n) = (qv.len(), scores.len());
        assert!(d.is_multiple_of(8) && o.len() == d);
        if n == 0 {
            o.fill(0.0);
            return;
        }
        assert!(k.data.len() >= (n - 1) * k.stride + d && v.data.len() >= (n - 1) * v.stride + d);
        let (q, keys) = (qv.as_ptr(), k.data.as_ptr());
        let mut t = 0;
        while t + 4 <= n {
            let mut acc = [_mm256_setzero_ps(); 4];
            for c in (0..d).step_by(8) {
                let qc = _mm256_loadu_ps(q.add(c));
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(qc, T::load8(keys.add((t + j) * k.stride + c)), *a);
                }
            }
            store_four_scores(acc, scale, scores.as_mut_ptr().add(t));
            t += 4;
        }
        for (t, s) in scores.iter_mut().enumerate().skip(t) {
            let mut acc = _mm256_setzero_ps();
            for c in (0..d).step_by(8) {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(c)), T::load8(keys.add(t * k.stride + c)), acc);
            }
            let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            *s = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h))) * scale;
        }
        softmax_in_place(scores);
        let mut c = 0;
        while c + 64 <= d {
            weighted_sum::<T, 8>(scores, v, c, o);
            c += 64;
        }
        while c < d {
            weighted_sum::<T, 1>(scores, v, c, o);
            c += 8;
        }
    }

    /// Four keys' dot products, each as 8 lanes to add, times `scale`, stored at `at..at + 4`:
    /// lanes [key 0, 1, 2, 3] of each 128-bit half after two horizontal adds, then the halves added.
    ///
    /// # Safety
    /// `at..at + 4` is writable and the CPU has AVX.
    #[inline(always)]
    pub(super) unsafe fn store_four_scores(acc: [__m256; 4], scale: f32, at: *mut f32) {
        let s = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        _mm_storeu_ps(at, _mm_mul_ps(s, _mm_set1_ps(scale)));
    }

    /// `o[c..c + 8W] = sum over t of p[t] * v[t][c..c + 8W]`, the sums held in W registers.
    #[inline(always)]
    unsafe fn weighted_sum<T: Element, const W: usize>(p: &[f32], v: HeadView<'_, T>, c: usize, o: &mut [f32]) {
        let mut acc = [_mm256_setzero_ps(); W];
        let values = v.data.as_ptr().add(c);
        for (t, &pt) in p.iter().enumerate() {
            let (pt, row) = (_mm256_set1_ps(pt), values.add(t * v.stride));
            for (w, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(pt, T::load8(row.add(8 * w)), *a);
            }
        }
        for (w, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.as_mut_ptr().add(c + 8 * w), *a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::avx2::store_four_scores;
    use super::{Element, HeadView};
    use crate::kernels::softmax::softmax_in_place;

    /// `attend_heads` for `G` query heads that share one key/value head (grouped-query attention),
    /// heads of a multiple of 16 values: each key and value vector is loaded, and widened from
    /// f16, once for all `G` instead of once per head. `qs` and `out` are `[G, d]`, `scores`
    /// `[G, n]` for the `n` keys.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
    pub unsafe fn attend_group<T: Element, const G: usize>(
        qs: &[f32],
        k: HeadView<'_, T>,
        v: HeadView<'_, T>,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let (d, n) = (qs.len() / G, scores.len() / G);
        assert!(d.is_multiple_of(16) && qs.len() == G * d && out.len() == G * d && scores.len() == G * n);
        if n == 0 {
            out.fill(0.0);
            return;
        }
        assert!(k.data.len() >= (n - 1) * k.stride + d && v.data.len() >= (n - 1) * v.stride + d);
        let (q, keys) = (qs.as_ptr(), k.data.as_ptr());
        // a score's 16 lanes added down to 8, for `store_four_scores`
        let halves = |a: __m512| {
            _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a))))
        };
        let mut t = 0;
        while t + 4 <= n {
            let mut acc = [[_mm512_setzero_ps(); 4]; G];
            for c in (0..d).step_by(16) {
                let key: [__m512; 4] = std::array::from_fn(|j| T::load16(keys.add((t + j) * k.stride + c)));
                for (g, acc) in acc.iter_mut().enumerate() {
                    let qc = _mm512_loadu_ps(q.add(g * d + c));
                    for (a, &kj) in acc.iter_mut().zip(&key) {
                        *a = _mm512_fmadd_ps(qc, kj, *a);
                    }
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                store_four_scores(acc.map(halves), scale, scores.as_mut_ptr().add(g * n + t));
            }
            t += 4;
        }
        for t in t..n {
            let mut acc = [_mm512_setzero_ps(); G];
            for c in (0..d).step_by(16) {
                let key = T::load16(keys.add(t * k.stride + c));
                for (g, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(g * d + c)), key, *a);
                }
            }
            for (g, a) in acc.iter().enumerate() {
                scores[g * n + t] = _mm512_reduce_add_ps(*a) * scale;
            }
        }
        for row in scores.chunks_exact_mut(n) {
            softmax_in_place(row);
        }
        let mut c = 0;
        while c + 64 <= d {
            weighted_sums::<T, G, 4>(scores, v, c, d, out);
            c += 64;
        }
        while c < d {
            weighted_sums::<T, G, 1>(scores, v, c, d, out);
            c += 16;
        }
    }

    /// `out[g][c..c + 16W] = sum over t of p[g][t] * v[t][c..c + 16W]` for every head g, the sums
    /// in G x W registers.
    #[inline(always)]
    unsafe fn weighted_sums<T: Element, const G: usize, const W: usize>(
        p: &[f32],
        v: HeadView<'_, T>,
        c: usize,
        d: usize,
        out: &mut [f32],
    ) {
        let n = p.len() / G;
        let mut acc = [[_mm512_setzero_ps(); W]; G];
        let values = v.data.as_ptr().add(c);
        for t in 0..n {
            let row = values.add(t * v.stride);
            let vals: [__m512; W] = std::array::from_fn(|w| T::load16(row.add(16 * w)));
            for (g, acc) in acc.iter_mut().enumerate() {
                let pt = _mm512_set1_ps(*p.get_unchecked(g * n + t));
                for (a, &x) in acc.iter_mut().zip(&vals) {
                    *a = _mm512_fmadd_ps(pt, x, *a);
                }
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            for (w, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(g * d + c + 16 * w), *a);
            }
        }
    }
}

/// Queries per task of `attention_by_heads`.
const QUERY_CHUNK: usize = 64;

/// Per head and chunk of queries: scores = Q K^T (GEMM) over the keys the chunk can see, the
/// mask and softmax by row, then P V (GEMM) into the head's columns of `out`. A causal prefill
/// so skips the keys after a chunk's last query (about half of all), and the tasks (heads x
/// chunks) share out evenly where heads alone would not. Each GEMM is single-threaded.
fn attention_by_heads(q: &[f32], k: KvView, v: KvView, shape: &AttentionShape, out: &mut [f32]) {
    let (sq, nh, d) = (shape.q_len, shape.n_heads, shape.head_dim);
    let (KvData::F32(keys_f32), KvData::F32(values_f32)) = (k.data, v.data) else {
        // an f16 cache: its visible keys and values widened once, for every task's GEMMs
        let (len, heads) = (shape.kv_len, shape.n_kv_heads);
        let (kw, vw) = (k.widened(len, heads, d), v.widened(len, heads, d));
        let view = |data| KvView::f32(data, d, len * d);
        return attention_by_heads(q, view(&kw), view(&vw), shape, out);
    };
    let group = nh / shape.n_kv_heads;
    let row = nh * d;
    let chunks = sq.div_ceil(QUERY_CHUNK);
    let out_ptr = DisjointWrites(out.as_mut_ptr());
    pool::install(|| {
        (0..nh * chunks).into_par_iter().for_each_init(Vec::new, |scores: &mut Vec<f32>, task| {
            let (h, c) = (task / chunks, task % chunks);
            let g = h / group;
            let queries = c * QUERY_CHUNK..((c + 1) * QUERY_CHUNK).min(sq);
            // the keys some query of the chunk sees: visible ranges only move forward
            let keys = shape.visible(queries.start).start..shape.visible(queries.end - 1).end;
            let (m, n) = (queries.len(), keys.len());
            scores.clear();
            scores.resize(m * n, 0.0);
            // SAFETY: every view below stays inside its buffer (q: [sq, nh, d]; k, v: kv_len rows
            // of the view, of which `keys`; scores: [m, n]), and the task writes only rows
            // `queries` of head h's d columns of `out`.
            unsafe {
                gemm_into(
                    m,
                    n,
                    d,
                    scores.as_mut_ptr(),
                    n,
                    1,
                    View { ptr: q.as_ptr().add(queries.start * row + h * d), row_stride: row, col_stride: 1 },
                    View {
                        ptr: keys_f32.as_ptr().add(keys.start * k.row_stride + g * k.head_stride),
                        row_stride: 1,
                        col_stride: k.row_stride,
                    },
                    gemm::Parallelism::None,
                );
            }
            for (i, r) in (queries.start..).zip(scores.chunks_exact_mut(n)) {
                let visible = shape.visible(i);
                let (first, end) = (visible.start - keys.start, visible.end - keys.start);
                r[..first].fill(0.0);
                r[end..].fill(0.0);
                let seen = &mut r[first..end];
                for x in seen.iter_mut() {
                    *x *= shape.scale;
                }
                softmax_in_place(seen);
            }
            unsafe {
                gemm_into(
                    m,
                    d,
                    n,
                    out_ptr.at(queries.start * row + h * d),
                    row,
                    1,
                    View { ptr: scores.as_ptr(), row_stride: n, col_stride: 1 },
                    View {
                        ptr: values_f32.as_ptr().add(keys.start * v.row_stride + g * v.head_stride),
                        row_stride: v.row_stride,
                        col_stride: 1,
                    },
                    gemm::Parallelism::None,
                );
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_key_returns_its_value() {
        let q = vec![1.0f32, 0.0, 0.0, 1.0]; // 1 query, 2 heads, d = 2
        let k = vec![0.3f32, 0.4];
        let v = vec![5.0f32, -6.0];
        let kv = |data| KvView::f32(data, 2, 2);
        let shape = AttentionShape {
            q_len: 1,
            kv_len: 1,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 2,
            causal: true,
            start_pos: 0,
            scale: 1.0,
            window: 0,
        };
        let mut out = vec![0.0; 4];
        attention(&q, kv(&k), kv(&v), &shape, &mut out).unwrap();
        assert_eq!(out, vec![5.0, -6.0, 5.0, -6.0]);
    }

    #[test]
    fn gemm_path_matches_query_by_query() {
        // d = 16: with AVX-512, each query's three heads of a key/value head go as one task
        for (sq, d) in [(20, 8), (150, 8), (20, 16)] {
            gemm_path_matches_query_by_query_for(sq, d);
        }
    }

    /// `sq` queries: 20 are one chunk of the GEMM path, 150 three (the last one short).
    fn gemm_path_matches_query_by_query_for(sq: usize, d: usize) {
        let (start, nh, nkv) = (5, 6, 2);
        let sk = start + sq;
        let vals = |n: usize, salt: f32| (0..n).map(|i| ((i as f32 + salt) * 0.37).sin()).collect::<Vec<f32>>();
        let (q, k, v) = (vals(sq * nh * d, 1.0), vals(sk * nkv * d, 2.0), vals(sk * nkv * d, 3.0));
        let view = |data| KvView::f32(data, nkv * d, d);
        let shape = AttentionShape {
            q_len: sq,
            kv_len: sk,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: d,
            causal: true,
            start_pos: start,
            scale: 0.3,
            window: 0,
        };
        for window in [0, 3, 7, 100] {
            let shape = AttentionShape { window, ..shape };
            let mut by_heads = vec![0.0; q.len()];
            attention(&q, view(&k), view(&v), &shape, &mut by_heads).unwrap();
            // the same queries one call at a time take the query-by-query path
            let mut one_by_one = vec![0.0; q.len()];
            for i in 0..sq {
                let s1 = AttentionShape { q_len: 1, start_pos: start + i, kv_len: start + i + 1, ..shape };
                let span = i * nh * d..(i + 1) * nh * d;
                attention(&q[span.clone()], view(&k), view(&v), &s1, &mut one_by_one[span]).unwrap();
            }
            for (a, b) in by_heads.iter().zip(&one_by_one) {
                assert!((a - b).abs() < 1e-5, "window {window}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn an_f16_cache_gives_what_its_values_widened_to_f32_give() {
        // both paths: 1 query (query by query) and 40 (GEMM, by heads); keys at a stride, as the
        // cache lays them out
        let (nh, nkv, d, sk) = (6, 2, 64, 90);
        let vals = |n: usize, salt: f32| (0..n).map(|i| ((i as f32 + salt) * 0.37).sin() * 3.0).collect::<Vec<f32>>();
        let halves = |x: &[f32]| x.iter().map(|&v| half::f16::from_f32(v)).collect::<Vec<_>>();
        let (k32, v32) = (vals(sk * nkv * d, 2.0), vals(sk * nkv * d, 3.0));
        let (k16, v16) = (halves(&k32), halves(&v32));
        let widened = |x: &[half::f16]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
        let (kw, vw) = (widened(&k16), widened(&v16));
        for sq in [1, 40] {
            let q = vals(sq * nh * d, 1.0);
            let shape = AttentionShape {
                q_len: sq,
                kv_len: sk,
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: d,
                causal: true,
                start_pos: sk - sq,
                scale: 0.125,
                window: 0,
            };
            let half_view = |data| KvView { data: KvData::F16(data), row_stride: nkv * d, head_stride: d };
            let (mut from_halves, mut from_floats) = (vec![0.0; q.len()], vec![0.0; q.len()]);
            attention(&q, half_view(&k16), half_view(&v16), &shape, &mut from_halves).unwrap();
            let view = |data| KvView::f32(data, nkv * d, d);
            attention(&q, view(&kw), view(&vw), &shape, &mut from_floats).unwrap();
            assert_eq!(from_halves, from_floats, "{sq} queries");
            // and the rounding is small next to the f32 values' own result
            let mut exact = vec![0.0; q.len()];
            attention(&q, view(&k32), view(&v32), &shape, &mut exact).unwrap();
            let worst = exact.iter().zip(&from_halves).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(worst < 5e-3, "{sq} queries: {worst}");
        }
    }

    #[test]
    fn window_of_one_sees_only_its_own_position() {
        let (sq, nh, d) = (20, 2, 4); // 20 queries take the GEMM path, 1 the query-by-query one
        let q: Vec<f32> = (0..sq * nh * d).map(|i| (i as f32 * 0.1).cos()).collect();
        let k: Vec<f32> = (0..sq * d).map(|i| (i as f32 * 0.3).sin()).collect();
        let v: Vec<f32> = (0..sq * d).map(|i| i as f32).collect();
        let view = |data| KvView::f32(data, d, d);
        let shape = AttentionShape {
            q_len: sq,
            kv_len: sq,
            n_heads: nh,
            n_kv_heads: 1,
            head_dim: d,
            causal: true,
            start_pos: 0,
            scale: 1.0,
            window: 1,
        };
        for q_len in [sq, 1] {
            let s = AttentionShape { q_len, ..shape };
            let mut out = vec![0.0; q_len * nh * d];
            attention(&q[..q_len * nh * d], view(&k), view(&v), &s, &mut out).unwrap();
            for i in 0..q_len {
                for h in 0..nh {
                    assert_eq!(&out[(i * nh + h) * d..(i * nh + h + 1) * d], &v[i * d..(i + 1) * d]);
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_query_kernel_matches_the_portable_one() {
        if !crate::kernels::simd::has_avx2_fma() {
            eprintln!("skipped: this CPU has no AVX2 and FMA");
            return;
        }
        let vals = |n: usize, salt: f32| (0..n).map(|i| ((i as f32 + salt) * 0.61).sin() * 2.0).collect::<Vec<f32>>();
        for d in [8, 16, 64, 72, 128] {
            for stride in [d, 3 * d + 8] {
                for n in [1, 2, 3, 4, 5, 7, 8, 33, 200] {
                    let (q, k, v) = (vals(d, 0.5), vals(n * stride, 1.5), vals(n * stride, 2.5));
                    let (kv, vv) = (HeadView { data: &k, stride }, HeadView { data: &v, stride });
                    let (mut s1, mut s2) = (vec![0.0; n], vec![0.0; n]);
                    let (mut o1, mut o2) = (vec![f32::NAN; d], vec![f32::NAN; d]);
                    attend_one_portable(&q, kv, vv, 0.125, &mut s1, &mut o1);
                    // SAFETY: checked above that the CPU has AVX2 and FMA.
                    unsafe { avx2::attend_one(&q, kv, vv, 0.125, &mut s2, &mut o2) };
                    for (a, b) in s1.iter().zip(&s2).chain(o1.iter().zip(&o2)) {
                        assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "d {d} stride {stride} n {n}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore = "needs AVX-512F/VL: make test runs it where /proc/cpuinfo lists them"]
    fn avx512_grouped_heads_match_the_portable_kernel_head_by_head() {
        assert!(crate::kernels::simd::has_avx512(), "this CPU has no AVX-512F/VL: the test cannot run here");
        fn check<T: Element>(heads: usize, d: usize, n: usize, stride: usize, widen: impl Fn(&[f32]) -> Vec<T>) {
            let vals =
                |n: usize, salt: f32| (0..n).map(|i| ((i as f32 + salt) * 0.61).sin() * 2.0).collect::<Vec<f32>>();
            let (q, k, v) = (vals(heads * d, 0.5), widen(&vals(n * stride, 1.5)), widen(&vals(n * stride, 2.5)));
            let (kv, vv) = (HeadView { data: &k[..], stride }, HeadView { data: &v[..], stride });
            let (mut s1, mut s2) = (vec![0.0; heads * n], vec![0.0; heads * n]);
            let (mut o1, mut o2) = (vec![f32::NAN; heads * d], vec![f32::NAN; heads * d]);
            for h in 0..heads {
                let (s, o) = (&mut s1[h * n..(h + 1) * n], &mut o1[h * d..(h + 1) * d]);
                attend_one_portable(&q[h * d..(h + 1) * d], kv, vv, 0.125, s, o);
            }
            attend_heads(heads, &q, kv, vv, 0.125, &mut s2, &mut o2);
            for (a, b) in s1.iter().zip(&s2).chain(o1.iter().zip(&o2)) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{heads} heads, d {d}, n {n}: {a} vs {b}");
            }
        }
        for heads in [2, 3, 4] {
            for d in [16, 64, 80, 128] {
                for n in [1, 2, 3, 4, 5, 7, 8, 33, 200] {
                    for stride in [d, 3 * d + 16] {
                        check::<f32>(heads, d, n, stride, |x| x.to_vec());
                        check::<half::f16>(heads, d, n, stride, |x| {
                            x.iter().map(|&v| half::f16::from_f32(v)).collect()
                        });
                    }
                }
            }
        }
    }

    #[test]
    fn heads_not_dividing_is_an_error() {
        let shape = AttentionShape {
            q_len: 1,
            kv_len: 1,
            n_heads: 3,
            n_kv_heads: 2,
            head_dim: 2,
            causal: false,
            start_pos: 0,
            scale: 1.0,
            window: 0,
        };
        let z = [0.0f32; 8];
        let kv = KvView::f32(&z, 4, 2);
        assert!(attention(&[0.0; 6], kv, kv, &shape, &mut [0.0; 6]).is_err());
    }
}
