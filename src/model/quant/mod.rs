//! Quantized matrix multiplication on the CPU for GGUF weights, read from their blocks as
//! stored: Q4_0, Q4_1, Q5_0, Q8_0 (blocks of 32) and the K-quants Q4_K, Q5_K, Q6_K (super-blocks
//! of 256, in [`kquants`]).
//!
//! Why our own kernels: candle 0.11's dot products are scalar (31 tok/s prefill, 20 decode
//! on the default model), and f32 weights, while fast for prefill, take 4–8× the memory and
//! move logits far enough from llama.cpp's to change greedy answers. These kernels do what
//! ggml does on x86: activations are quantized (Q8_1 against Q4_1, Q8_0 against Q4_0, Q5_0 and
//! Q8_0, Q8_K against the K-quants), blocks are multiplied in integers, and the scales are
//! applied in f32. So answers stay next to llama.cpp's, and decode reads 4.5–8.5 bits per
//! weight instead of 32.
//!
//! AVX2 and AVX-512 VNNI paths are chosen at run time; the scalar path computes the identical
//! sums in the identical order, and the tests compare them bit for bit.
#![allow(unsafe_code)]

mod kquants;

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

use kquants::{WithMins, Q4K, Q5K, Q6K, QK_K};

/// How far ahead (bytes) the kernels ask for weights. One core keeps only ~10 cache-line
/// misses in flight, which caps a weight stream at ~7 GB/s per core here; asking for lines
/// 4 KB ahead lets the L2 fetch more at once: measured 14.9 → 22.6 GB/s on a Q8_0 matrix
/// of 146 MB, 2 threads (0, 256 B, 1 KB, 2 KB, 4 KB tried).
const PREFETCH_BYTES: usize = 4096;

/// Ask for the cache lines `PREFETCH_BYTES` past `p .. p + bytes` (addresses past the end
/// are harmless: a prefetch never faults).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch<T>(p: *const T, bytes: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let p = (p as *const i8).wrapping_add(PREFETCH_BYTES);
    let mut at = 0;
    while at < bytes {
        // SAFETY: prefetching any address is allowed; it only hints the cache.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(at)) };
        at += 64;
    }
}

/// Elements per block of the 32-wide formats.
pub(crate) const QK: usize = 32;

/// A quantized weight matrix `(rows, cols)`, row-major in blocks along `cols`.
#[derive(Debug)]
pub(crate) struct QuantMatrix {
    rows: usize,
    cols: usize,
    blocks: Blocks,
}

/// The blocks of one format; f16 scales are widened to f32 at load (the only change from the
/// file's bytes: ~6 % more memory, no conversion in the inner loops).
#[derive(Debug)]
enum Blocks {
    /// Per block: `x = d * (q - 8)`, q in 0..16; two nibbles per byte (element j low, j+16
    /// high).
    Q4_0 {
        d: Vec<f32>,
        qs: Vec<[u8; 16]>,
    },
    /// Per block: `x = d * q + m`, q in 0..16; nibbles as Q4_0.
    Q4_1 {
        dm: Vec<[f32; 2]>,
        qs: Vec<[u8; 16]>,
    },
    /// Per block: `x = d * (q - 16)`, q in 0..32: nibbles as Q4_0, bit j of `qh` is element
    /// j's fifth bit.
    Q5_0 {
        d: Vec<f32>,
        qh: Vec<u32>,
        qs: Vec<[u8; 16]>,
    },
    /// Per block: `x = d * q`, q in -127..=127.
    Q8_0 {
        d: Vec<f32>,
        qs: Vec<[i8; 32]>,
    },
    Q4K(Vec<Q4K>),
    Q5K(Vec<Q5K>),
    Q6K(Vec<Q6K>),
}

/// How activations are quantized for a weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    /// Blocks of 32 with an i8 scale; `with_sum` adds Q8_1's `d * Σq` term.
    Q8 { with_sum: bool },
    /// Super-blocks of 256 with an f32 scale and sums of each 16.
    Q8K,
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Parse every `size`-byte block of `data`.
fn parse<T>(data: &[u8], size: usize, f: impl Fn(&[u8]) -> T) -> Vec<T> {
    data.chunks_exact(size).map(f).collect()
}

fn nibbles(b: &[u8]) -> [u8; 16] {
    b.try_into().expect("16 bytes")
}

