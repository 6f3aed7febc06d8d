//! Query-dependent expansion: which nodes of which chunks go into the upper model, and at
//! what resolution (METHOD.md, "Search").
//!
//! Works on plain data (node lengths, vectors, BM25 indexes), so it is testable without a
//! model or a store, and the result says exactly what to inject.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use serde::{Deserialize, Serialize};

use super::layout::{entries, node_number, nodes_per_chunk};
use super::Bm25;

/// How nodes are scored against the question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scorer {
    /// Cosine of the layer-0 vectors (node's last token vs the prompt's last token).
    Paper,
    /// Cosine of mean hidden states (node vs question).
    Hidden,
    /// BM25 of the question's words in the node's text, per level.
    Bm25,
    /// `bm25` of the node averaged with `bm25` of its whole chunk: a small node is ranked by
    /// the passage around it too (questions share few words with a 64-token leaf).
    Bm25chunk,
    /// Cosine of sentence embeddings (all-MiniLM-L6-v2) of the node's text and the question.
    Dense,
    /// `bm25` and `dense` fused (`search.fusion`).
    Hybrid,
}

impl Scorer {
    /// Whether it ranks with sentence embeddings (and so needs the embedder).
    pub fn is_dense(self) -> bool {
        matches!(self, Self::Dense | Self::Hybrid)
    }
}

/// How `hybrid` fuses its two rankings, level by level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Fusion {
    /// The sum of both scores, each standardised over the level's nodes (z-scores).
    Zscore,
    /// Reciprocal-rank fusion: the sum of 1 / (60 + rank) in each ranking.
    Rrf,
}

/// How the selection grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Per chunk, the paper's Algorithm 1: expand the better half at every level.
    Paper,
    /// Global best-first expansion under the total and the full-resolution budgets.
    Budget,
    /// The best-ranked leaves first, at full resolution, while the fine budget lasts (the
    /// paths down to them opened on the way); then best-first coarse expansion of the rest.
    Ranked,
}

/// Where injected entries sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// Consecutive positions after the prompt prefix, in document order.
    Contiguous,
    /// The paper's chunk-level ids: every entry of the i-th chunk at one position.
    Chunk,
}

/// `[search]`: which nodes a question pulls in, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SearchSettings {
    pub scorer: Scorer,
    /// How `hybrid` fuses BM25 and dense scores.
    pub fusion: Fusion,
    /// Each leaf's score gains this share of its better neighbour's (0 = off).
    pub neighbours: f32,
    /// `ranked`: leaves read around each chosen one: 1 = alone, 2 = with its better
    /// neighbour, 3 = with both.
    pub window: usize,
    pub policy: Policy,
    /// Most injected entries; 0 = the model's window minus the prompt and the answer.
    pub budget: usize,
    /// Most entries at full resolution (`budget` policy).
    pub fine_budget: usize,
    /// The coarsest level read whole at full resolution (0 = whole chunks; the tree's
    /// height = single leaves): a node this fine or finer goes to α = 1 in one step.
    pub fine_level: usize,
    /// Put `rag`'s cut mark (`[…]`) where the injected text jumps next to a passage read at
    /// full resolution, so the model reads separate passages as separate.
    pub cut_marks: bool,
    /// Whether the passages chosen at full resolution are read again at question time as
    /// text, each run at its document-order positions after the coarse entries that precede
    /// it (the upper model prefills at most `fine_budget` tokens plus the cut marks), instead
    /// of injecting their stored KV, encoded chunk by chunk. Contiguous positions and M = N
    /// only.
    pub reread: Reread,
    /// Subtracted from the attention logit of every coarse entry (α > 1), in nats; 0 = off.
    /// The model was never trained on pooled keys and attends them more than the text they
    /// stand for, which drowns the passages read in full (measured: BENCHMARKS.md).
    pub coarse_bias: f32,
    pub positions: Positions,
}

impl Default for SearchSettings {
    fn default() -> Self {
        Self {
            scorer: Scorer::Bm25,
            fusion: Fusion::Zscore,
            neighbours: 0.0,
            window: 3,
            policy: Policy::Budget,
            budget: 1024,
            fine_budget: 256,
            fine_level: 3,
            cut_marks: true,
            reread: Reread::Auto,
            coarse_bias: 3.0,
            positions: Positions::Contiguous,
        }
    }
}

/// When passages are read again as text (`search.reread`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Reread {
    /// When the tree keeps no full-resolution KV (`store.full_kv`): stored leaves answer as
    /// well with the coarse bias, at a quarter of the time to first token.
    Auto,
    #[value(alias = "true")]
    Always,
    /// Inject stored leaves; a tree without them encodes the chosen chunks again.
    #[value(alias = "false")]
    Never,
}

impl<'de> Deserialize<'de> for Reread {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // `true` and `false` were this setting's values before `auto`: configs that still
        // say so keep working.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Flag(bool),
            Name(String),
        }
        Ok(match Written::deserialize(d)? {
            Written::Flag(true) => Reread::Always,
            Written::Flag(false) => Reread::Never,
            Written::Name(name) => match name.as_str() {
                "auto" => Reread::Auto,
                "always" | "true" => Reread::Always,
                "never" | "false" => Reread::Never,
                _ => {
                    return Err(serde::de::Error::unknown_variant(
                        &name,
                        &["auto", "always", "never"],
                    ))
                }
            },
        })
    }
}

