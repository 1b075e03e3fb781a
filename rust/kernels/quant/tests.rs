//! Every block format on every dot path this CPU runs: exact integer lane sums, and products
//! within the error that 8-bit activations explain.

use std::sync::Arc;

use half::f16;
use rand_core::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use super::activation::{QuantizedRows, ACT_BLOCK, LO_SCALE};
use super::dot::{self, DotPath};
use super::matrix::{linear_many, QuantMatrix};
use super::{QuantKind, UnpackedRow};

/// The paths the tests force; one at a time, since forcing is process-wide.
static PATH_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng(seed: u64) -> Xoshiro256PlusPlus {
    Xoshiro256PlusPlus::seed_from_u64(seed)
}

/// A block scale: mostly ordinary, sometimes zero, negative, tiny or the largest f16.
fn scale(r: &mut Xoshiro256PlusPlus) -> [u8; 2] {
    let v = match r.next_u32() % 10 {
        0 => 0.0,
        1 => 65504.0,
        2 => -3e-5,
        3 => 6e-8,
        _ => ((r.next_u32() % 2000) as f32 / 1000.0 - 1.0) * 0.05,
    };
    f16::from_f32(v).to_le_bytes()
}

/// Where a block's f16 fields are (d, and m or dmin), by format.
fn scale_fields(kind: QuantKind) -> &'static [usize] {
    match kind {
        QuantKind::Q4_0 | QuantKind::Q5_0 | QuantKind::Q8_0 => &[0],
        QuantKind::Q4_1 | QuantKind::Q5_1 | QuantKind::Q4_K | QuantKind::Q5_K => &[0, 2],
        QuantKind::Q6_K => &[208],
    }
}

/// `rows` rows of random blocks of `kind`, with the f16 scale fields set by `scale`.
fn random_blocks(kind: QuantKind, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut r = rng(seed);
    let blocks = rows * cols / kind.block_elems();
    let size = kind.block_bytes();
    let mut bytes: Vec<u8> = (0..blocks * size).map(|_| r.next_u32() as u8).collect();
    for b in bytes.chunks_exact_mut(size) {
        for &at in scale_fields(kind) {
            b[at..at + 2].copy_from_slice(&scale(&mut r));
        }
    }
    if kind == QuantKind::Q8_0 {
        bytes[2] = 0x80; // -128
    }
    bytes
}

fn matrix(kind: QuantKind, rows: usize, cols: usize, seed: u64) -> QuantMatrix {
    let bytes = random_blocks(kind, rows, cols, seed);
    let len = bytes.len();
    QuantMatrix::new(kind, rows, cols, Arc::new(bytes), 0..len).unwrap()
}

fn inputs(m: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut r = rng(seed);
    (0..m * k).map(|i| ((r.next_u32() % 20001) as f32 / 10000.0 - 1.0) * if i % 97 == 0 { 40.0 } else { 1.0 }).collect()
}

fn available_paths() -> Vec<DotPath> {
    DotPath::ALL.into_iter().filter(|p| p.available()).collect()
}

#[test]
fn lane_sums_are_exact_on_every_path() {
    let mut r = rng(7);
    for kind in QuantKind::ALL {
        let u: Vec<u8> = (0..512).map(|_| (r.next_u32() % (if kind.wide() { 256 } else { 64 })) as u8).collect();
        let mut q: Vec<i8> = (0..512).map(|_| r.next_u32() as i8).collect();
        q[0] = -128;
        let reference = dot::lane_sums(DotPath::Portable, &u, &q, kind.wide());
        let exact: Vec<i32> = u
            .chunks(4)
            .zip(q.chunks(4))
            .map(|(a, b)| a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum())
            .collect();
        assert_eq!(reference, exact);
        for path in available_paths() {
            assert_eq!(dot::lane_sums(path, &u, &q, kind.wide()), exact, "{kind:?} on {path:?}");
        }
    }
}

#[test]
fn extreme_bytes_do_not_saturate() {
    // 255 x -128 everywhere: the largest magnitude a lane can reach
    let (u, q) = (vec![255u8; 64], vec![-128i8; 64]);
    for path in available_paths() {
        assert!(dot::lane_sums(path, &u, &q, true).iter().all(|&s| s == 4 * 255 * -128), "{path:?}");
    }
}

