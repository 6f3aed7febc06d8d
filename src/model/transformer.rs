//! The LLaMA-family transformer: embeddings, RMSNorm, RoPE, grouped-query attention, SwiGLU.
//!
//! Unlike candle's `quantized_llama`, the forward is open: it runs any layer range over
//! hidden states at explicit positions, attends to whatever the [`KvCache`] holds (the
//! model's own earlier tokens or KV injected from a context tree), can hand back each
//! layer's keys (before RoPE) and values and chosen hidden states, and computes logits only
//! when asked. The context tree and the answer engine are both built on these calls.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

use super::attention::{attend, round_f16, AttnPlan};
use super::config::Config;
use super::kv::KvCache;
use super::quant::QuantMatrix;
use super::rope::RopeTables;
use super::{ModelError, Result};

/// Query rows per attention block: 256 rows × 9 heads × 8K keys is 75 MB of scores.
const DEFAULT_ATTENTION_BLOCK: usize = 256;

/// Tokens per forward call in [`Model::prefill`]: large enough to keep the matrix kernels
/// busy (measured: 512-token prefill runs at full speed), small enough that activations stay
/// a few MB.
const PREFILL_PIECE: usize = 512;

/// How a projection's weight is held.
#[derive(Debug)]
pub(crate) enum Weights {
    /// `(out, in)` f32 through gemm: safetensors checkpoints, and GGUF types without a
    /// kernel of ours.
    Dense(Tensor),
    /// GGUF Q4_1/Q8_0 on the CPU, through our kernel (see `quant`).
    Quant(Arc<QuantMatrix>),
    /// GGUF quantized weights on a GPU, through candle's CUDA kernels.
    Candle(QMatMul),
}

/// The token embedding table.
#[derive(Debug)]
pub(crate) enum Embedding {
    /// f32 on the model's device.
    Dense(Tensor),
    /// GGUF blocks on the CPU, each looked-up row dequantized: the table is the largest
    /// tensor of a small model with a big vocabulary (Qwen2.5: 152K rows), and as f32 it
    /// would take 4–7× its file size.
    Quant(Arc<QuantMatrix>),
}

/// A projection `y = x Wᵀ + b`.
#[derive(Debug)]
pub(crate) struct Linear {
    w: Weights,
    b: Option<Tensor>,
}

impl Linear {
    pub(crate) fn new(w: Weights, b: Option<Tensor>) -> Self {
        Self { w, b }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.w {
            Weights::Dense(w) => x.matmul(&w.t()?)?,
            Weights::Candle(q) => q.forward(x)?,
            Weights::Quant(q) => {
                let n = x.dim(0)?;
                let flat = x.flatten_all()?.to_vec1::<f32>()?;
                Tensor::from_vec(q.matmul(&flat, n), (n, q.rows()), x.device())?
            }
        };
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    fn bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let w = match &self.w {
            Weights::Dense(t) => size(t),
            Weights::Quant(q) => q.bytes(),
            Weights::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Weights::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => size(t),
        };
        w + self.b.as_ref().map_or(0, size)
    }
}

/// Projections of the same input (q, k, v; gate, up), multiplied as one matrix where the
/// weights allow: the input is quantized once and the threads are woken once, not 3 times.
#[derive(Debug)]
pub(crate) struct Fused {
    /// One fused projection, or the parts as they came when they cannot be joined.
    parts: Vec<Linear>,
    /// Output width of each original projection.
    sizes: Vec<usize>,
}

