//! A matrix of quantized rows and its product with f32 inputs: the inputs are quantized once
//! (shared by every matrix of a group), then each task unpacks a run of weight rows one at a
//! time and takes every input row's integer dot product with it while it sits in L1.

use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;

use super::activation::QuantizedRows;
use super::blocks::GROUP;
use super::blocks::*;
use super::dot::{self, dot_scaled, DotPath};
use super::interleaved::{self, Interleave};
use super::{as_blocks, QuantKind, UnpackedRow};
use crate::error::{EllmError, Result};
use crate::kernels::pool::{self, DisjointWrites};

/// Bytes that outlive their matrix's users: a file mapping or an owned copy.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// `[rows, cols]` stored as blocks of `kind`, used as `x @ W^T`.
pub struct QuantMatrix {
    pub kind: QuantKind,
    pub rows: usize,
    pub cols: usize,
    layout: Layout,
}

enum Layout {
    /// Row after row, as a GGUF file stores them (read in place from its mapping).
    Rows {
        bytes: SharedBytes,
        range: Range<usize>,
        /// Logical row -> stored row, where the file's row order differs from the model's.
        row_map: Option<Vec<u32>>,
    },
    /// Groups of 16 rows repacked for the AVX-512 VNNI kernel (`interleaved`).
    Interleaved { data: Vec<u8>, group_bytes: usize },
}

impl QuantMatrix {
    /// `bytes[range]` must hold exactly `rows` rows of `cols / kind.block_elems()` blocks.
    pub fn new(kind: QuantKind, rows: usize, cols: usize, bytes: SharedBytes, range: Range<usize>) -> Result<Self> {
        if !cols.is_multiple_of(kind.block_elems()) {
            return Err(EllmError::Value(format!(
                "rows of {cols} values are not whole {} blocks of {}",
                kind.name(),
                kind.block_elems()
            )));
        }
        let want = rows * cols / kind.block_elems() * kind.block_bytes();
        if range.len() != want || range.end > (*bytes).as_ref().len() {
            return Err(EllmError::Value(format!(
                "a {rows}x{cols} {} matrix takes {want} bytes, got {}",
                kind.name(),
                range.len()
            )));
        }
        Ok(QuantMatrix { kind, rows, cols, layout: Layout::Rows { bytes, range, row_map: None } })
    }

    /// Quantize f32 rows (Q8_0 or Q4_0).
    pub fn quantize(kind: QuantKind, rows: usize, cols: usize, data: &[f32]) -> Result<Self> {
        if !cols.is_multiple_of(32) {
            return Err(EllmError::Value(format!("rows of {cols} values cannot be quantized in blocks of 32")));
        }
        let bytes = super::quantizer::quantize(data, kind);
        let len = bytes.len();
        QuantMatrix::new(kind, rows, cols, Arc::new(bytes), 0..len)
    }

    /// Read the rows in the order `map` gives (logical row i is stored row map[i]).
    pub fn with_row_map(mut self, map: Vec<u32>) -> Self {
        assert!(map.len() == self.rows && map.iter().all(|&r| (r as usize) < self.rows));
        if let Layout::Rows { row_map, .. } = &mut self.layout {
            *row_map = Some(map);
        }
        self
    }

    /// Repack for the group kernels (AVX-512 VNNI, AVX2) where this CPU's best path has one and
    /// the rows come in whole groups of 16; otherwise keep the rows as they are.
    pub fn for_this_cpu(self) -> Self {
        let grouped = matches!(dot::best(), DotPath::Avx512Vnni | DotPath::Avx2);
        if grouped && self.rows.is_multiple_of(interleaved::ROWS) {
            self.interleave()
        } else {
            self
        }
    }

    /// The rows repacked in groups of 16 (`rows` must be a multiple of 16).
    pub fn interleave(self) -> Self {
        assert!(self.rows.is_multiple_of(interleaved::ROWS));
        if matches!(self.layout, Layout::Interleaved { .. }) {
            return self;
        }
        fn pack_all<F: Interleave>(m: &QuantMatrix) -> Vec<u8> {
            let group_bytes = interleaved::group_bytes(m.kind, m.cols);
            let mut data = huge_page_buffer(m.rows / interleaved::ROWS * group_bytes);
            pool::install(|| {
                data.par_chunks_mut(group_bytes).enumerate().for_each(|(g, out)| {
                    let rows: [&[F]; interleaved::ROWS] =
                        std::array::from_fn(|r| as_blocks::<F>(m.row(g * interleaved::ROWS + r)));
                    interleaved::pack(&rows, out);
                })
            });
            data
        }
        let data = with_kind!(self.kind, F => pack_all::<F>(&self));
        let group_bytes = interleaved::group_bytes(self.kind, self.cols);
        QuantMatrix { layout: Layout::Interleaved { data, group_bytes }, ..self }
    }

