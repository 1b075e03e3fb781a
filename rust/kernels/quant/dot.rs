//! The integer dot product of a weight row unpacked to unsigned 8-bit values `u` with
//! activations in two signed 8-bit digits (`activation`), summed exactly in 32-bit lanes of 4
//! values, `s[l] = (sum u*hi << 7) + sum u*lo`, each lane then weighted by its weight scale
//! times its activation scale: `sum over lanes l of ws[l] * wa[l] * s[l]`.
//!
//! Four paths, chosen at run time: AVX-512 VNNI (`vpdpbusd`, 64 products per instruction),
//! AVX-VNNI (the same on 256 bits), AVX2 (`vpmaddubsw` + `vpmaddwd`) and portable Rust. All four
//! give the same integer lane sums. Never AMX.

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

use super::activation::LO_SHIFT;
use super::blocks::LANE;
use crate::error::{EllmError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DotPath {
    Avx512Vnni,
    AvxVnni,
    Avx2,
    Portable,
}

impl DotPath {
    pub const ALL: [DotPath; 4] = [DotPath::Avx512Vnni, DotPath::AvxVnni, DotPath::Avx2, DotPath::Portable];

    pub fn name(self) -> &'static str {
        match self {
            DotPath::Avx512Vnni => "avx512vnni",
            DotPath::AvxVnni => "avxvnni",
            DotPath::Avx2 => "avx2",
            DotPath::Portable => "portable",
        }
    }

    pub fn from_name(name: &str) -> Option<DotPath> {
        DotPath::ALL.into_iter().find(|p| p.name() == name)
    }

    /// This CPU can run the path.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            match self {
                DotPath::Avx512Vnni => has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
                DotPath::AvxVnni => has!("avx2") && has!("avxvnni"),
                DotPath::Avx2 => has!("avx2"),
                DotPath::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == DotPath::Portable
        }
    }
}

/// 0: the best path this CPU has; otherwise 1 + the index in `DotPath::ALL` of a forced one.
static FORCED: AtomicU8 = AtomicU8::new(0);

/// Force a path (tests and benchmarks), or go back to the best one with None.
pub fn force(path: Option<DotPath>) -> Result<()> {
    match path {
        None => FORCED.store(0, Relaxed),
        Some(p) if p.available() => {
            FORCED.store(1 + DotPath::ALL.iter().position(|&q| q == p).expect("listed") as u8, Relaxed)
        }
        Some(p) => return Err(EllmError::Value(format!("this CPU cannot run the {} kernels", p.name()))),
    }
    Ok(())
}

/// The path products take now.
pub fn active() -> DotPath {
    match FORCED.load(Relaxed) {
        0 => best(),
        i => DotPath::ALL[i as usize - 1],
    }
}

/// The best path this CPU runs.
pub fn best() -> DotPath {
    static BEST: AtomicU8 = AtomicU8::new(u8::MAX);
    let i = BEST.load(Relaxed);
    if i != u8::MAX {
        return DotPath::ALL[i as usize];
    }
    let i = DotPath::ALL.iter().position(|p| p.available()).expect("portable is always available");
    BEST.store(i as u8, Relaxed);
    DotPath::ALL[i]
}

