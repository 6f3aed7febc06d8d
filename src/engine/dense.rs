//! Dense search for a session: the sentence embedder, fetched and loaded when the scorer
//! needs it, and a tree's dense node vectors, read from the store or embedded once and kept.

use std::sync::Arc;
use std::time::Instant;

use super::session::{Progress, Stage};
use super::{DenseIndex, EngineError, TreeSession};
use crate::model::{self, Embedder, Llm, ModelChoice};
use crate::store::{self, Tree};
use crate::tree::search::Scorer;

/// Names the embedder a tree's dense vectors were made with (its weights' checksum).
const EMBEDDER_ID: &str = "all-MiniLM-L6-v2/53aa51172d14";

/// The embedder for `scorer`, fetched into the model's folder on first use and run on its
/// device; `None` when the scorer does not use it, or (said once through `say`) when it
/// cannot be fetched or loaded: search then ranks with BM25 alone.
pub fn load_embedder(
    scorer: Scorer,
    model: &ModelChoice,
    say: &mut dyn FnMut(&str),
) -> Option<Arc<Embedder>> {
    if !scorer.is_dense() {
        return None;
    }
    let loaded = model::ensure_embedder(&model.models_dir, say).and_then(|dir| {
        let device = model::select_device(model.device)?;
        Embedder::load(&dir, &device)
    });
    match loaded {
        Ok(e) => Some(Arc::new(e)),
        Err(e) => {
            say(&format!(
                "dense search is off, ranking with BM25 alone: {e}"
            ));
            None
        }
    }
}

/// `tree`'s dense node vectors: the stored ones, or embedded now (leaves from their text,
/// coarser nodes from their leaves) and stored beside the tree for the next time.
pub fn dense_index(
    tree: &Tree,
    embedder: &Arc<Embedder>,
    say: &mut dyn FnMut(&Progress),
) -> Result<DenseIndex, EngineError> {
    let plan = &tree.manifest().plan;
    let per = crate::tree::layout::nodes_per_chunk(plan.config.height);
    let nodes = plan.chunks.len() * per;
    let dim = embedder.dim();
    if let Some(vectors) = store::read_dense(tree.dir(), EMBEDDER_ID, nodes, dim) {
        return Ok(DenseIndex {
            embedder: embedder.clone(),
            vectors,
        });
    }
    let start = Instant::now();
    let spans: Vec<Vec<(usize, usize)>> = plan
        .chunks
        .iter()
        .map(|c| c.nodes.iter().map(|n| n.chars).collect())
        .collect();
    let mut progress = |done: usize, total: usize| {
        let secs = start.elapsed().as_secs_f64();
        let rate = done as f64 / secs.max(1e-9);
        say(&Progress {
            stage: Stage::Embed,
            done,
            total,
            tok_s: 0.0,
            eta_secs: (rate > 0.0).then(|| (total - done) as f64 / rate),
            message: format!("embedding passages for dense search: {done}/{total}"),
        });
    };
    let vectors = crate::tree::node_vectors(
        embedder,
        tree.text(),
        &spans,
        plan.config.height,
        &mut progress,
    )?;
    store::write_dense(tree.dir(), EMBEDDER_ID, &vectors, dim)?;
    Ok(DenseIndex {
        embedder: embedder.clone(),
        vectors,
    })
}

/// A session on `tree`, with dense search when `embedder` is given.
pub fn session<'a>(
    llm: &'a Llm,
    tree: Tree,
    embedder: Option<&Arc<Embedder>>,
    say: &mut dyn FnMut(&Progress),
) -> Result<TreeSession<'a>, EngineError> {
    let dense = embedder.map(|e| dense_index(&tree, e, say)).transpose()?;
    Ok(TreeSession::new(llm, tree)?.with_dense(dense))
}