impl Fused {
    pub(crate) fn new(parts: Vec<Linear>, sizes: Vec<usize>) -> Result<Self> {
        let joined = match parts.iter().map(|l| &l.w).collect::<Vec<_>>().as_slice() {
            ws if ws.iter().all(|w| matches!(w, Weights::Quant(_))) => {
                let ms: Vec<&QuantMatrix> = ws
                    .iter()
                    .filter_map(|w| match w {
                        Weights::Quant(m) => Some(m.as_ref()),
                        _ => None,
                    })
                    .collect();
                QuantMatrix::concat(&ms).map(|m| Weights::Quant(Arc::new(m)))
            }
            ws if ws.iter().all(|w| matches!(w, Weights::Dense(_))) => {
                let ts: Vec<&Tensor> = ws
                    .iter()
                    .filter_map(|w| match w {
                        Weights::Dense(t) => Some(t),
                        _ => None,
                    })
                    .collect();
                Some(Weights::Dense(Tensor::cat(&ts, 0)?))
            }
            _ => None,
        };
        let Some(w) = joined else {
            return Ok(Self { parts, sizes });
        };
        let b = if parts.iter().any(|l| l.b.is_some()) {
            let bs = parts
                .iter()
                .zip(&sizes)
                .map(|(l, &n)| match &l.b {
                    Some(b) => Ok(b.clone()),
                    None => Ok(Tensor::zeros(n, DType::F32, w_device(&w))?),
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        Ok(Self {
            parts: vec![Linear::new(w, b)],
            sizes,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        if self.parts.len() == self.sizes.len() && self.parts.len() > 1 {
            return self.parts.iter().map(|l| l.forward(x)).collect();
        }
        let y = self.parts[0].forward(x)?;
        let mut at = 0;
        let mut out = Vec::with_capacity(self.sizes.len());
        for &n in &self.sizes {
            out.push(y.narrow(1, at, n)?);
            at += n;
        }
        Ok(out)
    }

    fn bytes(&self) -> usize {
        self.parts.iter().map(Linear::bytes).sum()
    }
}

/// Where a joined weight lives: only dense and CPU-quantized weights are ever joined.
fn w_device(w: &Weights) -> &Device {
    match w {
        Weights::Dense(t) => t.device(),
        Weights::Quant(_) | Weights::Candle(_) => &Device::Cpu,
    }
}

#[derive(Debug)]
pub(crate) struct Attention {
    /// q, k, v.
    pub(crate) qkv: Fused,
    pub(crate) o: Linear,
}

#[derive(Debug)]
pub(crate) struct Mlp {
    /// gate, up.
    pub(crate) gate_up: Fused,
    pub(crate) down: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.forward(x)?;
        let h = (gu[0].silu()? * &gu[1])?;
        self.down.forward(&h)
    }
}

#[derive(Debug)]
pub(crate) struct Block {
    pub(crate) attn_norm: Tensor,
    pub(crate) attn: Attention,
    pub(crate) ffn_norm: Tensor,
    pub(crate) mlp: Mlp,
}

/// Per-layer keys (before RoPE) and values of the tokens of one forward call,
/// each `(n, n_kv_head * head_dim)`.
#[derive(Debug, Clone)]
pub struct LayerKv {
    pub k: Tensor,
    pub v: Tensor,
}

/// What one [`Model::forward`] call runs and keeps.
#[derive(Debug, Clone)]
pub struct Forward<'a> {
    /// One position per new token.
    pub positions: &'a [u32],
    /// Optional segment id per new token: new tokens attend only within their own run.
    pub segments: Option<&'a [u32]>,
    /// The layers to run.
    pub layers: Range<usize>,
    /// Return each layer's keys (before RoPE) and values for the new tokens.
    pub keep_kv: bool,
    /// Return the output of these layers (0 = after the first block).
    pub keep_hidden: &'a [usize],
    /// Only the keys and values of the last layer are wanted (with `keep_kv`): its
    /// attention and MLP are skipped and `hidden` is that layer's input.
    pub last_kv_only: bool,
}

impl<'a> Forward<'a> {
    /// All layers, causal, nothing kept.
    pub fn all(model: &Model, positions: &'a [u32]) -> Self {
        Self {
            positions,
            segments: None,
            layers: 0..model.config.n_layer,
            keep_kv: false,
            keep_hidden: &[],
            last_kv_only: false,
        }
    }
}

/// The result of one forward call.
#[derive(Debug)]
pub struct ForwardOutput {
    /// Hidden states `(n, d_model)` after the last layer run (before the final norm).
    pub hidden: Tensor,
    /// One entry per layer run, in order, when `keep_kv` was set.
    pub kv: Vec<LayerKv>,
    /// `(layer, hidden (n, d_model))` for each layer in `keep_hidden` that was run.
    pub hidden_at: Vec<(usize, Tensor)>,
}

/// A loaded LLaMA-family model.
#[derive(Debug)]
pub struct Model {
    pub(crate) config: Config,
    pub(crate) device: Device,
    /// `(vocab, d_model)` lookup table.
    pub(crate) embed: Embedding,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: Tensor,
    pub(crate) head: Linear,
    pub(crate) attention_block: usize,
    /// The output head is the embedding table itself (no separate copy in memory).
    pub(crate) tied: bool,
    /// Round Q, K, V and attention probabilities to f16, as llama.cpp does with its f16 KV
    /// cache. GGUF models run llama.cpp's numerics so their greedy answers stay next to
    /// llama.cpp's (BENCHMARKS.md, parity); safetensors models stay in f32 like transformers.
    pub(crate) kv_f16: bool,
    /// Tokens whose keys and values a forward returned (`keep_kv`): the lower model's work.
    kv_tokens: AtomicUsize,
}

impl Model {
    pub(crate) fn assemble(
        config: Config,
        device: Device,
        embed: Embedding,
        blocks: Vec<Block>,
        norm: Tensor,
        head: Linear,
        tied: bool,
    ) -> Self {
        Self {
            config,
            device,
            embed,
            blocks,
            norm,
            head,
            attention_block: DEFAULT_ATTENTION_BLOCK,
            tied,
            kv_f16: false,
            kv_tokens: AtomicUsize::new(0),
        }
    }

    /// Tokens whose keys and values a forward has returned since the model was loaded:
    /// everything the lower model encoded (the upper model never asks for them). Lets a
    /// caller see, from outside the engine, whether answering a question re-read the document.
    pub fn kv_tokens(&self) -> usize {
        self.kv_tokens.load(Ordering::Relaxed)
    }

    /// The network's shape.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where the weights live.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Query rows per attention block (tests shrink it to compare against naive attention).
    pub fn set_attention_block(&mut self, rows: usize) {
        self.attention_block = rows.max(1);
    }

    /// An empty cache for this model.
    pub fn new_cache(&self) -> KvCache {
        let c = &self.config;
        KvCache::new(c.n_layer, c.n_kv_head, c.head_dim, &self.device)
    }

    /// Token embeddings `(n, d_model)`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary ({} tokens)",
                self.config.vocab_size
            )));
        }
        match &self.embed {
            Embedding::Dense(t) => {
                let ids = Tensor::new(tokens, &self.device)?;
                Ok(t.index_select(&ids, 0)?)
            }
            Embedding::Quant(m) => {
                let rows: Vec<f32> = tokens.iter().flat_map(|&t| m.row(t as usize)).collect();
                Ok(Tensor::from_vec(
                    rows,
                    (tokens.len(), m.cols()),
                    &self.device,
                )?)
            }
        }
    }

    /// Run `f.layers` over hidden states `x` `(n, d_model)`.
    ///
    /// The new tokens attend to everything `cache` holds for each layer, then their rotated
    /// keys and values are appended to it.
    pub fn forward(&self, x: &Tensor, f: &Forward, cache: &mut KvCache) -> Result<ForwardOutput> {
        // One thread pool for everything: candle's gemm, our kernels and rayon's global pool
        // would otherwise each keep threads spinning on the same cores.
        candle_core::utils::with_threadpool(|| self.forward_in_pool(x, f, cache))
    }

    fn forward_in_pool(
        &self,
        x: &Tensor,
        f: &Forward,
        cache: &mut KvCache,
    ) -> Result<ForwardOutput> {
        let c = &self.config;
        let n = x.dim(0)?;
        if n == 0 {
            return Err(ModelError::Input("nothing to run: no tokens".into()));
        }
        if f.positions.len() != n {
            return Err(ModelError::Input(format!(
                "{} positions for {n} tokens",
                f.positions.len()
            )));
        }
        if f.layers.end > c.n_layer || f.layers.start > f.layers.end {
            return Err(ModelError::Input(format!(
                "layer range {:?} outside 0..{}",
                f.layers, c.n_layer
            )));
        }
        if f.keep_kv {
            self.kv_tokens.fetch_add(n, Ordering::Relaxed);
        }
        let rope = RopeTables::new(c, f.positions, &self.device)?;
        let plan = AttnPlan::new(n, f.segments, self.attention_block, &self.device)?;
        let mut out = ForwardOutput {
            hidden: x.clone(),
            kv: Vec::new(),
            hidden_at: Vec::new(),
        };
        let mut x = x.clone();
        for layer in f.layers.clone() {
            if f.last_kv_only && f.keep_kv && layer + 1 == f.layers.end {
                out.kv.push(self.layer_kv(layer, &x)?);
                break;
            }
            let (y, kv) = self.block_forward(layer, &x, &rope, &plan, cache)?;
            x = y;
            if f.keep_kv {
                out.kv.push(kv);
            }
            if f.keep_hidden.contains(&layer) {
                out.hidden_at.push((layer, x.clone()));
            }
        }
        out.hidden = x;
        Ok(out)
    }

    fn block_forward(
        &self,
        layer: usize,
        x: &Tensor,
        rope: &RopeTables,
        plan: &AttnPlan,
        cache: &mut KvCache,
    ) -> Result<(Tensor, LayerKv)> {
        let c = &self.config;
        let b = &self.blocks[layer];
        let eps = c.rms_eps as f32;
        let h = rms_norm(x, &b.attn_norm, eps)?;
        let (att, kv) = self.attention(layer, &h, rope, plan, cache)?;
        let x = (x + b.attn.o.forward(&att)?)?;
        let h = rms_norm(&x, &b.ffn_norm, eps)?;
        let x = (&x + b.mlp.forward(&h)?)?;
        Ok((x, kv))
    }

    fn attention(
        &self,
        layer: usize,
        h: &Tensor,
        rope: &RopeTables,
        plan: &AttnPlan,
        cache: &mut KvCache,
    ) -> Result<(Tensor, LayerKv)> {
        let c = &self.config;
        let a = &self.blocks[layer].attn;
        let n = h.dim(0)?;
        let qkv = a.qkv.forward(h)?;
        let (q, k, v) = (&qkv[0], qkv[1].clone(), qkv[2].clone());
        let q = self.kv_round(rope.apply(&heads_first(q, c.n_head, c.head_dim)?)?)?;
        let k_rot = self.kv_round(rope.apply(&heads_first(&k, c.n_kv_head, c.head_dim)?)?)?;
        let v_heads = self.kv_round(heads_first(&v, c.n_kv_head, c.head_dim)?)?;
        let prior = cache.layer_len(layer);
        cache.append(layer, &k_rot, &v_heads)?;
        let att = attend(&q, cache, layer, prior, plan, self.kv_f16)?;
        debug_assert_eq!(att.dim(0)?, n);
        Ok((att, LayerKv { k, v }))
    }

    /// Keys (before RoPE) and values of layer `layer` for its input `x`, nothing else.
    fn layer_kv(&self, layer: usize, x: &Tensor) -> Result<LayerKv> {
        let b = &self.blocks[layer];
        let h = rms_norm(x, &b.attn_norm, self.config.rms_eps as f32)?;
        let qkv = b.attn.qkv.forward(&h)?;
        Ok(LayerKv {
            k: qkv[1].clone(),
            v: qkv[2].clone(),
        })
    }

    fn kv_round(&self, x: Tensor) -> Result<Tensor> {
        if self.kv_f16 {
            round_f16(&x)
        } else {
            Ok(x)
        }
    }

    /// Logits `(n, vocab)` for hidden states `(n, d_model)` from the last layer.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        candle_core::utils::with_threadpool(|| {
            let h = rms_norm(hidden, &self.norm, self.config.rms_eps as f32)?;
            self.head.forward(&h)
        })
    }

    /// Put context entries into layer `layer` of `cache`: keys `k` (before RoPE) and values
    /// `v`, both `(n, n_kv_head * head_dim)`, rotated at `positions`.
    pub fn inject(
        &self,
        cache: &mut KvCache,
        layer: usize,
        kv: &LayerKv,
        positions: &[u32],
    ) -> Result<()> {
        let c = &self.config;
        if layer >= c.n_layer || cache.n_layer() != c.n_layer {
            return Err(ModelError::Input(format!(
                "layer {layer} does not exist in a {}-layer model and cache",
                c.n_layer
            )));
        }
        if kv.k.dim(0)? != positions.len() || kv.v.dim(0)? != positions.len() {
            return Err(ModelError::Input(format!(
                "{} positions for {} keys and {} values",
                positions.len(),
                kv.k.dim(0)?,
                kv.v.dim(0)?
            )));
        }
        let rope = RopeTables::new(c, positions, &self.device)?;
        let k = self.kv_round(rope.apply(&heads_first(&kv.k, c.n_kv_head, c.head_dim)?)?)?;
        let v = self.kv_round(heads_first(&kv.v, c.n_kv_head, c.head_dim)?)?;
        cache.append(layer, &k, &v)
    }

    /// Run every layer over `tokens` at the positions after what `cache` holds and return
    /// the logits `(vocab,)` of the last token.
    pub fn prefill(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let start = cache.next_position() as u32;
        let positions: Vec<u32> = (start..start + tokens.len() as u32).collect();
        let last = self.prefill_at(tokens, &positions, cache)?;
        Ok(self.logits(&last)?.squeeze(0)?)
    }

    /// Run every layer over `tokens` at `positions` (one each, any order), causal among
    /// themselves and seeing all that `cache` holds, adding their KV to it; returns the last
    /// token's hidden state `(1, d_model)`. The next token then follows the slice's last
    /// position.
    pub fn prefill_at(
        &self,
        tokens: &[u32],
        positions: &[u32],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(ModelError::Input("nothing to run: no tokens".into()));
        }
        if positions.len() != tokens.len() {
            return Err(ModelError::Input(format!(
                "{} positions for {} tokens",
                positions.len(),
                tokens.len()
            )));
        }
        // A long prompt runs in pieces through the cache: the result is the same, and the
        // activations held at once are those of one piece, not of the whole prompt.
        let mut hidden = None;
        for (piece, at) in tokens
            .chunks(PREFILL_PIECE)
            .zip(positions.chunks(PREFILL_PIECE))
        {
            let x = self.embed(piece)?;
            hidden = Some(self.forward(&x, &Forward::all(self, at), cache)?.hidden);
        }
        let hidden = hidden.ok_or_else(|| ModelError::Input("nothing to run".into()))?;
        let last = positions[positions.len() - 1] as usize;
        cache.set_next_position(last + 1);
        Ok(hidden.narrow(0, hidden.dim(0)? - 1, 1)?)
    }

    /// Bytes of the model's tensors as held in memory.
    pub fn weight_bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                let (a, m) = (&b.attn, &b.mlp);
                size(&b.attn_norm)
                    + size(&b.ffn_norm)
                    + a.qkv.bytes()
                    + a.o.bytes()
                    + m.gate_up.bytes()
                    + m.down.bytes()
            })
            .sum();
        let head = if self.tied { 0 } else { self.head.bytes() };
        let embed = match &self.embed {
            Embedding::Dense(t) => size(t),
            Embedding::Quant(m) => m.bytes(),
        };
        embed + size(&self.norm) + head + blocks
    }
}

/// RMSNorm as llama.cpp computes it: the mean square accumulated in f64, the scale
/// `1/sqrt(mean + eps)` in f32, then `x * scale * w`. candle's kernel sums in f32; the
/// difference is tiny but it moves 8-bit activation rounding downstream.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return Ok(candle_nn::ops::rms_norm(x, w, eps)?);
    }
    let (n, d) = x.dims2()?;
    let mut v = x.flatten_all()?.to_vec1::<f32>()?;
    let w = w.to_vec1::<f32>()?;
    for row in v.chunks_exact_mut(d) {
        let sum: f64 = row.iter().map(|&a| (a * a) as f64).sum();
        let scale = 1.0 / ((sum / d as f64) as f32 + eps).sqrt();
        for (a, &g) in row.iter_mut().zip(&w) {
            *a = *a * scale * g;
        }
    }
    Ok(Tensor::from_vec(v, (n, d), x.device())?)
}

/// `(n, heads * head_dim)` → `(heads, n, head_dim)`, contiguous.
fn heads_first(x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let n = x.dim(0)?;
    Ok(x.reshape((n, heads, head_dim))?
        .transpose(0, 1)?
        .contiguous()?)
}
