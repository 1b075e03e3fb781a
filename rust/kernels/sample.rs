//! Choosing the next token from a row of logits: greedy, temperature, top-k and top-p (nucleus),
//! the rules of `ellm.numpy_backend.kernels.sample`, which is their readable definition.
//!
//! A row's weights are `exp((x - max) / t)`. With nothing cut, the draw inverts their running
//! sum at `u` times their total, in blocks: the block sums are vectorized, and only the block the
//! draw falls in is walked one weight at a time. With a cut, only candidates are sorted: the k
//! heaviest with every tie of the k-th for top-k; for top-p, the weights down to the power of two
//! below which the nucleus cannot reach, lower while its cutoff does not fall among them.

use rayon::prelude::*;

use super::math::{dispatch, exp};
use super::pool;
use crate::error::{EllmError, Result};

/// How one row is sampled. `temperature <= 0` is greedy; `top_k == 0` keeps every id; `u` is
/// the row's uniform draw in [0, 1).
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f64,
    pub top_k: usize,
    pub u: f64,
}

/// Weights summed as one block while looking for the draw.
const BLOCK: usize = 256;
/// Logits a vector pass takes at a time (one AVX-512 register of f32).
const LANES: usize = 16;
/// Above this many candidates, the k-th weight is found by selection instead of a sorted buffer.
const BUFFERED_K: usize = 256;

/// One id per row of `logits` (rows of `vocab`), rows in parallel.
pub fn sample_rows(logits: &[f32], vocab: usize, rows: &[Sampling]) -> Result<Vec<usize>> {
    if vocab == 0 || logits.len() != vocab * rows.len() {
        return Err(EllmError::Value(format!(
            "sample: {} logits do not make {} rows of a vocabulary of {vocab}",
            logits.len(),
            rows.len()
        )));
    }
    let one = |r: usize, weights: &mut Vec<f32>| {
        sample_row(&logits[r * vocab..(r + 1) * vocab], &rows[r], weights)
            .map_err(|why| EllmError::Value(format!("sample: row {r}: {why}")))
    };
    if rows.len() == 1 {
        return Ok(vec![one(0, &mut Vec::new())?]); // not worth waking the pool for
    }
    pool::install(|| (0..rows.len()).into_par_iter().map_init(Vec::new, |weights, r| one(r, weights)).collect())
}

fn sample_row(row: &[f32], s: &Sampling, weights: &mut Vec<f32>) -> std::result::Result<usize, String> {
    let (max, argmax) = max_of(row);
    if max.is_nan() || max == f32::INFINITY {
        return Err("the logits hold NaN or +inf".into());
    }
    if max == f32::NEG_INFINITY {
        return Err("every logit is -inf: no token can be chosen".into());
    }
    if s.temperature <= 0.0 {
        return Ok(argmax);
    }
    let inv_t = 1.0 / s.temperature;
    if s.top_k == 0 && s.top_p >= 1.0 {
        // nothing is cut: no weight need be kept, only block sums to find the draw's block by
        weights.resize(row.len().div_ceil(BLOCK), 0.0);
        let total = block_sums(row, max, inv_t, weights);
        return Ok(invert_running_sum(row, max, inv_t, weights, s.u * total));
    }
    weights.resize(row.len(), 0.0);
    let total = exp_weights(row, max, inv_t, weights);
    Ok(draw_from_candidates(weights, total, s))
}

