//! GGUF's K-quants (Q4_K, Q5_K, Q6_K): super-blocks of 256 weights in sub-blocks with their
//! own small scales, multiplied against activations quantized to Q8_K, as ggml pairs them.
//!
//! A super-block's integer part (each sub-block's dot product times its scale) is exact in
//! i32, so the SIMD paths compute only that and every path applies the f32 scales through the
//! same two functions ([`with_mins`], [`scaled`]): scalar and SIMD agree bit for bit.

use super::ActRow;

/// Weights per super-block.
pub(crate) const QK_K: usize = 256;

/// Q4_K: `x = d·sc·q − dmin·m` per sub-block of 32, q in 0..16; two nibbles per byte (each
/// 32 bytes hold sub-block 2j in the low nibbles and 2j+1 in the high ones).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q4K {
    pub(super) d: f32,
    pub(super) dmin: f32,
    pub(super) sc: [u8; 8],
    pub(super) m: [u8; 8],
    pub(super) qs: [u8; 128],
}

/// Q5_K: as Q4_K with a fifth bit per weight in `qh` (bit 2j / 2j+1 of byte l).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q5K {
    pub(super) d: f32,
    pub(super) dmin: f32,
    pub(super) sc: [u8; 8],
    pub(super) m: [u8; 8],
    pub(super) qh: [u8; 32],
    pub(super) qs: [u8; 128],
}

/// Q6_K: `x = d·sc·(q − 32)` per sub-block of 16, q in 0..64 (4 low bits in `ql`, 2 high
/// bits in `qh`), scales signed 8-bit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Q6K {
    pub(super) d: f32,
    pub(super) sc: [i8; 16],
    pub(super) ql: [u8; 128],
    pub(super) qh: [u8; 64],
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    super::f16_at(b, at)
}

