//! Attention over the cache plus the new tokens, computed in query blocks.
//!
//! Every new token sees every cached entry (the model's earlier tokens and any injected
//! context) and, among the new tokens, only those at or before it in the same segment.
//! Segments let one forward run several independent chunks side by side (a block-diagonal
//! mask) without paying for the masked-out pairs.
//!
//! Scores are materialised one query block at a time, against only the keys that block can
//! see, so memory grows with `block × keys` rather than `T²`, and the masked upper blocks of
//! a causal prompt are never computed.

use candle_core::{DType, Device, Tensor, D};

use super::kv::KvCache;
use super::{ModelError, Result};

/// One block of query rows and the keys it needs.
#[derive(Debug)]
struct QueryBlock {
    q0: usize,
    q1: usize,
    /// First new-token key the block can see (the start of its first row's segment).
    k_lo: usize,
    /// Additive mask `(q1 - q0, cols)` over the last `cols` key columns; `None` when every
    /// key is visible.
    mask: Option<Mask>,
}

#[derive(Debug)]
struct Mask {
    cols: usize,
    values: Vec<f32>,
    /// The same values on a GPU, where the composed candle ops run instead of [`Softmax`].
    tensor: Option<Tensor>,
}

/// The query blocks and masks of one forward call, shared by all its layers.
#[derive(Debug)]
pub(crate) struct AttnPlan {
    blocks: Vec<QueryBlock>,
}

impl AttnPlan {
    /// Plan `n` new tokens in blocks of at most `block_size` rows.
    ///
    /// `segments` (one id per token, each id one contiguous run) restricts attention among
    /// the new tokens to their own run; `None` is one run.
    pub(crate) fn new(
        n: usize,
        segments: Option<&[u32]>,
        block_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let run_start = run_starts(n, segments)?;
        let mut blocks = Vec::new();
        let mut q0 = 0;
        while q0 < n {
            let q1 = (q0 + block_size.max(1)).min(n);
            let k_lo = run_start[q0];
            let one_run = run_start[q1 - 1] == k_lo;
            // Inside one run, keys before q0 are visible to every row: mask only the
            // triangle over [q0, q1). Across runs, mask the whole new-token range.
            let m0 = if one_run { q0 } else { k_lo };
            let mask = if q1 - q0 == 1 && one_run {
                None
            } else {
                let cols = q1 - m0;
                let mut m = vec![0f32; (q1 - q0) * cols];
                for t in q0..q1 {
                    for j in m0..q1 {
                        if j > t || run_start[j] != run_start[t] {
                            m[(t - q0) * cols + (j - m0)] = f32::NEG_INFINITY;
                        }
                    }
                }
                let tensor = if device.is_cpu() {
                    None
                } else {
                    Some(Tensor::from_vec(m.clone(), (q1 - q0, cols), device)?)
                };
                Some(Mask {
                    cols,
                    values: m,
                    tensor,
                })
            };
            blocks.push(QueryBlock { q0, q1, k_lo, mask });
            q0 = q1;
        }
        Ok(Self { blocks })
    }
}

fn run_starts(n: usize, segments: Option<&[u32]>) -> Result<Vec<usize>> {
    let Some(seg) = segments else {
        return Ok(vec![0; n]);
    };
    if seg.len() != n {
        return Err(ModelError::Input(format!(
            "{} segment ids for {n} tokens",
            seg.len()
        )));
    }
    let mut starts = vec![0; n];
    let mut seen = std::collections::HashSet::new();
    for t in 0..n {
        if t > 0 && seg[t] == seg[t - 1] {
            starts[t] = starts[t - 1];
        } else {
            if !seen.insert(seg[t]) {
                return Err(ModelError::Input(format!(
                    "segment {} is not one contiguous run",
                    seg[t]
                )));
            }
            starts[t] = t;
        }
    }
    Ok(starts)
}

