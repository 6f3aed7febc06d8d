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
    /// The mean of `bm25` (scaled to [0, 1] per level) and `hidden` (clamped at 0).
    Hybrid,
    /// `bm25` of the node averaged with `bm25` of its whole chunk: a small node is ranked by
    /// the passage around it too (questions share few words with a 64-token leaf).
    Bm25chunk,
}

/// How the selection grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Per chunk, the paper's Algorithm 1: expand the better half at every level.
    Paper,
    /// Global best-first expansion under the total and the full-resolution budgets.
    Budget,
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
    /// The question's mean hidden state (for `hidden`, `hybrid`).
    pub hidden: &'a [f32],
    pub text: &'a str,
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
}

/// The budgets of `budget` (and the cap for `paper`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
            .chunks_exact(index.d)
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
    let bm25 = || -> Vec<f32> {
        let mut out = vec![0f32; chunks * per];
        for (level, idx) in index.bm25.iter().enumerate() {
            let s = idx.scores(query.text);
            let max = s.iter().copied().fold(0.0, f64::max);
            let width = 1 << level;
            for (i, v) in s.iter().enumerate() {
                let (chunk, at) = (i / width, i % width);
                if chunk < chunks {
                    out[chunk * per + node_number(level, at)] =
                        if max > 0.0 { (v / max) as f32 } else { 0.0 };
                }
            }
        }
        out
    };
    match scorer {
        Scorer::Paper => cos(index.paper, query.paper),
        Scorer::Hidden => cos(index.hidden, query.hidden),
        Scorer::Bm25 => bm25(),
        Scorer::Bm25chunk => {
            let b = bm25();
            b.iter()
                .enumerate()
                .map(|(i, &x)| 0.5 * x + 0.5 * b[i - i % per])
                .collect()
        }
        Scorer::Hybrid => {
            let h = cos(index.hidden, query.hidden);
            bm25()
                .iter()
                .zip(h)
                .map(|(b, h)| 0.5 * b + 0.5 * h.max(0.0))
                .collect()
        }
    }
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
        Policy::Budget => best_first(scores, shape, budget),
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