/// Why a GGUF tensor cannot be multiplied by these kernels.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Unsupported {
    /// A format without a kernel here (f32/f16/bf16 and the rarer quants).
    #[error("no kernel for this format")]
    Format,
    /// The row length is not a whole number of blocks.
    #[error("its rows are not a whole number of blocks")]
    Width,
    /// The data is not `rows × cols` of this format (a damaged file).
    #[error("it holds {have} bytes where its shape needs {want}")]
    Size { have: usize, want: usize },
}

impl QuantMatrix {
    /// Parse GGUF block bytes.
    pub(crate) fn from_gguf(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        data: &[u8],
    ) -> Result<Self, Unsupported> {
        let (elems, size) = match dtype {
            GgmlDType::Q4_0 => (QK, 18),
            GgmlDType::Q4_1 => (QK, 20),
            GgmlDType::Q5_0 => (QK, 22),
            GgmlDType::Q8_0 => (QK, 34),
            GgmlDType::Q4K => (QK_K, Q4K::BYTES),
            GgmlDType::Q5K => (QK_K, Q5K::BYTES),
            GgmlDType::Q6K => (QK_K, Q6K::BYTES),
            _ => return Err(Unsupported::Format),
        };
        if !cols.is_multiple_of(elems) {
            return Err(Unsupported::Width);
        }
        let want = rows * cols / elems * size;
        if data.len() != want {
            return Err(Unsupported::Size {
                have: data.len(),
                want,
            });
        }
        let blocks = match dtype {
            GgmlDType::Q4_0 => Blocks::Q4_0 {
                d: parse(data, size, |b| f16_at(b, 0)),
                qs: parse(data, size, |b| nibbles(&b[2..18])),
            },
            GgmlDType::Q4_1 => Blocks::Q4_1 {
                dm: parse(data, size, |b| [f16_at(b, 0), f16_at(b, 2)]),
                qs: parse(data, size, |b| nibbles(&b[4..20])),
            },
            GgmlDType::Q5_0 => Blocks::Q5_0 {
                d: parse(data, size, |b| f16_at(b, 0)),
                qh: parse(data, size, |b| {
                    u32::from_le_bytes(b[2..6].try_into().expect("4 bytes"))
                }),
                qs: parse(data, size, |b| nibbles(&b[6..22])),
            },
            GgmlDType::Q8_0 => Blocks::Q8_0 {
                d: parse(data, size, |b| f16_at(b, 0)),
                qs: parse(data, size, |b| std::array::from_fn(|j| b[2 + j] as i8)),
            },
            GgmlDType::Q4K => Blocks::Q4K(parse(data, size, Q4K::parse)),
            GgmlDType::Q5K => Blocks::Q5K(parse(data, size, Q5K::parse)),
            _ => Blocks::Q6K(parse(data, size, Q6K::parse)),
        };
        Ok(Self { rows, cols, blocks })
    }