/// The error of quantizing x to two 8-bit digits, as seen through w: per block, half a step of
/// the second digit (d / 256, with d = max|x| / 127) times the sum of |w|; plus float rounding
/// of the sums.
fn bound(w: &[f32], x: &[f32]) -> f32 {
    let mut b = 0.0;
    for (wb, xb) in w.chunks(ACT_BLOCK).zip(x.chunks(ACT_BLOCK)) {
        let d = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
        b += 0.5 * (d / LO_SCALE) * wb.iter().map(|v| v.abs()).sum::<f32>();
    }
    let scale: f32 = w.iter().zip(x).map(|(a, b)| (a * b).abs()).sum();
    1.0001 * b + 1e-5 * scale + 1e-30
}

#[test]
fn interleaved_rows_unpack_to_the_same_values() {
    let (rows, cols) = (32, 512);
    for (seed, kind) in QuantKind::ALL.into_iter().enumerate() {
        let plain = matrix(kind, rows, cols, 50 + seed as u64);
        let packed = matrix(kind, rows, cols, 50 + seed as u64).interleave();
        assert!(packed.is_interleaved());
        let (mut a, mut b) = (UnpackedRow::new(cols), UnpackedRow::new(cols));
        for r in 0..rows {
            plain.unpack(r, &mut a);
            packed.unpack(r, &mut b);
            assert!(a.u == b.u, "{kind:?} row {r}: values");
            let same = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same(&a.scale_lanes, &b.scale_lanes) && same(&a.offset, &b.offset), "{kind:?} row {r}: scales");
        }
    }
}

#[test]
fn interleaving_keeps_the_bytes_per_weight_within_5_percent() {
    for kind in QuantKind::ALL {
        let stored = 16 * 512 / kind.block_elems() * kind.block_bytes();
        let packed = super::interleaved::group_bytes(kind, 512);
        assert!(packed as f64 <= 1.05 * stored as f64, "{kind:?}: {packed} vs {stored}");
    }
}

#[test]
fn products_match_dequantized_weights_within_the_activation_error() {
    let _lock = PATH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // 6 inputs: one group of weight rows at a time; 20: two at a time (the AVX-512 kernel)
    let (rows, cols) = (32, 512);
    for (seed, w) in QuantKind::ALL
        .into_iter()
        .flat_map(|k| [matrix(k, rows, cols, 1), matrix(k, rows, cols, 1).interleave()])
        .enumerate()
    {
        for m in [6, 20] {
            let x = inputs(m, cols, 100 + seed as u64);
            assert_every_path_within_the_bound(&w, &x, m);
        }
    }
}

/// `linear_many` of `x` (`m` rows) with `w` on every path this CPU runs, against the dequantized
/// weights in f64, within `bound`.
fn assert_every_path_within_the_bound(w: &QuantMatrix, x: &[f32], m: usize) {
    let (rows, cols, kind) = (w.rows, w.cols, w.kind);
    let mut dense = vec![0.0f32; rows * cols];
    for (r, row) in dense.chunks_exact_mut(cols).enumerate() {
        w.dequantize_row(r, row);
    }
    for path in available_paths() {
        dot::force(Some(path)).unwrap();
        let mut out = vec![0.0f32; m * rows];
        linear_many(x, m, &[w], &mut [&mut out]);
        for i in 0..m {
            for r in 0..rows {
                let (wr, xr) = (&dense[r * cols..(r + 1) * cols], &x[i * cols..(i + 1) * cols]);
                let exact: f64 = wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                let got = out[i * rows + r];
                let tol = bound(wr, xr);
                assert!(
                    ((got as f64) - exact).abs() <= tol as f64,
                    "{kind:?} {path:?} interleaved {} [{i},{r}]: {got} vs {exact} (bound {tol})",
                    w.is_interleaved()
                );
            }
        }
    }
    dot::force(None).unwrap();
}