    /// Bytes of its storage.
    pub fn nbytes(&self) -> usize {
        match &self.layout {
            Layout::Rows { .. } => self.rows * self.row_bytes(),
            Layout::Interleaved { data, .. } => data.len(),
        }
    }

    pub fn is_interleaved(&self) -> bool {
        matches!(self.layout, Layout::Interleaved { .. })
    }

    pub fn row_bytes(&self) -> usize {
        self.cols / self.kind.block_elems() * self.kind.block_bytes()
    }

    /// The stored bytes of logical row `r` (of a matrix kept row after row).
    fn row(&self, r: usize) -> &[u8] {
        let Layout::Rows { bytes, range, row_map } = &self.layout else { panic!("rows of an interleaved matrix") };
        let stored = row_map.as_ref().map_or(r, |m| m[r] as usize);
        let start = range.start + stored * self.row_bytes();
        &(**bytes).as_ref()[start..start + self.row_bytes()]
    }

    /// Row `r` in the row-at-a-time kernels' form.
    pub fn unpack(&self, r: usize, row: &mut UnpackedRow) {
        match &self.layout {
            Layout::Rows { .. } => self.kind.unpack_row(self.row(r), row),
            Layout::Interleaved { data, group_bytes } => {
                let group = &data[r / interleaved::ROWS * group_bytes..][..*group_bytes];
                let blocks = self.cols / self.kind.block_elems();
                with_kind!(self.kind, F => interleaved::unpack_row::<F>(group, blocks, r % interleaved::ROWS, row))
            }
        }
    }

    /// Row `r` as floats into `out[cols]`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let mut row = UnpackedRow::new(self.cols);
        self.unpack(r, &mut row);
        row.dequantize(&mut out[..self.cols]);
    }
}