/// `RX` products of one weight row (`u`, `ws`) with activation rows (digits `q[c] = (hi, lo)`,
/// scales `wa[c]`). `u` and every digit row hold the same number of values, a multiple of 64;
/// `ws` and `wa[c]` one scale per 4 of them. `wide` says `u` may exceed 127 (the AVX2 path then
/// splits it into nibbles).
#[inline]
pub fn dot_scaled<const RX: usize>(
    path: DotPath,
    u: &[u8],
    ws: &[f32],
    q: [(&[i8], &[i8]); RX],
    wa: [&[f32]; RX],
    wide: bool,
) -> [f32; RX] {
    let n = u.len();
    assert!(n.is_multiple_of(64) && ws.len() * LANE == n, "unpacked rows are padded to 64 values");
    for c in 0..RX {
        assert!(q[c].0.len() == n && q[c].1.len() == n && wa[c].len() * LANE == n, "activations match the row");
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `path` is one this CPU runs (`force` and `best` check), and the lengths are checked.
    unsafe {
        match path {
            DotPath::Avx512Vnni => return x86::scaled_avx512vnni(u, ws, q, wa),
            DotPath::AvxVnni => return x86::scaled_avxvnni(u, ws, q, wa),
            DotPath::Avx2 if wide => return x86::scaled_avx2::<RX, true>(u, ws, q, wa),
            DotPath::Avx2 => return x86::scaled_avx2::<RX, false>(u, ws, q, wa),
            DotPath::Portable => {}
        }
    }
    let _ = wide;
    portable_scaled(u, ws, q, wa)
}

/// The exact 32-bit lane sums of `u` with one digit row `q` on `path` (the integer half of
/// `dot_scaled`, for tests).
pub fn lane_sums(path: DotPath, u: &[u8], q: &[i8], wide: bool) -> Vec<i32> {
    assert!(u.len().is_multiple_of(64) && q.len() == u.len());
    let mut out = vec![0; u.len() / LANE];
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `dot_scaled`.
    unsafe {
        match path {
            DotPath::Avx512Vnni => return x86::lanes_avx512vnni(u, q, out),
            DotPath::AvxVnni => return x86::lanes_avxvnni(u, q, out),
            DotPath::Avx2 if wide => return x86::lanes_avx2::<true>(u, q, out),
            DotPath::Avx2 => return x86::lanes_avx2::<false>(u, q, out),
            DotPath::Portable => {}
        }
    }
    let _ = (path, wide);
    for (l, o) in out.iter_mut().enumerate() {
        *o = portable_lane(u, q, l);
    }
    out
}

#[inline(always)]
fn portable_lane(u: &[u8], q: &[i8], l: usize) -> i32 {
    (0..LANE).map(|i| u[l * LANE + i] as i32 * q[l * LANE + i] as i32).sum()
}

fn portable_scaled<const RX: usize>(u: &[u8], ws: &[f32], q: [(&[i8], &[i8]); RX], wa: [&[f32]; RX]) -> [f32; RX] {
    std::array::from_fn(|c| {
        let (hi, lo) = q[c];
        let lane = |l| (portable_lane(u, hi, l) << LO_SHIFT) + portable_lane(u, lo, l);
        (0..ws.len()).map(|l| ws[l] * wa[c][l] * lane(l) as f32).sum()
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::LO_SHIFT;

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn scaled_avx512vnni<const RX: usize>(
        u: &[u8],
        ws: &[f32],
        q: [(&[i8], &[i8]); RX],
        wa: [&[f32]; RX],
    ) -> [f32; RX] {
        let mut acc = [_mm512_setzero_ps(); RX];
        for i in (0..u.len()).step_by(64) {
            let uv = _mm512_loadu_si512(u.as_ptr().add(i).cast());
            let w = _mm512_loadu_ps(ws.as_ptr().add(i / 4));
            for c in 0..RX {
                let hi = _mm512_loadu_si512(q[c].0.as_ptr().add(i).cast());
                let lo = _mm512_loadu_si512(q[c].1.as_ptr().add(i).cast());
                let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), uv, hi);
                let sums = _mm512_dpbusd_epi32(_mm512_slli_epi32::<LO_SHIFT>(sums), uv, lo);
                let scale = _mm512_mul_ps(w, _mm512_loadu_ps(wa[c].as_ptr().add(i / 4)));
                acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[c]);
            }
        }
        acc.map(|a| _mm512_reduce_add_ps(a))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn lanes_avx512vnni(u: &[u8], q: &[i8], mut out: Vec<i32>) -> Vec<i32> {
        for i in (0..u.len()).step_by(64) {
            let s = _mm512_dpbusd_epi32(
                _mm512_setzero_si512(),
                _mm512_loadu_si512(u.as_ptr().add(i).cast()),
                _mm512_loadu_si512(q.as_ptr().add(i).cast()),
            );
            _mm512_storeu_si512(out.as_mut_ptr().add(i / 4).cast(), s);
        }
        out
    }

    /// 8 lane sums of 32 products by AVX-VNNI.
    #[inline(always)]
    unsafe fn lanes8_avxvnni(u: *const u8, q: *const i8) -> __m256i {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), _mm256_loadu_si256(u.cast()), _mm256_loadu_si256(q.cast()))
    }

    /// 8 lane sums of 32 products by AVX2. `vpmaddubsw` saturates its pair sums at 16 bits, so
    /// weights above 127 (`WIDE`) go through as two nibbles.
    #[inline(always)]
    unsafe fn lanes8_avx2<const WIDE: bool>(u: *const u8, q: *const i8) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        let (uv, qv) = (_mm256_loadu_si256(u.cast()), _mm256_loadu_si256(q.cast()));
        if WIDE {
            let low_mask = _mm256_set1_epi8(0x0F);
            let lo = _mm256_and_si256(uv, low_mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16(uv, 4), low_mask);
            let lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, qv), ones);
            let hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, qv), ones);
            _mm256_add_epi32(lo, _mm256_slli_epi32(hi, 4))
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(uv, qv), ones)
        }
    }

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    macro_rules! scaled_256 {
        ($u:ident, $ws:ident, $q:ident, $wa:ident, $lanes:expr) => {{
            let mut acc = [_mm256_setzero_ps(); RX];
            for i in (0..$u.len()).step_by(32) {
                let w = _mm256_loadu_ps($ws.as_ptr().add(i / 4));
                for c in 0..RX {
                    let hi = $lanes($u.as_ptr().add(i), $q[c].0.as_ptr().add(i));
                    let lo = $lanes($u.as_ptr().add(i), $q[c].1.as_ptr().add(i));
                    let sums = _mm256_add_epi32(_mm256_slli_epi32::<{ LO_SHIFT as i32 }>(hi), lo);
                    let scale = _mm256_mul_ps(w, _mm256_loadu_ps($wa[c].as_ptr().add(i / 4)));
                    acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[c]);
                }
            }
            acc.map(|a| hsum256(a))
        }};
    }

    #[target_feature(enable = "avx2,fma,avxvnni")]
    pub unsafe fn scaled_avxvnni<const RX: usize>(
        u: &[u8],
        ws: &[f32],
        q: [(&[i8], &[i8]); RX],
        wa: [&[f32]; RX],
    ) -> [f32; RX] {
        scaled_256!(u, ws, q, wa, |a, b| lanes8_avxvnni(a, b))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scaled_avx2<const RX: usize, const WIDE: bool>(
        u: &[u8],
        ws: &[f32],
        q: [(&[i8], &[i8]); RX],
        wa: [&[f32]; RX],
    ) -> [f32; RX] {
        scaled_256!(u, ws, q, wa, |a, b| lanes8_avx2::<WIDE>(a, b))
    }

    #[target_feature(enable = "avx2,avxvnni")]
    pub unsafe fn lanes_avxvnni(u: &[u8], q: &[i8], mut out: Vec<i32>) -> Vec<i32> {
        for i in (0..u.len()).step_by(32) {
            _mm256_storeu_si256(
                out.as_mut_ptr().add(i / 4).cast(),
                lanes8_avxvnni(u.as_ptr().add(i), q.as_ptr().add(i)),
            );
        }
        out
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn lanes_avx2<const WIDE: bool>(u: &[u8], q: &[i8], mut out: Vec<i32>) -> Vec<i32> {
        for i in (0..u.len()).step_by(32) {
            let s = lanes8_avx2::<WIDE>(u.as_ptr().add(i), q.as_ptr().add(i));
            _mm256_storeu_si256(out.as_mut_ptr().add(i / 4).cast(), s);
        }
        out
    }
}