dispatch! {
    /// The largest logit and its first index; NaN if any logit is NaN. Each of 16 lanes keeps
    /// its largest value and where it first saw it, so one pass finds both.
    fn max_of(row: &[f32]) -> (f32, usize) {
        let mut best = [f32::NEG_INFINITY; LANES];
        let mut first = [0u32; LANES];
        let mut nan = [false; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for (i, c) in (&mut chunks).enumerate() {
            for (((b, f), n), &v) in best.iter_mut().zip(&mut first).zip(&mut nan).zip(c) {
                *n |= v.is_nan();
                if v > *b {
                    *b = v;
                    *f = i as u32;
                }
            }
        }
        let rest = chunks.remainder();
        if nan.iter().any(|&n| n) || rest.iter().any(|v| v.is_nan()) {
            return (f32::NAN, 0);
        }
        let lanes = (0..LANES).map(|j| (best[j], first[j] as usize * LANES + j));
        let tail = rest.iter().enumerate().map(|(t, &v)| (v, row.len() - rest.len() + t));
        // the largest value, and of its places the first (ties in different lanes: the lowest index)
        lanes.chain(tail).fold((f32::NEG_INFINITY, 0), |(m, at), (v, i)| {
            if v > m || (v == m && i < at) {
                (v, i)
            } else {
                (m, at)
            }
        })
    }
}

/// A logit's weight: its probability times the row's normalizer, `exp((x - max) / t)`. A
/// temperature so small that 1/t overflows gives the limit, 1 at the maximum and 0 elsewhere
/// (`min` turns the maximum's 0 * inf into 0).
#[inline(always)]
fn weight(x: f32, max: f32, inv_t: f32) -> f32 {
    exp(((x - max) * inv_t).min(0.0))
}

dispatch! {
    /// Fills `weights` with the row's weights and returns their sum in f64.
    fn exp_weights(row: &[f32], max: f32, inv_t: f32, weights: &mut [f32]) -> f64 {
        for (w, &x) in weights.iter_mut().zip(row) {
            *w = weight(x, max, inv_t);
        }
        let mut lanes = [0.0f64; 8];
        let mut chunks = weights.chunks_exact(8);
        for c in &mut chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l += v as f64;
            }
        }
        lanes.iter().sum::<f64>() + chunks.remainder().iter().map(|&v| v as f64).sum::<f64>()
    }
}

dispatch! {
    /// The sum of the row's weights in each block of BLOCK logits into `sums`, and their total.
    fn block_sums(row: &[f32], max: f32, inv_t: f32, sums: &mut [f32]) -> f64 {
        let mut total = 0.0f64;
        for (sum, block) in sums.iter_mut().zip(row.chunks(BLOCK)) {
            let mut lanes = [0.0f32; LANES];
            let mut chunks = block.chunks_exact(LANES);
            for c in &mut chunks {
                for (l, &x) in lanes.iter_mut().zip(c) {
                    *l += weight(x, max, inv_t);
                }
            }
            *sum = pairwise_sum(lanes) + chunks.remainder().iter().map(|&x| weight(x, max, inv_t)).sum::<f32>();
            total += *sum as f64;
        }
        total
    }
}

/// The lanes summed in halves (a few vector adds, where one by one would be 15 dependent adds).
#[inline(always)]
fn pairwise_sum(mut lanes: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for j in 0..width {
            lanes[j] += lanes[j + width];
        }
        width /= 2;
    }
    lanes[0]
}

/// The first logit whose running sum of weights exceeds `target` (a weight of 0 is never
/// chosen): the block by its sum, then weight by weight from there (on into later blocks should
/// the block's sum have rounded up); the last positive weight when rounding leaves `target` at
/// or past the total.
fn invert_running_sum(row: &[f32], max: f32, inv_t: f32, sums: &[f32], target: f64) -> usize {
    let mut before = 0.0f64;
    let mut first = 0;
    while first + 1 < sums.len() && before + sums[first] as f64 <= target {
        before += sums[first] as f64;
        first += 1;
    }
    for (i, &x) in row.iter().enumerate().skip(first * BLOCK) {
        before += weight(x, max, inv_t) as f64;
        if before > target {
            return i;
        }
    }
    row.iter().rposition(|&x| weight(x, max, inv_t) > 0.0).unwrap_or(0)
}

