//! GGUF's K-quants (Q4_K, Q5_K, Q6_K): super-blocks of 256 weights in sub-blocks with their
//! own small scales, multiplied against activations quantized to Q8_K, as ggml pairs them.
//!
//! Each super-block gives 8 lanes of exact i32 sums (lane k: every sub-block's products at
//! bytes 4k..4k+4 of its 32, times the sub-block's scale), added into 8 f32 lanes by one FMA
//! with the super-block's scale, as ggml does; the mins go into one f32 sum. The scalar path
//! builds the same lanes and adds them in the same order: scalar and SIMD agree bit for bit.

use super::{f16_at, ActRow};

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
        let low = if s.is_multiple_of(2) {
            byte & 0xF
        } else {
            byte >> 4
        };
        low | (((self.qh[l] >> s) & 1) << 4)
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
            *dst = nearest_int(iscale * v).min(127) as i8;
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

/// ggml's `nearest_int`: round half to even by adding 1.5·2²³ (exact for |x| < 2²²).
/// `round_ties_even` is a libm call without SSE4.1 in the baseline: 6 % of a Qwen prefill.
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Σ min × (sum of the activations under it), for Q4_K/Q5_K's offset term.
fn mins(m: &[u8; 8], bsums: &[i16; 16]) -> i32 {
    (0..8)
        .map(|j| m[j] as i32 * (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32))
        .sum()
}

/// Lane k of Q6_K's −32 offset: 32 × Σ scale × (sum of its 16 activations) over the sums
/// 2k and 2k+1 (the lanes of `vpmaddwd` on the 16 scales and the 16 sums).
fn offset6(sc: &[i8; 16], bsums: &[i16; 16], k: usize) -> i32 {
    32 * (sc[2 * k] as i32 * bsums[2 * k] as i32 + sc[2 * k + 1] as i32 * bsums[2 * k + 1] as i32)
}

/// Q4_K and Q5_K share their scales, mins and offset term; only the quants differ.
pub(super) trait WithMins {
    /// `(d, dmin, scales, mins)`.
    fn head(&self) -> (f32, f32, &[u8; 8], &[u8; 8]);
    /// Quant of element `e` (0..256).
    fn q(&self, e: usize) -> u8;

    /// As candle's `to_float` (same operations, same order; candle adds Q5_K's fifth bit
    /// as 16.0 in f32, the same value exactly).
    fn dequantize(&self, y: &mut [f32]) {
        let (d, dmin, sc, m) = self.head();
        for (e, y) in y.iter_mut().enumerate().take(QK_K) {
            let d1 = d * sc[e / 32] as f32;
            let m1 = dmin * m[e / 32] as f32;
            *y = d1 * self.q(e) as f32 - m1;
        }
    }
}

impl WithMins for Q4K {
    fn head(&self) -> (f32, f32, &[u8; 8], &[u8; 8]) {
        (self.d, self.dmin, &self.sc, &self.m)
    }
    fn q(&self, e: usize) -> u8 {
        Q4K::q(self, e)
    }
}

impl WithMins for Q5K {
    fn head(&self) -> (f32, f32, &[u8; 8], &[u8; 8]) {
        (self.d, self.dmin, &self.sc, &self.m)
    }
    fn q(&self, e: usize) -> u8 {
        Q5K::q(self, e)
    }
}

pub(super) mod scalar {
    use super::super::scalar::hsum8;
    use super::*;

    pub(in super::super) use dot_with_mins as dot_q4k;
    pub(in super::super) use dot_with_mins as dot_q5k;

    /// Lane k of a super-block: Σ over its 8 chunks of 32 of scale(e) · q(e) · x(e) for
    /// the elements e at bytes 4k..4k+4 of each chunk.
    fn lanes(q: impl Fn(usize) -> i32, scale: impl Fn(usize) -> i32, x: &[[i8; 32]]) -> [i32; 8] {
        std::array::from_fn(|k| {
            (0..8)
                .map(|c| {
                    (4 * k..4 * k + 4)
                        .map(|l| scale(32 * c + l) * q(32 * c + l) * x[c][l] as i32)
                        .sum::<i32>()
                })
                .sum()
        })
    }

    /// Add a super-block's lanes, scaled, into `acc` (by FMA, as `vfmadd` does).
    fn add_lanes(acc: &mut [f32; 8], scale: f32, lanes: [i32; 8]) {
        for (a, l) in acc.iter_mut().zip(lanes) {
            *a = scale.mul_add(l as f32, *a);
        }
    }

