//! Quantized matrix multiplication on the CPU for GGUF's Q4_1 and Q8_0 weights.
//!
//! Why our own kernel: candle 0.11's Q4_1 dot product is scalar (31 tok/s prefill, 20 decode
//! on the default model), and f32 weights, while fast for prefill, move logits far enough
//! from llama.cpp's to change greedy answers. This kernel does what ggml does on x86:
//! activations are quantized per block of 32 (Q8_1 against Q4_1 weights, Q8_0 against Q8_0),
//! blocks are multiplied in integers, and the per-block scales are applied in f32 in the same
//! order. So answers stay next to llama.cpp's, and decode reads Q4_1's 5 bits per weight
//! (6 in memory, with the scales widened to f32) instead of 32.
//!
//! AVX2 and AVX-512 VNNI paths are chosen at run time; the scalar path computes the identical
//! lane sums in the identical order, and the tests compare them bit for bit.
#![allow(unsafe_code)]

use half::f16;
use rayon::prelude::*;

/// Elements per quantization block (both formats).
pub(crate) const QK: usize = 32;

/// A Q4_1 or Q8_0 weight matrix `(rows, cols)`, scales widened to f32 at load.
#[derive(Debug)]
pub(crate) enum QuantMatrix {
    /// Per block: `x = d * q + m`, q in 0..16; two nibbles per byte (element j low, j+16 high).
    Q4_1 {
        rows: usize,
        cols: usize,
        dm: Vec<[f32; 2]>,
        qs: Vec<[u8; 16]>,
    },
    /// Per block: `x = d * q`, q in -127..=127.
    Q8_0 {
        rows: usize,
        cols: usize,
        d: Vec<f32>,
        qs: Vec<[i8; 32]>,
    },
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

impl QuantMatrix {
    /// Parse GGUF block bytes. `None` for other types (they are dequantized instead).
    pub(crate) fn from_gguf(
        dtype: candle_core::quantized::GgmlDType,
        rows: usize,
        cols: usize,
        data: &[u8],
    ) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        if !cols.is_multiple_of(QK) {
            return None;
        }
        let blocks = rows * cols / QK;
        match dtype {
            GgmlDType::Q4_1 if data.len() == blocks * 20 => {
                let (mut dm, mut qs) = (Vec::with_capacity(blocks), Vec::with_capacity(blocks));
                for b in data.chunks_exact(20) {
                    dm.push([f16_at(b, 0), f16_at(b, 2)]);
                    let mut q = [0u8; 16];
                    q.copy_from_slice(&b[4..20]);
                    qs.push(q);
                }
                Some(Self::Q4_1 { rows, cols, dm, qs })
            }
            GgmlDType::Q8_0 if data.len() == blocks * 34 => {
                let (mut d, mut qs) = (Vec::with_capacity(blocks), Vec::with_capacity(blocks));
                for b in data.chunks_exact(34) {
                    d.push(f16_at(b, 0));
                    let mut q = [0i8; 32];
                    for (dst, &src) in q.iter_mut().zip(&b[2..34]) {
                        *dst = src as i8;
                    }
                    qs.push(q);
                }
                Some(Self::Q8_0 { rows, cols, d, qs })
            }
            _ => None,
        }
    }