/// Softmax of one block's scores off the CPU (tensor ops: the mask's tail and the cache's
/// logit bias added, then the last dimension normalised); `shape` is `(n_kv, group, tq, lk)`.
fn device_probs(
    scores: Tensor,
    mask: Option<&Mask>,
    bias_gpu: Option<&Tensor>,
    (n_kv, group, tq, lk): (usize, usize, usize, usize),
    probs_f16: bool,
) -> Result<Tensor> {
    let scores = scores.reshape((n_kv, group, tq, lk))?;
    if let Some(Mask {
        cols,
        tensor: Some(mask),
        ..
    }) = mask
    {
        let tail = scores
            .narrow(D::Minus1, lk - cols, *cols)?
            .broadcast_add(mask)?;
        scores.slice_set(&tail, D::Minus1, lk - cols)?;
    }
    if let Some(bias) = bias_gpu {
        let head = scores
            .narrow(D::Minus1, 0, bias.dim(0)?)?
            .broadcast_add(bias)?;
        scores.slice_set(&head, D::Minus1, 0)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((n_kv, group * tq, lk))?;
    // llama.cpp multiplies f16 probabilities by its f16 values; see `Model::kv_f16`.
    if probs_f16 {
        round_f16(&probs)
    } else {
        Ok(probs)
    }
}

/// Attention of rotated queries `q` `(n_head, n, head_dim)` over layer `layer` of `cache`,
/// whose first `prior` entries precede the new tokens (whose keys were appended after them).
/// Returns `(n, n_head * head_dim)`.
pub(crate) fn attend(
    q: &Tensor,
    cache: &KvCache,
    layer: usize,
    prior: usize,
    plan: &AttnPlan,
    probs_f16: bool,
) -> Result<Tensor> {
    let (n_head, _, head_dim) = q.dims3()?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    // The cache's logit bias covers entries before the new tokens; theirs add nothing.
    let bias = cache.logit_bias(layer);
    let bias = &bias[..bias.len().min(prior)];
    let bias_gpu = if q.device().is_cpu() || bias.iter().all(|&b| b == 0.0) {
        None
    } else {
        Some(Tensor::from_slice(bias, bias.len(), q.device())?)
    };
    let mut outs = Vec::with_capacity(plan.blocks.len());
    for b in &plan.blocks {
        let tq = b.q1 - b.q0;
        let keys = gather_keys(cache, layer, prior, b.k_lo, b.q1)?;
        let (k, v) = keys;
        if tq == 1 && b.mask.is_none() && q.device().is_cpu() {
            let qb = (q.narrow(1, b.q0, 1)?.contiguous()? * scale)?;
            let out = qb.apply_op3_no_bwd(&k, &v, &OneQuery { probs_f16, bias })?;
            outs.push(out.reshape((1, n_head * head_dim))?);
            continue;
        }
        let n_kv = k.dim(0)?;
        let group = n_head / n_kv;
        let lk = k.dim(1)?;
        // Query heads h = kv * group + g share kv head `kv` (the repeat_kv convention), so
        // reshaping to (n_kv, group * tq) lets each kv head's matmul serve its whole group
        // without copying K or V.
        let qb = (q.narrow(1, b.q0, tq)?.contiguous()? * scale)?.reshape((
            n_kv,
            group * tq,
            head_dim,
        ))?;
        let scores = qb.matmul(&k.t()?)?;
        let probs = if scores.device().is_cpu() {
            // The scores are this block's own fresh tensor: turn them into probabilities in
            // place rather than allocating another block × keys buffer.
            scores.inplace_op1(&Softmax {
                bias,
                mask: b.mask.as_ref(),
                rows: tq,
                round_f16: probs_f16,
            })?;
            scores
        } else {
            device_probs(
                scores,
                b.mask.as_ref(),
                bias_gpu.as_ref(),
                (n_kv, group, tq, lk),
                probs_f16,
            )?
        };
        let out = probs
            .matmul(&v)?
            .reshape((n_kv, group, tq, head_dim))?
            .permute((2, 0, 1, 3))?
            .reshape((tq, n_head * head_dim))?;
        outs.push(out);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

/// Mask, softmax and optional f16 rounding of attention scores in one pass over them (CPU).
///
/// Composed from candle ops this is five passes over the largest tensor of a long prefill
/// (mask, softmax, two dtype casts, a copy back); here it is one, split across threads.
/// Like llama.cpp, the exponentials are summed in f64 and scaled by the f32 reciprocal.
struct Softmax<'a> {
    /// Logit bias of the first key columns (the cache's entries before the new tokens).
    bias: &'a [f32],
    mask: Option<&'a Mask>,
    /// Query rows per head: score row `i` belongs to query `i % rows`.
    rows: usize,
    round_f16: bool,
}

impl candle_core::InplaceOp1 for Softmax<'_> {
    fn name(&self) -> &'static str {
        "slm-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let candle_core::CpuStorage::F32(all) = storage else {
            candle_core::bail!("attention scores must be f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("attention scores must be contiguous");
        };
        let lk = layout.dims().last().copied().unwrap_or(1);
        all[start..end]
            .par_chunks_mut(lk)
            .enumerate()
            .with_min_len(32)
            .for_each(|(i, row)| {
                if let Some(m) = self.mask {
                    let t = i % self.rows;
                    let tail = &mut row[lk - m.cols..];
                    for (v, add) in tail.iter_mut().zip(&m.values[t * m.cols..(t + 1) * m.cols]) {
                        *v += add;
                    }
                }
                for (v, add) in row.iter_mut().zip(self.bias) {
                    *v += add;
                }
                softmax_row(row, self.round_f16);
            });
        Ok(())
    }
}