    /// The rows of several matrices of one format and width, stacked; `None` otherwise.
    pub(crate) fn concat(parts: &[&QuantMatrix]) -> Option<Self> {
        let first = parts.first()?;
        let cols = first.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let mut blocks = first.blocks.empty();
        for p in parts {
            if !blocks.extend(&p.blocks) {
                return None;
            }
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        Some(Self { rows, cols, blocks })
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        let b = &self.blocks;
        match b {
            Blocks::Q4_0 { d, .. } => d.len() * (4 + 16),
            Blocks::Q4_1 { dm, .. } => dm.len() * (8 + 16),
            Blocks::Q5_0 { d, .. } => d.len() * (4 + 4 + 16),
            Blocks::Q8_0 { d, .. } => d.len() * (4 + 32),
            Blocks::Q4K(v) => std::mem::size_of_val(v.as_slice()),
            Blocks::Q5K(v) => std::mem::size_of_val(v.as_slice()),
            Blocks::Q6K(v) => std::mem::size_of_val(v.as_slice()),
        }
    }

    /// Row `r` back to f32 (an embedding lookup), exactly as candle dequantizes it.
    pub(crate) fn row(&self, r: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.cols];
        let nb = self.cols / self.blocks.elems();
        let w = r * nb..(r + 1) * nb;
        match &self.blocks {
            Blocks::Q4_0 { d, qs } => {
                for ((y, &d), q) in out.chunks_exact_mut(QK).zip(&d[w.clone()]).zip(&qs[w]) {
                    for j in 0..16 {
                        y[j] = ((q[j] & 0x0F) as i16 - 8) as f32 * d;
                        y[j + 16] = ((q[j] >> 4) as i16 - 8) as f32 * d;
                    }
                }
            }
            Blocks::Q4_1 { dm, qs } => {
                for ((y, &[d, m]), q) in out.chunks_exact_mut(QK).zip(&dm[w.clone()]).zip(&qs[w]) {
                    for j in 0..16 {
                        y[j] = d * (q[j] & 0x0F) as f32 + m;
                        y[j + 16] = d * (q[j] >> 4) as f32 + m;
                    }
                }
            }
            Blocks::Q5_0 { d, qh, qs } => {
                let parts = d[w.clone()].iter().zip(&qh[w.clone()]).zip(&qs[w]);
                for (y, ((&d, &h), q)) in out.chunks_exact_mut(QK).zip(parts) {
                    for j in 0..16 {
                        let lo = (q[j] & 0x0F) | (((h >> j) & 1) << 4) as u8;
                        let hi = (q[j] >> 4) | (((h >> (j + 16)) & 1) << 4) as u8;
                        y[j] = (lo as i32 - 16) as f32 * d;
                        y[j + 16] = (hi as i32 - 16) as f32 * d;
                    }
                }
            }
            Blocks::Q8_0 { d, qs } => {
                for ((y, &d), q) in out.chunks_exact_mut(QK).zip(&d[w.clone()]).zip(&qs[w]) {
                    for (y, &v) in y.iter_mut().zip(q) {
                        *y = d * v as f32;
                    }
                }
            }
            Blocks::Q4K(v) => {
                for (y, b) in out.chunks_exact_mut(QK_K).zip(&v[w]) {
                    b.dequantize(y);
                }
            }
            Blocks::Q5K(v) => {
                for (y, b) in out.chunks_exact_mut(QK_K).zip(&v[w]) {
                    b.dequantize(y);
                }
            }
            Blocks::Q6K(v) => {
                for (y, b) in out.chunks_exact_mut(QK_K).zip(&v[w]) {
                    b.dequantize(y);
                }
            }
        }
        out
    }