/// Top-k and top-p: the kept ids, heaviest first (ties by id), then the draw among them.
fn draw_from_candidates(weights: &[f32], total: f64, s: &Sampling) -> usize {
    let n = weights.len();
    if s.top_k > 0 {
        let floor = if s.top_k < n { kth_largest(weights, s.top_k) } else { 0.0 };
        return draw_from_kept(weights, floor, total, s).unwrap_or_else(|| unreachable!("top_k bounds the kept ids"));
    }
    // Top-p alone: candidates are the weights down to a power of two that holds the nucleus' mass,
    // a bucket lower each time the cutoff does not fall among them.
    let mass = mass_by_exponent(weights);
    let need = s.top_p * total;
    let mut bucket = mass.len() - 1;
    let mut above = mass[bucket];
    while bucket > 0 && above < need {
        bucket -= 1;
        above += mass[bucket];
    }
    loop {
        let floor = if bucket == 0 { 0.0 } else { f32::from_bits((bucket as u32) << 23) };
        if let Some(id) = draw_from_kept(weights, floor, total, s) {
            return id;
        }
        bucket -= 1; // bucket 0 keeps every id, so a draw was made there
    }
}

/// The draw among the ids whose weight is at least `floor`, after top-k and top-p; None when the
/// nucleus may reach below `floor`.
fn draw_from_kept(weights: &[f32], floor: f32, total: f64, s: &Sampling) -> Option<usize> {
    let mut candidates: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] >= floor).collect();
    candidates.sort_by(|&a, &b| weights[b].total_cmp(&weights[a])); // stable: ties keep id order
    let mut kept: Vec<f64> = candidates.iter().map(|&i| weights[i] as f64).collect();
    if s.top_k > 0 {
        kept.iter_mut().skip(s.top_k).for_each(|q| *q = 0.0);
    }
    if s.top_p < 1.0 {
        // Keep the smallest prefix whose probability reaches top_p.
        let mut mass = 0.0;
        let mut cut = false;
        for q in kept.iter_mut() {
            let p = *q / total;
            mass += p;
            if mass - p > s.top_p {
                *q = 0.0;
                cut = true;
            }
        }
        if !cut && s.top_k == 0 && floor > 0.0 {
            return None;
        }
    }
    let target = s.u * kept.iter().sum::<f64>();
    let mut running = 0.0;
    for (j, &q) in kept.iter().enumerate() {
        running += q;
        if running > target {
            return Some(candidates[j]);
        }
    }
    Some(candidates[kept.iter().rposition(|&q| q > 0.0).unwrap_or(0)])
}

/// The weights' sum by their binary exponent (weights are in [0, 1]: bucket e holds those in
/// [2^(e-127), 2^(e-126)), bucket 0 zero and subnormals). Four histograms, so that runs of weights
/// in one bucket do not wait on each other's adds.
fn mass_by_exponent(weights: &[f32]) -> Vec<f64> {
    let mut hist = [[0.0f64; 128]; 4];
    let mut chunks = weights.chunks_exact(4);
    for c in &mut chunks {
        for (h, &w) in hist.iter_mut().zip(c) {
            h[bucket_of(w)] += w as f64;
        }
    }
    for &w in chunks.remainder() {
        hist[0][bucket_of(w)] += w as f64;
    }
    (0..128).map(|e| hist.iter().map(|h| h[e]).sum()).collect()
}

fn bucket_of(w: f32) -> usize {
    ((w.to_bits() >> 23) as usize).min(127)
}

/// The k-th largest weight (1-based), 0 < k < weights.len().
fn kth_largest(weights: &[f32], k: usize) -> f32 {
    if k > BUFFERED_K {
        let mut copy = weights.to_vec();
        let (_, kth, _) = copy.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        return *kth;
    }
    // The k largest so far, sorted descending. Most blocks of weights hold none above the last,
    // which one vectorized comparison tells.
    let mut top: Vec<f32> = weights[..k].to_vec();
    top.sort_by(|a, b| b.total_cmp(a));
    for block in weights[k..].chunks(16) {
        if !any_above(block, top[k - 1]) {
            continue;
        }
        for &w in block {
            if w > top[k - 1] {
                let at = top.partition_point(|&t| t >= w);
                top.pop();
                top.insert(at, w);
            }
        }
    }
    top[k - 1]
}