/// The 8 six-bit scales and mins packed in 12 bytes (ggml's `get_scale_min_k4`).
fn scales_mins(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..8 {
        (sc[j], m[j]) = if j < 4 {
            (q[j] & 63, q[j + 4] & 63)
        } else {
            (
                (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
                (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
            )
        };
    }
    (sc, m)
}

impl Q4K {
    pub(super) const BYTES: usize = 144;

    pub(super) fn parse(b: &[u8]) -> Self {
        let (sc, m) = scales_mins(&b[4..16]);
        Self {
            d: f16_at(b, 0),
            dmin: f16_at(b, 2),
            sc,
            m,
            qs: b[16..144].try_into().expect("128 bytes"),
        }
    }

    /// Quant of element `e` (0..256).
    fn q(&self, e: usize) -> u8 {
        let byte = self.qs[32 * (e / 64) + e % 32];
        if e % 64 < 32 {
            byte & 0xF
        } else {
            byte >> 4
        }
    }

    /// As candle's `to_float` (same operations, same order).
    pub(super) fn dequantize(&self, y: &mut [f32]) {
        for (e, y) in y.iter_mut().enumerate().take(QK_K) {
            let s = e / 32;
            let d1 = self.d * self.sc[s] as f32;
            let m1 = self.dmin * self.m[s] as f32;
            *y = d1 * self.q(e) as f32 - m1;
        }
    }
}

impl Q5K {
    pub(super) const BYTES: usize = 176;

    pub(super) fn parse(b: &[u8]) -> Self {
        let (sc, m) = scales_mins(&b[4..16]);
        Self {
            d: f16_at(b, 0),
            dmin: f16_at(b, 2),
            sc,
            m,
            qh: b[16..48].try_into().expect("32 bytes"),
            qs: b[48..176].try_into().expect("128 bytes"),
        }
    }

    fn q(&self, e: usize) -> u8 {
        let s = e / 32;
        let l = e % 32;
        let byte = self.qs[32 * (s / 2) + l];
        let low = if s.is_multiple_of(2) { byte & 0xF } else { byte >> 4 };
        low | (((self.qh[l] >> s) & 1) << 4)
    }

    pub(super) fn dequantize(&self, y: &mut [f32]) {
        for (e, y) in y.iter_mut().enumerate().take(QK_K) {
            let s = e / 32;
            let d1 = self.d * self.sc[s] as f32;
            let m1 = self.dmin * self.m[s] as f32;
            // candle adds the fifth bit as 16.0 in f32: the same value, exactly.
            *y = d1 * self.q(e) as f32 - m1;
        }
    }
}

impl Q6K {
    pub(super) const BYTES: usize = 210;

    pub(super) fn parse(b: &[u8]) -> Self {
        let mut sc = [0i8; 16];
        for (s, &v) in sc.iter_mut().zip(&b[192..208]) {
            *s = v as i8;
        }
        Self {
            d: f16_at(b, 208),
            sc,
            ql: b[..128].try_into().expect("128 bytes"),
            qh: b[128..192].try_into().expect("64 bytes"),
        }
    }

    /// Unsigned quant (0..64) of element `e`.
    fn q(&self, e: usize) -> u8 {
        let (half, k, l) = (e / 128, (e % 128) / 32, e % 32);
        let ql = self.ql[64 * half + 32 * (k % 2) + l];
        let low = if k < 2 { ql & 0xF } else { ql >> 4 };
        low | (((self.qh[32 * half + l] >> (2 * k)) & 3) << 4)
    }

    pub(super) fn dequantize(&self, y: &mut [f32]) {
        for (e, y) in y.iter_mut().enumerate().take(QK_K) {
            *y = self.d * self.sc[e / 16] as f32 * (self.q(e) as i8 - 32) as f32;
        }
    }
}

/// Activations for K-quants, as ggml's `quantize_row_q8_K`: one f32 scale per 256 values
/// (the signed value of largest magnitude maps to −127) and the sums of each 16.
pub(super) fn quantize_q8k(x: &[f32], q: &mut [[i8; 32]], bsums: &mut [i16; 16]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.iter_mut().for_each(|c| *c = [0; 32]);
        *bsums = [0; 16];
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (chunk, xs) in q.iter_mut().zip(x.chunks_exact(32)) {
        for (dst, &v) in chunk.iter_mut().zip(xs) {
            // ggml's nearest_int rounds half to even.
            *dst = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
    }
    for (j, s) in bsums.iter_mut().enumerate() {
        *s = q[j / 2][16 * (j % 2)..16 * (j % 2) + 16]
            .iter()
            .map(|&v| v as i16)
            .sum();
    }
    1.0 / iscale
}

/// Σ min × (sum of the activations under it), for Q4_K/Q5_K's offset term.
fn mins(m: &[u8; 8], bsums: &[i16; 16]) -> i32 {
    (0..8)
        .map(|j| m[j] as i32 * (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32))
        .sum()
}

/// Q6_K's −32 offset: Σ scale × (sum of the activations under it) × 32.
fn offset6(sc: &[i8; 16], bsums: &[i16; 16]) -> i32 {
    32 * (0..16).map(|j| sc[j] as i32 * bsums[j] as i32).sum::<i32>()
}

/// Add one Q4_K/Q5_K super-block to `acc` (every kernel ends each super-block here).
#[inline(always)]
fn with_mins(acc: f32, da: f32, d: f32, dmin: f32, sumi: i32, summ: i32) -> f32 {
    acc + da * d * sumi as f32 - da * dmin * summ as f32
}

/// Add one Q6_K super-block to `acc`.
#[inline(always)]
fn scaled(acc: f32, da: f32, d: f32, sumi: i32) -> f32 {
    acc + da * d * sumi as f32
}

/// Activation chunk `c` (of 32) of super-block `b`.
fn chunk<'a>(a: &ActRow<'a>, b: usize, c: usize) -> &'a [i8; 32] {
    &a.qs[b * 8 + c]
}

pub(super) mod scalar {
    use super::*;

    pub(in super::super) fn dot_q4k(w: &[Q4K], a: &ActRow) -> f32 {
        let mut acc = 0f32;
        for (b, blk) in w.iter().enumerate() {
            let mut sumi = 0i32;
            for s in 0..8 {
                let x = chunk(a, b, s);
                let dot: i32 = (0..32)
                    .map(|l| blk.q(32 * s + l) as i32 * x[l] as i32)
                    .sum();
                sumi += blk.sc[s] as i32 * dot;
            }
            let summ = mins(&blk.m, &a.bsums[b]);
            acc = with_mins(acc, a.d[b], blk.d, blk.dmin, sumi, summ);
        }
        acc
    }

    pub(in super::super) fn dot_q5k(w: &[Q5K], a: &ActRow) -> f32 {
        let mut acc = 0f32;
        for (b, blk) in w.iter().enumerate() {
            let mut sumi = 0i32;
            for s in 0..8 {
                let x = chunk(a, b, s);
                let dot: i32 = (0..32)
                    .map(|l| blk.q(32 * s + l) as i32 * x[l] as i32)
                    .sum();
                sumi += blk.sc[s] as i32 * dot;
            }
            let summ = mins(&blk.m, &a.bsums[b]);
            acc = with_mins(acc, a.d[b], blk.d, blk.dmin, sumi, summ);
        }
        acc
    }

    pub(in super::super) fn dot_q6k(w: &[Q6K], a: &ActRow) -> f32 {
        let mut acc = 0f32;
        for (b, blk) in w.iter().enumerate() {
            let mut sumi = 0i32;
            for s in 0..16 {
                let x = &chunk(a, b, s / 2)[16 * (s % 2)..16 * (s % 2) + 16];
                let dot: i32 = (0..16)
                    .map(|l| blk.q(16 * s + l) as i32 * x[l] as i32)
                    .sum();
                sumi += blk.sc[s] as i32 * dot;
            }
            sumi -= offset6(&blk.sc, &a.bsums[b]);
            acc = scaled(acc, a.d[b], blk.d, sumi);
        }
        acc
    }
}

/// The K-quant kernels for one x86 feature set. `$scales(lo, hi)` builds the per-lane scale
/// vector (`lo` for bytes 0..16, `hi` for 16..32) and `$scaled_sums(w, a, s)` gives 8 i32
/// lanes, each 4 adjacent u8 × i8 products times its scale; both variants give the same
/// integers, and only integers leave the loop.
#[cfg(target_arch = "x86_64")]
macro_rules! k_kernels {
    ($features:literal, $scales:ident, $scaled_sums:ident) => {
        #[target_feature(enable = $features)]
        unsafe fn hsum_i32(v: __m256i) -> i32 {
            let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01));
            _mm_cvtsi128_si32(s)
        }

        #[target_feature(enable = $features)]
        unsafe fn load(p: *const u8) -> __m256i {
            _mm256_loadu_si256(p as *const __m256i)
        }

        /// # Safety
        /// The CPU must have this module's features; every row of `a` holds `w.len()`
        /// super-blocks (asserted by the caller).
        #[target_feature(enable = $features)]
        pub(in super::super) unsafe fn dot_q4k<const R: usize>(
            w: &[Q4K],
            a: &[ActRow; R],
            out: &mut [f32],
        ) {
            let low = _mm256_set1_epi8(0x0F);
            let mut acc = [0f32; R];
            for (b, blk) in w.iter().enumerate() {
                let mut sumi = [_mm256_setzero_si256(); R];
                for j in 0..4 {
                    let packed = load(blk.qs.as_ptr().add(32 * j));
                    let lo = _mm256_and_si256(packed, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                    let s_lo = $scales(blk.sc[2 * j] as i32, blk.sc[2 * j] as i32);
                    let s_hi = $scales(blk.sc[2 * j + 1] as i32, blk.sc[2 * j + 1] as i32);
                    for r in 0..R {
                        let ar = a.get_unchecked(r);
                        let x0 = load(ar.qs.get_unchecked(b * 8 + 2 * j).as_ptr() as *const u8);
                        let x1 = load(ar.qs.get_unchecked(b * 8 + 2 * j + 1).as_ptr() as *const u8);
                        let both = _mm256_add_epi32(
                            $scaled_sums(lo, x0, s_lo),
                            $scaled_sums(hi, x1, s_hi),
                        );
                        sumi[r] = _mm256_add_epi32(sumi[r], both);
                    }
                }
                for r in 0..R {
                    let ar = a.get_unchecked(r);
                    let summ = mins(&blk.m, ar.bsums.get_unchecked(b));
                    let da = *ar.d.get_unchecked(b);
                    acc[r] = with_mins(acc[r], da, blk.d, blk.dmin, hsum_i32(sumi[r]), summ);
                }
            }
            out[..R].copy_from_slice(&acc);
        }

        /// # Safety
        /// As [`dot_q4k`].
        #[target_feature(enable = $features)]
        pub(in super::super) unsafe fn dot_q5k<const R: usize>(
            w: &[Q5K],
            a: &[ActRow; R],
            out: &mut [f32],
        ) {
            let low = _mm256_set1_epi8(0x0F);
            let one = _mm256_set1_epi8(1);
            let mut acc = [0f32; R];
            for (b, blk) in w.iter().enumerate() {
                let mut sumi = [_mm256_setzero_si256(); R];
                // The fifth bits of sub-blocks 2j and 2j+1 sit in bits 2j, 2j+1 of each byte:
                // shift them down two at a time (16-bit shifts only move bits we mask off).
                let mut hbits = load(blk.qh.as_ptr());
                for j in 0..4 {
                    let packed = load(blk.qs.as_ptr().add(32 * j));
                    let h_lo = _mm256_slli_epi16(_mm256_and_si256(hbits, one), 4);
                    let h_hi =
                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 1), one), 4);
                    hbits = _mm256_srli_epi16(hbits, 2);
                    let lo = _mm256_or_si256(_mm256_and_si256(packed, low), h_lo);
                    let hi =
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(packed, 4), low), h_hi);
                    let s_lo = $scales(blk.sc[2 * j] as i32, blk.sc[2 * j] as i32);
                    let s_hi = $scales(blk.sc[2 * j + 1] as i32, blk.sc[2 * j + 1] as i32);
                    for r in 0..R {
                        let ar = a.get_unchecked(r);
                        let x0 = load(ar.qs.get_unchecked(b * 8 + 2 * j).as_ptr() as *const u8);
                        let x1 = load(ar.qs.get_unchecked(b * 8 + 2 * j + 1).as_ptr() as *const u8);
                        let both = _mm256_add_epi32(
                            $scaled_sums(lo, x0, s_lo),
                            $scaled_sums(hi, x1, s_hi),
                        );
                        sumi[r] = _mm256_add_epi32(sumi[r], both);
                    }
                }
                for r in 0..R {
                    let ar = a.get_unchecked(r);
                    let summ = mins(&blk.m, ar.bsums.get_unchecked(b));
                    let da = *ar.d.get_unchecked(b);
                    acc[r] = with_mins(acc[r], da, blk.d, blk.dmin, hsum_i32(sumi[r]), summ);
                }
            }
            out[..R].copy_from_slice(&acc);
        }

        /// # Safety
        /// As [`dot_q4k`].
        #[target_feature(enable = $features)]
        pub(in super::super) unsafe fn dot_q6k<const R: usize>(
            w: &[Q6K],
            a: &[ActRow; R],
            out: &mut [f32],
        ) {
            let low = _mm256_set1_epi8(0x0F);
            let two = _mm256_set1_epi8(3);
            let mut acc = [0f32; R];
            for (b, blk) in w.iter().enumerate() {
                let mut sumi = [_mm256_setzero_si256(); R];
                for half in 0..2 {
                    let ql0 = load(blk.ql.as_ptr().add(64 * half));
                    let ql1 = load(blk.ql.as_ptr().add(64 * half + 32));
                    let qh = load(blk.qh.as_ptr().add(32 * half));
                    // Two high bits per weight, at bits 0-1, 2-3, 4-5, 6-7 of each qh byte.
                    let h0 = _mm256_slli_epi16(_mm256_and_si256(qh, two), 4);
                    let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), two), 4);
                    let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), two), 4);
                    let h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), two), 4);
                    let q = [
                        _mm256_or_si256(_mm256_and_si256(ql0, low), h0),
                        _mm256_or_si256(_mm256_and_si256(ql1, low), h1),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low), h2),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low), h3),
                    ];
                    for (k, &qk) in q.iter().enumerate() {
                        let s = 8 * half + 2 * k;
                        let scales = $scales(blk.sc[s] as i32, blk.sc[s + 1] as i32);
                        for r in 0..R {
                            let ar = a.get_unchecked(r);
                            let x = load(
                                ar.qs.get_unchecked(b * 8 + 4 * half + k).as_ptr() as *const u8
                            );
                            sumi[r] = _mm256_add_epi32(sumi[r], $scaled_sums(qk, x, scales));
                        }
                    }
                }
                for r in 0..R {
                    let ar = a.get_unchecked(r);
                    let total = hsum_i32(sumi[r]) - offset6(&blk.sc, ar.bsums.get_unchecked(b));
                    acc[r] = scaled(acc[r], *ar.d.get_unchecked(b), blk.d, total);
                }
            }
            out[..R].copy_from_slice(&acc);
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn scales(lo: i32, hi: i32) -> __m256i {
        _mm256_set_m128i(_mm_set1_epi16(hi as i16), _mm_set1_epi16(lo as i16))
    }

    /// `vpmaddubsw` pairs (at most 63·127·2, no saturation) times the i16 scales by `vpmaddwd`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scaled_sums(w: __m256i, a: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), s)
    }

    k_kernels!("avx2,fma", scales, scaled_sums);
}

#[cfg(target_arch = "x86_64")]
pub(super) mod vnni {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    unsafe fn scales(lo: i32, hi: i32) -> __m256i {
        _mm256_set_m128i(_mm_set1_epi32(hi), _mm_set1_epi32(lo))
    }

    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    unsafe fn scaled_sums(w: __m256i, a: __m256i, s: __m256i) -> __m256i {
        _mm256_mullo_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a), s)
    }

    k_kernels!("avx2,fma,avx512vnni,avx512vl", scales, scaled_sums);
}