/// Softmax of one row in place; the largest value is found 8 lanes at a time (a plain
/// `fold(f32::max)` does not vectorize).
fn softmax_row(row: &mut [f32], round_f16: bool) {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    // Eight running sums, not one: a single f64 accumulator is a serial chain of additions
    // that costs more than the exponentials.
    let mut sums = [0f64; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for (s, v) in sums.iter_mut().zip(c.iter_mut()) {
            *v = (*v - max).exp();
            *s += *v as f64;
        }
    }
    for v in chunks.into_remainder() {
        *v = (*v - max).exp();
        sums[0] += *v as f64;
    }
    let scale = (1.0 / sums.iter().sum::<f64>()) as f32;
    for v in row.iter_mut() {
        *v *= scale;
    }
    if round_f16 {
        round_f16_slice(row);
    }
}

/// Round to the nearest f16 and widen back to f32.
pub(crate) fn round_f16(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F16)?.to_dtype(DType::F32)?)
}

/// Round every value to the nearest f16 and back, 8 at a time with F16C where the CPU has it.
fn round_f16_slice(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("f16c") {
        // SAFETY: F16C was just detected.
        #[allow(unsafe_code)]
        unsafe {
            round_f16_f16c(v)
        };
        return;
    }
    for x in v {
        *x = half::f16::from_f32(*x).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx,f16c")]
unsafe fn round_f16_f16c(v: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = v.chunks_exact_mut(8);
    for c in &mut chunks {
        let x = _mm256_loadu_ps(c.as_ptr());
        let h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
        _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
    }
    for x in chunks.into_remainder() {
        *x = half::f16::from_f32(*x).to_f32();
    }
}

#[cfg(test)]
#[test]
fn f16_rounding_matches_the_half_crate() {
    let mut v: Vec<f32> = (0..37)
        .map(|i| (i as f32 * 0.37).sin() * 1e-3 + i as f32 * 0.01)
        .collect();
    let want: Vec<f32> = v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
    round_f16_slice(&mut v);
    assert_eq!(v, want);
}

/// Attention of one new token (decode) on the CPU, straight over the cache's memory.
///
/// Through gemm this is a 3-row matrix product per kv head plus a dozen tensor ops per layer;
/// here each query head makes one pass over its keys and one over its values. Inputs: `q`
/// `(n_head, 1, head_dim)` already scaled, `k` and `v` `(n_kv, keys, head_dim)` views.
struct OneQuery<'a> {
    probs_f16: bool,
    /// Logit bias of the first keys.
    bias: &'a [f32],
}

impl candle_core::CustomOp3 for OneQuery<'_> {
    fn name(&self) -> &'static str {
        "slm-one-query-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &candle_core::CpuStorage,
        ql: &candle_core::Layout,
        ks: &candle_core::CpuStorage,
        kl: &candle_core::Layout,
        vs: &candle_core::CpuStorage,
        vl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage::F32;
        use rayon::prelude::*;
        let (F32(q), F32(k), F32(v)) = (qs, ks, vs) else {
            candle_core::bail!("attention inputs must be f32");
        };
        let (n_head, _, hd) = ql.shape().dims3()?;
        let (n_kv, lk, _) = kl.shape().dims3()?;
        let rows_ok = |l: &candle_core::Layout| l.stride()[1] == hd && l.stride()[2] == 1;
        let Some((q0, _)) = ql.contiguous_offsets() else {
            candle_core::bail!("query must be contiguous");
        };
        if !rows_ok(kl) || !rows_ok(vl) {
            candle_core::bail!("keys and values must be stored row by row");
        }
        let group = n_head / n_kv;
        let mut out = vec![0f32; n_head * hd];
        out.par_chunks_mut(hd).enumerate().for_each(|(h, o)| {
            let kv = h / group;
            let qh = &q[q0 + h * hd..q0 + (h + 1) * hd];
            let kb = kl.start_offset() + kv * kl.stride()[0];
            let vb = vl.start_offset() + kv * vl.stride()[0];
            let mut p: Vec<f32> = (0..lk)
                .map(|j| dot(qh, &k[kb + j * hd..kb + (j + 1) * hd]))
                .collect();
            for (x, add) in p.iter_mut().zip(self.bias) {
                *x += add;
            }
            softmax_row(&mut p, self.probs_f16);
            for (j, &pj) in p.iter().enumerate() {
                let vj = &v[vb + j * hd..vb + (j + 1) * hd];
                for (acc, &x) in o.iter_mut().zip(vj) {
                    *acc += pj * x;
                }
            }
        });
        Ok((F32(out), candle_core::Shape::from((n_head, 1, hd))))
    }
}