fn any_above(block: &[f32], floor: f32) -> bool {
    block.iter().fold(false, |any, &w| any | (w > floor))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 12.0
            })
            .collect()
    }

    fn at(temperature: f32, top_p: f64, top_k: usize, u: f64) -> Sampling {
        Sampling { temperature, top_p, top_k, u }
    }

    #[test]
    fn the_draw_inverts_the_running_sum() {
        let logits = [0.0f32.ln(), 1.0f32.ln(), 2.0f32.ln(), 1.0f32.ln()]; // weights 0, 1, 2, 1 of 4
        let pick = |u| sample_rows(&logits, 4, &[at(1.0, 1.0, 0, u)]).unwrap()[0];
        assert_eq!([pick(0.0), pick(0.24), pick(0.26), pick(0.74), pick(0.76), pick(0.999)], [1, 1, 2, 2, 3, 3]);
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(sample_rows(&[1.0, 3.0, 3.0, 2.0], 4, &[at(0.0, 1.0, 0, 0.9)]).unwrap(), vec![1]);
    }

    #[test]
    fn the_first_maximum_is_found_across_lanes_and_the_tail() {
        // 1000 = 62 chunks of 16 and a tail of 8; maxima in different lanes, chunks and the tail
        for (places, first) in [(vec![700, 37, 500, 995], 37), (vec![996, 999], 996), (vec![48, 33], 33), (vec![0], 0)]
        {
            let mut logits = row(1000, 11);
            for &p in &places {
                logits[p] = 9.0;
            }
            assert_eq!(max_of(&logits), (9.0, first), "maxima at {places:?}");
        }
        for nan_at in [5, 500, 998] {
            let mut logits = row(1000, 11);
            logits[nan_at] = f32::NAN;
            assert!(max_of(&logits).0.is_nan(), "NaN at {nan_at}");
        }
    }

    #[test]
    fn a_vanishing_temperature_draws_among_the_maxima() {
        for t in [1e-45, 1e-38, 1e-20] {
            let pick = |u| sample_rows(&[1.0, 3.0, 2.0, 3.0], 4, &[at(t, 1.0, 0, u)]).unwrap()[0];
            assert_eq!([pick(0.1), pick(0.9)], [1, 3], "temperature {t}");
        }
    }

    #[test]
    fn top_k_and_top_p_keep_the_heaviest() {
        let logits = row(5000, 7);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        for k in [1, 3, 300] {
            for u in [0.0, 0.5, 0.999] {
                let id = sample_rows(&logits, 5000, &[at(1.0, 1.0, k, u)]).unwrap()[0];
                assert!(order[..k].contains(&id), "top_k {k} u {u} chose {id}");
            }
        }
        // top_p near 0 keeps only the heaviest id.
        assert_eq!(sample_rows(&logits, 5000, &[at(1.0, 1e-9, 0, 0.999)]).unwrap(), vec![order[0]]);
        // a nucleus wider than the first candidates still draws from the whole of it.
        let id = sample_rows(&logits, 5000, &[at(1.0, 0.99, 0, 0.999)]).unwrap()[0];
        assert!(!order[..64].contains(&id));
    }

    #[test]
    fn kth_largest_agrees_with_a_sort() {
        let w: Vec<f32> = row(3000, 3).iter().map(|v| v.abs()).collect();
        let mut sorted = w.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        for k in [1, 2, 64, 256, 257, 2999] {
            assert_eq!(kth_largest(&w, k), sorted[k - 1]);
        }
    }

    #[test]
    fn bad_rows_are_errors_that_name_the_row() {
        let err = sample_rows(&[0.0, 1.0, f32::NAN, 0.0], 2, &[at(1.0, 1.0, 0, 0.5); 2]).unwrap_err();
        assert!(err.to_string().contains("row 1"), "{err}");
        assert!(sample_rows(&[f32::NEG_INFINITY; 2], 2, &[at(1.0, 1.0, 0, 0.5)]).is_err());
        assert!(sample_rows(&[0.0; 3], 2, &[at(1.0, 1.0, 0, 0.5)]).is_err());
    }
}