#[test]
fn the_largest_values_against_the_largest_activations_do_not_saturate() {
    // every value at its format's largest (Q8_0: -128), every activation digit at +-127: the
    // 16-bit sums of the AVX2 kernel are at their fullest here
    let _lock = PATH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (rows, cols, m) = (16, 512, 5);
    for kind in QuantKind::ALL {
        let mut bytes = random_blocks(kind, rows, cols, 21);
        for b in bytes.chunks_exact_mut(kind.block_bytes()) {
            let fill = if kind == QuantKind::Q8_0 { 0x80 } else { 0xFF };
            b.fill(fill);
            for &at in scale_fields(kind) {
                b[at..at + 2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
            }
        }
        let len = bytes.len();
        let w = QuantMatrix::new(kind, rows, cols, Arc::new(bytes), 0..len).unwrap().interleave();
        let x: Vec<f32> = (0..m * cols).map(|i| if (i / cols) % 2 == 0 { 1.0 } else { -1.0 }).collect();
        assert_every_path_within_the_bound(&w, &x, m);
    }
}

#[test]
fn every_path_gives_the_same_products_up_to_float_order() {
    let _lock = PATH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let w = matrix(QuantKind::Q4_K, 8, 256, 3);
    let x = inputs(1, 256, 4);
    let run = |path| {
        dot::force(Some(path)).unwrap();
        let mut out = vec![0.0f32; 8];
        linear_many(&x, 1, &[&w], &mut [&mut out]);
        out
    };
    let reference = run(DotPath::Portable);
    for path in available_paths() {
        for (a, b) in run(path).iter().zip(&reference) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{path:?}: {a} vs {b}");
        }
    }
    dot::force(None).unwrap();
}

#[test]
fn activations_quantize_like_llama_cpp() {
    let x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
    let a = QuantizedRows::new(&x, 32);
    // d = 16 / 127; -16 -> -127, 15 -> round(15 * 127 / 16) = 119
    assert_eq!((a.hi_row(0)[0], a.hi_row(0)[31]), (-127, 119));
    let d = 16.0f32 / 127.0;
    assert!((a.lanes_row(0)[0] - d / LO_SCALE).abs() < 1e-9);
    // the second digit: 15 - 119 d = 0.0079 d -> round(0.0079 * 128) = 1
    for (i, (&h, &l)) in a.hi_row(0)[..32].iter().zip(&a.lo_row(0)[..32]).enumerate() {
        let back = d * (h as f32 + l as f32 / LO_SCALE);
        assert!((back - x[i]).abs() <= 0.5 * d / LO_SCALE + 1e-6, "{i}: {back} vs {}", x[i]);
    }
    let zero = QuantizedRows::new(&[0.0; 32], 32);
    assert!(zero.hi_row(0).iter().chain(zero.lo_row(0)).all(|&v| v == 0) && zero.lanes_row(0)[0] == 0.0);
}

#[test]
fn quantizers_round_trip_within_half_a_step() {
    let x = inputs(4, 64, 9);
    for kind in [QuantKind::Q8_0, QuantKind::Q4_0] {
        let w = QuantMatrix::quantize(kind, 4, 64, &x).unwrap();
        let mut back = vec![0.0f32; 64];
        for r in 0..4 {
            w.dequantize_row(r, &mut back);
            for (b, (xb, yb)) in x[r * 64..(r + 1) * 64].chunks(32).zip(back.chunks(32)).enumerate() {
                let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                // Q4_0 maps the largest magnitude to -8 steps, so the other sign reaches only 7:
                // values there may lie a whole step beyond the last level
                let (step, steps) = if kind == QuantKind::Q8_0 { (amax / 127.0, 0.5) } else { (amax / 8.0, 1.0) };
                for (a, b2) in xb.iter().zip(yb) {
                    // plus the f16 rounding of the scale
                    assert!((a - b2).abs() <= steps * step + 2e-3 * amax, "{kind:?} block {b}: {a} vs {b2}");
                }
            }
        }
    }
}

#[test]
fn unpacked_rows_dequantize_to_the_formats_values() {
    // Q4_1 by hand: d = 0.5, m = -1, byte j = (j % 16) | (15 - j % 16) << 4
    let mut block = vec![];
    block.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
    block.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut row = UnpackedRow::new(32);
    QuantKind::Q4_1.unpack_row(&block, &mut row);
    let mut out = vec![0.0; 32];
    row.dequantize(&mut out);
    for j in 0..16 {
        assert_eq!(out[j], 0.5 * j as f32 - 1.0);
        assert_eq!(out[j + 16], 0.5 * (15 - j) as f32 - 1.0);
    }
}