/// The shape of the stored trees, as search needs it.
#[derive(Debug, Clone)]
pub struct Shape<'a> {
    pub height: usize,
    /// Tokens per entry, levels `0..=height`.
    pub alpha: &'a [usize],
    /// Per chunk, the token count of every node (node order).
    pub node_lens: &'a [Vec<usize>],
}

/// What a question is scored with.
#[derive(Debug, Clone, Default)]
pub struct Query<'a> {
    /// The prompt's last-token layer-0 vector (for `paper`).
    pub paper: &'a [f32],
    /// The question's mean hidden state (for `hidden`).
    pub hidden: &'a [f32],
    /// The question's sentence embedding, unit length (for `dense`, `hybrid`).
    pub dense: &'a [f32],
    pub text: &'a str,
    /// Words that count for BM25 at `context_weight` against the text's 1 (a follow-up
    /// question's previous turn).
    pub context: &'a str,
    pub context_weight: f32,
}

/// The node vectors and indexes to score against.
#[derive(Debug, Clone)]
pub struct Index<'a> {
    /// `(chunks × nodes, d)` each.
    pub paper: &'a [f32],
    pub hidden: &'a [f32],
    pub d: usize,
    /// One index per level, over that level's nodes chunk by chunk.
    pub bm25: Vec<&'a Bm25>,
    /// `(chunks × nodes, dense_d)` unit-length sentence embeddings (empty without them).
    pub dense: &'a [f32],
    pub fusion: Fusion,
}

/// The budgets of `budget` (and the cap for `paper`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Most injected entries in all.
    pub total: usize,
    /// Most entries at full resolution (α = 1).
    pub fine: usize,
    /// The coarsest level whose nodes are read whole at α = 1 (`budget` policy; the tree's
    /// height = leaf by leaf).
    pub fine_level: usize,
    /// Entries of the cut mark injected on either side of a node read at α = 1: charged to
    /// `total` for both sides, so the marks never take the injection over it.
    pub separator: usize,
    /// `ranked`: leaves read around each chosen one (1 = alone, 2 = with its better
    /// neighbour, 3 = with both).
    pub window: usize,
}

/// One node chosen for injection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Selected {
    pub chunk: usize,
    pub level: usize,
    /// Position within its level (left to right).
    pub index: usize,
    /// Tokens per entry; 1 = full resolution.
    pub alpha: usize,
    pub score: f32,
    /// Entries it injects.
    pub entries: usize,
}

/// Every node's score, `(chunks × nodes)`.
pub fn score(scorer: Scorer, index: &Index, query: &Query, shape: &Shape) -> Vec<f32> {
    let per = nodes_per_chunk(shape.height);
    let chunks = shape.node_lens.len();
    let cos = |table: &[f32], q: &[f32]| -> Vec<f32> {
        let qn = norm(q);
        table
            .chunks_exact(q.len().max(1))
            .map(|v| {
                let n = norm(v) * qn;
                if n > 0.0 {
                    dot(v, q) / n
                } else {
                    -1.0
                }
            })
            .collect()
    };
    // Raw BM25 of every node, in node order.
    let bm25 = || -> Vec<f32> {
        let mut out = vec![0f32; chunks * per];
        for (level, idx) in index.bm25.iter().enumerate() {
            let width = 1 << level;
            for (i, v) in idx
                .scores_with(query.text, query.context, query.context_weight as f64)
                .iter()
                .enumerate()
            {
                let (chunk, at) = (i / width, i % width);
                if chunk < chunks {
                    out[chunk * per + node_number(level, at)] = *v as f32;
                }
            }
        }
        out
    };
    let scaled_bm25 = || {
        let mut b = bm25();
        per_level(&mut b, shape, |v| {
            let max = v.iter().copied().fold(0.0, f32::max);
            v.iter_mut()
                .for_each(|x| *x = if max > 0.0 { *x / max } else { 0.0 });
        });
        b
    };
    match scorer {
        Scorer::Paper => cos(index.paper, query.paper),
        Scorer::Hidden => cos(index.hidden, query.hidden),
        Scorer::Bm25 => scaled_bm25(),
        Scorer::Bm25chunk => {
            let b = scaled_bm25();
            b.iter()
                .enumerate()
                .map(|(i, &x)| 0.5 * x + 0.5 * b[i - i % per])
                .collect()
        }
        Scorer::Dense => cos(index.dense, query.dense),
        Scorer::Hybrid => {
            let mut b = bm25();
            let mut d = cos(index.dense, query.dense);
            let fuse: fn(&mut [f32]) = match index.fusion {
                Fusion::Zscore => standardise,
                Fusion::Rrf => reciprocal_ranks,
            };
            per_level(&mut b, shape, fuse);
            per_level(&mut d, shape, fuse);
            b.iter().zip(&d).map(|(b, d)| b + d).collect()
        }
    }
}

