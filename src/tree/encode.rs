//! The lower model over chunks: per layer, keys (before RoPE) and values of every token, the
//! downsampled views of every level, and each node's search vectors (METHOD.md, "Build").
//!
//! Every chunk is encoded after the same **sink prefix** (the tokens that precede the
//! document in the upper model's prompt), attending causally within itself only, at the
//! positions it would have right after that prefix. The prefix's KV is computed once and
//! shared by every chunk, then dropped: it is not part of the tree.

use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::layout::{level_rows, node_spans, nodes_per_chunk};
use crate::model::{Forward, KvCache, Model, ModelError};

type Result<T> = std::result::Result<T, ModelError>;

/// How a node's tokens are reduced to one KV entry per α tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Downsample {
    /// The mean of each group of α entries.
    Mean,
    /// Every α-th entry, from the first (the official SharedLLM code).
    Strided,
}

/// `[tree]`: how the context tree is built (a change makes a new tree).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TreeSettings {
    /// Tokens per chunk (cut at a sentence end within ±10 %).
    pub chunk_tokens: usize,
    /// Levels below the chunk: level w has 2^w nodes.
    pub height: usize,
    /// Tokens per kept KV entry at each level, 0 (the chunk) to `height`.
    pub alpha: Vec<usize>,
    pub downsample: Downsample,
    /// Layers of the lower model whose KV is kept (M); 0 = all.
    pub lower_layers: usize,
    /// Layer whose mean hidden state is each node's `hidden` vector.
    pub vector_layer: usize,
    /// Chunks encoded together in one forward pass (and written as one file).
    pub batch_chunks: usize,
}

impl Default for TreeSettings {
    fn default() -> Self {
        Self {
            chunk_tokens: 512,
            height: 3,
            alpha: vec![32, 16, 8, 4],
            downsample: Downsample::Mean,
            lower_layers: 0,
            vector_layer: 12,
            batch_chunks: 4,
        }
    }
}

/// Everything that decides the tree's contents (stored with it; a change means a new tree).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeConfig {
    pub chunk_tokens: usize,
    pub height: usize,
    /// Tokens per entry for levels `0..=height`.
    pub alpha: Vec<usize>,
    pub downsample: Downsample,
    /// Layers whose KV is kept (M).
    pub layers: usize,
    pub vector_layer: usize,
    /// Whether every token's KV is kept (else only the levels).
    pub full_kv: bool,
    pub batch_chunks: usize,
    /// The sink prefix the chunks were encoded after.
    pub sink: Vec<u32>,
}

/// One chunk through the lower model.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedChunk {
    pub len: usize,
    /// `(layers, 2, len, kv_dim)`: keys before RoPE then values, per layer; empty when the
    /// tree keeps no full-resolution KV.
    pub full: Vec<f16>,
    /// Per level `w`: `(layers, 2, rows_w, kv_dim)`, the level's nodes one after the other.
    pub levels: Vec<Vec<f16>>,
    /// `(nodes, d_model)`: the layer-0 output at each node's last token (the paper's vector).
    pub paper: Vec<f32>,
    /// `(nodes, d_model)`: the mean output of `vector_layer` over each node's tokens.
    pub hidden: Vec<f32>,
}

/// Encodes chunks with a model's first layers after a shared sink prefix.
pub struct Encoder<'m> {
    model: &'m Model,
    cfg: TreeConfig,
    /// The sink prefix's KV in every layer run.
    sink: KvCache,
}

impl<'m> Encoder<'m> {
    pub fn new(model: &'m Model, cfg: TreeConfig) -> Result<Self> {
        let n_layer = model.config().n_layer;
        if cfg.layers == 0 || cfg.layers > n_layer || cfg.vector_layer >= n_layer {
            return Err(ModelError::Input(format!(
                "tree.lower_layers = {} and tree.vector_layer = {} must fit the model's \
                 {n_layer} layers (lower_layers ≤ {n_layer}, vector_layer < {n_layer})",
                cfg.layers, cfg.vector_layer
            )));
        }
        let mut sink = model.new_cache();
        if !cfg.sink.is_empty() {
            let positions: Vec<u32> = (0..cfg.sink.len() as u32).collect();
            let x = model.embed(&cfg.sink)?;
            let f = Forward {
                positions: &positions,
                segments: None,
                layers: 0..run_layers(&cfg),
                keep_kv: false,
                keep_hidden: &[],
                last_kv_only: false,
            };
            model.forward(&x, &f, &mut sink)?;
        }
        Ok(Self { model, cfg, sink })
    }

