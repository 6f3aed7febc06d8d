//! The context tree: cutting a tokenized document into chunks at sentence ends with their
//! pages, the node layout of each chunk's binary tree, the lower model's encoding of chunks
//! into per-level KV and node vectors, and BM25 statistics.
//!
//! Knows documents (for pages), token ids and the model, never files on disk or the UI.

mod bm25;
mod chunk;
mod dense;
mod encode;
pub mod layout;
pub mod search;

pub use bm25::{level_indexes, terms, Bm25};
pub use chunk::{chunk, Chunk};
pub use dense::node_vectors;
pub use encode::{Downsample, EncodedChunk, Encoder, TreeConfig, TreeSettings};