    /// The rows of several matrices of one format and width, stacked; `None` otherwise.
    pub(crate) fn concat(parts: &[&QuantMatrix]) -> Option<Self> {
        let cols = parts.first()?.cols();
        if parts.iter().any(|p| p.cols() != cols) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows()).sum();
        match parts[0] {
            Self::Q4_1 { .. } => {
                let (mut dm, mut qs) = (Vec::new(), Vec::new());
                for p in parts {
                    let Self::Q4_1 { dm: d, qs: q, .. } = p else {
                        return None;
                    };
                    dm.extend_from_slice(d);
                    qs.extend_from_slice(q);
                }
                Some(Self::Q4_1 { rows, cols, dm, qs })
            }
            Self::Q8_0 { .. } => {
                let (mut d, mut qs) = (Vec::new(), Vec::new());
                for p in parts {
                    let Self::Q8_0 { d: pd, qs: q, .. } = p else {
                        return None;
                    };
                    d.extend_from_slice(pd);
                    qs.extend_from_slice(q);
                }
                Some(Self::Q8_0 { rows, cols, d, qs })
            }
        }
    }

    pub(crate) fn rows(&self) -> usize {
        match self {
            Self::Q4_1 { rows, .. } | Self::Q8_0 { rows, .. } => *rows,
        }
    }

    pub(crate) fn cols(&self) -> usize {
        match self {
            Self::Q4_1 { cols, .. } | Self::Q8_0 { cols, .. } => *cols,
        }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Self::Q4_1 { dm, qs, .. } => dm.len() * 8 + qs.len() * 16,
            Self::Q8_0 { d, qs, .. } => d.len() * 4 + qs.len() * 32,
        }
    }

    /// `x (n, cols)` row-major → `x Wᵀ (n, rows)` row-major.
    pub(crate) fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        let kernel = Kernel::detect();
        self.matmul_with(kernel, x, n)
    }

    fn matmul_with(&self, kernel: Kernel, x: &[f32], n: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows(), self.cols());
        // The SIMD kernels index blocks unchecked: every slice they get is cut from these
        // buffers with checked slicing, and this is what makes those cuts line up.
        assert_eq!(x.len(), n * cols, "activations must be n × cols");
        if n == 0 {
            return Vec::new();
        }
        let act = Activations::quantize(kernel, x, cols, matches!(self, Self::Q4_1 { .. }));
        let nb = cols / QK;
        let mut out = vec![0f32; n * rows];
        if n >= 8 * rayon::current_num_threads() {
            // Many rows (prefill): each task takes four activation rows across every weight
            // row; a weight block is unpacked once for four dot products, the matrix stays
            // in L2, and each task writes its own contiguous output rows.
            out.par_chunks_mut(4 * rows)
                .enumerate()
                .for_each(|(g, chunk)| {
                    let group = chunk.len() / rows;
                    let a = act.rows(g * 4, group, nb);
                    let mut vals = [0f32; 4];
                    for r in 0..rows {
                        self.dot_rows(kernel, r, nb, &a[..group], &mut vals[..group]);
                        for (i, &v) in vals[..group].iter().enumerate() {
                            chunk[i * rows + r] = v;
                        }
                    }
                });
            return out;
        }
        // Few rows (decode): split the weight rows into a few large bands, one per task.
        let band_rows = rows.div_ceil(rayon::current_num_threads() * 2).max(16);
        let bands: Vec<(usize, Vec<f32>)> = (0..rows.div_ceil(band_rows))
            .into_par_iter()
            .map(|band| {
                let r0 = band * band_rows;
                let r1 = (r0 + band_rows).min(rows);
                let mut vals = vec![0f32; (r1 - r0) * n];
                let mut t = 0;
                while t < n {
                    let group = (n - t).min(4);
                    let a = act.rows(t, group, nb);
                    for r in r0..r1 {
                        let out = &mut vals[(r - r0) * n + t..(r - r0) * n + t + group];
                        self.dot_rows(kernel, r, nb, &a[..group], out);
                    }
                    t += group;
                }
                (r0, vals)
            })
            .collect();
        for (r0, vals) in bands {
            for (i, row) in vals.chunks_exact(n).enumerate() {
                for (t, &v) in row.iter().enumerate() {
                    out[t * rows + r0 + i] = v;
                }
            }
        }
        out
    }

    /// Weight row `r` against activation rows `rows` (at most 4).
    fn dot_rows(&self, kernel: Kernel, r: usize, nb: usize, rows: &[ActRow], out: &mut [f32]) {
        let w = r * nb..(r + 1) * nb;
        match self {
            Self::Q4_1 { dm, qs, .. } => kernel.dot_q4_1(&dm[w.clone()], &qs[w], rows, out),
            Self::Q8_0 { d, qs, .. } => kernel.dot_q8_0(&d[w.clone()], &qs[w], rows, out),
        }
    }

    /// Back to f32 `(rows, cols)`.
    #[cfg(test)]
    fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows() * self.cols());
        match self {
            Self::Q4_1 { dm, qs, .. } => {
                for (&[d, m], q) in dm.iter().zip(qs) {
                    let base = out.len();
                    out.resize(base + QK, 0.0);
                    for j in 0..16 {
                        out[base + j] = d * (q[j] & 0x0F) as f32 + m;
                        out[base + j + 16] = d * (q[j] >> 4) as f32 + m;
                    }
                }
            }
            Self::Q8_0 { d, qs, .. } => {
                for (&d, q) in d.iter().zip(qs) {
                    out.extend(q.iter().map(|&v| d * v as f32));
                }
            }
        }
        out
    }
}