    pub fn config(&self) -> &TreeConfig {
        &self.cfg
    }

    /// Encode `chunks` (token ids each) in one forward pass, each attending only to the sink
    /// prefix and itself.
    pub fn encode(&self, chunks: &[&[u32]]) -> Result<Vec<EncodedChunk>> {
        let run = self.run(chunks, &[0, self.cfg.vector_layer])?;
        let d = self.model.config().d_model;
        let kv_dim = self.kv_dim();
        let mut out = Vec::with_capacity(chunks.len());
        let mut at = 0;
        for c in chunks {
            let rows = at..at + c.len();
            at += c.len();
            let spans = node_spans(c.len(), self.cfg.height);
            let full = if self.cfg.full_kv {
                gather_full(&run.kv, rows.clone(), kv_dim)
            } else {
                Vec::new()
            };
            let levels = (0..=self.cfg.height)
                .map(|w| {
                    downsample(
                        &run.kv,
                        rows.start,
                        &spans,
                        w,
                        self.cfg.alpha[w],
                        self.cfg.downsample,
                        kv_dim,
                    )
                })
                .collect();
            let mut paper = Vec::with_capacity(spans.len() * d);
            let mut hidden = Vec::with_capacity(spans.len() * d);
            for s in &spans {
                if s.is_empty() {
                    paper.extend(std::iter::repeat_n(0.0, d));
                    hidden.extend(std::iter::repeat_n(0.0, d));
                    continue;
                }
                let last = rows.start + s.end - 1;
                paper.extend_from_slice(&run.layer0[last * d..(last + 1) * d]);
                let mut mean = vec![0f32; d];
                for r in s.clone() {
                    let row = &run.vector[(rows.start + r) * d..(rows.start + r + 1) * d];
                    mean.iter_mut().zip(row).for_each(|(m, &x)| *m += x);
                }
                let inv = 1.0 / s.len() as f32;
                hidden.extend(mean.iter().map(|m| m * inv));
            }
            debug_assert_eq!(paper.len(), nodes_per_chunk(self.cfg.height) * d);
            out.push(EncodedChunk {
                len: c.len(),
                full,
                levels,
                paper,
                hidden,
            });
        }
        Ok(out)
    }

    /// Full-resolution KV `(layers, 2, end, kv_dim)` of the first `end` tokens of one chunk:
    /// what a tree without stored leaves recomputes when a question needs them.
    pub fn encode_full(&self, chunk: &[u32]) -> Result<Vec<f16>> {
        let run = self.run(&[chunk], &[])?;
        Ok(gather_full(&run.kv, 0..chunk.len(), self.kv_dim()))
    }

    fn kv_dim(&self) -> usize {
        let c = self.model.config();
        c.n_kv_head * c.head_dim
    }

    fn run(&self, chunks: &[&[u32]], keep_hidden: &[usize]) -> Result<Run> {
        let p = self.cfg.sink.len() as u32;
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut segments = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            tokens.extend_from_slice(c);
            positions.extend((0..c.len() as u32).map(|j| p + j));
            segments.extend(std::iter::repeat_n(i as u32, c.len()));
        }
        let mut cache = self.sink.fork()?;
        let f = Forward {
            positions: &positions,
            segments: Some(&segments),
            layers: 0..run_layers(&self.cfg),
            keep_kv: true,
            keep_hidden,
            // The last layer's output is not kept: its K and V are all the tree needs.
            last_kv_only: !keep_hidden.contains(&(run_layers(&self.cfg) - 1)),
        };
        let x = self.model.embed(&tokens)?;
        let out = self.model.forward(&x, &f, &mut cache)?;
        let flat = |t: &candle_core::Tensor| -> Result<Vec<f32>> {
            Ok(t.contiguous()?.flatten_all()?.to_vec1::<f32>()?)
        };
        let kv = out.kv[..self.cfg.layers]
            .iter()
            .map(|l| Ok((flat(&l.k)?, flat(&l.v)?)))
            .collect::<Result<Vec<_>>>()?;
        let hidden_of = |layer: usize| -> Result<Vec<f32>> {
            match out.hidden_at.iter().find(|(l, _)| *l == layer) {
                Some((_, h)) => flat(h),
                None => Ok(Vec::new()),
            }
        };
        Ok(Run {
            kv,
            layer0: hidden_of(0)?,
            vector: hidden_of(self.cfg.vector_layer)?,
        })
    }
}