/// Two rankings of the same passages fused by `fusion` (what `hybrid` does per level).
pub fn fuse(fusion: Fusion, a: &[f64], b: &[f64]) -> Vec<f64> {
    let f: fn(&mut [f32]) = match fusion {
        Fusion::Zscore => standardise,
        Fusion::Rrf => reciprocal_ranks,
    };
    let mut a: Vec<f32> = a.iter().map(|&x| x as f32).collect();
    let mut b: Vec<f32> = b.iter().map(|&x| x as f32).collect();
    f(&mut a);
    f(&mut b);
    a.iter().zip(&b).map(|(x, y)| (x + y) as f64).collect()
}

/// Apply `f` to the scores of each level's nodes (all chunks together).
fn per_level(scores: &mut [f32], shape: &Shape, f: impl Fn(&mut [f32])) {
    let per = nodes_per_chunk(shape.height);
    let chunks = shape.node_lens.len();
    for level in 0..=shape.height {
        let width = 1 << level;
        let at = |c: usize, i: usize| c * per + node_number(level, i);
        let mut v: Vec<f32> = (0..chunks)
            .flat_map(|c| (0..width).map(move |i| (c, i)))
            .map(|(c, i)| scores[at(c, i)])
            .collect();
        f(&mut v);
        for c in 0..chunks {
            for i in 0..width {
                scores[at(c, i)] = v[c * width + i];
            }
        }
    }
}

/// Scores as z-scores over `v` (all zero when they do not vary).
fn standardise(v: &mut [f32]) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let sd = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    v.iter_mut().for_each(|x| {
        *x = if sd > 0.0 {
            ((*x as f64 - mean) / sd) as f32
        } else {
            0.0
        }
    });
}

/// Scores as 1 / (60 + rank), rank 1 = best (the constant of Cormack et al. 2009).
fn reciprocal_ranks(v: &mut [f32]) {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    for (rank, i) in order.into_iter().enumerate() {
        v[i] = 1.0 / (61.0 + rank as f32);
    }
}

/// Add `weight` × the better of its two neighbours' scores to every leaf (across chunk
/// boundaries): a fact is often told over two leaves, and a leaf next to a strong match is
/// more likely to hold the answer than an isolated weak one.
pub fn with_neighbours(scores: &mut [f32], shape: &Shape, weight: f32) {
    if weight == 0.0 {
        return;
    }
    let per = nodes_per_chunk(shape.height);
    let leaves = 1usize << shape.height;
    let total = shape.node_lens.len() * leaves;
    let at = |g: usize| (g / leaves) * per + node_number(shape.height, g % leaves);
    let raw: Vec<f32> = (0..total).map(|g| scores[at(g)]).collect();
    for g in 0..total {
        let left = g.checked_sub(1).map(|l| raw[l]);
        let right = raw.get(g + 1).copied();
        if let Some(best) = left.into_iter().chain(right).reduce(f32::max) {
            scores[at(g)] = raw[g] + weight * best;
        }
    }
}

/// A node by `(chunk, level, index)`.
pub type NodeKey = (usize, usize, usize);

/// Keep `nodes` (the passages the turn before read) in the running: each scores at least
/// `weight` × the best score of its level.
pub fn keep_candidates(scores: &mut [f32], shape: &Shape, nodes: &[NodeKey], weight: f32) {
    let per = nodes_per_chunk(shape.height);
    let chunks = shape.node_lens.len();
    for &(chunk, level, index) in nodes {
        if chunk >= chunks || level > shape.height || index >= 1 << level {
            continue;
        }
        let best = (0..chunks)
            .flat_map(|c| (0..1usize << level).map(move |i| c * per + node_number(level, i)))
            .map(|i| scores[i])
            .fold(f32::NEG_INFINITY, f32::max);
        let at = chunk * per + node_number(level, index);
        if best > 0.0 {
            scores[at] = scores[at].max(weight * best);
        }
    }
}

/// Every leaf as `(chunk, leaf index)`, best score first (document order among equals).
pub fn ranked_leaves(scores: &[f32], shape: &Shape) -> Vec<(usize, usize)> {
    let per = nodes_per_chunk(shape.height);
    let leaves = 1usize << shape.height;
    let mut out: Vec<(usize, usize)> = (0..shape.node_lens.len())
        .flat_map(|c| (0..leaves).map(move |i| (c, i)))
        .collect();
    let s = |&(c, i): &(usize, usize)| scores[c * per + node_number(shape.height, i)];
    out.sort_by(|a, b| s(b).total_cmp(&s(a)).then(a.cmp(b)));
    out
}

/// A leaf in reading order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub chunk: usize,
    pub leaf: usize,
}