/// Activations quantized per block of 32, as ggml's `quantize_row_q8_1` / `q8_0` on x86.
struct Activations {
    /// Block scale, rounded to f16 (as stored by ggml) and widened back.
    d: Vec<f32>,
    /// Q8_1 only: `d * Σq`, rounded to f16 and widened back.
    s: Vec<f32>,
    qs: Vec<[i8; 32]>,
}

/// One activation row's blocks.
#[derive(Clone, Copy)]
struct ActRow<'a> {
    d: &'a [f32],
    s: &'a [f32],
    qs: &'a [[i8; 32]],
}

impl Activations {
    fn quantize(kernel: Kernel, x: &[f32], cols: usize, with_sum: bool) -> Self {
        let blocks = x.len() / QK;
        debug_assert_eq!(x.len() % cols, 0);
        let mut d = vec![0f32; blocks];
        let mut s = vec![0f32; blocks];
        let mut qs = vec![[0i8; 32]; blocks];
        // Rows are independent: quantize them in parallel when there are many.
        let per_row = cols / QK;
        d.par_chunks_mut(per_row)
            .zip(s.par_chunks_mut(per_row))
            .zip(qs.par_chunks_mut(per_row))
            .zip(x.par_chunks(cols))
            .with_min_len(16)
            .for_each(|(((d, s), q), x)| {
                for (b, block) in x.chunks_exact(QK).enumerate() {
                    let block: &[f32; QK] = block.try_into().expect("chunks of 32");
                    let (db, sum) = kernel.quantize_block(block, &mut q[b]);
                    d[b] = f16::from_f32(db).to_f32();
                    s[b] = f16::from_f32(db * sum as f32).to_f32();
                }
            });
        if !with_sum {
            // Q8_0 has no sum term; an empty `s` also tells the kernels not to read it.
            s.clear();
        }
        Self { d, s, qs }
    }

    /// Rows `t .. t + n` (n ≤ 4; the rest of the array repeats row `t`).
    fn rows(&self, t: usize, n: usize, nb: usize) -> [ActRow<'_>; 4] {
        std::array::from_fn(|i| self.row(if i < n { t + i } else { t }, nb))
    }

    fn row(&self, t: usize, nb: usize) -> ActRow<'_> {
        let r = t * nb..(t + 1) * nb;
        ActRow {
            d: &self.d[r.clone()],
            s: if self.s.is_empty() {
                &[]
            } else {
                &self.s[r.clone()]
            },
            qs: &self.qs[r],
        }
    }
}

/// Call a SIMD kernel with its row count as a constant (1–4), so its inner loop unrolls.
#[cfg(target_arch = "x86_64")]
macro_rules! simd_rows {
    ($m:ident :: $f:ident, $w0:expr, $w1:expr, $a:expr, $out:expr) => {
        match $a {
            [r0] => $m::$f::<1>($w0, $w1, &[*r0], $out),
            [r0, r1] => $m::$f::<2>($w0, $w1, &[*r0, *r1], $out),
            [r0, r1, r2] => $m::$f::<3>($w0, $w1, &[*r0, *r1, *r2], $out),
            [r0, r1, r2, r3] => $m::$f::<4>($w0, $w1, &[*r0, *r1, *r2, *r3], $out),
            _ => unreachable!("1 to 4 activation rows"),
        }
    };
}

