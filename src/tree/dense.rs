//! Dense node vectors: every leaf embedded from its text by the sentence embedder, every
//! coarser node the normalised mean of its leaves' vectors.
//!
//! A leaf (~64 model tokens) fits the embedder's 256 word pieces whole; a chunk (512 tokens)
//! would be cut at about half, so coarser nodes are summarised from their leaves instead of
//! embedded (which would also cost the whole embedding pass again per level).

use super::layout::{node_number, nodes_per_chunk};
use crate::model::{Embedder, ModelError};

/// `(chunks × nodes, dim)` vectors for chunks whose nodes (node order) span the byte ranges
/// `nodes` of `text`; `progress(done, total)` is told after each batch of leaves.
pub fn node_vectors(
    embedder: &Embedder,
    text: &str,
    nodes: &[Vec<(usize, usize)>],
    height: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f32>, ModelError> {
    let per = nodes_per_chunk(height);
    let leaves = 1usize << height;
    let dim = embedder.dim();
    let leaf_texts: Vec<&str> = nodes
        .iter()
        .flat_map(|c| (0..leaves).map(move |i| c[node_number(height, i)]))
        .map(|(a, b)| text.get(a..b).unwrap_or(""))
        .collect();
    let mut leaf_vecs = Vec::with_capacity(leaf_texts.len() * dim);
    // Slices of a few hundred leaves, so a long book reports progress as it goes.
    for part in leaf_texts.chunks(256) {
        leaf_vecs.extend(embedder.embed(part)?);
        progress(leaf_vecs.len() / dim, leaf_texts.len());
    }
    let mut out = vec![0f32; nodes.len() * per * dim];
    for c in 0..nodes.len() {
        for level in 0..=height {
            let width = leaves >> level;
            for i in 0..1 << level {
                let row = &mut out[(c * per + node_number(level, i)) * dim..][..dim];
                for leaf in i * width..(i + 1) * width {
                    let v = &leaf_vecs[(c * leaves + leaf) * dim..][..dim];
                    row.iter_mut().zip(v).for_each(|(r, x)| *r += x);
                }
                let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                if n > 0.0 {
                    row.iter_mut().for_each(|r| *r /= n);
                }
            }
        }
    }
    Ok(out)
}
