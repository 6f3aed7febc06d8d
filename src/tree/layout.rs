//! Where the nodes of a chunk's binary tree lie and how many KV entries each keeps.
//!
//! Level 0 is the whole chunk; every node splits exactly in half (the left half takes the
//! smaller part of an odd length), so level `w` has `2^w` nodes. Nodes are numbered level by
//! level, left to right: node `(w, i)` is number `2^w − 1 + i`.

use std::ops::Range;

/// Nodes in a tree of `height` levels below the chunk.
pub fn nodes_per_chunk(height: usize) -> usize {
    (1 << (height + 1)) - 1
}

/// Number of node `(level, index)` in level-by-level order.
pub fn node_number(level: usize, index: usize) -> usize {
    (1 << level) - 1 + index
}

/// `(level, index)` of node number `n`.
pub fn node_at(n: usize) -> (usize, usize) {
    let level = (usize::BITS - 1 - (n + 1).leading_zeros()) as usize;
    (level, n + 1 - (1 << level))
}

/// Token spans (local to the chunk) of every node of a chunk of `len` tokens, in node order.
pub fn node_spans(len: usize, height: usize) -> Vec<Range<usize>> {
    let total = nodes_per_chunk(height);
    let mut spans = Vec::with_capacity(total);
    spans.push(0..len);
    let mut n = 0;
    while spans.len() < total {
        let s = spans[n].clone();
        n += 1;
        let mid = s.start + (s.end - s.start) / 2;
        spans.push(s.start..mid);
        spans.push(mid..s.end);
    }
    // Children were pushed in breadth-first order, which is level-by-level order.
    spans
}

/// KV entries a span of `len` tokens keeps at ratio `alpha` (the last group may be partial).
pub fn entries(len: usize, alpha: usize) -> usize {
    len.div_ceil(alpha.max(1))
}

/// For each node of `level`, its entry range within that level's downsampled rows
/// (the level keeps its nodes' entries one after the other).
pub fn level_rows(spans: &[Range<usize>], level: usize, alpha: usize) -> Vec<Range<usize>> {
    let first = node_number(level, 0);
    let mut at = 0;
    spans[first..first + (1 << level)]
        .iter()
        .map(|s| {
            let n = entries(s.len(), alpha);
            at += n;
            at - n..at
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_split_exactly_in_half_level_by_level() {
        let spans = node_spans(13, 2);
        assert_eq!(spans.len(), nodes_per_chunk(2));
        assert_eq!(spans, vec![0..13, 0..6, 6..13, 0..3, 3..6, 6..9, 9..13]);
        for n in 0..spans.len() {
            let (w, i) = node_at(n);
            assert_eq!(node_number(w, i), n);
        }
        assert_eq!(node_at(0), (0, 0));
        assert_eq!(node_at(6), (2, 3));
    }

    #[test]
    fn each_level_covers_the_chunk_once() {
        let spans = node_spans(517, 3);
        for level in 0..=3 {
            let first = node_number(level, 0);
            let level_spans = &spans[first..first + (1 << level)];
            assert_eq!(level_spans[0].start, 0);
            assert_eq!(level_spans.last().map(|s| s.end), Some(517));
            assert!(level_spans.windows(2).all(|w| w[0].end == w[1].start));
        }
    }

    #[test]
    fn rows_follow_the_nodes_with_partial_last_groups() {
        let spans = node_spans(13, 1);
        assert_eq!(level_rows(&spans, 1, 4), vec![0..2, 2..4]);
        assert_eq!(level_rows(&spans, 0, 4), vec![0..4]);
        assert_eq!(entries(0, 4), 0);
    }
}