    pub(in super::super) fn dot_with_mins<B: WithMins>(w: &[B], a: &ActRow) -> f32 {
        let (mut acc, mut accm) = ([0f32; 8], 0f32);
        for (b, blk) in w.iter().enumerate() {
            let (d, dmin, sc, m) = blk.head();
            let x = &a.qs[b * 8..b * 8 + 8];
            let l = lanes(|e| blk.q(e) as i32, |e| sc[e / 32] as i32, x);
            add_lanes(&mut acc, a.d[b] * d, l);
            accm += a.d[b] * dmin * mins(m, &a.bsums[b]) as f32;
        }
        hsum8(acc) - accm
    }

    pub(in super::super) fn dot_q6k(w: &[Q6K], a: &ActRow) -> f32 {
        let mut acc = [0f32; 8];
        for (b, blk) in w.iter().enumerate() {
            let x = &a.qs[b * 8..b * 8 + 8];
            let mut l = lanes(|e| blk.q(e) as i32, |e| blk.sc[e / 16] as i32, x);
            for (k, v) in l.iter_mut().enumerate() {
                *v -= offset6(&blk.sc, &a.bsums[b], k);
            }
            add_lanes(&mut acc, a.d[b] * blk.d, l);
        }
        hsum8(acc)
    }
}