/// Start from every chunk at level 0 (dropping the worst chunks when they would leave no
/// room for `budget.fine` entries of refinement), then replace the best-scoring node by its
/// two children — or a deepest node by its full-resolution tokens — while both budgets hold.
///
/// A leaf read at full resolution makes its neighbours the next candidates: a sentence that
/// matches the question often continues (or starts) across a leaf boundary, and the words
/// that answer it share none of the question's.
fn best_first(scores: &[f32], shape: &Shape, budget: Budget) -> Vec<Selected> {
    let leaves = 1usize << shape.height;
    let chunks = shape.node_lens.len();
    // Score lent to a leaf (by chunk and leaf index) by a neighbour read in full.
    let mut lent: HashMap<(usize, usize), f32> = HashMap::new();
    let effective = |lent: &HashMap<(usize, usize), f32>, s: &Selected| -> f32 {
        let width = leaves >> s.level;
        (s.index * width..(s.index + 1) * width)
            .filter_map(|leaf| lent.get(&(s.chunk, leaf)).copied())
            .fold(s.score, f32::max)
    };
    let mut slots: Vec<Option<Selected>> = Vec::new();
    let mut used = 0;
    let mut fine = 0;
    let mut start: Vec<usize> = Vec::new();
    let coarse_room = budget
        .total
        .saturating_sub(budget.fine)
        .max(budget.total / 4);
    // A level kept at α = 1 counts against the full-resolution budget like a leaf.
    let fine_cost = |s: &Selected| if s.alpha == 1 { s.entries } else { 0 };
    let marks = |s: &Selected| {
        if s.alpha == 1 {
            2 * budget.separator
        } else {
            0
        }
    };
    for chunk in chunks_by_score(scores, shape) {
        let s = node(shape, scores, chunk, 0, 0, shape.alpha[0]);
        let cost = s.entries + marks(&s);
        if used + cost <= coarse_room && fine + fine_cost(&s) <= budget.fine {
            used += cost;
            fine += fine_cost(&s);
            start.push(slots.len());
            slots.push(Some(s));
        }
    }
    let mut heap: BinaryHeap<Item> = start
        .into_iter()
        .filter_map(|i| {
            slots[i].as_ref().map(|s| Item {
                score: s.score,
                slot: i,
            })
        })
        .collect();
    while let Some(Item { slot, score }) = heap.pop() {
        let Some(cur) = slots[slot].clone() else {
            continue;
        };
        if cur.alpha == 1 {
            continue;
        }
        let now = effective(&lent, &cur);
        if now > score {
            // A neighbour lent it a better score since it was queued.
            heap.push(Item { score: now, slot });
            continue;
        }
        if cur.level >= budget.fine_level.min(shape.height) {
            let len = shape.node_lens[cur.chunk][node_number(cur.level, cur.index)];
            let extra = len.saturating_sub(cur.entries) + 2 * budget.separator;
            let fits = used + extra <= budget.total && fine + len <= budget.fine;
            if fits {
                // Above the leaves, a whole passage at once: its halves read side by side,
                // not scattered.
                used += extra;
                fine += len;
                slots[slot] = Some(Selected {
                    alpha: 1,
                    entries: len,
                    ..cur
                });
                // A leaf's neighbours on either side, across chunk boundaries, come next
                // (one step only: a leaf read for its neighbour's sake lends nothing on).
                let global = cur.chunk * leaves + cur.index;
                let neighbours = if cur.level == shape.height && cur.score >= now {
                    vec![(global + 1, 0.999), (global.wrapping_sub(1), 0.998)]
                } else {
                    Vec::new()
                };
                for (next, factor) in neighbours {
                    if next >= chunks * leaves {
                        continue;
                    }
                    let key = (next / leaves, next % leaves);
                    let bid = now * factor;
                    if lent.get(&key).is_none_or(|&b| b < bid) {
                        lent.insert(key, bid);
                        let holder = slots.iter().position(|s| {
                            s.as_ref().is_some_and(|s| {
                                let width = leaves >> s.level;
                                s.chunk == key.0 && s.index == key.1 / width && s.alpha > 1
                            })
                        });
                        if let Some(h) = holder {
                            heap.push(Item {
                                score: bid,
                                slot: h,
                            });
                        }
                    }
                }
            }
            if fits || cur.level == shape.height {
                continue;
            }
        }
        let level = cur.level + 1;
        let a = shape.alpha[level];
        let kids = [
            node(shape, scores, cur.chunk, level, 2 * cur.index, a),
            node(shape, scores, cur.chunk, level, 2 * cur.index + 1, a),
        ];
        let cost: usize = kids.iter().map(|k| k.entries + marks(k)).sum();
        let kids_fine: usize = kids.iter().map(fine_cost).sum();
        // `used` always includes `cur.entries` (and `fine` its own, if any).
        if used - cur.entries + cost > budget.total
            || fine - fine_cost(&cur) + kids_fine > budget.fine
        {
            continue;
        }
        used = used + cost - cur.entries;
        fine = fine - fine_cost(&cur) + kids_fine;
        slots[slot] = None;
        for k in kids {
            heap.push(Item {
                score: effective(&lent, &k),
                slot: slots.len(),
            });
            slots.push(Some(k));
        }
    }
    slots
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
                    };
                    let sel = select(Policy::Budget, &scores, &shape, b);
                    let used: usize = sel.iter().map(|s| s.entries).sum();
                    let fine_used: usize =
                        sel.iter().filter(|s| s.alpha == 1).map(|s| s.entries).sum();
                    let marks = 2 * 6 * sel.iter().filter(|s| s.alpha == 1).count();
                    assert!(
                        used + marks <= total && fine_used <= fine,
                        "{a:?} {total}/{fine} from level {fine_level}: {used}/{fine_used}"
                    );
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
        };
        assert_eq!(full_leaves(20, 13, 5, budget), vec![(13, 3, 5)]);
    }
}