    /// `x (n, cols)` row-major → `x Wᵀ (n, rows)` row-major.
    pub(crate) fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        let kernel = Kernel::detect();
        self.matmul_with(kernel, x, n)
    }

    fn matmul_with(&self, kernel: Kernel, x: &[f32], n: usize) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        // The SIMD kernels index blocks unchecked: every slice they get is cut from these
        // buffers with checked slicing, and this is what makes those cuts line up.
        assert_eq!(x.len(), n * cols, "activations must be n × cols");
        if n == 0 {
            return Vec::new();
        }
        let act = Activations::quantize(kernel, x, cols, self.blocks.scheme());
        let nb = cols / self.blocks.elems();
        let mut out = vec![0f32; n * rows];
        if n >= 8 * rayon::current_num_threads() {
            // Many rows (prefill): each task takes four activation rows across every weight
            // row; a weight block is unpacked once for four dot products, the matrix stays
            // in L2, and each task writes its own contiguous output rows.
            out.par_chunks_mut(4 * rows)
                .enumerate()
                .for_each(|(g, chunk)| {
                    let group = chunk.len() / rows;
                    let a = act.rows(g * 4, group);
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
                    let a = act.rows(t, group);
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

    /// Weight row `r` (`nb` blocks) against activation rows `rows` (at most 4).
    fn dot_rows(&self, kernel: Kernel, r: usize, nb: usize, rows: &[ActRow], out: &mut [f32]) {
        let w = r * nb..(r + 1) * nb;
        // Every activation row must hold as many blocks as the weight row: the SIMD kernels
        // index them unchecked.
        let chunks = nb * self.blocks.elems() / QK;
        let k = matches!(self.blocks.scheme(), Scheme::Q8K);
        assert!(
            out.len() == rows.len()
                && rows.iter().all(|a| {
                    a.d.len() == nb
                        && a.qs.len() == chunks
                        && (!k || a.bsums.len() == nb)
                        && (a.s.is_empty() || a.s.len() == nb)
                })
        );
        match &self.blocks {
            Blocks::Q4_0 { d, qs } => kernel.dot_q4_0(&d[w.clone()], &qs[w], rows, out),
            Blocks::Q4_1 { dm, qs } => {
                assert!(rows.iter().all(|a| a.s.len() == nb));
                kernel.dot_q4_1(&dm[w.clone()], &qs[w], rows, out)
            }
            Blocks::Q5_0 { d, qh, qs } => {
                kernel.dot_q5_0(&d[w.clone()], &qh[w.clone()], &qs[w], rows, out)
            }
            Blocks::Q8_0 { d, qs } => kernel.dot_q8_0(&d[w.clone()], &qs[w], rows, out),
            Blocks::Q4K(v) => kernel.dot_q4k(&v[w], rows, out),
            Blocks::Q5K(v) => kernel.dot_q5k(&v[w], rows, out),
            Blocks::Q6K(v) => kernel.dot_q6k(&v[w], rows, out),
        }
    }
}

impl Blocks {
    /// Elements per block.
    fn elems(&self) -> usize {
        match self {
            Self::Q4K(_) | Self::Q5K(_) | Self::Q6K(_) => QK_K,
            _ => QK,
        }
    }

    fn scheme(&self) -> Scheme {
        match self {
            Self::Q4_1 { .. } => Scheme::Q8 { with_sum: true },
            Self::Q4_0 { .. } | Self::Q5_0 { .. } | Self::Q8_0 { .. } => {
                Scheme::Q8 { with_sum: false }
            }
            Self::Q4K(_) | Self::Q5K(_) | Self::Q6K(_) => Scheme::Q8K,
        }
    }

    /// No blocks, same format.
    fn empty(&self) -> Self {
        match self {
            Self::Q4_0 { .. } => Self::Q4_0 {
                d: Vec::new(),
                qs: Vec::new(),
            },
            Self::Q4_1 { .. } => Self::Q4_1 {
                dm: Vec::new(),
                qs: Vec::new(),
            },
            Self::Q5_0 { .. } => Self::Q5_0 {
                d: Vec::new(),
                qh: Vec::new(),
                qs: Vec::new(),
            },
            Self::Q8_0 { .. } => Self::Q8_0 {
                d: Vec::new(),
                qs: Vec::new(),
            },
            Self::Q4K(_) => Self::Q4K(Vec::new()),
            Self::Q5K(_) => Self::Q5K(Vec::new()),
            Self::Q6K(_) => Self::Q6K(Vec::new()),
        }
    }

    /// Append `other`'s blocks; false when it is another format.
    fn extend(&mut self, other: &Blocks) -> bool {
        match (self, other) {
            (Self::Q4_0 { d, qs }, Self::Q4_0 { d: d2, qs: q2 }) => {
                d.extend_from_slice(d2);
                qs.extend_from_slice(q2);
            }
            (Self::Q4_1 { dm, qs }, Self::Q4_1 { dm: d2, qs: q2 }) => {
                dm.extend_from_slice(d2);
                qs.extend_from_slice(q2);
            }
            (
                Self::Q5_0 { d, qh, qs },
                Self::Q5_0 {
                    d: d2,
                    qh: h2,
                    qs: q2,
                },
            ) => {
                d.extend_from_slice(d2);
                qh.extend_from_slice(h2);
                qs.extend_from_slice(q2);
            }
            (Self::Q8_0 { d, qs }, Self::Q8_0 { d: d2, qs: q2 }) => {
                d.extend_from_slice(d2);
                qs.extend_from_slice(q2);
            }
            (Self::Q4K(a), Self::Q4K(b)) => a.extend_from_slice(b),
            (Self::Q5K(a), Self::Q5K(b)) => a.extend_from_slice(b),
            (Self::Q6K(a), Self::Q6K(b)) => a.extend_from_slice(b),
            _ => return false,
        }
        true
    }
}

/// Activations quantized per block: as ggml's `quantize_row_q8_1` / `q8_0` on x86 (blocks
/// of 32) or `quantize_row_q8_K` (super-blocks of 256).
struct Activations {
    /// Block scale (Q8_0/Q8_1: rounded to f16 as ggml stores it, and widened back).
    d: Vec<f32>,
    /// Q8_1 only: `d * Σq`, rounded to f16 and widened back.
    s: Vec<f32>,
    /// The quants, 32 at a time (8 per Q8_K super-block).
    qs: Vec<[i8; 32]>,
    /// Q8_K only: the sum of each 16 quants.
    bsums: Vec<[i16; 16]>,
    /// Blocks (d) per row.
    per_row: usize,
    /// Chunks of 32 per row.
    chunks: usize,
}

/// One activation row's blocks.
#[derive(Clone, Copy)]
struct ActRow<'a> {
    d: &'a [f32],
    s: &'a [f32],
    qs: &'a [[i8; 32]],
    bsums: &'a [[i16; 16]],
}

impl Activations {
    fn quantize(kernel: Kernel, x: &[f32], cols: usize, scheme: Scheme) -> Self {
        debug_assert_eq!(x.len() % cols, 0);
        let chunks = cols / QK;
        let mut qs = vec![[0i8; 32]; x.len() / QK];
        if scheme == Scheme::Q8K {
            let per_row = cols / QK_K;
            let blocks = x.len() / QK_K;
            let mut d = vec![0f32; blocks];
            let mut bsums = vec![[0i16; 16]; blocks];
            d.par_iter_mut()
                .zip(bsums.par_iter_mut())
                .zip(qs.par_chunks_mut(8))
                .zip(x.par_chunks(QK_K))
                .with_min_len(64)
                .for_each(|(((d, s), q), x)| *d = kquants::quantize_q8k(x, q, s));
            return Self {
                d,
                s: Vec::new(),
                qs,
                bsums,
                per_row,
                chunks,
            };
        }
        let blocks = x.len() / QK;
        let mut d = vec![0f32; blocks];
        let mut s = vec![0f32; blocks];
        // Rows are independent: quantize them in parallel when there are many.
        d.par_chunks_mut(chunks)
            .zip(s.par_chunks_mut(chunks))
            .zip(qs.par_chunks_mut(chunks))
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
        if scheme != (Scheme::Q8 { with_sum: true }) {
            // Q8_0 has no sum term; an empty `s` also tells the kernels not to read it.
            s.clear();
        }
        Self {
            d,
            s,
            qs,
            bsums: Vec::new(),
            per_row: chunks,
            chunks,
        }
    }

    /// Rows `t .. t + n` (n ≤ 4; the rest of the array repeats row `t`).
    fn rows(&self, t: usize, n: usize) -> [ActRow<'_>; 4] {
        std::array::from_fn(|i| self.row(if i < n { t + i } else { t }))
    }

    fn row(&self, t: usize) -> ActRow<'_> {
        let r = t * self.per_row..(t + 1) * self.per_row;
        ActRow {
            d: &self.d[r.clone()],
            s: if self.s.is_empty() {
                &[]
            } else {
                &self.s[r.clone()]
            },
            qs: &self.qs[t * self.chunks..(t + 1) * self.chunks],
            bsums: if self.bsums.is_empty() {
                &[]
            } else {
                &self.bsums[r.clone()]
            },
        }
    }
}