/// The K-quant kernels on AVX2 (the VNNI kernel set uses them too: `vpdpbusd` would need a
/// 32-bit multiply per sub-block scale, where `vpmaddubsw` + `vpmaddwd` apply the 16-bit
/// scale in the same instruction). Only exact integers leave each super-block's loop.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum4(s: __m128i) -> i32 {
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01));
        _mm_cvtsi128_si32(s)
    }

    /// f32 lanes summed in ggml's `hsum_float_8` order.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn hsum8f(acc: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn load<T>(p: *const T) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    /// The 16-bit scales `lo` (bytes 0..16) and `hi` (16..32) of `sc`, which holds 8 i16 per
    /// 128-bit lane, in every 16-bit lane of their half.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pick(sc: __m256i, lo: i16, hi: i16) -> __m256i {
        let byte_pair = |k: i16| ((2 * k + 1) << 8) | (2 * k);
        let index = _mm256_set_m128i(_mm_set1_epi16(byte_pair(hi)), _mm_set1_epi16(byte_pair(lo)));
        _mm256_shuffle_epi8(sc, index)
    }

    /// 8 u8 scales as i16, the same 8 in both 128-bit lanes.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scales8(sc: &[u8; 8]) -> __m256i {
        _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_loadl_epi64(
            sc.as_ptr() as *const __m128i
        )))
    }

    /// [`super::mins`] in SIMD: pairs of the 16 sums, times the 8 mins.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn mins(m: &[u8; 8], bsums: &[i16; 16]) -> i32 {
        let b = load(bsums.as_ptr());
        let pairs = _mm_hadd_epi16(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
        let m16 = _mm_cvtepu8_epi16(_mm_loadl_epi64(m.as_ptr() as *const __m128i));
        hsum4(_mm_madd_epi16(m16, pairs))
    }

    /// 8 i32 lanes, each 4 adjacent u8 × i8 products times its lane's i16 scale.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scaled_sums(w: __m256i, x: *const [i8; 32], s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, load(x)), s)
    }

    /// Add a Q4_K/Q5_K super-block's exact lanes into row `ar`'s f32 lanes and its mins
    /// into `accm` (every Q4_K/Q5_K kernel ends a super-block here).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn add_with_mins(
        b: usize,
        blk: &impl WithMins,
        lanes: __m256i,
        ar: &ActRow,
        acc: &mut __m256,
        accm: &mut f32,
    ) {
        let (d, dmin, _, m) = blk.head();
        let da = *ar.d.get_unchecked(b);
        *acc = _mm256_fmadd_ps(_mm256_set1_ps(da * d), _mm256_cvtepi32_ps(lanes), *acc);
        *accm += da * dmin * mins(m, ar.bsums.get_unchecked(b)) as f32;
    }

    /// Q4_K or Q5_K: `quants(j)` gives the two sub-blocks of 64-chunk j as bytes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn with_mins_kernel<const R: usize>(
        b: usize,
        sc: &[u8; 8],
        quants: &[(__m256i, __m256i); 4],
        a: &[ActRow; R],
        sumi: &mut [__m256i; R],
    ) {
        let sc16 = scales8(sc);
        for (j, &(lo, hi)) in quants.iter().enumerate() {
            let s_lo = pick(sc16, 2 * j as i16, 2 * j as i16);
            let s_hi = pick(sc16, 2 * j as i16 + 1, 2 * j as i16 + 1);
            for (ar, sumi) in a.iter().zip(sumi.iter_mut()) {
                let x = ar.qs.as_ptr().add(b * 8 + 2 * j);
                let both =
                    _mm256_add_epi32(scaled_sums(lo, x, s_lo), scaled_sums(hi, x.add(1), s_hi));
                *sumi = _mm256_add_epi32(*sumi, both);
            }
        }
    }

    /// A Q4_K/Q5_K dot product; `unpack` gives a super-block's quants as 4 chunk pairs.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_with_mins<B: WithMins, const R: usize>(
        w: &[B],
        a: &[ActRow; R],
        out: &mut [f32],
        unpack: impl Fn(&B) -> [(__m256i, __m256i); 4],
    ) {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut accm = [0f32; R];
        for (b, blk) in w.iter().enumerate() {
            super::super::prefetch(blk, std::mem::size_of_val(blk));
            let mut sumi = [_mm256_setzero_si256(); R];
            with_mins_kernel(b, blk.head().2, &unpack(blk), a, &mut sumi);
            for r in 0..R {
                let ar = a.get_unchecked(r);
                add_with_mins(b, blk, sumi[r], ar, &mut acc[r], &mut accm[r]);
            }
        }
        for r in 0..R {
            out[r] = hsum8f(acc[r]) - accm[r];
        }
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA; every row of `a` holds `w.len()` super-blocks
    /// (asserted by the caller).
    #[target_feature(enable = "avx2,fma")]
    pub(in super::super) unsafe fn dot_q4k<const R: usize>(
        w: &[Q4K],
        a: &[ActRow; R],
        out: &mut [f32],
    ) {
        let low = _mm256_set1_epi8(0x0F);
        dot_with_mins(w, a, out, |blk| {
            std::array::from_fn(|j| {
                let packed = load(blk.qs.as_ptr().add(32 * j));
                (
                    _mm256_and_si256(packed, low),
                    _mm256_and_si256(_mm256_srli_epi16(packed, 4), low),
                )
            })
        })
    }

    /// # Safety
    /// As [`dot_q4k`].
    #[target_feature(enable = "avx2,fma")]
    pub(in super::super) unsafe fn dot_q5k<const R: usize>(
        w: &[Q5K],
        a: &[ActRow; R],
        out: &mut [f32],
    ) {
        let low = _mm256_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        dot_with_mins(w, a, out, |blk| {
            // The fifth bits of sub-blocks 2j and 2j+1 sit in bits 2j, 2j+1 of each byte
            // (16-bit shifts only move bits that the mask drops).
            let hbits = load(blk.qh.as_ptr());
            std::array::from_fn(|j| {
                let packed = load(blk.qs.as_ptr().add(32 * j));
                let h = _mm256_srl_epi16(hbits, _mm_cvtsi32_si128(2 * j as i32));
                let h_lo = _mm256_slli_epi16(_mm256_and_si256(h, one), 4);
                let h_hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 1), one), 4);
                (
                    _mm256_or_si256(_mm256_and_si256(packed, low), h_lo),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(packed, 4), low), h_hi),
                )
            })
        })
    }

    /// # Safety
    /// As [`dot_q4k`].
    #[target_feature(enable = "avx2,fma")]
    pub(in super::super) unsafe fn dot_q6k<const R: usize>(
        w: &[Q6K],
        a: &[ActRow; R],
        out: &mut [f32],
    ) {
        let low = _mm256_set1_epi8(0x0F);
        let two = _mm256_set1_epi8(3);
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, blk) in w.iter().enumerate() {
            super::super::prefetch(blk, std::mem::size_of_val(blk));
            // 16 i8 scales as i16: sub-blocks 0..8 in the low lane, 8..16 in the high one.
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.sc.as_ptr() as *const __m128i));
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
                // This half's 8 scales in both lanes.
                let lane = if half == 0 {
                    _mm256_permute2x128_si256(sc16, sc16, 0x00)
                } else {
                    _mm256_permute2x128_si256(sc16, sc16, 0x11)
                };
                for (k, &qk) in q.iter().enumerate() {
                    let scales = pick(lane, 2 * k as i16, 2 * k as i16 + 1);
                    for (ar, sumi) in a.iter().zip(sumi.iter_mut()) {
                        let x = ar.qs.as_ptr().add(b * 8 + 4 * half + k);
                        *sumi = _mm256_add_epi32(*sumi, scaled_sums(qk, x, scales));
                    }
                }
            }
            for r in 0..R {
                let ar = a.get_unchecked(r);
                // The −32 offset: Σ scale × (sum of its 16 activations) × 32, per lane.
                let off = _mm256_madd_epi16(sc16, load(ar.bsums.get_unchecked(b).as_ptr()));
                let lanes = _mm256_sub_epi32(sumi[r], _mm256_slli_epi32(off, 5));
                let scale = _mm256_set1_ps(*ar.d.get_unchecked(b) * blk.d);
                acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(lanes), acc[r]);
            }
        }
        for r in 0..R {
            out[r] = hsum8f(acc[r]);
        }
    }
}