/// Dot product in 8 independent lanes, so it vectorizes (one running sum would not).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Keys and values `[0, prior) ++ prior + [k_lo, q1)` of one layer.
fn gather_keys(
    cache: &KvCache,
    layer: usize,
    prior: usize,
    k_lo: usize,
    q1: usize,
) -> Result<(Tensor, Tensor)> {
    let missing = || ModelError::Input(format!("layer {layer} has no keys to attend to"));
    if k_lo == 0 {
        return cache.range(layer, 0, prior + q1)?.ok_or_else(missing);
    }
    let own = cache
        .range(layer, prior + k_lo, q1 - k_lo)?
        .ok_or_else(missing)?;
    match cache.range(layer, 0, prior)? {
        None => Ok(own),
        Some((pk, pv)) => Ok((
            Tensor::cat(&[&pk, &own.0], 1)?,
            Tensor::cat(&[&pv, &own.1], 1)?,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_rows(plan: &AttnPlan, i: usize) -> Vec<Vec<f32>> {
        plan.blocks[i]
            .mask
            .as_ref()
            .map(|m| m.values.chunks(m.cols).map(<[f32]>::to_vec).collect())
            .unwrap_or_default()
    }

    #[test]
    fn causal_blocks_mask_only_their_own_triangle() -> Result<()> {
        // 5 tokens, blocks of 2: rows [0,2) [2,4) [4,5).
        let plan = AttnPlan::new(5, None, 2, &Device::Cpu)?;
        assert_eq!(plan.blocks.len(), 3);
        let inf = f32::NEG_INFINITY;
        // . x
        // . .
        assert_eq!(mask_rows(&plan, 1), vec![vec![0., inf], vec![0., 0.]]);
        assert!(plan.blocks[2].mask.is_none());
        assert_eq!(plan.blocks[2].k_lo, 0);
        Ok(())
    }

    #[test]
    fn segments_make_the_mask_block_diagonal() -> Result<()> {
        // Two runs [0,2) and [2,5) in one block of 5.
        let plan = AttnPlan::new(5, Some(&[7, 7, 9, 9, 9]), 8, &Device::Cpu)?;
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            mask_rows(&plan, 0),
            vec![
                vec![0., inf, inf, inf, inf],
                vec![0., 0., inf, inf, inf],
                vec![inf, inf, 0., inf, inf],
                vec![inf, inf, 0., 0., inf],
                vec![inf, inf, 0., 0., 0.],
            ]
        );
        // A block starting inside the second run sees from that run's start.
        let plan = AttnPlan::new(5, Some(&[7, 7, 9, 9, 9]), 3, &Device::Cpu)?;
        assert_eq!(plan.blocks[1].k_lo, 2);
        Ok(())
    }

    #[test]
    fn a_segment_id_may_not_come_back() {
        assert!(AttnPlan::new(3, Some(&[1, 2, 1]), 4, &Device::Cpu).is_err());
        assert!(AttnPlan::new(3, Some(&[1, 2]), 4, &Device::Cpu).is_err());
    }
}