/// Layers the lower model runs: those whose KV is kept, and at least up to the vector layer.
fn run_layers(cfg: &TreeConfig) -> usize {
    cfg.layers.max(cfg.vector_layer + 1)
}

/// One forward pass's outputs as plain vectors.
struct Run {
    /// Per layer kept: keys `(n, kv_dim)` before RoPE, values `(n, kv_dim)`.
    kv: Vec<(Vec<f32>, Vec<f32>)>,
    layer0: Vec<f32>,
    vector: Vec<f32>,
}

/// Rows `rows` of every kept layer as `(layers, 2, rows, kv_dim)` f16, layers in parallel.
fn gather_full(kv: &[(Vec<f32>, Vec<f32>)], rows: Range<usize>, kv_dim: usize) -> Vec<f16> {
    let per_layer = 2 * rows.len() * kv_dim;
    let mut out = vec![f16::ZERO; kv.len() * per_layer];
    out.par_chunks_mut(per_layer.max(1))
        .zip(kv.par_iter())
        .for_each(|(dst, (k, v))| {
            let (dk, dv) = dst.split_at_mut(rows.len() * kv_dim);
            let span = rows.start * kv_dim..rows.end * kv_dim;
            // Bulk conversion uses F16C where the CPU has it.
            dk.convert_from_f32_slice(&k[span.clone()]);
            dv.convert_from_f32_slice(&v[span]);
        });
    out
}

/// The rows of level `level` for one chunk whose first token is row `base` of `kv`, as
/// `(layers, 2, rows, kv_dim)` f16, layers in parallel.
fn downsample(
    kv: &[(Vec<f32>, Vec<f32>)],
    base: usize,
    spans: &[Range<usize>],
    level: usize,
    alpha: usize,
    how: Downsample,
    kv_dim: usize,
) -> Vec<f16> {
    let first = super::layout::node_number(level, 0);
    let nodes = &spans[first..first + (1 << level)];
    let rows = level_rows(spans, level, alpha).last().map_or(0, |r| r.end);
    let per_layer = 2 * rows * kv_dim;
    let mut out = vec![f16::ZERO; kv.len() * per_layer];
    out.par_chunks_mut(per_layer.max(1))
        .zip(kv.par_iter())
        .for_each(|(dst, (k, v))| {
            let mut acc = vec![0f32; kv_dim];
            let mut at = 0;
            for t in [k, v] {
                let row = |r: usize| &t[(base + r) * kv_dim..(base + r + 1) * kv_dim];
                for s in nodes {
                    let mut g = s.start;
                    while g < s.end {
                        let end = (g + alpha).min(s.end);
                        match how {
                            Downsample::Strided => acc.copy_from_slice(row(g)),
                            Downsample::Mean => {
                                acc.copy_from_slice(row(g));
                                for r in g + 1..end {
                                    acc.iter_mut().zip(row(r)).for_each(|(a, &x)| *a += x);
                                }
                                let inv = 1.0 / (end - g) as f32;
                                acc.iter_mut().for_each(|a| *a *= inv);
                            }
                        }
                        dst[at..at + kv_dim].convert_from_f32_slice(&acc);
                        at += kv_dim;
                        g = end;
                    }
                }
            }
            debug_assert_eq!(at, per_layer);
        });
    out
}