/// Which implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    Scalar,
    /// `vpmaddubsw` + `vpmaddwd` for the integer dot products, as ggml on AVX2.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// `vpdpbusd` (AVX-512 VNNI on 256-bit vectors): the same sums in one instruction.
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Kernel {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                return Self::Vnni;
            }
            return Self::Avx2;
        }
        Self::Scalar
    }

    /// Every kernel this CPU can run (the tests compare them).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut all = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if Self::detect() != Self::Scalar {
                all.push(Self::Avx2);
            }
            if Self::detect() == Self::Vnni {
                all.push(Self::Vnni);
            }
        }
        all
    }

    /// Quantize 32 values to `q`; returns the unrounded scale and the sum of the quants.
    fn quantize_block(self, x: &[f32; 32], q: &mut [i8; 32]) -> (f32, i32) {
        match self {
            Self::Scalar => scalar::quantize_block(x, q),
            // SAFETY: the SIMD kernels are only chosen when the CPU reports their features;
            // the block's length is in its type.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 | Self::Vnni => unsafe { avx2::quantize_block(x, q) },
        }
    }

    /// `dm`, `wq` and every row of `a` must hold the same number of blocks (checked: the SIMD
    /// kernels rely on it).
    fn dot_q4_1(self, dm: &[[f32; 2]], wq: &[[u8; 16]], a: &[ActRow], out: &mut [f32]) {
        let nb = dm.len();
        assert!(
            wq.len() == nb
                && out.len() == a.len()
                && a.iter()
                    .all(|r| r.d.len() == nb && r.s.len() == nb && r.qs.len() == nb)
        );
        match self {
            Self::Scalar => {
                for (o, a) in out.iter_mut().zip(a) {
                    *o = scalar::dot_q4_1(dm, wq, a);
                }
            }
            // SAFETY: CPU features as above; block counts checked by the assert.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { simd_rows!(avx2::dot_q4_1, dm, wq, a, out) },
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => unsafe { simd_rows!(vnni::dot_q4_1, dm, wq, a, out) },
        }
    }

    /// As [`Kernel::dot_q4_1`], without the sum term.
    fn dot_q8_0(self, wd: &[f32], wq: &[[i8; 32]], a: &[ActRow], out: &mut [f32]) {
        let nb = wd.len();
        assert!(
            wq.len() == nb
                && out.len() == a.len()
                && a.iter().all(|r| r.d.len() == nb && r.qs.len() == nb)
        );
        match self {
            Self::Scalar => {
                for (o, a) in out.iter_mut().zip(a) {
                    *o = scalar::dot_q8_0(wd, wq, a);
                }
            }
            // SAFETY: CPU features as above; block counts checked by the assert.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { simd_rows!(avx2::dot_q8_0, wd, wq, a, out) },
            #[cfg(target_arch = "x86_64")]
            Self::Vnni => unsafe { simd_rows!(vnni::dot_q8_0, wd, wq, a, out) },
        }
    }
}

/// The SIMD kernels' arithmetic, lane by lane: 8 lanes of 4 products each, an f32 FMA per
/// block and lane, then ggml's `hsum_float_8` order. Bit-for-bit what they compute.
mod scalar {
    use super::{ActRow, QK};

    pub(super) fn quantize_block(x: &[f32; 32], q: &mut [i8; 32]) -> (f32, i32) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0;
        for (dst, &v) in q.iter_mut().zip(x) {
            // _mm256_round_ps(_MM_ROUND_NEAREST) rounds half to even.
            let r = (v * id).round_ties_even() as i32;
            *dst = r as i8;
            sum += r;
        }
        (d, sum)
    }

    fn hsum8(acc: [f32; 8]) -> f32 {
        let r: [f32; 4] = std::array::from_fn(|i| acc[i] + acc[i + 4]);
        let (a, b) = (r[0] + r[2], r[1] + r[3]);
        a + b
    }

    pub(super) fn dot_q4_1(dm: &[[f32; 2]], wq: &[[u8; 16]], a: &ActRow) -> f32 {
        let mut acc = [0f32; 8];
        let mut summs = 0f32;
        for b in 0..dm.len() {
            let [wd, wm] = dm[b];
            summs += wm * a.s[b];
            let d0d1 = wd * a.d[b];
            let w: [i32; QK] = std::array::from_fn(|j| {
                if j < 16 {
                    (wq[b][j] & 0x0F) as i32
                } else {
                    (wq[b][j - 16] >> 4) as i32
                }
            });
            for (lane, slot) in acc.iter_mut().enumerate() {
                let sum: i32 = (0..4)
                    .map(|k| w[lane * 4 + k] * a.qs[b][lane * 4 + k] as i32)
                    .sum();
                *slot = d0d1.mul_add(sum as f32, *slot);
            }
        }
        hsum8(acc) + summs
    }

    pub(super) fn dot_q8_0(wd: &[f32], wq: &[[i8; 32]], a: &ActRow) -> f32 {
        let mut acc = [0f32; 8];
        for b in 0..wd.len() {
            let scale = wd[b] * a.d[b];
            for (lane, slot) in acc.iter_mut().enumerate() {
                let sum: i32 = (0..4)
                    .map(|k| wq[b][lane * 4 + k] as i32 * a.qs[b][lane * 4 + k] as i32)
                    .sum();
                *slot = scale.mul_add(sum as f32, *slot);
            }
        }
        hsum8(acc)
    }
}