/// The leaves in the order `ranked` reads them: best first, each followed by the better of
/// its neighbours when `window` ≥ 2 and by the other one too when `window` ≥ 3 (a passage
/// that answers is often longer than one leaf: half the dev set's evidence spans two).
pub fn reading_order(scores: &[f32], shape: &Shape, window: usize) -> Vec<Reading> {
    let per = nodes_per_chunk(shape.height);
    let leaves = 1usize << shape.height;
    let total = shape.node_lens.len() * leaves;
    let score = |g: usize| scores[(g / leaves) * per + node_number(shape.height, g % leaves)];
    let mut taken = vec![false; total];
    let mut out = Vec::with_capacity(total);
    for (c, i) in ranked_leaves(scores, shape) {
        let g = c * leaves + i;
        if taken[g] {
            continue;
        }
        let mut sides: Vec<usize> = [g.checked_sub(1), Some(g + 1).filter(|&r| r < total)]
            .into_iter()
            .flatten()
            .collect();
        sides.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
        for n in std::iter::once(g).chain(sides.into_iter().take(window.saturating_sub(1))) {
            if !taken[n] {
                taken[n] = true;
                out.push(Reading {
                    chunk: n / leaves,
                    leaf: n % leaves,
                });
            }
        }
    }
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}

/// Choose the nodes to inject, in document order.
pub fn select(policy: Policy, scores: &[f32], shape: &Shape, budget: Budget) -> Vec<Selected> {
    let mut out = match policy {
        Policy::Paper => paper(scores, shape, budget),
        Policy::Budget => best_first(scores, shape, budget, true, budget.fine),
        Policy::Ranked => ranked(scores, shape, budget),
    };
    out.sort_by_key(|s| (s.chunk, node_span_order(s, shape)));
    out
}

/// Order of a node within its chunk by where its tokens start (then coarser first).
fn node_span_order(s: &Selected, shape: &Shape) -> (usize, usize) {
    let lens = &shape.node_lens[s.chunk];
    let first = node_number(s.level, 0);
    let start: usize = lens[first..first + s.index].iter().sum();
    (start, s.level)
}

fn node(
    shape: &Shape,
    scores: &[f32],
    chunk: usize,
    level: usize,
    index: usize,
    alpha: usize,
) -> Selected {
    let per = nodes_per_chunk(shape.height);
    let n = node_number(level, index);
    let len = shape.node_lens[chunk][n];
    Selected {
        chunk,
        level,
        index,
        alpha,
        score: scores[chunk * per + n],
        entries: entries(len, alpha),
    }
}

/// Chunk order by root score, best first.
fn chunks_by_score(scores: &[f32], shape: &Shape) -> Vec<usize> {
    let per = nodes_per_chunk(shape.height);
    let mut order: Vec<usize> = (0..shape.node_lens.len()).collect();
    order.sort_by(|&a, &b| scores[b * per].total_cmp(&scores[a * per]).then(a.cmp(&b)));
    order
}

/// Algorithm 1 of the paper in every chunk (keeping the best chunks when all would exceed
/// `budget.total`).
fn paper(scores: &[f32], shape: &Shape, budget: Budget) -> Vec<Selected> {
    let per = nodes_per_chunk(shape.height);
    let mut out = Vec::new();
    let mut used = 0;
    for chunk in chunks_by_score(scores, shape) {
        let mut picked = Vec::new();
        let mut at = 0; // index within the current level of the node being split
        for level in 1..=shape.height {
            let (l, r) = (2 * at, 2 * at + 1);
            let a = shape.alpha[level];
            let (sl, sr) = (
                scores[chunk * per + node_number(level, l)],
                scores[chunk * per + node_number(level, r)],
            );
            if level == shape.height {
                picked.push(node(shape, scores, chunk, level, l, a));
                picked.push(node(shape, scores, chunk, level, r, a));
            } else {
                // Keep the worse half at this level's ratio, go down the better one; with
                // equal scores (no query) the right half, as the paper does.
                let (keep, go) = if sl > sr { (r, l) } else { (l, r) };
                picked.push(node(shape, scores, chunk, level, keep, a));
                at = go;
            }
        }
        if shape.height == 0 {
            picked.push(node(shape, scores, chunk, 0, 0, shape.alpha[0]));
        }
        let cost: usize = picked.iter().map(|p| p.entries).sum();
        if used + cost <= budget.total {
            used += cost;
            out.extend(picked);
        }
    }
    out
}