/// The K-quant kernels on 512-bit vectors (AVX-512 BW): two sub-blocks per instruction, half
/// the instructions of [`avx2`] per super-block. The 16 i32 lanes fold to the same 8 exact
/// lane sums before any float arithmetic, so the results are [`avx2`]'s, bit for bit.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::avx2::{add_with_mins, hsum8f, load, scales8};
    use super::*;
    use std::arch::x86_64::*;

    /// 16-bit lane indices: the low 16 lanes `lo`, the high 16 `hi`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn halves(lo: i16, hi: i16) -> __m512i {
        _mm512_mask_blend_epi16(0xFFFF_0000, _mm512_set1_epi16(lo), _mm512_set1_epi16(hi))
    }

    /// 16-bit lane indices by 128-bit quarter: `base + quarter`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn quarters(base: i16) -> __m512i {
        let q = _mm512_mask_blend_epi16(0xFF00_FF00, _mm512_set1_epi16(0), _mm512_set1_epi16(1));
        let q = _mm512_add_epi16(
            q,
            _mm512_mask_blend_epi16(0xFFFF_0000, _mm512_set1_epi16(0), _mm512_set1_epi16(2)),
        );
        _mm512_add_epi16(q, _mm512_set1_epi16(base))
    }

    /// Two chunks of 32 u8 × i8 pairs, each 4 adjacent products times its lane's i16 scale.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn scaled_sums(w: __m512i, x: *const [i8; 32], s: __m512i) -> __m512i {
        _mm512_madd_epi16(
            _mm512_maddubs_epi16(w, _mm512_loadu_si512(x as *const _)),
            s,
        )
    }

    /// 16 lanes to the 8 of the 256-bit kernels (chunk 2i's lane k plus chunk 2i+1's).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn fold(v: __m512i) -> __m256i {
        _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))
    }

    /// Q4_K or Q5_K after the quants are unpacked: `quants[j]` holds sub-blocks 2j, 2j+1.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn with_mins_rows<const R: usize>(
        b: usize,
        sc: &[u8; 8],
        quants: &[__m512i; 4],
        a: &[ActRow; R],
        sumi: &mut [__m512i; R],
    ) {
        let sc16 = _mm512_castsi256_si512(scales8(sc));
        for (j, &w) in quants.iter().enumerate() {
            let s = _mm512_permutexvar_epi16(halves(2 * j as i16, 2 * j as i16 + 1), sc16);
            for (ar, sumi) in a.iter().zip(sumi.iter_mut()) {
                let x = ar.qs.as_ptr().add(b * 8 + 2 * j);
                *sumi = _mm512_add_epi32(*sumi, scaled_sums(w, x, s));
            }
        }
    }

    /// The 4 chunk pairs of a Q4_K super-block's nibbles (low nibbles in the low half).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn nibble_pairs(qs: &[u8; 128]) -> [__m512i; 4] {
        let low = _mm512_set1_epi8(0x0F);
        std::array::from_fn(|j| {
            let p = _mm512_broadcast_i64x4(load(qs.as_ptr().add(32 * j)));
            _mm512_and_si512(
                _mm512_mask_blend_epi64(0xF0, p, _mm512_srli_epi16(p, 4)),
                low,
            )
        })
    }

    /// As the 256-bit `dot_with_mins`: `unpack` gives the 4 chunk pairs.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn dot_with_mins<B: WithMins, const R: usize>(
        w: &[B],
        a: &[ActRow; R],
        out: &mut [f32],
        unpack: impl Fn(&B) -> [__m512i; 4],
    ) {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut accm = [0f32; R];
        for (b, blk) in w.iter().enumerate() {
            super::super::prefetch(blk, std::mem::size_of_val(blk));
            let mut sumi = [_mm512_setzero_si512(); R];
            with_mins_rows(b, blk.head().2, &unpack(blk), a, &mut sumi);
            for r in 0..R {
                let ar = a.get_unchecked(r);
                add_with_mins(b, blk, fold(sumi[r]), ar, &mut acc[r], &mut accm[r]);
            }
        }
        for r in 0..R {
            out[r] = hsum8f(acc[r]) - accm[r];
        }
    }

    /// As [`avx2::dot_q4k`](super::avx2).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VL, AVX2 and FMA; every row of `a` holds `w.len()`
    /// super-blocks (asserted by the caller).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(in super::super) unsafe fn dot_q4k<const R: usize>(
        w: &[Q4K],
        a: &[ActRow; R],
        out: &mut [f32],
    ) {
        dot_with_mins(w, a, out, |blk| nibble_pairs(&blk.qs))
    }

    /// # Safety
    /// As [`dot_q4k`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(in super::super) unsafe fn dot_q5k<const R: usize>(
        w: &[Q5K],
        a: &[ActRow; R],
        out: &mut [f32],
    ) {
        let one = _mm512_set1_epi8(1);
        dot_with_mins(w, a, out, |blk| {
            let hb = _mm512_broadcast_i64x4(load(blk.qh.as_ptr()));
            let mut quants = nibble_pairs(&blk.qs);
            for (j, q) in quants.iter_mut().enumerate() {
                // Sub-block 2j's fifth bit is bit 2j of each qh byte, 2j+1's bit 2j+1.
                let bits = _mm512_srlv_epi16(hb, halves(2 * j as i16, 2 * j as i16 + 1));
                *q = _mm512_or_si512(*q, _mm512_slli_epi16(_mm512_and_si512(bits, one), 4));
            }
            quants
        })
    }

    /// # Safety
    /// As [`dot_q4k`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(in super::super) unsafe fn dot_q6k<const R: usize>(
        w: &[Q6K],
        a: &[ActRow; R],
        out: &mut [f32],
    ) {
        let low = _mm512_set1_epi8(0x0F);
        let two = _mm512_set1_epi8(3);
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, blk) in w.iter().enumerate() {
            super::super::prefetch(blk, std::mem::size_of_val(blk));
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.sc.as_ptr() as *const __m128i));
            let sc512 = _mm512_castsi256_si512(sc16);
            let mut sumi = [_mm512_setzero_si512(); R];
            for half in 0..2 {
                // Chunks 4h, 4h+1 (low nibbles of ql's two 32-byte runs) and 4h+2, 4h+3 (high).
                let ql = _mm512_loadu_si512(blk.ql.as_ptr().add(64 * half) as *const _);
                let qh = _mm512_broadcast_i64x4(load(blk.qh.as_ptr().add(32 * half)));
                let high = |lo: i16, hi: i16| {
                    let bits = _mm512_and_si512(_mm512_srlv_epi16(qh, halves(lo, hi)), two);
                    _mm512_slli_epi16(bits, 4)
                };
                let q = [
                    _mm512_or_si512(_mm512_and_si512(ql, low), high(0, 2)),
                    _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low), high(4, 6)),
                ];
                for (pair, &qp) in q.iter().enumerate() {
                    // Chunk 4h + 2·pair + i holds sub-blocks 8h + 4·pair + 2i and + 1.
                    let first = (8 * half + 4 * pair) as i16;
                    let s = _mm512_permutexvar_epi16(quarters(first), sc512);
                    for (ar, sumi) in a.iter().zip(sumi.iter_mut()) {
                        let x = ar.qs.as_ptr().add(b * 8 + 4 * half + 2 * pair);
                        *sumi = _mm512_add_epi32(*sumi, scaled_sums(qp, x, s));
                    }
                }
            }
            for r in 0..R {
                let ar = a.get_unchecked(r);
                let off = _mm256_madd_epi16(sc16, load(ar.bsums.get_unchecked(b).as_ptr()));
                let lanes = _mm256_sub_epi32(fold(sumi[r]), _mm256_slli_epi32(off, 5));
                let scale = _mm256_set1_ps(*ar.d.get_unchecked(b) * blk.d);
                acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(lanes), acc[r]);
            }
        }
        for r in 0..R {
            out[r] = hsum8f(acc[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::nearest_int;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for x in [-127.0f32, -2.5, -1.5, -0.5, 0.0, 0.5, 1.5, 2.5, 3.49, 126.6] {
            assert_eq!(nearest_int(x), x.round_ties_even() as i32, "{x}");
        }
    }
}