/// The dot-product kernels for one x86 feature set; `$lane_sums` turns 32 u8 × i8 products
/// into 8 i32 lanes of 4 adjacent products each (both variants give identical integers).
#[cfg(target_arch = "x86_64")]
macro_rules! dot_kernels {
    ($features:literal, $lane_sums:ident) => {
        /// `out[r]` = weight row · activation row `a[r]`, for `R` rows at once.
        ///
        /// # Safety
        /// The CPU must have this module's features; all slices have `dm.len()` blocks.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn dot_q4_1<const R: usize>(
            dm: &[[f32; 2]],
            wq: &[[u8; 16]],
            a: &[ActRow; R],
            out: &mut [f32],
        ) {
            let nb = dm.len();
            debug_assert!(wq.len() == nb && a.iter().all(|r| r.d.len() == nb && r.s.len() == nb));
            let mut acc = [_mm256_setzero_ps(); R];
            let mut summs = [0f32; R];
            let low = _mm256_set1_epi8(0x0F);
            for b in 0..nb {
                // SAFETY (indexing): every slice holds `nb` blocks (asserted by the caller).
                let [wd, wm] = *dm.get_unchecked(b);
                let packed = _mm_loadu_si128(wq.get_unchecked(b).as_ptr() as *const __m128i);
                let both = _mm256_insertf128_si256(
                    _mm256_castsi128_si256(packed),
                    _mm_srli_epi16(packed, 4),
                    1,
                );
                let w = _mm256_and_si256(both, low);
                for r in 0..R {
                    let ar = a.get_unchecked(r);
                    summs[r] += wm * *ar.s.get_unchecked(b);
                    let d0d1 = _mm256_set1_ps(wd * *ar.d.get_unchecked(b));
                    let x = _mm256_loadu_si256(ar.qs.get_unchecked(b).as_ptr() as *const __m256i);
                    acc[r] = _mm256_fmadd_ps(d0d1, $lane_sums(w, x), acc[r]);
                }
            }
            for r in 0..R {
                out[r] = hsum8(acc[r]) + summs[r];
            }
        }

        /// # Safety
        /// As [`dot_q4_1`].
        #[target_feature(enable = $features)]
        pub(super) unsafe fn dot_q8_0<const R: usize>(
            wd: &[f32],
            wq: &[[i8; 32]],
            a: &[ActRow; R],
            out: &mut [f32],
        ) {
            let nb = wd.len();
            debug_assert!(wq.len() == nb && a.iter().all(|r| r.d.len() == nb));
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                // SAFETY (indexing): every slice holds `nb` blocks (asserted by the caller).
                let w = _mm256_loadu_si256(wq.get_unchecked(b).as_ptr() as *const __m256i);
                // The u8 × i8 instructions need one unsigned operand: move w's sign onto x.
                let wabs = _mm256_sign_epi8(w, w);
                let wdb = *wd.get_unchecked(b);
                for r in 0..R {
                    let ar = a.get_unchecked(r);
                    let scale = _mm256_set1_ps(wdb * *ar.d.get_unchecked(b));
                    let x = _mm256_loadu_si256(ar.qs.get_unchecked(b).as_ptr() as *const __m256i);
                    let sums = $lane_sums(wabs, _mm256_sign_epi8(x, w));
                    acc[r] = _mm256_fmadd_ps(scale, sums, acc[r]);
                }
            }
            for r in 0..R {
                out[r] = hsum8(acc[r]);
            }
        }

        #[target_feature(enable = $features)]
        unsafe fn hsum8(acc: __m256) -> f32 {
            let r = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
            let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
            let r = _mm_add_ss(r, _mm_movehdup_ps(r));
            _mm_cvtss_f32(r)
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::ActRow;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn lane_sums(w: __m256i, a: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(w, a);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    dot_kernels!("avx2,fma", lane_sums);

    /// ggml's AVX2 `quantize_row_q8_1` for one block.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_block(x: &[f32; 32], q: &mut [i8; 32]) -> (f32, i32) {
        let p = x.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let sign = _mm256_set1_ps(-0.0);
        let mut max = _mm256_andnot_ps(sign, v[0]);
        for vi in &v[1..] {
            max = _mm256_max_ps(max, _mm256_andnot_ps(sign, *vi));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps(max, 1), _mm256_castps256_ps128(max));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let amax = _mm_cvtss_f32(m4);
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let i: [__m256i; 4] = std::array::from_fn(|k| {
            _mm256_cvtps_epi32(_mm256_round_ps(
                _mm256_mul_ps(v[k], id),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            ))
        });
        let total = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let t4 = _mm_add_epi32(
            _mm256_extracti128_si256(total, 1),
            _mm256_castsi256_si128(total),
        );
        let t4 = _mm_add_epi32(t4, _mm_unpackhi_epi64(t4, t4));
        let t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0b01));
        let sum = _mm_cvtsi128_si32(t4);
        // Pack 32 i32 → 32 i8; the packs interleave 128-bit lanes, the permute undoes it.
        let lo = _mm256_packs_epi32(i[0], i[1]);
        let hi = _mm256_packs_epi32(i[2], i[3]);
        let bytes = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(lo, hi),
            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
        );
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, bytes);
        (d, sum)
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::ActRow;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    unsafe fn lane_sums(w: __m256i, a: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a))
    }

    dot_kernels!("avx2,fma,avx512vnni,avx512vl", lane_sums);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn random(n: usize, seed: u32) -> Vec<f32> {
        // A small LCG: deterministic, no extra dependency.
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    fn quantized(dtype: GgmlDType, rows: usize, cols: usize, seed: u32) -> (QuantMatrix, Vec<f32>) {
        let w = random(rows * cols, seed);
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&t, dtype).expect("quantize");
        let data = q.data().expect("bytes");
        let m = QuantMatrix::from_gguf(dtype, rows, cols, &data).expect("supported");
        let deq = q
            .dequantize(&Device::Cpu)
            .expect("deq")
            .flatten_all()
            .expect("flat");
        (m, deq.to_vec1().expect("vec"))
    }

    #[test]
    fn dequantizing_matches_candle() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (m, want) = quantized(dtype, 3, 64, 1);
            assert_eq!(m.dequantize(), want);
        }
    }

    #[test]
    fn every_kernel_computes_the_same_bits() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (m, _) = quantized(dtype, 37, 96, 2);
            // 7 rows take the few-rows path (a group of four and three); the second count the
            // many-rows path (it starts at 8 rows per thread) with a remainder of three.
            for n in [7, 8 * rayon::current_num_threads() + 3] {
                let x = random(n * 96, 3);
                let want = m.matmul_with(Kernel::Scalar, &x, n);
                for k in Kernel::available() {
                    let got = m.matmul_with(k, &x, n);
                    let same = want
                        .iter()
                        .zip(&got)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{k:?} differs from scalar for {dtype:?}, {n} rows");
                    let one = m.matmul_with(k, &x[..96], 1);
                    assert_eq!(one, want[..37].to_vec(), "{k:?} single row");
                }
            }
        }
    }

    #[test]
    fn simd_quantization_matches_the_scalar_one() {
        let x = random(32 * 9, 11);
        for k in Kernel::available() {
            for block in x.chunks_exact(32) {
                let block: &[f32; 32] = block.try_into().expect("32");
                let (mut a, mut b) = ([0i8; 32], [0i8; 32]);
                let sa = Kernel::Scalar.quantize_block(block, &mut a);
                let sb = k.quantize_block(block, &mut b);
                assert_eq!((a, sa.1), (b, sb.1), "{k:?}");
                assert_eq!(sa.0.to_bits(), sb.0.to_bits());
            }
        }
    }

    #[test]
    fn quantized_matmul_is_close_to_the_f32_product() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (m, w) = quantized(dtype, 9, 64, 4);
            let x = random(4 * 64, 5);
            let got = m.matmul(&x, 4);
            for t in 0..4 {
                for r in 0..9 {
                    let exact: f32 = (0..64).map(|k| x[t * 64 + k] * w[r * 64 + k]).sum();
                    // 8-bit activations: error well under 2 % of the row's magnitude.
                    let scale: f32 = (0..64).map(|k| (x[t * 64 + k] * w[r * 64 + k]).abs()).sum();
                    assert!((got[t * 9 + r] - exact).abs() < 0.02 * scale, "{dtype:?}");
                }
            }
        }
    }

    #[test]
    fn activation_quantization_rounds_half_to_even_like_ggml() {
        // amax 127 makes id exactly 1, so 2.5 → 2 and 3.5 → 4.
        let mut x = vec![0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = 3.5;
        x[3] = -2.5;
        for k in Kernel::available() {
            let a = Activations::quantize(k, &x, 32, true);
            assert_eq!(&a.qs[0][..4], &[127, 2, 4, -2], "{k:?}");
            assert_eq!(a.s[0], f16::from_f32(131.0).to_f32());
        }
    }
}