/// A zeroed buffer that the kernel may back with 2 MB pages: a matrix read in full on every
/// token then takes a TLB entry per 2 MB instead of per 4 kB, and is faulted in 512 times
/// fewer steps when it is filled.
fn huge_page_buffer(len: usize) -> Vec<u8> {
    let data = vec![0u8; len];
    #[cfg(target_os = "linux")]
    if len >= 4 << 20 {
        // SAFETY: advice on memory this Vec owns; it changes no contents.
        unsafe { libc::madvise(data.as_ptr() as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    }
    data
}

/// Weight bytes per parallel task.
const BYTES_PER_TASK: usize = 16 * 1024;
/// Input rows per call of the dot kernel.
const TILE_INPUTS: usize = 4;
/// Inputs past which the AVX-512 kernel takes two groups of weight rows at a time.
const PAIRS_FROM_INPUTS: usize = 16;

/// `outs[i][m, mats[i].rows] = x[m, k] @ mats[i]^T` for matrices that all take rows of `k`.
pub fn linear_many(x: &[f32], m: usize, mats: &[&QuantMatrix], outs: &mut [&mut [f32]]) {
    assert_eq!(mats.len(), outs.len());
    let Some(first) = mats.first() else { return };
    let k = first.cols;
    assert!(mats.iter().all(|w| w.cols == k) && x.len() == m * k);
    let act = QuantizedRows::new(x, k);
    let path = dot::active();
    let mut tasks: Vec<(&QuantMatrix, DisjointWrites, Range<usize>)> = Vec::new();
    for (w, out) in mats.iter().zip(outs.iter_mut()) {
        assert_eq!(out.len(), m * w.rows);
        let mut per_task = (BYTES_PER_TASK / w.row_bytes().max(1)).max(1);
        if w.is_interleaved() {
            per_task = per_task.next_multiple_of(interleaved::ROWS);
        }
        let writes = DisjointWrites(out.as_mut_ptr());
        for start in (0..w.rows).step_by(per_task) {
            tasks.push((w, DisjointWrites(writes.0), start..(start + per_task).min(w.rows)));
        }
    }
    let run = |(w, out, rows): (&QuantMatrix, DisjointWrites, Range<usize>)| {
        // SAFETY: tasks cover disjoint rows of each output.
        unsafe {
            match &w.layout {
                #[cfg(target_arch = "x86_64")]
                Layout::Interleaved { data, group_bytes } if path == DotPath::Avx512Vnni => {
                    groups_product(w, data, *group_bytes, &act, &out, rows)
                }
                #[cfg(target_arch = "x86_64")]
                Layout::Interleaved { data, group_bytes } if path == DotPath::Avx2 => {
                    half_groups_product(w, data, *group_bytes, &act, &out, rows)
                }
                _ => rows_product(w, &act, path, &out, rows),
            }
        }
    };
    if tasks.len() == 1 {
        tasks.into_iter().for_each(run);
    } else {
        pool::install(|| tasks.into_par_iter().for_each(run));
    }
}

/// Output columns `rows` (weight rows) of `out[m, w.rows]` for every input row of `act`.
///
/// # Safety
/// Nobody else writes those columns meanwhile.
unsafe fn rows_product(w: &QuantMatrix, act: &QuantizedRows, path: DotPath, out: &DisjointWrites, rows: Range<usize>) {
    let (n, wide) = (w.rows, w.kind.wide());
    let mut row = UnpackedRow::new(w.cols);
    let groups = act.stride / GROUP;
    for r in rows {
        w.unpack(r, &mut row);
        let offsets = &row.offset[..groups];
        let mut i = 0;
        while i + TILE_INPUTS <= act.rows {
            let q = std::array::from_fn(|c| (act.hi_row(i + c), act.lo_row(i + c)));
            let wa = std::array::from_fn(|c| act.lanes_row(i + c));
            let dots = dot_scaled::<TILE_INPUTS>(path, &row.u, &row.scale_lanes, q, wa, wide);
            for (c, d) in dots.into_iter().enumerate() {
                *out.at((i + c) * n + r) = d + offset_dot(offsets, act.sums_row(i + c));
            }
            i += TILE_INPUTS;
        }
        for i in i..act.rows {
            let [d] = dot_scaled::<1>(
                path,
                &row.u,
                &row.scale_lanes,
                [(act.hi_row(i), act.lo_row(i))],
                [act.lanes_row(i)],
                wide,
            );
            *out.at(i * n + r) = d + offset_dot(offsets, act.sums_row(i));
        }
    }
}

/// `rows_product` for an interleaved matrix on the AVX-512 VNNI kernel: `rows` is whole groups.
///
/// # Safety
/// As `rows_product`; and the CPU has AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
unsafe fn groups_product(
    w: &QuantMatrix,
    data: &[u8],
    group_bytes: usize,
    act: &QuantizedRows,
    out: &DisjointWrites,
    rows: Range<usize>,
) {
    use interleaved::ROWS;
    let n = w.rows;
    let group = |first_row: usize| &data[first_row / ROWS * group_bytes..][..group_bytes];
    let put = |first_row: usize, i: usize, values: &[f32; ROWS]| {
        for (r, &v) in values.iter().enumerate() {
            *out.at(i * n + first_row + r) = v;
        }
    };
    // Two groups at a time (where the format's accumulators fit the registers twice over) share
    // each activation load, which pays when many inputs make the product compute-bound. A few
    // inputs stream the weights from memory, and one group at a time streams faster (decode:
    // 2.8-3.1 ms a step against 3.5-3.9 with pairs, Zen 5).
    let pairs = !w.kind.split_halves() && act.rows > PAIRS_FROM_INPUTS;
    let firsts: Vec<usize> = rows.step_by(ROWS).collect();
    let mut at = 0;
    while at < firsts.len() {
        if pairs && at + 1 < firsts.len() {
            let (a, b) = (firsts[at], firsts[at + 1]);
            tiles::<2>(w.kind, [group(a), group(b)], act, &mut |k, i, v| put([a, b][k], i, v));
            at += 2;
        } else {
            let a = firsts[at];
            tiles::<1>(w.kind, [group(a)], act, &mut |_, i, v| put(a, i, v));
            at += 1;
        }
    }
}

/// What kernel call `call` of `calls` over one group prefetches: the first streams its group in.
/// With more calls to come on that group alone (`overlap`), the later ones bring in the next
/// group between them, so the memory works while they compute from the cache (Zen 5, 2-16
/// inputs: steps 10-15% faster than with the memory idle meanwhile).
#[cfg(target_arch = "x86_64")]
fn prefetch_for(call: usize, calls: usize, overlap: bool) -> interleaved::Prefetch {
    use interleaved::Prefetch;
    match call {
        0 => Prefetch::Ahead,
        _ if overlap => Prefetch::Next { part: call - 1, parts: calls - 1 },
        _ => Prefetch::Off,
    }
}

/// Every activation row against G groups, TILE_INPUTS rows at a time, handing each group's 16
/// results for input row i to `put(group index, i, results)`.
///
/// # Safety
/// As `group_dot`.
#[cfg(target_arch = "x86_64")]
unsafe fn tiles<const G: usize>(
    kind: QuantKind,
    groups: [&[u8]; G],
    act: &QuantizedRows,
    put: &mut dyn FnMut(usize, usize, &[f32; interleaved::ROWS]),
) {
    use interleaved::x86::group_dot;
    use interleaved::ROWS;
    let calls = act.rows / TILE_INPUTS + act.rows % TILE_INPUTS;
    let prefetch = |call: usize| prefetch_for(call, calls, G == 1);
    let mut i = 0;
    let mut call = 0;
    while i + TILE_INPUTS <= act.rows {
        let mut tile = [[[0.0f32; ROWS]; TILE_INPUTS]; G];
        with_kind!(kind, F => group_dot::<F, TILE_INPUTS, G>(groups, act, i, prefetch(call), &mut tile));
        call += 1;
        for (k, rows) in tile.iter().enumerate() {
            for (c, values) in rows.iter().enumerate() {
                put(k, i + c, values);
            }
        }
        i += TILE_INPUTS;
    }
    for i in i..act.rows {
        let mut tile = [[[0.0f32; ROWS]; 1]; G];
        with_kind!(kind, F => group_dot::<F, 1, G>(groups, act, i, prefetch(call), &mut tile));
        call += 1;
        for (k, rows) in tile.iter().enumerate() {
            put(k, i, &rows[0]);
        }
    }
}

/// `rows_product` for an interleaved matrix on the AVX2 kernel: `rows` is whole groups. Tiles
/// of several input rows take half a group at a time (the registers hold no more); a single
/// row takes the whole group.
///
/// # Safety
/// As `rows_product`; and the CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
unsafe fn half_groups_product(
    w: &QuantMatrix,
    data: &[u8],
    group_bytes: usize,
    act: &QuantizedRows,
    out: &DisjointWrites,
    rows: Range<usize>,
) {
    use super::interleaved_avx2::{half_group_dot, HALF};
    let n = w.rows;
    let calls = 2 * (act.rows / TILE_INPUTS) + act.rows % TILE_INPUTS;
    for first_row in rows.step_by(interleaved::ROWS) {
        let group = &data[first_row / interleaved::ROWS * group_bytes..][..group_bytes];
        let put = |i: usize, r0: usize, values: &[f32; HALF]| {
            for (r, &v) in values.iter().enumerate() {
                *out.at(i * n + first_row + r0 + r) = v;
            }
        };
        let mut i = 0;
        let mut call = 0;
        while i + TILE_INPUTS <= act.rows {
            for r0 in [0, HALF] {
                let mut tile = [[[0.0f32; HALF]; 1]; TILE_INPUTS];
                let prefetch = prefetch_for(call, calls, true);
                with_kind!(w.kind, F => half_group_dot::<F, TILE_INPUTS, 1>(group, r0, act, i, prefetch, &mut tile));
                call += 1;
                for (c, [values]) in tile.iter().enumerate() {
                    put(i + c, r0, values);
                }
            }
            i += TILE_INPUTS;
        }
        for i in i..act.rows {
            let mut tile = [[[0.0f32; HALF]; 2]; 1];
            let prefetch = prefetch_for(call, calls, true);
            with_kind!(w.kind, F => half_group_dot::<F, 1, 2>(group, 0, act, i, prefetch, &mut tile));
            call += 1;
            put(i, 0, &tile[0][0]);
            put(i, HALF, &tile[0][1]);
        }
    }
}

/// The weights' group offsets against the activations' group sums.
#[inline]
fn offset_dot(offsets: &[f32], sums: &[f32]) -> f32 {
    offsets.iter().zip(sums).map(|(o, s)| o * s).sum()
}