/// `budget` with the best-ranked leaves put first: each leaf that still fits the fine
/// budget, in reading order, and every node on the path down to it, outrank all other nodes,
/// so best-first opens those paths and reads those leaves before spending the rest of the
/// budget on coarse context. The nodes keep their own scores in the result.
fn ranked(scores: &[f32], shape: &Shape, budget: Budget) -> Vec<Selected> {
    let per = nodes_per_chunk(shape.height);
    let h = shape.height;
    let a = shape.alpha;
    let mut priority = scores.to_vec();
    let mut fine = 0;
    // Entries the chosen leaves add over their chunks' roots: the paths opened down to them,
    // each leaf at α = 1 and its cut marks. Kept free when the roots are laid out.
    let mut reserve = 0;
    let mut opened = std::collections::HashSet::new();
    let mut rank = 0usize;
    // Above every real score: z-scores, cosines and BM25 ratios stay far below.
    let top = 1e6f32;
    for Reading { chunk: c, leaf: i } in reading_order(scores, shape, budget.window) {
        let lens = &shape.node_lens[c];
        let len = lens[node_number(h, i)];
        let mut cost = len - entries(len, a[h]) + 2 * budget.separator;
        let mut path = Vec::new();
        for level in 0..h {
            let at = i >> (h - level);
            if !opened.contains(&(c, level, at)) {
                let kid = |k| entries(lens[node_number(level + 1, k)], a[level + 1]);
                cost += kid(2 * at) + kid(2 * at + 1);
                cost -= entries(lens[node_number(level, at)], a[level]);
                path.push((c, level, at));
            }
        }
        if len == 0 || fine + len > budget.fine || reserve + cost > budget.total * 3 / 4 {
            continue;
        }
        fine += len;
        reserve += cost;
        opened.extend(path);
        for level in 0..=h {
            let n = c * per + node_number(level, i >> (h - level));
            priority[n] = priority[n].max(top - rank as f32);
        }
        rank += 1;
    }
    let mut out = best_first(&priority, shape, budget, false, reserve);
    for s in &mut out {
        s.score = scores[s.chunk * per + node_number(s.level, s.index)];
    }
    out
}

/// One candidate refinement, ordered by score.
#[derive(Debug)]
struct Item {
    score: f32,
    slot: usize,
}

impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    fn cmp(&self, o: &Self) -> Ordering {
        // Higher score first; among equals the earlier slot (document order).
        self.score.total_cmp(&o.score).then(o.slot.cmp(&self.slot))
    }
}

/// Best-first growth under the budgets (see [`best_first`]): what is selected so far, what
/// it costs, and the queue of nodes that may still be refined.
struct Fill<'a> {
    scores: &'a [f32],
    shape: &'a Shape<'a>,
    budget: Budget,
    leaves: usize,
    /// Selected nodes; a refined node's slot is emptied and its children appended.
    slots: Vec<Option<Selected>>,
    heap: BinaryHeap<Item>,
    /// Entries injected, and entries at full resolution.
    used: usize,
    fine: usize,
    /// Score lent to a leaf (by chunk and leaf index) by a neighbour read in full.
    lent: HashMap<(usize, usize), f32>,
}

impl Fill<'_> {
    /// Entries a node costs at full resolution (a level kept at α = 1 counts like a leaf).
    fn fine_cost(s: &Selected) -> usize {
        if s.alpha == 1 {
            s.entries
        } else {
            0
        }
    }

    /// The cut marks around a node read at full resolution.
    fn marks(&self, s: &Selected) -> usize {
        if s.alpha == 1 {
            2 * self.budget.separator
        } else {
            0
        }
    }

    /// A node's score, or the better one a neighbour lent to any leaf under it.
    fn effective(&self, s: &Selected) -> f32 {
        let width = self.leaves >> s.level;
        (s.index * width..(s.index + 1) * width)
            .filter_map(|leaf| self.lent.get(&(s.chunk, leaf)).copied())
            .fold(s.score, f32::max)
    }

    /// Every chunk that fits `room`, best first, at its coarsest level.
    fn seed(&mut self, room: usize) {
        for chunk in chunks_by_score(self.scores, self.shape) {
            let s = node(self.shape, self.scores, chunk, 0, 0, self.shape.alpha[0]);
            let cost = s.entries + self.marks(&s);
            if self.used + cost <= room && self.fine + Self::fine_cost(&s) <= self.budget.fine {
                self.used += cost;
                self.fine += Self::fine_cost(&s);
                self.heap.push(Item {
                    score: s.score,
                    slot: self.slots.len(),
                });
                self.slots.push(Some(s));
            }
        }
    }

    /// Read `cur` (in `slot`) whole at full resolution if it fits: above the leaves, a whole
    /// passage at once, its halves side by side, not scattered. With `lend`, a leaf read for
    /// its own score lends its neighbours a share of it.
    fn read_whole(&mut self, slot: usize, cur: &Selected, now: f32, lend: bool) -> bool {
        let len = self.shape.node_lens[cur.chunk][node_number(cur.level, cur.index)];
        let extra = len.saturating_sub(cur.entries) + 2 * self.budget.separator;
        if self.used + extra > self.budget.total || self.fine + len > self.budget.fine {
            return false;
        }
        self.used += extra;
        self.fine += len;
        self.slots[slot] = Some(Selected {
            alpha: 1,
            entries: len,
            ..cur.clone()
        });
        // One step only: a leaf read for its neighbour's sake lends nothing on.
        if lend && cur.level == self.shape.height && cur.score >= now {
            self.lend_neighbours(cur.chunk * self.leaves + cur.index, now);
        }
        true
    }

    /// Leaf `global` (numbered across chunks) was read in full: its neighbours on either
    /// side, across chunk boundaries, bid for a place with a share of its score `now`, and
    /// the nodes holding them are queued again at that score.
    fn lend_neighbours(&mut self, global: usize, now: f32) {
        let (leaves, all) = (self.leaves, self.shape.node_lens.len() * self.leaves);
        for (next, factor) in [(global + 1, 0.999), (global.wrapping_sub(1), 0.998)] {
            if next >= all {
                continue;
            }
            let key = (next / leaves, next % leaves);
            let bid = now * factor;
            if !self.lent.get(&key).is_none_or(|&b| b < bid) {
                continue;
            }
            self.lent.insert(key, bid);
            let holder = self.slots.iter().position(|s| {
                s.as_ref().is_some_and(|s| {
                    let width = leaves >> s.level;
                    s.chunk == key.0 && s.index == key.1 / width && s.alpha > 1
                })
            });
            if let Some(h) = holder {
                self.heap.push(Item {
                    score: bid,
                    slot: h,
                });
            }
        }
    }

    /// Replace `cur` (in `slot`) by its two children at the next level, if they fit.
    fn split(&mut self, slot: usize, cur: &Selected) {
        let level = cur.level + 1;
        let a = self.shape.alpha[level];
        let kids = [
            node(self.shape, self.scores, cur.chunk, level, 2 * cur.index, a),
            node(
                self.shape,
                self.scores,
                cur.chunk,
                level,
                2 * cur.index + 1,
                a,
            ),
        ];
        let cost: usize = kids.iter().map(|k| k.entries + self.marks(k)).sum();
        let kids_fine: usize = kids.iter().map(Self::fine_cost).sum();
        // `used` always includes `cur.entries` (and `fine` its own, if any).
        let used = self.used - cur.entries + cost;
        let fine = self.fine - Self::fine_cost(cur) + kids_fine;
        if used > self.budget.total || fine > self.budget.fine {
            return;
        }
        (self.used, self.fine) = (used, fine);
        self.slots[slot] = None;
        for k in kids {
            self.heap.push(Item {
                score: self.effective(&k),
                slot: self.slots.len(),
            });
            self.slots.push(Some(k));
        }
    }
}