/// Call a SIMD kernel with its row count as a constant (1–4), so its inner loop unrolls.
#[cfg(target_arch = "x86_64")]
macro_rules! simd_rows {
    ($($m:ident)::+, ($($w:expr),*), $a:expr, $out:expr) => {
        match $a {
            [r0] => $($m)::+::<1>($($w,)* &[*r0], $out),
            [r0, r1] => $($m)::+::<2>($($w,)* &[*r0, *r1], $out),
            [r0, r1, r2] => $($m)::+::<3>($($w,)* &[*r0, *r1, *r2], $out),
            [r0, r1, r2, r3] => $($m)::+::<4>($($w,)* &[*r0, *r1, *r2, *r3], $out),
            _ => unreachable!("1 to 4 activation rows"),
        }
    };
}

/// One dot-product method of [`Kernel`]: the scalar function per row, or the SIMD kernel
/// for all rows at once.
macro_rules! dispatch {
    ($self:ident, $f:ident, ($($w:expr),*), $a:expr, $out:expr) => {
        match $self {
            Kernel::Scalar => {
                for (o, a) in $out.iter_mut().zip($a) {
                    *o = scalar::$f($($w,)* a);
                }
            }
            // SAFETY: the SIMD kernels are only chosen when the CPU reports their features,
            // and `QuantMatrix::dot_rows` (the only caller) asserts that every slice holds
            // the same number of blocks.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { simd_rows!(avx2::$f, ($($w),*), $a, $out) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => unsafe { simd_rows!(vnni::$f, ($($w),*), $a, $out) },
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
    /// `vpdpbusd` (AVX-512 VNNI on 256-bit vectors): the same sums in one instruction; the
    /// K-quants on 512-bit AVX-512 BW, two sub-blocks per instruction.
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

impl Kernel {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            if is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512f")
            {
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

    fn dot_q4_0(self, wd: &[f32], wq: &[[u8; 16]], a: &[ActRow], out: &mut [f32]) {
        dispatch!(self, dot_q4_0, (wd, wq), a, out)
    }

    fn dot_q4_1(self, dm: &[[f32; 2]], wq: &[[u8; 16]], a: &[ActRow], out: &mut [f32]) {
        dispatch!(self, dot_q4_1, (dm, wq), a, out)
    }

    fn dot_q5_0(self, wd: &[f32], qh: &[u32], wq: &[[u8; 16]], a: &[ActRow], out: &mut [f32]) {
        dispatch!(self, dot_q5_0, (wd, qh, wq), a, out)
    }

    fn dot_q8_0(self, wd: &[f32], wq: &[[i8; 32]], a: &[ActRow], out: &mut [f32]) {
        dispatch!(self, dot_q8_0, (wd, wq), a, out)
    }

    fn dot_q4k(self, w: &[Q4K], a: &[ActRow], out: &mut [f32]) {
        dispatch!(self, dot_q4k, (w), a, out)
    }

    fn dot_q5k(self, w: &[Q5K], a: &[ActRow], out: &mut [f32]) {
        dispatch!(self, dot_q5k, (w), a, out)
    }

    fn dot_q6k(self, w: &[Q6K], a: &[ActRow], out: &mut [f32]) {
        dispatch!(self, dot_q6k, (w), a, out)
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

    /// The 8 lanes of f32 sums, in ggml's `hsum_float_8` order (as the SIMD kernels end).
    pub(super) fn hsum8(acc: [f32; 8]) -> f32 {
        let r: [f32; 4] = std::array::from_fn(|i| acc[i] + acc[i + 4]);
        let (a, b) = (r[0] + r[2], r[1] + r[3]);
        a + b
    }

    /// One block into the 8 lane accumulators: lane i gets `scale × Σ w·x` over elements
    /// 4i..4i+4, by FMA, as the SIMD kernels do.
    fn lanes(acc: &mut [f32; 8], scale: f32, w: &[i32; QK], x: &[i8; 32]) {
        for (lane, slot) in acc.iter_mut().enumerate() {
            let sum: i32 = (0..4)
                .map(|k| w[lane * 4 + k] * x[lane * 4 + k] as i32)
                .sum();
            *slot = scale.mul_add(sum as f32, *slot);
        }
    }

    /// The 32 quants of a nibble block (element j low nibble, j+16 high), less `offset`.
    fn unpack(q: &[u8; 16], offset: i32) -> [i32; QK] {
        std::array::from_fn(|j| {
            let v = if j < 16 { q[j] & 0x0F } else { q[j - 16] >> 4 };
            v as i32 - offset
        })
    }

    pub(super) fn dot_q4_0(wd: &[f32], wq: &[[u8; 16]], a: &ActRow) -> f32 {
        let mut acc = [0f32; 8];
        for b in 0..wd.len() {
            lanes(&mut acc, wd[b] * a.d[b], &unpack(&wq[b], 8), &a.qs[b]);
        }
        hsum8(acc)
    }

    pub(super) fn dot_q4_1(dm: &[[f32; 2]], wq: &[[u8; 16]], a: &ActRow) -> f32 {
        let mut acc = [0f32; 8];
        let mut summs = 0f32;
        for b in 0..dm.len() {
            let [wd, wm] = dm[b];
            summs += wm * a.s[b];
            lanes(&mut acc, wd * a.d[b], &unpack(&wq[b], 0), &a.qs[b]);
        }
        hsum8(acc) + summs
    }

    pub(super) fn dot_q5_0(wd: &[f32], qh: &[u32], wq: &[[u8; 16]], a: &ActRow) -> f32 {
        let mut acc = [0f32; 8];
        for b in 0..wd.len() {
            let mut w = unpack(&wq[b], 16);
            for (j, v) in w.iter_mut().enumerate() {
                *v += (((qh[b] >> j) & 1) << 4) as i32;
            }
            lanes(&mut acc, wd[b] * a.d[b], &w, &a.qs[b]);
        }
        hsum8(acc)
    }

    pub(super) fn dot_q8_0(wd: &[f32], wq: &[[i8; 32]], a: &ActRow) -> f32 {
        let mut acc = [0f32; 8];
        for b in 0..wd.len() {
            let w = std::array::from_fn(|j| wq[b][j] as i32);
            lanes(&mut acc, wd[b] * a.d[b], &w, &a.qs[b]);
        }
        hsum8(acc)
    }

    pub(super) use super::kquants::scalar::{dot_q4k, dot_q5k, dot_q6k};
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
                super::prefetch(wq.as_ptr().wrapping_add(b), 16);
                super::prefetch(dm.as_ptr().wrapping_add(b), 8);
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
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..wd.len() {
                super::prefetch(wq.as_ptr().wrapping_add(b), 32);
                super::prefetch(wd.as_ptr().wrapping_add(b), 4);
                // SAFETY (indexing): every slice holds `nb` blocks (asserted by the caller).
                let w = _mm256_loadu_si256(wq.get_unchecked(b).as_ptr() as *const __m256i);
                signed_block(w, *wd.get_unchecked(b), b, a, &mut acc);
            }
            for r in 0..R {
                out[r] = hsum8(acc[r]);
            }
        }

        /// Signed weights `w` (−16..16) against the rows, as ggml's `mul_sum_i8_pairs`: the
        /// u8 × i8 instructions need one unsigned operand, so w's sign moves onto x.
        #[target_feature(enable = $features)]
        unsafe fn signed_block<const R: usize>(
            w: __m256i,
            wd: f32,
            b: usize,
            a: &[ActRow; R],
            acc: &mut [__m256; R],
        ) {
            let wabs = _mm256_sign_epi8(w, w);
            for r in 0..R {
                let ar = a.get_unchecked(r);
                let scale = _mm256_set1_ps(wd * *ar.d.get_unchecked(b));
                let x = _mm256_loadu_si256(ar.qs.get_unchecked(b).as_ptr() as *const __m256i);
                let sums = $lane_sums(wabs, _mm256_sign_epi8(x, w));
                acc[r] = _mm256_fmadd_ps(scale, sums, acc[r]);
            }
        }

        /// A nibble block as 32 bytes in element order (element j low, j+16 high).
        #[target_feature(enable = $features)]
        unsafe fn nibble_block(q: &[u8; 16]) -> __m256i {
            let packed = _mm_loadu_si128(q.as_ptr() as *const __m128i);
            let both = _mm256_insertf128_si256(
                _mm256_castsi128_si256(packed),
                _mm_srli_epi16(packed, 4),
                1,
            );
            _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
        }

        /// # Safety
        /// As [`dot_q4_1`].
        #[target_feature(enable = $features)]
        pub(super) unsafe fn dot_q4_0<const R: usize>(
            wd: &[f32],
            wq: &[[u8; 16]],
            a: &[ActRow; R],
            out: &mut [f32],
        ) {
            let mut acc = [_mm256_setzero_ps(); R];
            let eight = _mm256_set1_epi8(8);
            for b in 0..wd.len() {
                super::prefetch(wq.as_ptr().wrapping_add(b), 16);
                super::prefetch(wd.as_ptr().wrapping_add(b), 4);
                // SAFETY (indexing): every slice holds `nb` blocks (asserted by the caller).
                let w = _mm256_sub_epi8(nibble_block(wq.get_unchecked(b)), eight);
                signed_block(w, *wd.get_unchecked(b), b, a, &mut acc);
            }
            for r in 0..R {
                out[r] = hsum8(acc[r]);
            }
        }

        /// # Safety
        /// As [`dot_q4_1`].
        #[target_feature(enable = $features)]
        pub(super) unsafe fn dot_q5_0<const R: usize>(
            wd: &[f32],
            qh: &[u32],
            wq: &[[u8; 16]],
            a: &[ActRow; R],
            out: &mut [f32],
        ) {
            let mut acc = [_mm256_setzero_ps(); R];
            // Byte j takes qh's byte j/8, then keeps its bit j%8.
            let spread = _mm256_setr_epi64x(
                0,
                0x0101_0101_0101_0101,
                0x0202_0202_0202_0202,
                0x0303_0303_0303_0303,
            );
            let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            let high = _mm256_set1_epi8(0xF0u8 as i8);
            for b in 0..wd.len() {
                super::prefetch(wq.as_ptr().wrapping_add(b), 16);
                super::prefetch(wd.as_ptr().wrapping_add(b), 4);
                super::prefetch(qh.as_ptr().wrapping_add(b), 4);
                // SAFETY (indexing): every slice holds `nb` blocks (asserted by the caller).
                let h = _mm256_shuffle_epi8(_mm256_set1_epi32(*qh.get_unchecked(b) as i32), spread);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit);
                // q − 16 is the nibble itself with the fifth bit set, and nibble | 0xF0 (the
                // same value as i8) without it.
                let w = _mm256_or_si256(
                    nibble_block(wq.get_unchecked(b)),
                    _mm256_andnot_si256(set, high),
                );
                signed_block(w, *wd.get_unchecked(b), b, a, &mut acc);
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

    pub(super) use super::kquants::avx2::{dot_q4k, dot_q5k, dot_q6k};

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

    pub(super) use super::kquants::avx512::{dot_q4k, dot_q5k, dot_q6k};
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

    /// Every format with a kernel here.
    const ALL: [GgmlDType; 7] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    /// Two super-blocks per row, so every format has several blocks.
    const COLS: usize = 512;

    fn dequantize(m: &QuantMatrix) -> Vec<f32> {
        (0..m.rows()).flat_map(|r| m.row(r)).collect()
    }

    #[test]
    fn dequantizing_matches_candle() {
        for dtype in ALL {
            let (m, want) = quantized(dtype, 3, COLS, 1);
            assert_eq!(dequantize(&m), want, "{dtype:?}");
            // Close to the file's size: only the f16 scales are widened.
            let file = 3 * COLS / dtype.block_size() * dtype.type_size();
            assert!(m.bytes() >= file && m.bytes() <= file * 5 / 4, "{dtype:?}");
        }
    }

    #[test]
    fn formats_without_a_kernel_and_damaged_data_are_refused() {
        let data = vec![0u8; 64 * 4];
        let f32 = QuantMatrix::from_gguf(GgmlDType::F32, 2, 32, &data);
        assert_eq!(f32.err(), Some(Unsupported::Format));
        let narrow = QuantMatrix::from_gguf(GgmlDType::Q4K, 1, 128, &data);
        assert_eq!(narrow.err(), Some(Unsupported::Width));
        let short = QuantMatrix::from_gguf(GgmlDType::Q8_0, 2, 32, &data[..60]);
        assert_eq!(short.err(), Some(Unsupported::Size { have: 60, want: 68 }));
    }

    #[test]
    fn every_kernel_computes_the_same_bits() {
        for dtype in ALL {
            let (m, _) = quantized(dtype, 37, COLS, 2);
            // 7 rows take the few-rows path (a group of four and three); the second count the
            // many-rows path (it starts at 8 rows per thread) with a remainder of three.
            for n in [7, 8 * rayon::current_num_threads() + 3] {
                let x = random(n * COLS, 3);
                let want = m.matmul_with(Kernel::Scalar, &x, n);
                for k in Kernel::available() {
                    let got = m.matmul_with(k, &x, n);
                    let same = want
                        .iter()
                        .zip(&got)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{k:?} differs from scalar for {dtype:?}, {n} rows");
                    let one = m.matmul_with(k, &x[..COLS], 1);
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
        for dtype in ALL {
            let (m, w) = quantized(dtype, 9, COLS, 4);
            let x = random(4 * COLS, 5);
            let got = m.matmul(&x, 4);
            let c = COLS;
            for t in 0..4 {
                for r in 0..9 {
                    let exact: f32 = (0..c).map(|k| x[t * c + k] * w[r * c + k]).sum();
                    // 8-bit activations: error well under 2 % of the row's magnitude.
                    let scale: f32 = (0..c).map(|k| (x[t * c + k] * w[r * c + k]).abs()).sum();
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
            let a = Activations::quantize(k, &x, 32, Scheme::Q8 { with_sum: true });
            assert_eq!(&a.qs[0][..4], &[127, 2, 4, -2], "{k:?}");
            assert_eq!(a.s[0], f16::from_f32(131.0).to_f32());
        }
    }

    #[test]
    fn q8k_quantization_maps_the_largest_value_to_minus_127_and_sums_each_16() {
        let mut x = vec![0.5f32; 256];
        x[7] = -2.0;
        let a = Activations::quantize(Kernel::detect(), &x, 256, Scheme::Q8K);
        assert_eq!(a.qs[0][7], -127);
        // iscale = −127/−2: 0.5 → 31.75 → 32.
        assert_eq!(a.qs[0][0], 32);
        assert_eq!(a.bsums[0][0], -127 + 15 * 32);
        assert_eq!(a.bsums[0][1], 16 * 32);
        assert_eq!(a.d[0], 1.0 / (-127.0 / -2.0));
    }
}