/// Start from every chunk at level 0 (dropping the worst chunks when they would leave no
/// room for `reserve` entries of refinement), then replace the best-scoring node by its
/// two children — or a deepest node by its full-resolution tokens — while both budgets hold.
///
/// With `lend`, a leaf read at full resolution makes its neighbours the next candidates: a sentence that
/// matches the question often continues (or starts) across a leaf boundary, and the words
/// that answer it share none of the question's.
fn best_first(
    scores: &[f32],
    shape: &Shape,
    budget: Budget,
    lend: bool,
    reserve: usize,
) -> Vec<Selected> {
    let mut f = Fill {
        scores,
        shape,
        budget,
        leaves: 1usize << shape.height,
        slots: Vec::new(),
        heap: BinaryHeap::new(),
        used: 0,
        fine: 0,
        lent: HashMap::new(),
    };
    f.seed(budget.total.saturating_sub(reserve).max(budget.total / 4));
    while let Some(Item { slot, score }) = f.heap.pop() {
        let Some(cur) = f.slots[slot].clone() else {
            continue;
        };
        if cur.alpha == 1 {
            continue;
        }
        let now = f.effective(&cur);
        if now > score {
            // A neighbour lent it a better score since it was queued.
            f.heap.push(Item { score: now, slot });
            continue;
        }
        if cur.level >= budget.fine_level.min(shape.height)
            && (f.read_whole(slot, &cur, now, lend) || cur.level == shape.height)
        {
            continue;
        }
        f.split(slot, &cur);
    }
    f.slots
        .into_iter()
        .flatten()
        .filter(|s| s.entries > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::layout::node_spans;

    fn shape_of(lens: &[usize], height: usize) -> Vec<Vec<usize>> {
        lens.iter()
            .map(|&l| node_spans(l, height).iter().map(|s| s.len()).collect())
            .collect()
    }

    /// Check C: never over either budget; with both budgets ≥ the document, everything at
    /// full resolution.
    #[test]
    fn budget_never_exceeds_either_budget() {
        let lens = shape_of(&[512, 500, 530, 470, 512, 64], 3);
        let alpha = [32, 16, 8, 4];
        let shape = Shape {
            height: 3,
            alpha: &alpha,
            node_lens: &lens,
        };
        let per = nodes_per_chunk(3);
        let scores: Vec<f32> = (0..lens.len() * per)
            .map(|i| ((i * 7919) % 101) as f32 / 101.0)
            .collect();
        // Also with the deepest level kept at α = 1: it counts as full resolution too.
        let alpha_fine = [32, 16, 8, 1];
        for a in [&alpha[..], &alpha_fine[..]] {
            let shape = Shape {
                height: 3,
                alpha: a,
                node_lens: &lens,
            };
            for (total, fine) in [(60, 0), (200, 64), (400, 150), (1000, 300), (3000, 3000)] {
                for fine_level in 0..=3 {
                    let b = Budget {
                        total,
                        fine,
                        fine_level,
                        separator: 6,
                        window: 1,
                    };
                    for (policy, window) in [
                        (Policy::Budget, 1),
                        (Policy::Ranked, 1),
                        (Policy::Ranked, 3),
                    ] {
                        let b = Budget { window, ..b };
                        let sel = select(policy, &scores, &shape, b);
                        let used: usize = sel.iter().map(|s| s.entries).sum();
                        let fine_used: usize =
                            sel.iter().filter(|s| s.alpha == 1).map(|s| s.entries).sum();
                        let marks = 2 * 6 * sel.iter().filter(|s| s.alpha == 1).count();
                        assert!(
                            used + marks <= total && fine_used <= fine,
                            "{policy:?} {a:?} {total}/{fine} from level {fine_level}: {used}/{fine_used}"
                        );
                    }
                }
            }
        }
        let doc: usize = lens.iter().map(|l| l[0]).sum();
        let sel = select(
            Policy::Budget,
            &scores,
            &shape,
            Budget {
                total: doc,
                fine: doc,
                fine_level: 3,
                separator: 0,
                window: 1,
            },
        );
        assert!(sel.iter().all(|s| s.alpha == 1));
        assert_eq!(sel.iter().map(|s| s.entries).sum::<usize>(), doc);
        // Document order, no overlap: the leaves tile the document.
        assert_eq!(sel.len(), lens.len() * 8);
    }

    /// Check D: C = 1024, h = 3, α = (16, 8, 4) keeps C/8 entries per chunk along one path.
    #[test]
    fn paper_keeps_an_eighth_along_one_path() {
        let lens = shape_of(&[1024, 1024, 1024], 3);
        let alpha = [64, 16, 8, 4];
        let shape = Shape {
            height: 3,
            alpha: &alpha,
            node_lens: &lens,
        };
        let per = nodes_per_chunk(3);
        let mut scores = vec![0f32; 3 * per];
        // Chunk 1 prefers left, then right, then left.
        scores[per + node_number(1, 0)] = 1.0;
        scores[per + node_number(2, 1)] = 1.0;
        scores[per + node_number(3, 2)] = 1.0;
        let sel = select(
            Policy::Paper,
            &scores,
            &shape,
            Budget {
                total: 1 << 20,
                fine: 0,
                fine_level: 3,
                separator: 0,
                window: 1,
            },
        );
        for c in 0..3 {
            let mine: Vec<&Selected> = sel.iter().filter(|s| s.chunk == c).collect();
            assert_eq!(mine.iter().map(|s| s.entries).sum::<usize>(), 1024 / 8);
            assert_eq!(mine.len(), 4, "one sibling per level and both leaves");
        }
        let c1: Vec<(usize, usize)> = sel
            .iter()
            .filter(|s| s.chunk == 1)
            .map(|s| (s.level, s.index))
            .collect();
        // Kept: the right half at level 1, the left quarter of the left half at level 2, and
        // both level-3 halves of node (2, 1).
        assert_eq!(c1, vec![(2, 0), (3, 2), (3, 3), (1, 1)]);
        // No query (all equal): always the right half.
        let flat = vec![0f32; 3 * per];
        let sel = select(
            Policy::Paper,
            &flat,
            &shape,
            Budget {
                total: 1 << 20,
                fine: 0,
                fine_level: 3,
                separator: 0,
                window: 1,
            },
        );
        let c0: Vec<(usize, usize)> = sel
            .iter()
            .filter(|s| s.chunk == 0)
            .map(|s| (s.level, s.index))
            .collect();
        assert_eq!(c0, vec![(1, 0), (2, 2), (3, 6), (3, 7)]);
    }

    /// The nodes read at full resolution, `(chunk, level, index)`, when `chunks` chunks of
    /// 512 tokens score 0.1 except one path in chunk `hot` (down to leaf `leaf`) at 0.9.
    fn full_leaves(
        chunks: usize,
        hot: usize,
        leaf: usize,
        budget: Budget,
    ) -> Vec<(usize, usize, usize)> {
        let lens = shape_of(&vec![512; chunks], 3);
        let alpha = [32, 16, 8, 4];
        let shape = Shape {
            height: 3,
            alpha: &alpha,
            node_lens: &lens,
        };
        let per = nodes_per_chunk(3);
        let mut scores = vec![0.1f32; chunks * per];
        for level in 0..=3 {
            scores[hot * per + node_number(level, leaf >> (3 - level))] = 0.9;
        }
        select(Policy::Budget, &scores, &shape, budget)
            .iter()
            .filter(|s| s.alpha == 1)
            .map(|s| (s.chunk, s.level, s.index))
            .collect()
    }

    #[test]
    fn a_leaf_read_in_full_brings_its_neighbours() {
        // The best leaf is the last of chunk 2: its right neighbour is chunk 3's first leaf.
        let budget = Budget {
            total: 2000,
            fine: 192,
            fine_level: 3,
            separator: 0,
            window: 1,
        };
        assert_eq!(
            full_leaves(6, 2, 7, budget),
            vec![(2, 3, 6), (2, 3, 7), (3, 3, 0)]
        );
    }

    #[test]
    fn a_whole_half_is_read_when_it_fits() {
        let half = Budget {
            total: 2000,
            fine: 256,
            fine_level: 1,
            separator: 0,
            window: 1,
        };
        assert_eq!(full_leaves(6, 2, 7, half), vec![(2, 1, 1)]);
        // Too small for the half: its better quarter whole, then a leaf of the other one.
        let quarter = Budget { fine: 192, ..half };
        assert_eq!(full_leaves(6, 2, 7, quarter), vec![(2, 3, 4), (2, 2, 3)]);
    }

    #[test]
    fn the_best_leaf_reaches_full_resolution_first() {
        let budget = Budget {
            total: 20 * 16 + 200,
            fine: 64,
            fine_level: 3,
            separator: 0,
            window: 1,
        };
        assert_eq!(full_leaves(20, 13, 5, budget), vec![(13, 3, 5)]);
    }

    /// `ranked` reads the best leaves in rank order wherever they are, even in chunks whose
    /// roots score low, and reports each node's own score.
    #[test]
    fn ranked_reads_the_best_leaves_first() {
        let lens = shape_of(&[512; 8], 3);
        let alpha = [32, 16, 8, 4];
        let shape = Shape {
            height: 3,
            alpha: &alpha,
            node_lens: &lens,
        };
        let per = nodes_per_chunk(3);
        // Chunk roots favour chunk 0; the best leaves are in chunks 5 and 2.
        let mut scores = vec![0.1f32; 8 * per];
        scores[0] = 0.9;
        scores[5 * per + node_number(3, 6)] = 0.8;
        scores[2 * per + node_number(3, 1)] = 0.7;
        scores[per * 7 + node_number(3, 0)] = 0.6;
        let b = Budget {
            total: 8 * 16 + 400,
            fine: 128,
            fine_level: 3,
            separator: 0,
            window: 1,
        };
        let full = |b: Budget| -> Vec<(usize, usize, usize, f32)> {
            select(Policy::Ranked, &scores, &shape, b)
                .iter()
                .filter(|s| s.alpha == 1)
                .map(|s| (s.chunk, s.level, s.index, s.score))
                .collect()
        };
        assert_eq!(full(b), vec![(2, 3, 1, 0.7), (5, 3, 6, 0.8)]);
        assert_eq!(
            ranked_leaves(&scores, &shape)[..3],
            [(5, 6), (2, 1), (7, 0)]
        );
        // With a window of three, the best leaf comes with both its neighbours (the last
        // leaf of chunk 5 before the first of chunk 6 on a tie: document order).
        assert_eq!(
            reading_order(&scores, &shape, 3)[..4]
                .iter()
                .map(|r| (r.chunk, r.leaf))
                .collect::<Vec<_>>(),
            [(5, 6), (5, 5), (5, 7), (2, 1)]
        );
        let three = full(Budget {
            fine: 192,
            window: 3,
            ..b
        });
        let read: Vec<(usize, usize)> = three.iter().map(|x| (x.0, x.2)).collect();
        assert_eq!(read, vec![(5, 5), (5, 6), (5, 7)]);
    }

    #[test]
    fn neighbours_lend_a_share_of_the_better_score() {
        let lens = shape_of(&[64, 64], 1);
        let alpha = [2, 1];
        let shape = Shape {
            height: 1,
            alpha: &alpha,
            node_lens: &lens,
        };
        // Leaves in document order: 1.0, 0.0 | 0.5, 0.2 (node 0 of each chunk is its root).
        let mut scores = vec![9.0, 1.0, 0.0, 9.0, 0.5, 0.2];
        with_neighbours(&mut scores, &shape, 0.5);
        // Across the chunk boundary too; roots untouched.
        let want = [9.0, 1.0, 0.5, 9.0, 0.6, 0.45];
        assert!(
            scores.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{scores:?}"
        );
    }

    #[test]
    fn the_last_turn_s_passages_stay_candidates() {
        let lens = shape_of(&[64, 64], 1);
        let alpha = [2, 1];
        let shape = Shape {
            height: 1,
            alpha: &alpha,
            node_lens: &lens,
        };
        // Per chunk: root, leaf 0, leaf 1.
        let mut scores = vec![4.0, 1.0, 0.0, 2.0, 0.1, 0.8];
        keep_candidates(
            &mut scores,
            &shape,
            &[(0, 1, 1), (1, 1, 1), (1, 0, 0), (9, 1, 0)],
            0.5,
        );
        // Raised to half the best leaf (1.0) or root (4.0); never lowered; unknown skipped.
        assert_eq!(scores, vec![4.0, 1.0, 0.5, 2.0, 0.1, 0.8]);
    }

    #[test]
    fn fusion_adds_standardised_scores_or_reciprocal_ranks() {
        let z = fuse(Fusion::Zscore, &[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]);
        assert!(z.iter().all(|x| x.abs() < 1e-6), "{z:?}");
        let z = fuse(Fusion::Zscore, &[0.0, 0.0, 6.0], &[0.1, 0.3, 0.2]);
        assert!(z[2] > z[1] && z[1] > z[0], "{z:?}");
        let r = fuse(Fusion::Rrf, &[5.0, 1.0, 0.0], &[0.0, 1.0, 5.0]);
        assert!((r[0] - r[2]).abs() < 1e-9 && r[1] < r[0], "{r:?}");
        assert!((r[1] - 2.0 / 62.0).abs() < 1e-6, "{r:?}");
    }
}
